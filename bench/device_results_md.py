"""Turn ``device_check.json`` (bench/device_check.py) into the "GPU" section of bench/RESULTS.md.

Usage::

    uv run python bench/device_results_md.py PATH/device_check.json >> bench/RESULTS.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

GIB = 1024**3


def _num(x: Any, fmt: str = "{:.2f}") -> str:
    return "-" if x is None else fmt.format(x)


def _gib(x: Any) -> str:
    return "-" if x is None else f"{x / GIB:.2f}"


def render(r: dict[str, Any]) -> str:
    """The markdown section for one device check's results."""
    m = r["machine"]
    tol = r["tolerance"]
    title = "## GPU: device check, dry run on the CPU (its second device is the CPU again)" if r["dry"] else f"## GPU: device check on {m['gpu']}"
    lines = [
        title,
        "",
        f"Command: `{r['command']}` ({r['started_utc']} UTC, {r['seconds']} s; Python {m['python']}, torch {m['torch']}, "
        f"{m['cpu_threads']} CPU threads" + (f", {m['gpu_memory_bytes'] / GIB:.1f} GiB of GPU memory" if m["gpu_memory_bytes"] else "") + ").",
        "",
    ]
    if r.get("calibration"):
        lines += [
            "Calibration, each GPU run against the CPU run of the same model and method in float32 (tolerance: codes "
            f"identical >= {tol['codes_equal_min']:.0%}, scales within {tol['scale_rel_max']:.0%}, median within "
            f"{tol['scale_rel_median']:.1%}). Peak GPU memory is measured (torch's allocator); the estimate is "
            "ecoquant's own (`ecoquant.calibrate.memory`, what `--device auto` decides by).",
            "",
            "| model | method | device | dtype | tokens | s total | s/layer mean | s/layer max | peak GPU GiB (measured) "
            "| estimate GiB | codes identical | scale rel. diff max / median | within tolerance |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in r["calibration"]:
            c = row.get("against_cpu")
            lines.append(
                f"| {row['model']} | {row['method']} | {row['device']} | {row['dtype']} | {row['tokens']} | {row['seconds']:.1f} "
                f"| {_num(row['seconds_per_layer_mean'])} | {_num(row['seconds_per_layer_max'])} | {_gib(row['peak_cuda_bytes'])} "
                f"| {_gib(row['estimated_bytes'])} | {'-' if c is None else format(c['codes_equal'], '.4%')} "
                f"| {'-' if c is None else format(c['scale_rel_max'], '.2e') + ' / ' + format(c['scale_rel_median'], '.2e')} "
                f"| {'-' if c is None else ('yes' if c['within_tolerance'] else 'NO')} |"
            )
        lines.append("")
    e = r.get("energy")
    if e:
        idle = e["idle"]
        lines += [
            f"Energy: {e['meter']}; modelled for {e['target_gpu']} (roofline over datasheet figures, docs/energy.md). "
            f"Idle: measured {_num(idle['measured_w'], '{:.1f}')} W over {_num(idle['seconds'], '{:.0f}')} s, "
            f"modelled {idle['modelled_w']:.1f} W. The tiny VLM in bf16 and its W4A16 checkpoint, transformers backend on the "
            f"{'CPU' if r['dry'] else 'GPU'}, `builtin-basic` suite, mean of the measured windows (min..max):",
            "",
            "| model | requests | tokens out | wall s | measured J (min..max) | measured above idle J | modelled J | measured / modelled | scores |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for row in e["models"]:
            spread = "" if row["measured_min_j"] is None else f" ({row['measured_min_j']:.1f}..{row['measured_max_j']:.1f})"
            scores = ", ".join(f"{k} {v:.2f}" for k, v in row["suite_scores"].items())
            lines.append(
                f"| {row['label']} | {row['requests']} | {row['tokens_out']} | {row['wall_time_s']:.1f} "
                f"| {_num(row['measured_j'], '{:.1f}')}{spread} | {_num(row['measured_above_idle_j'], '{:.1f}')} "
                f"| {_num(row['modelled_j'], '{:.3f}')} | {_num(row['measured_over_modelled'], '{:.1f}')} | {scores} |"
            )
        lines.append("")
    for part, err in r.get("errors", {}).items():
        lines.append(f"**{part} failed:** `{err}`")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(render(json.loads(Path(sys.argv[1]).read_text())))
