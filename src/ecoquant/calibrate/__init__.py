"""Layer-sequential calibration (GPTQ, AWQ) for any transformers decoder, without graph tracing.

* :mod:`~ecoquant.calibrate.run` -- the entry point, :func:`~ecoquant.calibrate.run.calibrate`.
* :mod:`~ecoquant.calibrate.data` -- calibration samples and the recipe's calibration block.
* :mod:`~ecoquant.calibrate.capture` -- each decoder layer's real arguments, from the model's own forward.
* :mod:`~ecoquant.calibrate.sequential` -- the walk, one layer in memory at a time.
* :mod:`~ecoquant.calibrate.lazy` -- weights loaded from safetensors on demand.
* :mod:`~ecoquant.calibrate.methods` -- GPTQ and AWQ as the walk calls them.
* :mod:`~ecoquant.calibrate.result` -- quantized weights on disk, served to the exporter.

Nothing is imported here, so that ``import ecoquant.calibrate`` stays cheap.
"""
