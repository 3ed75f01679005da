"""W4A16 methods side by side on the real, trained Gemma-3 270M (offline, from PyPI).

Every variant is W4A16, group 128, symmetric, with the same ignore list
(``lm_head``, which is tied to the embedding; the embedding is not a Linear
and is never quantized). Each variant is made in its own process so that its
wall time and peak RSS are its own; llmcompressor and AutoRound run in their
own throw-away uv environments (they pin other transformers versions). Then
all variants are scored against bf16 in one pass over the evaluation text:
perplexity, mean KL(base || variant) and top-1 agreement.

Usage::

    uv run python bench/gemma3_methods.py --work /tmp/g3-bench \\
        --methods rtn-minmax,rtn-mse,llmc-rtn [--windows 32] [--texts austen,sqlite]

Methods: rtn-minmax, rtn-mse, rtn-hessian (the activation-aware search; it
calibrates), gptq (column order), gptq-actorder (static groups, min-max: the default before issue 14),
gptq-hessian, gptq-refine (hessian + ``--refine-steps``), gptq-minmax-refine, awq, awq-hessian,
awq-gptq (hessian observer), awq-gptq-minmax, awq-gptq-refine, gptq-hessian-2pass, awq-gptq-2pass
(``--scale-passes 2``), gptq-bf16 (``--calib-dtype bfloat16``),
gptq-defaults (hessian, two passes, bf16: ``--method gptq``'s defaults
on a CPU with native bf16), gptq-defaults-damp0.05, gptq-defaults-damp0.1,
gptq-defaults-damp0.2, gptq-defaults-no-actorder (its neighbours),
awq-gptq-defaults, awq-gptq-defaults-damp0.1 (``--method awq-gptq``'s, at two dampenings), gptq-2pass-refine-bf16, awq-gptq-2pass-refine-bf16 (the same plus
refinement) (ecoquant; calibrated on the shipped corpus), llmc-rtn (llmcompressor
0.14 QuantizationModifier), llmc-gptq-basic, llmc-gptq-seq (per decoder
layer), llmc-gptq-stack (the whole text model as one sequential target)
(llmcompressor 0.14 GPTQModifier), autoround (PyPI auto-round, defaults).
Issue 23's W8A8 rows: w8a8-fp8 (``--scheme w8a8-fp8``, data-free), w8a8-int8-rtn,
w8a8-int8-gptq (``--scheme w8a8-int8 --method gptq`` with its defaults), and
llmcompressor's llmc-fp8-dynamic and llmc-w8a8 (``QuantizationModifier`` with
the ``FP8_DYNAMIC`` / ``W8A8`` presets, no smoothing); w8a8-int8-sq and
w8a8-int8-sq-gptq (``--method smoothquant`` / ``smoothquant-gptq``, strength
0.5) beside llmcompressor's SmoothQuant + GPTQ W8A8 recipe, llmc-sq-gptq-w8a8
(the mappings it registers for Gemma-3) and llmc-sq-gptq-w8a8-ffn (the MLP
mapping named by hand on ``pre_feedforward_layernorm``). Activations of the W8A8
rows are quantized per token when scored, as transformers loads them.
Every calibrated method sees the same 128 windows of the shipped corpus.
Each variant is scored on every ``--texts`` evaluation text: ``austen``
(*Persuasion*, the calibration novel's author) and ``sqlite`` (SQLite's
documentation, another genre). A variant already made by an earlier run with
the same command is reused, with the cost that run measured.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LLMC = ["--with", "llmcompressor==0.14.0.1", "--with", "torch==2.13.0"]
AUTOROUND = ["--with", "auto-round==0.16.1", "--with", "compressed-tensors==0.20.0", "--with", "torch==2.13.0"]


def uv_isolated(deps: list[str], *args: str) -> list[str]:
    uv = shutil.which("uv") or "uv"
    return [uv, "run", "--isolated", "--no-project", *deps, "python", *args]


def calib_json(base: Path, work: Path, samples: int, seq_len: int) -> Path:
    """ecoquant's own calibration windows as a JSON list of texts, for the external tools.

    The windows are exactly the ones ``ecoquant quantize --calib corpus`` draws
    (``seq_len`` tokens of the shipped calibration novel, seed 42), decoded
    without ``<bos>``; the external tools tokenize them again and add it. So
    every method calibrates on the same text.
    """
    from ecoquant.calibrate.data import CalibrationConfig, load_calibration

    path = work / f"calib-{samples}x{seq_len}.json"
    if not path.exists():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(base)
        cal = load_calibration(base, CalibrationConfig(source="corpus", num_samples=samples, max_length=seq_len),
                               tokenizer=tok)
        texts = [tok.decode(b["input_ids"][0].tolist(), skip_special_tokens=True) for b in cal.batches]
        path.write_text(json.dumps(texts))
    return path


def commands(base: Path, work: Path, args: argparse.Namespace) -> dict[str, Callable[[Path], list[str]]]:
    """method -> (output folder -> command that makes it)."""
    ours = ["ecoquant", "quantize", str(base), "--no-progress", "--overwrite", "--preset", "text-decoder"]
    # Every flag a row depends on is spelled out, so that a change of CLI defaults never changes a row:
    # min-max and one scale pass unless the row says otherwise, float32 forwards unless it says bf16.
    data = ["--calib", "corpus", "--calib-samples", str(args.samples), "--calib-length", str(args.seq_len)]
    calib = [*data, "--calib-dtype", "float32"]
    calib_bf16 = [*data, "--calib-dtype", "bfloat16"]
    mm, hess, one, two = ["--observer", "minmax"], ["--observer", "hessian"], ["--scale-passes", "1"], ["--scale-passes", "2"]
    refine = ["--refine-steps", str(args.refine_steps)]
    ext = str(REPO / "bench/external/llmcompressor_oneshot.py")
    cj = lambda: str(calib_json(base, work, args.samples, args.seq_len))  # noqa: E731
    # Dampening spelled out too (0.01 unless the row says otherwise): the CLI's default changed to 0.1.
    gptq_any = [*ours, "--method", "gptq"]
    awq_gptq_any = [*ours, "--method", "awq-gptq"]
    gptq = [*gptq_any, "--dampening", "0.01"]
    awq_gptq = [*awq_gptq_any, "--dampening", "0.01"]
    return {
        "rtn-minmax": lambda out: [*ours, "--out", str(out)],
        "rtn-mse": lambda out: [*ours, "--out", str(out), "--observer", "mse"],
        "gptq": lambda out: [*gptq, "--out", str(out), "--no-act-order", *mm, *calib],
        "gptq-actorder": lambda out: [*gptq, "--out", str(out), "--act-order", *mm, *one, *calib],
        "awq": lambda out: [*ours, "--out", str(out), "--method", "awq", *mm, *calib],
        # Issue 14: the activation-aware scale search (hessian observer), refinement, AWQ then GPTQ.
        "rtn-hessian": lambda out: [*ours, "--out", str(out), *hess, *calib],
        "gptq-hessian": lambda out: [*gptq, "--out", str(out), *hess, *one, *calib],
        "gptq-refine": lambda out: [*gptq, "--out", str(out), *hess, *one, *refine, *calib],
        "gptq-minmax-refine": lambda out: [*gptq, "--out", str(out), "--act-order", *mm, *one, *refine, *calib],
        "awq-hessian": lambda out: [*ours, "--out", str(out), "--method", "awq", *hess, *calib],
        "awq-gptq": lambda out: [*awq_gptq, "--out", str(out), *hess, *one, *calib],
        "awq-gptq-minmax": lambda out: [*awq_gptq, "--out", str(out), *mm, *one, *calib],
        "awq-gptq-refine": lambda out: [*awq_gptq, "--out", str(out), *hess, *one, *refine, *calib],
        # Two scale passes (what `--method gptq` / `awq-gptq` now do by default), bf16 forwards.
        "gptq-hessian-2pass": lambda out: [*gptq, "--out", str(out), *hess, *two, *calib],
        "awq-gptq-2pass": lambda out: [*awq_gptq, "--out", str(out), *hess, *two, *calib],
        "gptq-bf16": lambda out: [*gptq, "--out", str(out), "--act-order", *mm, *one, *calib_bf16],
        "gptq-defaults": lambda out: [*gptq, "--out", str(out), *hess, *two, *calib_bf16],  # `--method gptq` here
        # The defaults' neighbours, for choosing them by the out-of-domain figure.
        "gptq-defaults-damp0.05": lambda out: [*gptq_any, "--out", str(out), "--dampening", "0.05", *hess, *two, *calib_bf16],
        "gptq-defaults-damp0.1": lambda out: [*gptq_any, "--out", str(out), "--dampening", "0.1", *hess, *two, *calib_bf16],
        "gptq-defaults-damp0.2": lambda out: [*gptq_any, "--out", str(out), "--dampening", "0.2", *hess, *two, *calib_bf16],
        "awq-gptq-defaults": lambda out: [*awq_gptq, "--out", str(out), *hess, *two, *calib_bf16],
        "awq-gptq-defaults-damp0.1": lambda out: [*awq_gptq_any, "--out", str(out), "--dampening", "0.1", *hess, *two, *calib_bf16],
        "gptq-defaults-no-actorder": lambda out: [*gptq, "--out", str(out), *hess, *one, "--no-act-order", *calib_bf16],
        "gptq-2pass-refine-bf16": lambda out: [*gptq, "--out", str(out), *hess, *two, *refine, *calib_bf16],
        "awq-gptq-2pass-refine-bf16": lambda out: [*awq_gptq, "--out", str(out), *hess, *two, *refine, *calib_bf16],
        "llmc-rtn": lambda out: uv_isolated(LLMC, ext, str(base), str(out), "--ignore", "lm_head"),
        # Issue 23: W8A8. Same data and dampening as gptq-defaults for the GPTQ row.
        "w8a8-fp8": lambda out: [*ours, "--out", str(out), "--scheme", "w8a8-fp8"],
        "w8a8-int8-rtn": lambda out: [*ours, "--out", str(out), "--scheme", "w8a8-int8"],
        "w8a8-int8-gptq": lambda out: [*gptq_any, "--out", str(out), "--scheme", "w8a8-int8", "--dampening", "0.1", *hess, *two, *calib_bf16],
        "llmc-fp8-dynamic": lambda out: uv_isolated(LLMC, ext, str(base), str(out), "--ignore", "lm_head", "--scheme", "FP8_DYNAMIC"),
        "llmc-w8a8": lambda out: uv_isolated(LLMC, ext, str(base), str(out), "--ignore", "lm_head", "--scheme", "W8A8"),
        # SmoothQuant (strength 0.5), then GPTQ int8 per channel: ecoquant's two calibrated W8A8 INT8 methods.
        "w8a8-int8-sq": lambda out: [*ours, "--out", str(out), "--scheme", "w8a8-int8", "--method", "smoothquant", *mm, *calib_bf16],
        "w8a8-int8-sq-gptq": lambda out: [*ours, "--out", str(out), "--scheme", "w8a8-int8", "--method", "smoothquant-gptq",
                                          "--dampening", "0.1", *hess, *two, *calib_bf16],
        # llmcompressor's W8A8 recipe: SmoothQuantModifier(0.5) + GPTQModifier(W8A8), as its examples write it,
        # with the mappings it registers for Gemma3ForCausalLM (input_layernorm -> q/k/v,
        # post_attention_layernorm -> gate/up) ...
        "llmc-sq-gptq-w8a8": lambda out: uv_isolated(
            LLMC, ext, str(base), str(out), "--ignore", "lm_head", "--method", "gptq", "--pipeline", "sequential",
            "--scheme", "W8A8", "--smoothquant", "0.5", "--dampening", "0.1",
            "--calib-json", cj(), "--max-length", str(args.seq_len)),
        # ... and with the norm that really feeds Gemma-3's MLP (pre_feedforward_layernorm) named by hand.
        "llmc-sq-gptq-w8a8-ffn": lambda out: uv_isolated(
            LLMC, ext, str(base), str(out), "--ignore", "lm_head", "--method", "gptq", "--pipeline", "sequential",
            "--scheme", "W8A8", "--smoothquant", "0.5", "--dampening", "0.1",
            "--sq-mapping", "re:.*q_proj,re:.*k_proj,re:.*v_proj=re:.*input_layernorm",
            "--sq-mapping", "re:.*gate_proj,re:.*up_proj=re:.*pre_feedforward_layernorm",
            "--calib-json", cj(), "--max-length", str(args.seq_len)),
        "llmc-gptq-basic": lambda out: uv_isolated(
            LLMC, ext, str(base), str(out), "--ignore", "lm_head", "--method", "gptq", "--pipeline", "basic",
            "--calib-json", cj(), "--max-length", str(args.seq_len)),
        "llmc-gptq-seq": lambda out: uv_isolated(
            LLMC, ext, str(base), str(out), "--ignore", "lm_head", "--method", "gptq", "--pipeline", "sequential",
            "--calib-json", cj(), "--max-length", str(args.seq_len)),
        # The whole text stack as one sequential target: the escape hatch the
        # issue names for Gemma-4 (Gemma4TextModel); Gemma3TextModel here.
        "llmc-gptq-stack": lambda out: uv_isolated(
            LLMC, ext, str(base), str(out), "--ignore", "lm_head", "--method", "gptq", "--pipeline", "sequential",
            "--sequential-target", "Gemma3TextModel", "--calib-json", cj(), "--max-length", str(args.seq_len)),
        "autoround": lambda out: uv_isolated(
            AUTOROUND, str(REPO / "bench/external/autoround_quantize.py"), str(base), str(out),
            "--calib-json", cj(), "--seq-len", str(args.seq_len), "--samples", str(args.samples)),
    }


def footprint(folder: Path) -> str:
    """Safetensors bytes on disk, and the weight bytes read per decoded token where ecoquant's recipe has them."""
    from ecoquant.export.footprint import human_bytes

    size = human_bytes(sum(f.stat().st_size for f in folder.glob("*.safetensors")))
    recipe = folder / "quant_recipe.json"
    per_token = json.loads(recipe.read_text()).get("bytes_per_token") if recipe.is_file() else None
    return f"{size} | {human_bytes(per_token['total_bytes']) if per_token else '—'}"


