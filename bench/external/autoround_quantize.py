"""Run AutoRound (PyPI ``auto-round``) on a model, in its own environment.

Not part of the ecoquant package and never imports it: this is the reference
that ecoquant's calibrated methods are compared against. AutoRound's defaults
(SignRound, 200 iterations per block, batch 8, its own learning rate) are
kept; only what the comparison fixes is set: W4A16 group 128 symmetric, the
calibration texts (the hub's default dataset is unreachable offline), the
sample count and length, CPU, seed 42. AutoRound skips calibration texts
shorter than ``--seq-len`` tokens (its own rule), so it may use fewer samples
than it was given. The result is written in
llm-compressor's compressed-tensors format so that transformers loads it
beside the other variants. Usage (no project environment involved)::

    uv run --isolated --no-project --with auto-round==0.16.1 --with compressed-tensors==0.20.0 --with torch==2.13.0 \\
        python bench/external/autoround_quantize.py SRC OUT --calib-json calib.json
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("src")
    p.add_argument("out")
    p.add_argument("--calib-json", required=True, help="JSON list of calibration texts")
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--iters", type=int, default=None, help="default: AutoRound's own (200)")
    args = p.parse_args()

    from auto_round import AutoRound
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(42)
    tok = AutoTokenizer.from_pretrained(args.src)
    model = AutoModelForCausalLM.from_pretrained(args.src, dtype=torch.bfloat16)
    texts = json.load(open(args.calib_json))
    extra = {} if args.iters is None else {"iters": args.iters}
    t0 = time.perf_counter()
    ar = AutoRound(model, tokenizer=tok, scheme="W4A16", dataset=texts, nsamples=args.samples,
                   seqlen=args.seq_len, device_map="cpu", seed=42, **extra)
    out = Path(args.out)
    # AutoRound writes into a sub-folder named after the model and scheme; stage
    # it beside OUT and move that folder into place, so OUT is the checkpoint.
    with tempfile.TemporaryDirectory(dir=out.parent) as staging:
        ar.quantize_and_save(staging, format="llm_compressor")
        (made,) = [p for p in Path(staging).iterdir() if (p / "config.json").exists()]
        shutil.rmtree(out, ignore_errors=True)
        made.rename(out)
    seconds = time.perf_counter() - t0
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps({"seconds": seconds, "peak_rss_gib": peak_gib}))


if __name__ == "__main__":
    main()
