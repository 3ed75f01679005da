"""The embedded default: the whole job on the tiny Gemma-4 model, offline, in about a minute.

``ecoquant demo`` builds the project's tiny Gemma-4 checkpoint (vision and
audio towers, PLE, KV-sharing; random weights), quantizes its language stack
to W4A16 with RTN min-max and RTN MSE, checks each checkpoint against the
base through transformers, evaluates base and variants on a slice of the
built-in document/chart suite, and writes the report (table and plot). It
needs no network and no arguments, so a new user sees every stage work
before pointing ecoquant at a real model. The tiny model's weights are
random: its answers, and so its scores, mean nothing; the plumbing is real.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ecoquant.api import QuantizeConfig, QuantizeResult, quantize
from ecoquant.eval.backends.base import generation_settings
from ecoquant.eval.runner import EvalConfig, run_eval
from ecoquant.report import ReportFiles, render_report
from ecoquant.export.verify import Verification, verify
from ecoquant.fixtures.tiny_gemma4 import tiny_gemma4_path
from ecoquant.quantize.scheme import QuantScheme

#: Variants the demo makes: name -> scheme.
DEMO_VARIANTS: dict[str, QuantScheme] = {
    "rtn-minmax": QuantScheme(observer="minmax"),
    "rtn-mse": QuantScheme(observer="mse"),
}


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
    report: ReportFiles


#: The demo's evaluation: one sample per built-in task, short answers, greedy.
DEMO_EVAL = EvalConfig(suite="builtin", limit=1, generation=generation_settings(max_new_tokens=8), idle_seconds=0.0)


def run_demo(out: Path, show_progress: bool = True) -> DemoResult:
    """Build the tiny model, quantize it two ways into ``out``, verify, evaluate, report (replaces ``out``'s files)."""
    base = tiny_gemma4_path()
    variants = []
    for name, scheme in DEMO_VARIANTS.items():
        result = quantize(base, out / name, QuantizeConfig(scheme=scheme, overwrite=True), show_progress=show_progress)
        variants.append(DemoVariant(name, result, verify(result.out, base)))
    record = run_eval(str(base), [str(v.result.out) for v in variants], DEMO_EVAL, show_progress=show_progress)
    record.save(out / "results.json")
    return DemoResult(base=base, variants=tuple(variants), report=render_report(record, out))