def run_measured(cmd: list[str]) -> tuple[float, float]:
    """Run a command; return (wall seconds, peak RSS GiB of its largest process)."""
    t = time.perf_counter()
    # A fresh python per method, so RUSAGE_CHILDREN's max is that method's own.
    wrapper = [sys.executable, "-c",
               "import resource,subprocess,sys,json;"
               "r=subprocess.run(sys.argv[1:]);"
               "print(json.dumps({'rc':r.returncode,'rss':resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}),"
               "file=sys.stderr);sys.exit(r.returncode)", *cmd]
    proc = subprocess.run(wrapper, stderr=subprocess.PIPE, text=True)
    last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "{}"
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"failed: {' '.join(cmd)}")
    rss_kib = json.loads(last)["rss"]
    return time.perf_counter() - t, rss_kib / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--methods", default="rtn-minmax,rtn-mse,llmc-rtn")
    p.add_argument("--windows", type=int, default=32, help="512-token evaluation windows (56 = the whole text)")
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--make-only", action="store_true", help="make the variants (or reuse them), score nothing")
    p.add_argument("--texts", default="austen,sqlite", help="evaluation texts (in domain: austen; out of domain: sqlite)")
    p.add_argument("--refine-steps", type=int, default=4, help="for gptq-refine")
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)

    from ecoquant.fixtures.gemma3_gguf import gemma3_270m_path
    from ecoquant.quality.run import QualityConfig, compare

    base = gemma3_270m_path()
    table = commands(base, args.work, args)
    made: dict[str, Path] = {}
    cost: dict[str, tuple[float, float]] = {}
    for method in args.methods.split(","):
        out = args.work / method
        cmd = table[method](out)
        record = args.work / f"{method}.cost.json"
        if record.is_file() and (out / "config.json").is_file() and json.loads(record.read_text())["cmd"] == cmd:
            # Made by an earlier run of this bench with the very same command: reuse it (and its cost).
            cost[method] = tuple(json.loads(record.read_text())["cost"])  # type: ignore[assignment]
            print(f"  {method}: reused from {record} ({cost[method][0]:.0f} s)", flush=True)
        else:
            print(f"$ {' '.join(cmd)}", flush=True)
            cost[method] = run_measured(cmd)
            record.write_text(json.dumps({"cmd": cmd, "cost": cost[method], "finished": time.time()}))
            print(f"  {method}: {cost[method][0]:.0f} s, peak RSS {cost[method][1]:.2f} GiB", flush=True)
        made[method] = out
    if args.make_only:
        return

    scores: dict[str, dict[str, dict[str, float]]] = {}  # text -> row -> metric
    n_tokens: dict[str, int] = {}
    for text_name in args.texts.split(","):
        t = time.perf_counter()
        report = compare(base, list(made.values()),
                         QualityConfig(max_windows=args.windows, device="cpu", text=text_name))
        print(f"scored on {text_name} in {time.perf_counter() - t:.0f} s", flush=True)
        rows = report.to_dict()
        (args.work / f"quality-{text_name}.json").write_text(json.dumps(rows, indent=2))
        part = next(part for part in rows["parts"] if part["name"] == "text")
        n_tokens[text_name] = part["n_tokens"]
        scores[text_name] = dict(zip(["bf16", *made], [part["base"], *part["variants"]], strict=True))
    texts = list(scores)
    print("\nGemma-3 270M (W4A16 g128 unless the row names another scheme); evaluation tokens: "
          + ", ".join(f"{t} {n_tokens[t]} ({args.windows} x 512-token windows)" for t in texts) + "\n")
    head = " | ".join([*(f"KL {t}" for t in texts), *(f"ppl {t}" for t in texts), *(f"top-1 {t}" for t in texts)])
    print(f"| variant | {head} | quantize wall | peak RSS | footprint | bytes/token |")
    print("|---|" + "---:|" * (3 * len(texts) + 4))
    for name in ["bf16", *made]:
        wall, rss = cost.get(name, (float("nan"), float("nan")))
        extra = "— | —" if name == "bf16" else f"{wall:.0f} s | {rss:.2f} GiB"
        cells = [*(f"{scores[t][name]['kl_mean']:.4f}" for t in texts),
                 *(f"{scores[t][name]['perplexity']:.2f}" for t in texts),
                 *(f"{scores[t][name]['top1_agreement']:.4f}" for t in texts)]
        print(f"| {name} | {' | '.join(cells)} | {extra} | {footprint(made.get(name, base))} |")
    if "rtn-minmax" in made and "llmc-rtn" in made:
        print("\necoquant rtn-minmax vs llmcompressor RTN:", flush=True)
        subprocess.run([sys.executable, str(REPO / "bench/compare_checkpoints.py"), str(made["rtn-minmax"]),
                        str(made["llmc-rtn"])], check=True)


if __name__ == "__main__":
    main()
