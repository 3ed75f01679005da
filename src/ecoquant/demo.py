"""The embedded default: the whole job on the tiny Gemma-4 model, offline, in about a minute.

``ecoquant demo`` builds the project's tiny Gemma-4 checkpoint (vision and
audio towers, PLE, KV-sharing; random weights), quantizes its language stack
to W4A16 with RTN min-max and RTN MSE, checks each checkpoint against the
base through transformers, and prints where everything went. It needs no
network and no arguments, so a new user sees every stage work before
pointing ecoquant at a real model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ecoquant.api import QuantizeConfig, QuantizeResult, quantize
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


def run_demo(out: Path, show_progress: bool = True) -> DemoResult:
    """Build the tiny model, quantize it two ways into ``out``, verify each (overwrites ``out``'s variants)."""
    base = tiny_gemma4_path()
    variants = []
    for name, scheme in DEMO_VARIANTS.items():
        result = quantize(base, out / name, QuantizeConfig(scheme=scheme, overwrite=True), show_progress=show_progress)
        variants.append(DemoVariant(name, result, verify(result.out, base)))
    return DemoResult(base=base, variants=tuple(variants))
