"""Where GPTQ's time goes on Gemma-3 270M: layer forwards, Hessian accumulation, the per-Linear solve, statistics.

Runs ecoquant's layer-sequential GPTQ (act-order; observer, scale passes and
compute dtype as given, min-max / 1 / float32 unless told) on the shipped corpus
with timers wrapped around the functions the engine calls, and prints one line
per part (the observer's and the pass check's lines are parts of the solve's). Point ``PYTHONPATH`` at another checkout's ``src`` to
time that version of the code with the same script (how "before" was measured):

    uv run python bench/gptq_profile.py --samples 32
    uv run python bench/gptq_profile.py --samples 32 --observer hessian --scale-passes 2 --dtype bfloat16
    git worktree add /tmp/ecoquant-old <commit> && PYTHONPATH=/tmp/ecoquant-old/src uv run python bench/gptq_profile.py --samples 32
"""

from __future__ import annotations

import argparse
import collections
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

TIMES: collections.Counter[str] = collections.Counter()


def timed(owner: Any, name: str, label: str) -> None:
    """Replace ``owner.name`` by a wrapper that adds its wall time to ``TIMES[label]``."""
    inner: Callable[..., Any] = getattr(owner, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            TIMES[label] += time.perf_counter() - t

    setattr(owner, name, wrapper)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--observer", default="minmax", help="minmax, mse, grid or hessian")
    p.add_argument("--scale-passes", type=int, default=1)
    p.add_argument("--dtype", default="float32", help="compute dtype of the calibration forwards")
    args = p.parse_args()

    import torch

    import ecoquant
    import ecoquant.calibrate.methods as methods
    import ecoquant.quantize.gptq as gptq
    import ecoquant.quantize.rtn as rtn
    import ecoquant.calibrate.sequential as sequential
    from ecoquant.calibrate.data import CalibrationConfig, load_calibration
    from ecoquant.calibrate.run import calibrate
    from ecoquant.fixtures.gemma3_gguf import gemma3_270m_path
    from ecoquant.plan import plan_model
    from ecoquant.quantize.gptq import GPTQConfig
    from ecoquant.quantize.scheme import QuantScheme

    timed(methods, "accumulate_hessian", "Hessian accumulation")
    timed(methods, "gptq_quantize", "GPTQ solve (per Linear)")
    timed(methods, "rtn_quantize", "statistics: RTN for comparison")
    timed(methods, "_relative_losses", "statistics: relative losses")
    for owner in (gptq, rtn):  # the observer, wherever it is called from (inside the solve and the RTN line)
        timed(owner, "choose_qparams", "  observer (scale choice), all calls")
    timed(sequential.LayerWalk, "_run_layer", "layer forwards (both passes)")

    base = gemma3_270m_path()
    from transformers import AutoTokenizer

    cal = load_calibration(base, CalibrationConfig(source="corpus", num_samples=args.samples, max_length=args.seq_len),
                           tokenizer=AutoTokenizer.from_pretrained(base))
    plan = plan_model(base, preset="text-decoder")
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        calibrate(base, method="gptq", selection=plan.selection, batches=cal.batches, work_dir=Path(d) / "w",
                  scheme=QuantScheme(observer=args.observer),
                  gptq=GPTQConfig(act_order=True, scale_passes=args.scale_passes), dtype=getattr(torch, args.dtype))
    total = time.perf_counter() - t
    print(f"ecoquant from {Path(ecoquant.__file__).parent}; {args.samples} x {args.seq_len} calibration tokens; "
          f"observer {args.observer}, {args.scale_passes} scale pass(es), {args.dtype} forwards")
    print(f"| part | seconds | share |\n|---|---:|---:|\n| total calibrate() | {total:.1f} | 100% |")
    for label, secs in TIMES.most_common():
        print(f"| {label} | {secs:.1f} | {100 * secs / total:.0f}% |")
    rest = total - sum(v for k, v in TIMES.items() if not k.startswith("  "))
    print(f"| everything else (loading, capture, install, writing) | {rest:.1f} | {100 * rest / total:.0f}% |")


if __name__ == "__main__":
    main()
