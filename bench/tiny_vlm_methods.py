"""W4A16 methods side by side on the trained tiny Gemma-4 VLM: scores, recovery per half, KL on answer tokens.

The model is the one ``ecoquant fixtures tiny-vlm`` ships (trained from scratch
on the basic pages; every Gemma-4 E module type). Every variant quantizes the
same modules (the ``auto`` preset: the language model's decoder Linears and
``per_layer_model_projection``; towers, embeddings and the tied ``lm_head``
stay bf16), symmetric int4, at group 128 and at group 32. ecoquant's GPTQ
and AWQ calibrate out of domain, on the demo's calibration (16 windows of the
shipped novel and 16 realistic charts and documents, never a basic page).
GPTQModel and AutoRound run in their own uv environments
(``uv run --isolated``) on the same 16 text windows, decoded (they take
text; the images are ecoquant's only).

Then every variant is scored in one pass on the basic pages' evaluation split
(``--pages`` per task, six tasks), through the transformers backend, greedy:
score per half (doc: ANLS; image: multiple choice, relaxed accuracy, exact
match), recovery = variant / bf16, and the mean KL(bf16 || variant) over the
gold answer tokens (teacher-forced: the prompt as ``eval`` sends it, then the
gold answer and ``<turn|>``).

Issue 23's rows (:data:`SCHEME_VARIANTS`) put the vision tower (and its
embedder) in W8A8 beside a W4A16 GPTQ decoder, and the decoder itself in W8A8
(RTN, SmoothQuant, SmoothQuant + GPTQ); transformers quantizes their
activations per token as vLLM would, so the KL includes that.

Usage::

    uv run python bench/tiny_vlm_methods.py --work /tmp/vlm-bench [--pages 40] [--methods a,b,...]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
# The peers' environments, as their scripts' docstrings give them (gptqmodel 7.7 needs torch >= 2.14.1).
GPTQMODEL = ["--with", "gptqmodel==7.6.0", "--with", "torch==2.13.0", "--with", "transformers==5.23.0",
             "--with", "compressed-tensors==0.20.0"]
AUTOROUND = ["--with", "auto-round==0.16.1", "--with", "torch==2.13.0", "--with", "transformers==5.23.0",
             "--with", "compressed-tensors==0.20.0", "--with", "pillow==13.0.0", "--with", "torchvision==0.28.0"]
#: Tokens per calibration text for the peers. ecoquant's windows are 256 tokens with byte-fallback
#: pieces; decoded and re-encoded by the peers some come out shorter, and AutoRound drops every
#: text shorter than its seqlen ("no calibration text has 256 tokens" at 256), so both peers get 128.
PEER_SEQ_LEN = 128
METHODS = (
    "bf16",
    "rtn-minmax-g128", "rtn-mse-g128", "gptq-g128", "awq-g128",
    "rtn-minmax-g32", "rtn-mse-g32", "gptq-g32", "awq-g32",
    "gptqmodel-g128", "autoround-g128",
)

#: Issue 23: decoder method and scheme, and the vision tower's scheme (None: bf16), per variant.
SCHEME_VARIANTS: dict[str, tuple[str, str, str | None]] = {
    # The decoder of the two rows after it (``--method gptq``'s defaults: hessian, two passes, dampening 0.1),
    # with the tower in bf16; ``gptq-g128`` above is the older min-max GPTQ.
    "gptq-defaults-g128": ("gptq", "w4a16", None),
    "gptq-g128+vision-w8a8-int8": ("gptq", "w4a16", "w8a8-int8"),
    "gptq-g128+vision-w8a8-fp8": ("gptq", "w4a16", "w8a8-fp8"),
    "w8a8-int8-rtn": ("rtn", "w8a8-int8", None),
    "w8a8-int8-smoothquant": ("smoothquant", "w8a8-int8", None),
    "w8a8-int8-smoothquant-gptq": ("smoothquant-gptq", "w8a8-int8", None),
    "w8a8-int8-smoothquant-gptq+vision-w8a8-int8": ("smoothquant-gptq", "w8a8-int8", "w8a8-int8"),
    "w8a8-fp8+vision-w8a8-fp8": ("rtn", "w8a8-fp8", "w8a8-fp8"),
}


def uv_isolated(deps: list[str], *args: str) -> list[str]:
    uv = shutil.which("uv") or "uv"
    return [uv, "run", "--isolated", "--no-project", *deps, "python", *args]


def calib_texts(base: Path, work: Path) -> Path:
    """The text half of the demo's calibration, decoded, for the external tools."""
    from ecoquant.calibrate.data import load_calibration
    from ecoquant.demo import DEMO_CALIBRATION

    path = work / "calib-text.json"
    if not path.exists():
        from dataclasses import replace

        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(base)
        text_only = replace(DEMO_CALIBRATION, multimodal=False, num_samples=DEMO_CALIBRATION.num_samples // 2)
        cal = load_calibration(base, text_only, tokenizer=tok)
        texts = [tok.decode(b["input_ids"][0].tolist(), skip_special_tokens=True) for b in cal.batches]
        path.write_text(json.dumps(texts))
    return path


def make_variant(name: str, base: Path, work: Path) -> dict[str, Any]:
    """Build one variant into ``work/name``; returns how long it took (and any error, verbatim)."""
    out = work / name
    record = work / f"{name}.make.json"
    if name == "bf16" or (out / "config.json").exists():
        # Made by an earlier run: its make time, when that run recorded one.
        seconds = json.loads(record.read_text())["seconds"] if record.is_file() else None
        return {"seconds": seconds, "error": None}
    if name in SCHEME_VARIANTS:
        made = make_scheme_variant(name, base, out)
        record.write_text(json.dumps(made))
        return made
    method, group = name.rsplit("-g", 1)
    t0 = time.perf_counter()
    if method in ("gptqmodel", "autoround"):
        script = REPO / "bench/external" / f"{method}_quantize.py"
        deps = GPTQMODEL if method == "gptqmodel" else AUTOROUND
        n = json.loads(calib_texts(base, work).read_text())
        cmd = uv_isolated(deps, str(script), str(base), str(out), "--calib-json", str(calib_texts(base, work)),
                          "--samples", str(len(n)), "--seq-len", str(PEER_SEQ_LEN), "--group-size", group)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        (work / f"{name}.log").write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            lines = [ln for ln in (proc.stdout + proc.stderr).strip().splitlines() if ln.strip()]
            return {"seconds": time.perf_counter() - t0, "error": lines[-1] if lines else f"exit {proc.returncode}"}
        return {"seconds": time.perf_counter() - t0, "error": None}

    from ecoquant.api import QuantizeConfig, quantize
    from ecoquant.demo import DEMO_CALIBRATION
    from ecoquant.quantize.scheme import QuantScheme

    rtn_observer = {"rtn-minmax": "minmax", "rtn-mse": "mse"}
    scheme = QuantScheme(group_size=int(group), observer=rtn_observer.get(method, "minmax"))
    config = QuantizeConfig(
        method="rtn" if method in rtn_observer else method,  # type: ignore[arg-type]
        scheme=scheme,
        calibration=DEMO_CALIBRATION,
    )
    quantize(base, out, config, show_progress=False)
    return {"seconds": time.perf_counter() - t0, "error": None}


def make_scheme_variant(name: str, base: Path, out: Path) -> dict[str, Any]:
    """An issue-23 row: ``ecoquant quantize``'s defaults for the method, with the decoder and tower schemes named."""
    from dataclasses import replace

    from ecoquant.api import QuantizeConfig, quantize
    from ecoquant.demo import DEMO_CALIBRATION
    from ecoquant.quantize.defaults import default_dampening, default_observer, default_scale_passes
    from ecoquant.quantize.gptq import GPTQConfig
    from ecoquant.quantize.scheme import named_scheme

    method, scheme_name, vision = SCHEME_VARIANTS[name]
    scheme = named_scheme(scheme_name)
    if scheme.type != "float":
        scheme = replace(scheme, observer=default_observer(method))  # type: ignore[arg-type]
    t0 = time.perf_counter()
    config = QuantizeConfig(
        method=method,  # type: ignore[arg-type]
        scheme=scheme,
        calibration=DEMO_CALIBRATION,
        gptq=GPTQConfig(dampening_frac=default_dampening(method), scale_passes=default_scale_passes(method, True)),
        vision_scheme=None if vision is None else named_scheme(vision),
    )
    quantize(base, out, config, show_progress=False)
    return {"seconds": time.perf_counter() - t0, "error": None}


def answer_logits(model_dir: Path, examples: list[Any], pad_id: int) -> torch.Tensor:
    """Logits at every gold-answer position, all examples concatenated (float32)."""
    from transformers import AutoModelForImageTextToText

    from ecoquant.fixtures.train_tiny_vlm import collate

    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    out = []
    with torch.no_grad():
        for s in range(0, len(examples), 16):
            batch = collate(examples[s : s + 16], pad_id)
            labels = batch.pop("labels")
            logits = model(**batch).logits[:, :-1]
            out.append(logits[labels[:, 1:] != -100].float())
    del model
    return torch.cat(out)


def score_variant(model_dir: Path, suite: Any) -> dict[str, float]:
    from ecoquant.eval.backends.base import generation_settings
    from ecoquant.eval.backends.transformers_backend import TransformersBackend, TransformersOptions
    from ecoquant.eval.economy import prompt_variant, suite_requests
    from ecoquant.eval.tasks import score_in_order, suite_scores

    settings = generation_settings(max_new_tokens=8)
    backend = TransformersBackend.load(model_dir, TransformersOptions(device="cpu", batch_size=8))
    rows = suite_requests(suite, prompt_variant("default"), settings)
    completions = backend.generate([r for _, _, r in rows], settings)
    backend.close()
    task_scores = score_in_order([task for task, _, _ in rows], [c.text for c in completions])
    return {**suite_scores(task_scores), **{t.task: t.score for t in task_scores}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--pages", type=int, default=40, help="evaluation pages per basic task")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--report", action="store_true", help="print the table of the last run's results.json only")
    args = p.parse_args()
    if args.report:
        print_table(json.loads((args.work / "results.json").read_text()), args.pages)
        return

    from transformers import AutoProcessor

    from ecoquant.eval.builtin.basic import BASIC_KINDS
    from ecoquant.eval.loaders import load_suite
    from ecoquant.fixtures.train_tiny_vlm import Encoder
    from ecoquant.fixtures.tiny_vlm import tiny_vlm_path
    from ecoquant.quality.divergence import kl_divergence

    base = tiny_vlm_path()
    args.work.mkdir(parents=True, exist_ok=True)
    methods = [m for m in args.methods.split(",") if m]
    if methods[0] != "bf16":
        methods.insert(0, "bf16")
    made = {m: make_variant(m, base, args.work) for m in methods}
    suite = load_suite("builtin-basic", cache_dir=args.work / "pages", size=args.pages)
    processor = AutoProcessor.from_pretrained(base)
    encoder = Encoder(processor)
    examples = [encoder.encode(k, "eval", i)[0] for k in BASIC_KINDS for i in range(args.pages)]
    pad_id = processor.tokenizer.pad_token_id
    base_logits = answer_logits(base, examples, pad_id)

    rows: dict[str, dict[str, Any]] = {}
    for m in methods:
        folder = base if m == "bf16" else args.work / m
        row: dict[str, Any] = {"make_seconds": made[m]["seconds"], "error": made[m]["error"]}
        if row["error"] is None:
            row["scores"] = score_variant(folder, suite)
            row["kl_answer"] = 0.0 if m == "bf16" else float(kl_divergence(base_logits, answer_logits(folder, examples, pad_id)).mean())
        rows[m] = row
        print(m, json.dumps(row), flush=True)
    (args.work / "results.json").write_text(json.dumps(rows, indent=1))
    print_table(rows, args.pages)


def print_table(rows: dict[str, dict[str, Any]], pages: int) -> None:
    from ecoquant.eval.builtin.basic import BASIC_KINDS

    b = rows["bf16"]["scores"]
    print(f"\n{pages * len(BASIC_KINDS)} samples ({pages} evaluation pages x {len(BASIC_KINDS)} tasks)\n")
    print("| variant | doc | image | recovery doc | recovery image | mean recovery | KL on answer tokens | make s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for m, row in rows.items():
        if row["error"] is not None:
            print(f"| {m} | — | — | — | — | — | — | failed: `{row['error']}` |")
            continue
        s = row["scores"]
        rd, ri = s["doc"] / b["doc"], s["image"] / b["image"]
        secs = "—" if row["make_seconds"] is None else f"{row['make_seconds']:.0f}"
        print(f"| {m} | {s['doc']:.4f} | {s['image']:.4f} | {rd:.1%} | {ri:.1%} | {(rd + ri) / 2:.1%} | "
              f"{row['kl_answer']:.2e} | {secs} |")


if __name__ == "__main__":
    main()
