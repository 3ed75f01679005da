"""Full-size RTN on a synthetic Gemma-4 E4B checkpoint: wall time, peak RSS and sizes.

Writes random bf16 weights with E4B's real tensor names and shapes (from the
shape twin), shard by shard and row block by row block, so that even writing
the 5.6 GB per-layer embedding never holds it in memory. Then runs
``ecoquant quantize --method rtn`` on it in a child process and reports that
process's wall time and peak RSS (``ru_maxrss`` of the child), plus the sizes
before and after. The claim to check: peak RSS stays under 6 GiB on this
2-core, 24 GiB machine, although the checkpoint is ~15 GiB.

Usage::

    uv run python bench/e4b_synthetic_rtn.py --work /tmp/e4b-bench [--observer minmax]

Needs ~26 GB of free disk in --work. The synthetic source is kept for reruns.
"""

from __future__ import annotations

import argparse
import math
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from ecoquant.export.footprint import GIB
from ecoquant.export.safetensors_stream import PlannedTensor, write_streaming
from ecoquant.fixtures.e4b_twin import build_e4b_twin, e4b_config

SHARD_BYTES = 5 * 10**9  # the real E4B checkpoint ships ~5 GB shards
ROWS_PER_BLOCK_BYTES = 256 << 20


def _random_rows(shape: tuple[int, ...], seed: int) -> Iterator[torch.Tensor]:
    """Random bf16 values (std 0.02, like trained LLM weights), yielded in row blocks."""
    gen = torch.Generator().manual_seed(seed)
    rows, row_elems = shape[0], math.prod(shape[1:])
    per_block = max(1, ROWS_PER_BLOCK_BYTES // (2 * row_elems))
    for start in range(0, rows, per_block):
        n = min(per_block, rows - start)
        yield (torch.randn((n, *shape[1:]), generator=gen) * 0.02).to(torch.bfloat16)


def write_synthetic(out: Path) -> None:
    """E4B-shaped random checkpoint: config.json, shards, index."""
    import json

    out.mkdir(parents=True, exist_ok=True)
    model = build_e4b_twin()
    params = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for i, (name, shape) in enumerate(params):
        nbytes = 2 * math.prod(shape)
        if size and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        rows_shape = shape if len(shape) > 1 else (shape[0], 1)
        shards[-1].append(
            PlannedTensor(
                name,
                "BF16",
                shape,
                produce_rows=lambda s=shape, r=rows_shape, seed=i: (b.reshape(-1, *s[1:]) for b in _random_rows(r, seed)),
            )
        )
        size += nbytes
    weight_map = {}
    for k, planned in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        t = time.perf_counter()
        n = write_streaming(out / fname, planned, {"format": "pt"})
        print(f"  wrote {fname}: {n / GIB:.2f} GiB in {time.perf_counter() - t:.0f} s", flush=True)
        weight_map.update({p.name: fname for p in planned})
    total = sum(2 * math.prod(s) for _, s in params)
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
    )
    e4b_config().save_pretrained(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for the synthetic source and the output")
    parser.add_argument("--observer", default="minmax", choices=["minmax", "mse"])
    args = parser.parse_args()
    src, out = args.work / "e4b-synthetic-bf16", args.work / f"e4b-synthetic-rtn-{args.observer}"
    if not (src / "config.json").is_file():
        print(f"writing synthetic E4B checkpoint to {src}", flush=True)
        t = time.perf_counter()
        write_synthetic(src)
        print(f"  done in {time.perf_counter() - t:.0f} s", flush=True)
    cmd = ["ecoquant", "quantize", str(src), "--out", str(out), "--method", "rtn", "--observer", args.observer,
           "--overwrite", "--no-progress"]
    print("$ " + " ".join(cmd), flush=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - t
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    src_bytes = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    out_bytes = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(f"\n| source (bf16) | output (W4A16, {args.observer}) | ratio | wall | peak RSS (quantize process) |")
    print("|---|---|---|---|---|")
    print(
        f"| {src_bytes / GIB:.2f} GiB | {out_bytes / GIB:.2f} GiB | {out_bytes / src_bytes:.3f} | {wall:.0f} s | "
        f"{peak_kib / 2**20:.2f} GiB |"
    )
    if before > peak_kib:
        print("note: an earlier child had a larger peak; RSS figure is an upper bound", file=sys.stderr)
    limit = 6 * GIB
    print(f"peak RSS {'<' if peak_kib * 1024 < limit else '>='} 6 GiB")


if __name__ == "__main__":
    main()
