"""Calibration sized to the model: as many tokens as measurably help, no more.

GPTQ's Hessian for a Linear of ``d`` inputs is ``d x d``; it is well
estimated once the calibration has a few times ``d`` tokens, and more tokens
then change the quantized weights below anything the output can tell. The
seed's 256 windows of 2048 tokens (524k tokens) were chosen for 4-8B models;
on the shipped tiny VLM (``d`` = 64) they cost 245 s of GPTQ and 460 s of
AWQ per module set on 2 cores and, measured, buy nothing over a few
thousand tokens.

The rule is a table by the size of the language stack (its parameters,
from the checkpoint's safetensors headers, so no weights are read):
:data:`CALIBRATION_TIERS`, each entry with the measurement behind it
(``bench/calib_size.py``; the numbers are in bench/RESULTS.md, section
"Calibration sized to the model"). ``ecoquant optimize``'s staged search
calibrates with :func:`sized_calibration`; ``--calib-samples`` and
``--calib-length`` override it, and ``ecoquant quantize`` keeps the seed's
default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

from ecoquant.calibrate.data import CalibrationConfig


@dataclass(frozen=True)
class CalibrationTier:
    """Models with at most ``max_params`` parameters calibrate on ``samples`` windows of ``length`` tokens."""

    max_params: float
    samples: int
    length: int
    measured: str

    @property
    def tokens(self) -> int:
        return self.samples * self.length


CALIBRATION_TIERS: tuple[CalibrationTier, ...] = (
    CalibrationTier(
        50e6,
        32,
        256,
        "tiny VLM (6.3M parameters, d=64): GPTQ's text KL and answer-token KL at 32 x 256 within the spread of "
        "two calibration draws of the same size, and no lower at 256 x 2048 (64x the tokens, about 20x the GPTQ time)",
    ),
    CalibrationTier(
        1e9,
        128,
        512,
        "Gemma-3 270M (d=640): 128 x 512 is issue 4's calibration, where ecoquant's GPTQ matched llmcompressor's; "
        "16 x 512 is measurably worse (bench/RESULTS.md)",
    ),
    CalibrationTier(
        math.inf,
        256,
        2048,
        "the seed's default for 4-8B models (llmcompressor's examples); not re-measured here (no GPU)",
    ),
)


def parameter_count(model: Path) -> int:
    """Parameters of a local checkpoint, from its safetensors headers (nothing is loaded)."""
    from ecoquant.models.loading import tensor_infos

    return sum(math.prod(t.shape) for t in tensor_infos(Path(model)))


def calibration_tier(params: int) -> CalibrationTier:
    return next(t for t in CALIBRATION_TIERS if params <= t.max_params)


def sized_calibration(
    model: Path, base: CalibrationConfig | None = None, *, samples: int | None = None, length: int | None = None
) -> CalibrationConfig:
    """``base`` (default: the seed's source and seed) with the tier's samples and length, unless given."""
    tier = calibration_tier(parameter_count(model))
    base = base or CalibrationConfig()
    return replace(base, num_samples=samples or tier.samples, max_length=length or tier.length)
