"""What AWQ's searches found, read back from checkpoints' ``quant_recipe.json``: smoothing, clipping, and their cost.

For each checkpoint made with ``--method awq`` or ``awq-gptq``: per mapping kind
(norm -> q/k/v, norm -> gate/up, up -> down), how often smoothing beat plain
rounding, the chosen ratios, how much it lowered the searched error, and how far
folding the scales into bf16 tensors moved the layer's output before any
quantization (``smoothing_rel_diff``), and how far the stored norm's rounding
moved the scales asked for (``scale_moved_max``: Gemma-3's ``(1 + w)`` norms
near ``w = -1``, see ``fold_scales_into_norm``; the balance layers use the
moved ones); then per module kind the
relative output error the recipe records (``loss``, GPTQ-based methods only)
and the share of weights AWQ's clip search clipped.

    uv run python bench/awq_analysis.py /tmp/g3/awq /tmp/g3/awq-gptq
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path


def kind(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def main() -> None:
    for folder in map(Path, sys.argv[1:]):
        recipe = json.loads((folder / "quant_recipe.json").read_text())
        units = recipe["method_config"]["stats"]["units"]
        print(f"\n## {folder.name} ({recipe['method']}, observer {recipe['scheme']['observer']})\n")
        smooth: dict[str, list[dict]] = defaultdict(list)
        rel_diff = []
        per_module: dict[str, list[dict]] = defaultdict(list)
        for unit in units.values():
            for s in unit.get("smoothing", []):
                smooth[f"{kind(s['smooth'])} -> {'/'.join(kind(b) for b in s['balance'])}"].append(s)
            if "smoothing_rel_diff" in unit:
                rel_diff.append(unit["smoothing_rel_diff"])
            for name, entry in unit.items():
                if isinstance(entry, dict) and name not in ("smoothing",):
                    per_module[kind(name)].append(entry)
        print("| mapping | layers | smoothed | ratio (median) | searched error / RTN's (median) | "
              "scale moved by the norm's rounding (median of max) |")
        print("|---|---:|---:|---:|---:|---:|")
        for mapping, entries in smooth.items():
            applied = [e for e in entries if e.get("applied")]
            ratios = [e["ratio"] for e in applied if e.get("ratio") is not None]
            gains = [e["best_error"] / e["rtn_error"] for e in entries if e.get("rtn_error")]
            med_ratio = f"{statistics.median(ratios):.2f}" if ratios else "—"
            med_gain = f"{statistics.median(gains):.3f}" if gains else "—"
            moved = [e["scale_moved_max"] for e in applied if "scale_moved_max" in e]
            med_moved = f"{statistics.median(moved):.2%}" if moved else "—"
            print(f"| {mapping} | {len(entries)} | {len(applied)} | {med_ratio} | {med_gain} | {med_moved} |")
        if rel_diff:
            print(f"\nfolding into bf16, output change before quantization: median {statistics.median(rel_diff):.2e}, "
                  f"max {max(rel_diff):.2e} (relative to the layer output's max)")
        print("\n| module | loss (median) | RTN loss (median) | clipped share (median) |")
        print("|---|---:|---:|---:|")
        for name, entries in sorted(per_module.items()):
            loss = [e["loss"] for e in entries if "loss" in e]
            rtn = [e["rtn_loss"] for e in entries if "rtn_loss" in e]
            clipped = [e["clipped_fraction"] for e in entries if "clipped_fraction" in e]
            cells = [f"{statistics.median(v):.4f}" if v else "—" for v in (loss, rtn, clipped)]
            print(f"| {name} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
