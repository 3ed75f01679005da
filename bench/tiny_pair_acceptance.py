"""Acceptance of the tiny VLM's MTP assistant by target quantization and by k, measured (issue 30, item 7).

The pair is the one ecoquant ships: the trained tiny Gemma-4 VLM (``ecoquant fixtures tiny-vlm``) and the
assistant distilled from it in bf16 (``ecoquant fixtures tiny-vlm-assistant``, ``bench/train_tiny_assistant.py``).
Each target variant is made with ``ecoquant quantize``'s API and its method's defaults (observer, GPTQ
dampening and scale passes, as ``make_scheme_variant`` in ``bench/tiny_vlm_methods.py``); the calibrated
ones use the demo's calibration (out of domain for the basic pages). The assistant itself stays bf16: it
drafts from each quantized target's own hidden states and KV, which is the question.

Each variant then answers the basic pages' evaluation split (``--pages`` per task, six tasks, greedy)
through the transformers backend with ``--assistant`` at k = 1..4, one request at a time, and once without
it. Reported per (variant, k), summed over the requests, in vLLM's conventions:
mean accepted per step = accepted / target steps, acceptance rate = accepted / drafted, and whether every
answer equals the variant's own answer without the assistant.

Usage::

    uv run python bench/tiny_pair_acceptance.py --work /tmp/tiny-pair [--pages 1] [--ks 1,2,3,4] [--variants a,b]

Each variant's rows are kept in ``WORK/acceptance-VARIANT-pPAGES.json`` and reused by a rerun, so variants can
be measured by separate invocations; the table is printed from those files.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

#: Target variants: (method, scheme name), None for the bf16 target itself.
VARIANTS: dict[str, tuple[str, str] | None] = {
    "bf16": None,
    "rtn-w4a16": ("rtn", "w4a16"),
    "gptq-w4a16": ("gptq", "w4a16"),
    "awq-gptq-w4a16": ("awq-gptq", "w4a16"),
    "w8a8-int8": ("rtn", "w8a8-int8"),
    "w8a8-fp8": ("rtn", "w8a8-fp8"),
}


def make_variant(name: str, base: Path, work: Path) -> tuple[Path, float | None]:
    """The variant's folder (made once into ``work/name``) and how long making it took (None: reused or bf16)."""
    spec = VARIANTS[name]
    out = work / name
    if spec is None:
        return base, None
    if (out / "config.json").exists():
        return out, None
    from ecoquant.api import QuantizeConfig, quantize
    from ecoquant.demo import DEMO_CALIBRATION
    from ecoquant.quantize.defaults import default_dampening, default_observer, default_scale_passes
    from ecoquant.quantize.gptq import GPTQConfig
    from ecoquant.quantize.scheme import named_scheme

    method, scheme_name = spec
    scheme = named_scheme(scheme_name)
    if scheme.type != "float":
        scheme = replace(scheme, observer=default_observer(method))  # type: ignore[arg-type]
    config = QuantizeConfig(
        method=method,  # type: ignore[arg-type]
        scheme=scheme,
        calibration=DEMO_CALIBRATION,
        gptq=GPTQConfig(dampening_frac=default_dampening(method), scale_passes=default_scale_passes(method, True)),
    )
    t0 = time.perf_counter()
    quantize(base, out, config, show_progress=False)
    return out, time.perf_counter() - t0


def answer(model: Path, requests: list[Any], assistant: str | None, k: int) -> list[Any]:
    from ecoquant.eval.backends.base import generation_settings
    from ecoquant.eval.backends.transformers_backend import TransformersBackend, TransformersOptions

    options = TransformersOptions(device="cpu", batch_size=1, assistant=assistant, num_speculative_tokens=k)
    backend = TransformersBackend.load(model, options)
    try:
        return backend.generate(requests, generation_settings())
    finally:
        backend.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for the quantized targets and results.json")
    parser.add_argument("--pages", type=int, default=1, help="evaluation pages per basic task")
    parser.add_argument("--ks", default="1,2,3,4", help="draft lengths to measure")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="target variants to measure")
    parser.add_argument("--make-only", action="store_true", help="make the quantized targets and stop")
    args = parser.parse_args()

    from ecoquant.eval.backends.base import generation_settings
    from ecoquant.eval.economy import prompt_variant, suite_requests
    from ecoquant.eval.loaders import load_suite
    from ecoquant.fixtures.tiny_assistant import tiny_vlm_assistant_path
    from ecoquant.fixtures.tiny_vlm import tiny_vlm_path

    args.work.mkdir(parents=True, exist_ok=True)
    base = tiny_vlm_path()
    names, ks = args.variants.split(","), [int(k) for k in args.ks.split(",")]
    made = {name: make_variant(name, base, args.work) for name in names}
    print(json.dumps({n: s for n, (_, s) in made.items()}), flush=True)  # seconds to make each (None: reused)
    if args.make_only:
        return
    assistant = str(tiny_vlm_assistant_path())
    suite = load_suite("builtin-basic", size=args.pages)
    requests = [r for _, _, r in suite_requests(suite, prompt_variant("default"), generation_settings())]
    for name in names:
        done_path = args.work / f"acceptance-{name}-p{args.pages}.json"
        if done_path.exists():  # measured by an earlier run (variants can be measured by separate invocations)
            continue
        model = made[name][0]
        plain = [c.text for c in answer(model, requests, None, 1)]
        rows = [measure(name, k, answer(model, requests, assistant, k), plain) for k in ks]
        done_path.write_text(json.dumps(rows, indent=1) + "\n")
    print_table([r for name in names for r in json.loads((args.work / f"acceptance-{name}-p{args.pages}.json").read_text())])


def measure(name: str, k: int, done: list[Any], plain: list[str]) -> dict[str, Any]:
    """One (variant, k) row, summed over the requests."""
    steps = sum(c.target_steps for c in done)
    drafted = sum(c.drafted_tokens for c in done)
    accepted = sum(c.accepted_tokens for c in done)
    row = {
        "variant": name,
        "k": k,
        "requests": len(done),
        "tokens_out": sum(c.tokens_out for c in done),
        "target_steps": steps,
        "drafted": drafted,
        "accepted": accepted,
        "mean_accepted_per_step": accepted / steps if steps else 0.0,
        "acceptance_rate": accepted / drafted if drafted else 0.0,
        "same_answers": [c.text for c in done] == plain,
    }
    print(json.dumps(row), flush=True)
    return row


def print_table(rows: list[dict[str, Any]]) -> None:
    print("\n| target | k | requests | tokens out | target steps | drafted | accepted | mean accepted / step |"
          " acceptance rate | tokens / target step | answers as without the assistant |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['k']} | {r['requests']} | {r['tokens_out']} | {r['target_steps']} |"
              f" {r['drafted']} | {r['accepted']} | {r['mean_accepted_per_step']:.2f} | {r['acceptance_rate']:.2f} |"
              f" {1 + r['mean_accepted_per_step']:.2f} | {'yes' if r['same_answers'] else 'NO'} |")


if __name__ == "__main__":
    main()
