"""How much calibration GPTQ needs: KL to bf16 against calibration samples x tokens, on the shipped models.

Issue 24: ``ecoquant optimize`` calibrated every GPTQ and AWQ candidate of the
tiny VLM on the seed's 256 windows of 2048 tokens (245 s and 460 s a
module set on 2 cores, for a 13 MB model). This measures where more tokens
stop changing anything: for each point of ``--points`` (``SAMPLESxLENGTH``)
it writes ``--method`` (default ``gptq``, with its defaults) calibrated on
that many windows of the shipped corpus (what the default source falls back
to offline; text only), in its own timing, then scores every variant against
bf16 in one pass of :func:`ecoquant.quality.run.compare` on the evaluation
novel (``--windows`` windows of ``--window-tokens``): mean KL(bf16 ||
variant) and top-1 agreement. On the tiny VLM it also reports the KL on the
gold answer tokens of the basic pages (teacher-forced, as
``bench/tiny_vlm_methods.py`` does), the text the model was trained on.

Usage::

    nice -n 5 uv run python bench/calib_size.py --model tiny-vlm --work /tmp/calib-size \\
        --points rtn,16x256,32x256,32x256@7,64x256,128x256,256x256,32x512,128x512,32x2048,128x2048,256x2048
    nice -n 5 uv run python bench/calib_size.py --model gemma3-270m --work /tmp/calib-size-g3 --points 16x512,64x512

A point is ``SAMPLESxLENGTH`` or ``SAMPLESxLENGTH@SEED`` (another draw of the
same size: how much of a difference is the draw's), or ``rtn`` (no
calibration: the distance calibration covers). A variant made by an earlier run into the same ``--work`` is reused with the
time that run measured (``timings.json``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def model_path(name: str) -> Path:
    if name == "tiny-vlm":
        from ecoquant.fixtures.tiny_vlm import tiny_vlm_path

        return tiny_vlm_path()
    if name == "gemma3-270m":
        from ecoquant.fixtures.gemma3_gguf import gemma3_270m_path

        return gemma3_270m_path()
    raise SystemExit(f"unknown model {name}; use tiny-vlm or gemma3-270m")


def make(base: Path, out: Path, method: str, samples: int, length: int, seed: int) -> float:
    from ecoquant.api import QuantizeConfig, quantize
    from ecoquant.calibrate.data import CORPUS_SOURCE, CalibrationConfig

    t0 = time.perf_counter()
    calibration = CalibrationConfig(source=CORPUS_SOURCE, num_samples=samples, max_length=length, seed=seed)
    quantize(base, out, QuantizeConfig(method=method, calibration=calibration, overwrite=True), show_progress=False)  # type: ignore[arg-type]
    return time.perf_counter() - t0


def answer_kl(base: Path, variants: dict[str, Path], pages: int) -> dict[str, float]:
    """Mean KL(bf16 || variant) on the basic pages' gold answer tokens (the tiny VLM's own domain)."""
    sys.path.insert(0, str(REPO / "bench"))
    from tiny_vlm_methods import answer_logits  # type: ignore[import-not-found]
    from transformers import AutoProcessor

    from ecoquant.eval.builtin.basic import BASIC_KINDS
    from ecoquant.fixtures.train_tiny_vlm import Encoder
    from ecoquant.quality.divergence import kl_divergence

    processor = AutoProcessor.from_pretrained(base)
    encoder = Encoder(processor)
    examples = [encoder.encode(k, "eval", i)[0] for k in BASIC_KINDS for i in range(pages)]
    pad = processor.tokenizer.pad_token_id
    ref = answer_logits(base, examples, pad)
    return {name: float(kl_divergence(ref, answer_logits(p, examples, pad)).mean()) for name, p in variants.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny-vlm", help="tiny-vlm or gemma3-270m")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--points", default="16x256,32x256,64x256,128x256,256x256,32x512,128x512,32x2048,128x2048,256x2048")
    p.add_argument("--method", default="gptq")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--windows", type=int, default=32, help="evaluation windows for the text KL")
    p.add_argument("--window-tokens", type=int, default=512)
    p.add_argument("--pages", type=int, default=20, help="tiny-vlm: evaluation pages per basic task for the answer KL")
    args = p.parse_args()

    from ecoquant.quality.run import QualityConfig, compare

    base = model_path(args.model)
    args.work.mkdir(parents=True, exist_ok=True)
    timings_path = args.work / "timings.json"
    timings: dict[str, float] = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    variants: dict[str, Path] = {}
    for point in [x for x in args.points.split(",") if x]:
        if point == "rtn":  # the data-free reference: how far calibration moves KL at all
            name, method, samples, length, seed = "rtn", "rtn", 1, 2, 0
        else:
            size, _, seed_text = point.partition("@")
            samples, length = (int(v) for v in size.split("x"))
            method, seed = args.method, int(seed_text or args.seed)
            name = f"{method}-{samples}x{length}-s{seed}"
        out = args.work / name
        if not (out / "config.json").exists() or name not in timings:
            timings[name] = make(base, out, method, samples, length, seed)
            timings_path.write_text(json.dumps(timings, indent=1))
        print(f"{name}: made in {timings[name]:.1f} s", flush=True)
        variants[name] = out

    report = compare(base, list(variants.values()), QualityConfig(window_tokens=args.window_tokens, max_windows=args.windows, device="cpu"))
    text = report.parts[0]
    scores = {v.model: v for v in text.variants}
    akl = answer_kl(base, variants, args.pages) if args.model == "tiny-vlm" else {}
    rows: list[dict[str, Any]] = []
    for name, out in variants.items():
        s = scores[str(out)]
        rows.append({"variant": name, "seconds": timings[name], "kl_text": s.kl_mean, "top1_text": s.top1_agreement,
                     "ppl_ratio": s.perplexity_ratio, "kl_answer": akl.get(name)})
    (args.work / "results.json").write_text(json.dumps(rows, indent=1))
    print(f"\n{args.model}, {args.method}: text KL on {text.n_tokens} tokens of the evaluation novel"
          + (f"; answer KL on {args.pages} pages x 6 basic tasks" if akl else "") + "\n")
    print("| calibration (samples x tokens) | tokens | quantize s | text KL (nats) | top-1 | ppl / bf16 | answer KL (nats) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        a = "—" if r["kl_answer"] is None else f"{r['kl_answer']:.5f}"
        if r["variant"] == "rtn":
            label, tokens = "RTN (none)", "0"
        else:
            _, size, seed = r["variant"].split("-")
            n, length = size.split("x")
            label, tokens = f"{n} x {length} (seed {seed[1:]})", f"{int(n) * int(length):,}"
        print(f"| {label} | {tokens} | {r['seconds']:.0f} | {r['kl_text']:.5f} | {r['top1_text']:.4f} "
              f"| {r['ppl_ratio']:.4f} | {a} |")


if __name__ == "__main__":
    main()
