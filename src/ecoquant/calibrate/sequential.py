"""The layer walk: calibrate a decoder one layer at a time, in bounded memory.

1. Build the model on the meta device (no weights).
2. Capture (:mod:`ecoquant.calibrate.capture`): run the model's own forward
   with its decoder layers swapped out. Whatever runs before the layers is
   loaded on first use; Linears among them that are selected (Gemma-4's
   ``per_layer_model_projection``, whose input is the scaled embedding) are
   calibrated on this pass and replaced by their fake-quantized weights
   before a second pass records every layer's real arguments.
3. For each decoder layer: load its weights, run it on every batch while
   hooks feed the inputs of its selected Linears to the method, quantize,
   install the fake-quantized weights, and run it again: that output is the
   next layer's input, so each layer is calibrated on what the quantized
   model upstream really produces (GPTQ's error propagation). KV-shared
   layers read the K/V their donor layer stored in ``shared_kv_states`` on
   its quantized run, as at inference. Then the layer's weights are dropped.

Memory at any time: the current layer, the activations of all batches, the
per-layer arguments shared by all layers, and the donors' K/V. Per-layer
arguments (PLE slices) are spooled to disk. Quantized weights go to the work
folder as soon as a layer is done, so a killed run resumes: rerun with the
same work folder and the finished layers are read back and re-run once (with
their quantized weights, to produce the next layer's input) instead of being
calibrated again.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ecoquant.calibrate.capture import Batch, LayerInputs, lazy_outside, record_layer_calls, run_until_first_layer
from ecoquant.calibrate.lazy import CheckpointReader, Materializer
from ecoquant.calibrate.methods import Calibrator, Outcome, Session, Unit
from ecoquant.calibrate.result import CalibrationResult, ResultStore
from ecoquant.errors import EcoquantError
from ecoquant.export.safetensors_stream import DTYPES
from ecoquant.models.loading import model_class
from ecoquant.models.topology import Topology, decoder_layers, resolve_mappings
from ecoquant.progress import progress_bar
from ecoquant.quantize.primitives import dequantize
from ecoquant.quantize.scheme import QuantScheme


class StaleWorkError(EcoquantError):
    """The work folder holds another calibration than the one asked for (so it cannot be resumed)."""


#: The walk's fingerprint in its work folder: a rerun with the same one resumes.
WALK_FILE = "walk.json"

#: ``(layer, batch, args, kwargs, output)`` for each layer run that produces the next layer's input.
LayerObserver = Callable[[int, int, tuple[Any, ...], dict[str, Any], torch.Tensor], None]


class _InputTap:
    """Collects the inputs of some Linears during one batch, grouped by identity.

    Linears that read the very same tensor object (q, k and v read one
    normalised hidden state) form one stream: one Hessian, one activation cache.
    """

    def __init__(self, modules: dict[str, nn.Linear]) -> None:
        self.modules = modules
        self.seen: list[tuple[str, torch.Tensor]] = []
        self.handles: list[Any] = []

    def __enter__(self) -> _InputTap:
        for name, module in self.modules.items():
            self.handles.append(module.register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()
        self.seen.clear()

    def _hook(self, name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            self.seen.append((name, args[0]))

        return hook

    def flush(self, session: Session) -> None:
        """Hand this batch's inputs to the session, one call per stream."""
        streams: list[tuple[torch.Tensor, list[str]]] = []
        for name, x in self.seen:
            for tensor, names in streams:
                if tensor is x:
                    names.append(name)
                    break
            else:
                streams.append((x, [name]))
        self.seen.clear()
        for x, names in streams:
            session.observe(tuple(names), x)


def _first(out: Any) -> torch.Tensor:
    """A decoder layer's hidden-state output (transformers 5 returns a tensor; older layers a tuple)."""
    return out[0] if isinstance(out, tuple) else out


def _peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def build_meta_model(config: Any, dtype: torch.dtype) -> nn.Module:
    """The model's module tree on the meta device, in ``dtype``, in eval mode."""
    cls = model_class(config)
    with torch.device("meta"):
        model = cls._from_config(config, dtype=dtype)  # type: ignore[attr-defined]
    return model.eval()


