"""Past the seed's module set: the head and the token tables, priced, scored and timed side by side.

Three measurements, one run:

1. **E4B shape twin** (config only, meta shapes): weight footprint and weight
   bytes read per decoded token (batch 1) for bf16, the seed's set
   (``gemma4-e``), + an untied int4 head, + int4 embedding and PLE tables
   (``gemma4-e-int4-tables``).
2. **Gemma-3 270M** (trained, from the PyPI GGUF; its tied head is 262144 x
   640, 168M of its 270M parameters): the seed-like set (``text-decoder``,
   RTN g128), + int8 head, + int4 head, + int4 embedding (head untied, bf16),
   each loaded by transformers and scored against bf16 on the shipped
   evaluation text: perplexity, mean KL, top-1 agreement.
3. **The same checkpoints in vLLM's CPU build** (``--vllm-python``): batch-1
   decode tokens/s (one prompt, 128 new tokens, best of 3), beside each one's
   bytes per token. Where vLLM cannot run a checkpoint here, the exact error
   is printed instead of a number.

Usage::

    uv run python bench/token_tables.py --work /tmp/tables-bench [--windows 16] \\
        [--vllm-python ~/.cache/ecoquant/vllm-cpu-env/bin/python]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
from pathlib import Path

DECODE = textwrap.dedent(
    """
    import json, os, sys, time
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM, SamplingParams
    try:
        llm = LLM(model=sys.argv[1], max_model_len=512, gpu_memory_utilization=0.3, enforce_eager=True,
                  distributed_executor_backend="uni", seed=0)
        params = SamplingParams(max_tokens=128, temperature=0.0, ignore_eos=True)
        llm.generate(["The history of the city"], params)  # warm-up
        best = None
        for _ in range(3):
            t0 = time.perf_counter()
            out = llm.generate(["The history of the city begins"], params)
            dt = time.perf_counter() - t0
            n = len(out[0].outputs[0].token_ids)
            best = max(best or 0.0, n / dt)
        print("ECOQUANT_DECODE " + json.dumps({"tokens_per_s": best}), flush=True)
    except Exception as exc:
        print("ECOQUANT_DECODE " + json.dumps({"error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}"}), flush=True)
    """
)


def gib(n: int) -> str:
    return f"{n / 1024**3:.2f} GiB"


def twin_table() -> list[str]:
    from ecoquant.fixtures.e4b_twin import e4b_twin_path
    from ecoquant.plan import plan_footprint, plan_model, plan_tables, plan_token_bytes
    from ecoquant.quantize.scheme import QuantScheme

    twin = e4b_twin_path()
    scheme = QuantScheme()
    lines = [
        "| module set (E4B twin) | footprint | bytes/token | decoder | head | embedding rows | vs bf16 |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, preset, head in (
        ("seed's set (gemma4-e)", "gemma4-e", None),
        ("+ int4 head (gemma4-e-int4-head)", "gemma4-e-int4-head", None),
        ("+ int4 embeddings and PLE (gemma4-e-int4-tables)", "gemma4-e-int4-tables", None),
    ):
        plan = plan_model(twin, preset)
        tables = plan_tables(plan, scheme, plan.preset.embeddings, head or plan.preset.lm_head)
        fp = plan_footprint(plan, scheme, tables)
        tb = plan_token_bytes(plan, scheme, tables)
        if not lines[2:]:
            lines.append(f"| bf16 | {gib(fp.before_bytes)} | {gib(tb.bf16_total)} | | | | 100% |")
        lines.append(
            f"| {label} | {gib(fp.after_bytes)} | {gib(tb.total)} | {gib(tb.decoder)} | {gib(tb.head)} | "
            f"{tb.embedding_rows / 1024:.1f} KiB | {tb.ratio:.1%} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--windows", type=int, default=16, help="512-token evaluation windows for quality")
    parser.add_argument("--vllm-python", type=Path, default=None)
    args = parser.parse_args()

    from ecoquant.api import QuantizeConfig, quantize
    from ecoquant.fixtures.gemma3_gguf import gemma3_270m_path
    from ecoquant.quality.run import QualityConfig, compare

    print("## E4B twin: footprint and bytes per decoded token\n")
    print("\n".join(twin_table()))

    base = gemma3_270m_path()
    variants = {
        "seed-like (text-decoder)": {},
        "+ int8 head": {"lm_head": "int8"},
        "+ int4 head": {"lm_head": "int4"},
        "+ int4 embedding (bf16 untied head)": {"embeddings": "int4"},
    }
    paths: dict[str, Path] = {}
    per_token: dict[str, dict] = {}
    for label, kw in variants.items():
        out = args.work / label.split(" (")[0].replace("+ ", "plus-").replace(" ", "-")
        result = quantize(base, out, QuantizeConfig(preset="text-decoder", overwrite=True, **kw), show_progress=False)
        paths[label] = result.out
        per_token[label] = result.recipe["bytes_per_token"]
    report = compare(base, list(paths.values()), QualityConfig(max_windows=args.windows))
    text = report.part("text")
    print(f"\n## Gemma-3 270M: quality against bf16 ({text.n_tokens} tokens, {text.n_sequences} windows of 512)\n")
    print("| variant | bytes/token | vs bf16 | perplexity | ppl ratio | mean KL | top-1 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    bf16 = next(iter(per_token.values()))["bf16_total_bytes"]
    print(f"| bf16 | {bf16 / 1e6:.1f} MB | 100% | {text.base.perplexity:.3f} | 1.000 | 0 | 1 |")
    for (label, _), score in zip(paths.items(), text.variants, strict=True):
        b = per_token[label]
        print(
            f"| {label} | {b['total_bytes'] / 1e6:.1f} MB | {b['ratio_to_bf16']:.1%} | {score.perplexity:.3f} | "
            f"{score.perplexity_ratio:.3f} | {score.kl_mean:.4f} | {score.top1_agreement:.4f} |"
        )

    if args.vllm_python is None:
        print("\n(vLLM decode speed not measured: pass --vllm-python)")
        return
    print("\n## vLLM CPU build: batch-1 decode, 128 tokens, best of 3\n")
    print("| checkpoint | bytes/token | decode tokens/s | tokens/s x bytes/token (GB/s) |")
    print("|---|---:|---:|---:|")
    script = args.work / "decode.py"
    script.write_text(DECODE)
    rows = {"bf16": (base, bf16)} | {label: (paths[label], per_token[label]["total_bytes"]) for label in list(paths)[:3]}
    for label, (path, nbytes) in rows.items():
        done = subprocess.run([str(args.vllm_python), str(script), str(path)], capture_output=True, text=True, timeout=900)
        line = next((x for x in done.stdout.splitlines() if x.startswith("ECOQUANT_DECODE ")), None)
        got = json.loads(line.split(" ", 1)[1]) if line else {"error": (done.stderr or done.stdout).strip().splitlines()[-1][:300]}
        if "tokens_per_s" in got:
            tps = got["tokens_per_s"]
            print(f"| {label} | {nbytes / 1e6:.1f} MB | {tps:.1f} | {tps * nbytes / 1e9:.2f} |")
        else:
            print(f"| {label} | {nbytes / 1e6:.1f} MB | not run: {got['error']} | |")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
