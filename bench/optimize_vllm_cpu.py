"""``ecoquant optimize --backend vllm`` on the trained tiny VLM, served by vLLM's CPU build as the organizers serve.

Every model (the bf16 base and each candidate) is served by its own ``vllm
serve --config``, warmed up, and timed over the whole suite; this prints each
candidate's wall time and output tokens as ratios to the base's, measured in
the same run, with the gate and the pick. There is no NVML device here, so the
ranking is by wall time (said in the output). On a 2-core CPU and a 12 MB
model, wall time is mostly vLLM's per-request overhead: the run shows the
procedure working through vLLM end to end, not what int4 saves on a GPU.

Usage::

    uv run python bench/optimize_vllm_cpu.py --work /tmp/opt-vllm \\
        --vllm-python ~/.cache/ecoquant/vllm-cpu-env/bin/python [--size 4]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--vllm-python", type=Path, required=True)
    parser.add_argument("--size", type=int, default=4, help="basic pages per task (6 tasks)")
    args = parser.parse_args()

    from ecoquant.calibrate.data import CORPUS_SOURCE
    from ecoquant.eval.backends.base import generation_settings
    from ecoquant.eval.runner import EvalConfig
    from ecoquant.fixtures.tiny_vlm import tiny_vlm_path
    from ecoquant.optimize import OptimizeConfig, optimize
    from ecoquant.optimize.grid import grid_from_mapping

    os.environ["HF_HUB_OFFLINE"] = "1"
    grid = grid_from_mapping(
        {
            "calibration": {"source": CORPUS_SOURCE, "num_samples": 32, "max_length": 256, "multimodal": True},
            "grid": {"method": ["rtn", "gptq", "awq"], "response": ["default", "short"]},
        },
        "bench grid",
    )
    config = OptimizeConfig(
        out=args.work,
        grid=grid,
        backend="vllm",
        vllm_python=args.vllm_python,
        eval=EvalConfig(suite="builtin-basic", size=args.size, generation=generation_settings(max_new_tokens=16), idle_seconds=0.0),
    )
    t0 = time.perf_counter()
    result = optimize(tiny_vlm_path(), config)
    total = time.perf_counter() - t0
    record = result.record
    base = next(r for r in record.runs if r.role == "base")
    print(f"\n{len(record.runs)} models, each served by vLLM {base.backend.get('vllm')} ({base.backend.get('distribution')}),"
          f" {base.requests} requests per model, whole run {total / 60:.1f} min\n")
    print("| model | doc | image | mean recovery | wall s | wall vs base | output tokens | tokens vs base | decision |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    decisions = {s.name: ("**pick**" if s.name == result.choice.pick else ("passes" if s.passed else s.why)) for s in result.choice.standings}
    for run in record.runs:
        rec = None
        if run.role != "base":
            rec = sum(run.suite_scores[h] / base.suite_scores[h] for h in base.suite_scores) / len(base.suite_scores)
        print(
            f"| {run.label} | {run.suite_scores['doc']:.3f} | {run.suite_scores['image']:.3f} | "
            f"{'—' if rec is None else f'{rec:.1%}'} | {run.wall_time_s:.2f} | {run.wall_time_s / base.wall_time_s:.2f} | "
            f"{run.tokens_out} | {run.tokens_out / base.tokens_out:.2f} | {decisions.get(run.label, 'base')} |"
        )
    for f in record.failures:
        print(f"| {f.label} | failed at {f.stage}: {f.error.splitlines()[0]} |")
    print(f"\n{result.choice.summary()}")
    print(f"submission: {result.submission}")


if __name__ == "__main__":
    main()