class LayerWalk:
    """One calibration run over a model folder (see the module docstring).

    Args:
        path: model folder (config.json + safetensors).
        model: the model built on the meta device (:func:`build_meta_model`).
        topology: the family's facts (layer path, AWQ mappings).
        selection: full names of the Linears to quantize.
        calibrator: GPTQ, AWQ, or any :class:`Calibrator`.
        device: where layers run.
        dtype: compute dtype of the layers and activations.
        work_dir: where quantized weights, spool files and ``result.json`` go.
    """

    def __init__(
        self,
        path: Path,
        model: nn.Module,
        topology: Topology,
        selection: Sequence[str],
        calibrator: Calibrator,
        scheme: QuantScheme,
        device: torch.device,
        dtype: torch.dtype,
        work_dir: Path,
    ) -> None:
        self.path = path
        self.model = model
        self.topology = topology
        self.calibrator = calibrator
        self.scheme = scheme
        self.device = device
        self.dtype = dtype
        self.work_dir = work_dir
        self.layers_path, self.layers = decoder_layers(model, topology)
        aliases = dict(getattr(model, "all_tied_weights_keys", None) or {})
        self.reader = CheckpointReader(path, aliases)
        self.mat = Materializer(model, self.reader, device, dtype)
        self.modules = dict(model.named_modules())
        # transformers' ``PreTrainedModel.device`` is its first parameter's, and some forwards move tensors
        # there (Idefics3Model: ``embed_tokens(ids).to(self.device)``); loaded, it says the device, not meta.
        # Token tables are left to their row-by-row reader (the rows a table's device needs come with its first call).
        for sub in model.modules():
            first = next(sub.parameters(), None) if hasattr(sub, "base_model_prefix") else None
            if first is not None and first.device.type == "meta":
                owner = next(m for m in sub.modules() if any(p is first for p in m.parameters(recurse=False)))
                if not isinstance(owner, nn.Embedding):
                    self.mat.materialize(owner, recurse=False)
        for name in selection:
            if not isinstance(self.modules.get(name), nn.Linear):
                raise EcoquantError(f"{name} is selected but is not a Linear module of {type(model).__name__}")
        self.by_layer: list[list[str]] = [[] for _ in self.layers]
        self.outside: list[str] = []
        for name in selection:
            head = f"{self.layers_path}."
            if name.startswith(head):
                self.by_layer[int(name[len(head) :].split(".", 1)[0])].append(name)
            else:
                self.outside.append(name)
        self.source_dtype = {n: DTYPES[i.dtype] for n, i in self.reader.infos.items() if i.dtype in DTYPES}
        self.store = ResultStore(work_dir)
        self.stats: dict[str, Any] = {"units": {}, "timings_s": {}}
        self.selection = sorted(selection)
        self.resume = False

    # --- running things -----------------------------------------------------------------

    def _install(self, unit: Unit, outcome: Outcome) -> None:
        """Replace the unit's weights by what the quantized model will compute with.

        ``q * scale`` is formed in the compute dtype: exact in float32 (what the
        checkpoint loaded in float32 computes), and the very bf16 product bf16
        inference uses when computing in bf16.
        """
        for name, qw in outcome.quantized.items():
            module = unit.modules[name]
            module.weight.data = dequantize(qw.q, qw.scale.to(self.dtype), qw.zero_point, self.scheme).to(self.device)

    def _finish(self, key: str, unit: Unit, session: Session) -> None:
        """Quantize a unit whose inputs the session has seen; store and install the result."""
        outcome = session.finish()
        self._install(unit, outcome)
        self.store.write(key, outcome)
        self.stats["units"][unit.name] = dict(outcome.stats)

    def _resume(self, key: str, unit: Unit) -> bool:
        """Install a unit finished by an earlier, killed run of the same calibration; False if it did not finish.

        Its codes are read back and installed (and tensors it changed, AWQ's
        folded norms, put back into their modules), so the layers after it see
        exactly the inputs the uninterrupted run saw.
        """
        if not self.resume:
            return False
        outcome = self.store.read(key)
        if outcome is None:
            return False
        # Outside the layers, modules load on first use; these are written before that use.
        touched = {*unit.modules, *(full.rsplit(".", 1)[0] for full in outcome.replaced)}
        for name in touched:
            self.mat.materialize(self.modules[name], recurse=False)
        for full, value in outcome.replaced.items():
            module_name, attr = full.rsplit(".", 1)
            tensor = getattr(self.modules[module_name], attr)
            tensor.data = value.to(device=tensor.device, dtype=tensor.dtype)
        self._install(unit, outcome)
        self.stats["units"][unit.name] = dict(outcome.stats)
        self.stats.setdefault("resumed_units", []).append(unit.name)
        return True

    def _run_layer(self, i: int, inputs: LayerInputs, b: int) -> tuple[tuple[Any, ...], dict[str, Any], torch.Tensor]:
        args, kwargs = inputs.batches[b].layer_call(i, self.device)
        # Shared-state reads and writes count only while the layer itself runs.
        inputs.set_layer(i)
        try:
            out = _first(self.layers[i](*args, **kwargs))
        finally:
            inputs.set_layer(None)
        return args, kwargs, out

    # --- the walk -------------------------------------------------------------------------

    @torch.no_grad()
    def run(
        self,
        batches: Sequence[Batch],
        show_progress: bool = False,
        on_layer_output: LayerObserver | None = None,
    ) -> CalibrationResult:
        """Calibrate every selected Linear; return where the results are.

        When the work folder holds an earlier run of this very calibration
        (same :meth:`fingerprint`), its finished units are reused and the walk
        goes on from the first unit that did not finish.
        """
        if not batches:
            raise EcoquantError("calibration needs at least one sample")
        self._claim_work_dir(batches)
        t0 = time.perf_counter()
        n_layers = len(self.layers)
        total_tokens = sum(int(b["input_ids"].numel()) for b in batches)
        with progress_bar("calibrating", n_layers + 1, enabled=show_progress) as advance:
            inputs = self._capture(batches, total_tokens)
            advance("captured layer inputs")
            self.stats["timings_s"]["capture"] = round(time.perf_counter() - t0, 3)
            for i in range(n_layers):
                self._layer(i, inputs, total_tokens, len(batches), on_layer_output)
                advance(f"layer {i}")
        self.stats["kv_sharing"] = {str(k): v for k, v in sorted(inputs.kv_sharing().items())}
        self.stats["timings_s"]["total"] = round(time.perf_counter() - t0, 3)
        self.stats["peak_rss_bytes"] = _peak_rss_bytes()
        if self.device.type == "cuda":
            self.stats["peak_cuda_bytes"] = int(torch.cuda.max_memory_allocated(self.device))
        self.stats["calibration"] = {"batches": len(batches), "tokens": total_tokens}
        self.stats["layers_path"] = self.layers_path
        self.stats["compute_dtype"] = str(self.dtype).removeprefix("torch.")
        self.stats.update(self.calibrator.describe())
        result = CalibrationResult(
            work_dir=self.work_dir,
            scheme=self.scheme,
            quantized=dict(self.store.quantized),
            replaced=dict(self.store.replaced),
            stats=self.stats,
        )
        result.save()
        return result

    def fingerprint(self, batches: Sequence[Batch]) -> dict[str, Any]:
        """What decides every byte a walk writes: source tensors, selection, method, scheme, data, dtype, device."""
        data = hashlib.sha256()
        for batch in batches:
            for key in sorted(batch):
                value = batch[key]
                if isinstance(value, torch.Tensor):
                    data.update(key.encode())
                    data.update(str((value.dtype, tuple(value.shape))).encode())
                    data.update(value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        files = sorted({i.shard for i in self.reader.infos.values()})
        source = [(Path(f).name, Path(f).stat().st_size, Path(f).stat().st_mtime_ns) for f in files]
        return {
            "source": source,
            "tensors": sorted((n, i.dtype, list(i.shape)) for n, i in self.reader.infos.items()),
            "selection": self.selection,
            "method": self.calibrator.describe(),
            "scheme": self.scheme.to_dict(),
            "data_sha256": data.hexdigest(),
            "dtype": str(self.dtype),
            "device": self.device.type,
        }

    def _claim_work_dir(self, batches: Sequence[Batch]) -> None:
        """Record this walk's fingerprint, or find the same one and resume from it."""
        path = self.work_dir / WALK_FILE
        mine = json.loads(json.dumps(self.fingerprint(batches)))  # as JSON reads it back
        if path.is_file():
            theirs = json.loads(path.read_text())
            if theirs != mine:
                differs = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
                raise StaleWorkError(
                    f"{self.work_dir} holds a different calibration (its {', '.join(differs)} differ); "
                    "pass a new or empty work folder"
                )
            self.resume = True
            return
        tmp = path.with_name(f".{path.name}.partial")
        tmp.write_text(json.dumps(mine, indent=1))
        os.replace(tmp, path)

    def _capture(self, batches: Sequence[Batch], total_tokens: int) -> LayerInputs:
        """Calibrate the Linears before the layers, then record every layer's arguments."""
        with lazy_outside(self.model, self.layers, self.mat.before_call):
            if self.outside:
                unit = Unit(
                    name="before layers",
                    prefix="",
                    root=self.model,
                    modules={n: self.modules[n] for n in self.outside},  # type: ignore[misc]
                    source_dtype=self.source_dtype,
                    total_tokens=total_tokens,
                )

                if not self._resume("before_layers", unit):
                    session = self.calibrator.begin(unit)
                    # The session sees each batch as it goes; inputs are not kept.
                    with _InputTap(unit.modules) as tap:
                        run_until_first_layer(
                            self.model, self.layers, batches, self.device, on_batch=lambda b: tap.flush(session)
                        )
                    self._finish("before_layers", unit, session)
            inputs = record_layer_calls(self.model, self.layers, batches, self.device, self.work_dir / "spool")
        # Everything outside the layers is done with: drop it (layers are still on meta).
        self.stats["embedding_rows"] = {self.mat.names[k]: t.rows for k, t in self.mat.tables.items()}
        self.mat.release(self.model)
        return inputs

    def _layer(
        self, i: int, inputs: LayerInputs, total_tokens: int, n_batches: int, on_layer_output: LayerObserver | None
    ) -> None:
        t = time.perf_counter()
        layer = self.layers[i]
        self.mat.materialize(layer)
        names = self.by_layer[i]
        if names:
            prefix = f"{self.layers_path}.{i}."
            mappings = resolve_mappings(layer, self.topology.awq_mappings)
            unit = Unit(
                name=f"layer {i}",
                prefix=prefix,
                root=layer,
                modules={n: self.modules[n] for n in names},  # type: ignore[misc]
                source_dtype=self.source_dtype,
                mappings=mappings,
                no_clip=frozenset(prefix + n for n in self.topology.awq_no_clip),
                total_tokens=total_tokens,
                run_batch=lambda b: self._run_layer(i, inputs, b)[2],
            )

            if not self._resume(f"layer_{i:04d}", unit):
                session = self.calibrator.begin(unit)
                with _InputTap(unit.modules) as tap:
                    for b in range(n_batches):
                        self._run_layer(i, inputs, b)
                        tap.flush(session)
                t_quant = time.perf_counter()
                self._finish(f"layer_{i:04d}", unit, session)
                # The part of the layer's time that does not grow with calibration tokens.
                self.stats.setdefault("quantize_s", {})[f"layer {i}"] = round(time.perf_counter() - t_quant, 3)
        for b in range(n_batches):
            args, kwargs, out = self._run_layer(i, inputs, b)
            if on_layer_output is not None:
                on_layer_output(i, b, args, kwargs, out)
            inputs.batches[b].hidden = out
        self.mat.release(layer)
        self.stats["timings_s"][f"layer {i}"] = round(time.perf_counter() - t, 3)
