"""The embedded default: the whole job on the trained tiny Gemma-4 model, offline, in a few minutes.

``ecoquant demo`` takes the project's trained tiny Gemma-4 vision-language
model (vision and audio towers, PLE, KV-sharing; trained from scratch to read
the built-in basic pages, see :mod:`ecoquant.fixtures.tiny_vlm`), quantizes
its language stack to W4A16 four ways (RTN min-max, RTN MSE, GPTQ, AWQ),
checks each checkpoint against the base through transformers, evaluates base
and variants on evaluation pages the model never trained on, and writes the
report: scores and recovery per half, the 80% gate per variant, and the
plot. It needs no network and no arguments, so a new user sees every stage
work, with real numbers, before pointing ecoquant at a real model.

GPTQ and AWQ calibrate out of domain: on the shipped text corpus and on the
realistic charts and documents, never on the basic pages they are scored on.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from ecoquant.api import QuantizeConfig, QuantizeResult, quantize
from ecoquant.calibrate.data import CORPUS_SOURCE, CalibrationConfig
from ecoquant.eval.backends.base import generation_settings
from ecoquant.eval.runner import EvalConfig, RunRecord, run_eval
from ecoquant.export.verify import Verification, verify
from ecoquant.fixtures.tiny_vlm import tiny_vlm_path
from ecoquant.quantize.scheme import QuantScheme
from ecoquant.report import ReportFiles, render_report

#: Calibration for the demo's GPTQ and AWQ: 32 samples, half text, half images, out of domain.
DEMO_CALIBRATION = CalibrationConfig(source=CORPUS_SOURCE, num_samples=32, max_length=256, multimodal=True)

#: Variants the demo makes: name -> how.
DEMO_VARIANTS: MappingProxyType[str, QuantizeConfig] = MappingProxyType(
    {
        "rtn-minmax": QuantizeConfig(scheme=QuantScheme(observer="minmax")),
        "rtn-mse": QuantizeConfig(scheme=QuantScheme(observer="mse")),
        "gptq": QuantizeConfig(method="gptq", calibration=DEMO_CALIBRATION),
        "awq": QuantizeConfig(method="awq", calibration=DEMO_CALIBRATION),
    }
)

#: Evaluation pages per basic task (six tasks, one question each: 24 samples).
DEMO_PAGES = 4


@dataclass(frozen=True)
class DemoVariant:
    """One quantized variant of the demo and its check against the base."""

    name: str
    result: QuantizeResult
    verification: Verification


@dataclass(frozen=True)
class DemoResult:
    """Where the demo's base model and variants are."""

    base: Path
    variants: tuple[DemoVariant, ...]
    record: RunRecord
    report: ReportFiles


#: The demo's evaluation: the basic pages, short answers, greedy.
DEMO_EVAL = EvalConfig(
    suite="builtin-basic", size=DEMO_PAGES, generation=generation_settings(max_new_tokens=8), idle_seconds=0.0
)


def run_demo(out: Path, show_progress: bool = True) -> DemoResult:
    """Quantize the trained tiny model four ways into ``out``, verify, evaluate, report (replaces ``out``'s files)."""
    base = tiny_vlm_path()
    variants = []
    for name, config in DEMO_VARIANTS.items():
        config = dataclasses.replace(config, overwrite=True)
        result = quantize(base, out / name, config, show_progress=show_progress)
        variants.append(DemoVariant(name, result, verify(result.out, base)))
    record = run_eval(str(base), [str(v.result.out) for v in variants], DEMO_EVAL, show_progress=show_progress)
    record.save(out / "results.json")
    return DemoResult(base=base, variants=tuple(variants), record=record, report=render_report(record, out))
