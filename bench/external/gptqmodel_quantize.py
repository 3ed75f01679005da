"""Run GPTQModel (PyPI ``gptqmodel``) on a model, in its own environment.

Not part of the ecoquant package and never imports it: this is a peer that
ecoquant's GPTQ is compared against. GPTQModel's own GPTQ defaults are kept
(damping 0.05, group-aware activation reordering "GAR" with ``desc_act``
off, calibration sorted by length, true sequential); only what the
comparison fixes is set: 4-bit symmetric, the given group size, the
calibration texts (tokenized here and truncated to ``--seq-len`` tokens; all
are used, none is dropped for being short), the sample count, CPU, seed 42.
GPTQModel picks its own module tree per architecture. For Gemma-4 E
(``Gemma4ForConditionalGeneration``) that is the language model's decoder
Linears: q/k/v/o (KV-shared layers have no k/v), gate/up/down, and the
Per-Layer-Embedding ``per_layer_input_gate``/``per_layer_projection``, which
this script keeps bf16 like ecoquant's ``gemma4-e`` preset. Vision and audio
towers, their projections, embeddings, lm_head and the model-level
``per_layer_model_projection`` stay bf16 (the last one is outside GPTQModel's
decoder tree; ecoquant's preset quantizes it).

GPTQModel has no compressed-tensors / llm-compressor export (its formats are
gptq, gptq_v2, marlin, bitblas, ...; compressed-tensors is import-only). It
saves its native GPTQ format, which transformers loads only where gptqmodel
is installed. By default (``--format compressed-tensors``) this script then
repacks that checkpoint into compressed-tensors ``pack-quantized`` W4A16 with
the same integers; the scales, which GPTQModel writes in fp16, are stored in
the model's dtype (bf16), which is what compressed-tensors would hold them in
anyway. ``--format gptq`` keeps GPTQModel's native checkpoint as it wrote it.
Processor files of SRC that GPTQModel does not save are copied beside it.

Usage (no project environment involved; gptqmodel 7.7.0 needs torch>=2.14.1,
so 7.6.0 is the newest that installs beside torch 2.13.0)::

    uv run --isolated --no-project --with gptqmodel==7.6.0 --with torch==2.13.0 \\
        --with transformers==5.23.0 --with compressed-tensors==0.20.0 \\
        python bench/external/gptqmodel_quantize.py SRC OUT --calib-json calib.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import tempfile
import time
from pathlib import Path

import torch

# no accelerator is used, even where one exists
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# GPTQModel 7.6 gives its CPU pool (cores + 1) // 2 workers but asks 2 of them for
# its model loader: on a machine with 1-2 cores it stops with "ValueError: Virtual
# pool 'model_loader:cpu' requests 2 workers but parent 'cpu' only has 1".
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, ((os.cpu_count() or 1) + 1) // 2)))


def calibration_rows(tok, texts, samples, seq_len):
    """Tokenized rows, each truncated to seq_len tokens; texts under 2 tokens dropped."""
    rows = []
    for text in texts:
        ids = tok(text, truncation=True, max_length=seq_len)["input_ids"]
        if len(ids) < 2:
            continue
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids)})
        if len(rows) == samples:
            break
    if not rows:
        raise SystemExit("no usable calibration text")
    return rows


# ---- GPTQ (sym, v1 on disk) -> compressed-tensors pack-quantized ------------------

def _unpack_rows(packed, bits=4):
    """int32 [n/8, m] packed along dim 0 (GPTQ qweight) -> uint8 [n, m]."""
    per = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    vals = (packed.unsqueeze(1) >> shifts.view(1, per, 1)) & (2**bits - 1)
    return vals.reshape(packed.shape[0] * per, packed.shape[1]).to(torch.uint8)


def _unpack_cols(packed, bits=4):
    """int32 [n, m/8] packed along dim 1 (GPTQ qzeros) -> uint8 [n, m]."""
    return _unpack_rows(packed.t().contiguous(), bits).t().contiguous()


def gptq_to_compressed_tensors(src: Path, dst: Path, group_size: int) -> None:
    """Rewrite a GPTQModel checkpoint (4-bit sym, format gptq) as compressed-tensors pack-quantized."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from safetensors import safe_open
    from safetensors.torch import save_file

    cfg = json.loads((src / "config.json").read_text())
    qcfg = cfg.get("quantization_config") or {}
    if qcfg.get("bits") != 4 or not qcfg.get("sym", True):
        raise SystemExit(f"repacking handles 4-bit symmetric GPTQ only, got {qcfg}")
    fmt = qcfg.get("checkpoint_format", qcfg.get("format", "gptq"))
    if fmt not in ("gptq", "gptq_v2"):
        raise SystemExit(f"repacking handles gptq / gptq_v2 checkpoints only, got {fmt}")
    zero_offset = 1 if fmt == "gptq" else 0  # v1 stores zero - 1
    dtype = getattr(torch, (cfg.get("text_config") or {}).get("dtype") or cfg.get("dtype") or "bfloat16")
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.suffix != ".safetensors" and f.name not in ("config.json", "model.safetensors.index.json") \
                and f.is_file() and f.name != "quantize_config.json":
            shutil.copy2(f, dst / f.name)
    quantized = []
    weight_map = {}
    for shard in sorted(src.glob("*.safetensors")):
        out = {}
        with safe_open(str(shard), "pt") as fh:
            keys = list(fh.keys())
            prefixes = sorted(k[: -len(".qweight")] for k in keys if k.endswith(".qweight"))
            skip = {f"{p}.{s}" for p in prefixes for s in ("qweight", "qzeros", "scales", "g_idx")}
            for k in keys:
                if k not in skip:
                    out[k] = fh.get_tensor(k)
            for p in prefixes:
                qweight = fh.get_tensor(f"{p}.qweight")   # [in/8, out]
                qzeros = fh.get_tensor(f"{p}.qzeros")     # [groups, out/8]
                scales = fh.get_tensor(f"{p}.scales")     # [groups, out]
                q = _unpack_rows(qweight)                 # [in, out], 0..15
                n_in, n_out = q.shape
                zeros = _unpack_cols(qzeros)[:, :n_out].to(torch.int16) + zero_offset  # [groups, out]
                if f"{p}.g_idx" in keys:
                    g_idx = fh.get_tensor(f"{p}.g_idx").to(torch.long)
                else:
                    g_idx = torch.arange(n_in) // group_size
                if not torch.equal(g_idx, torch.arange(n_in) // group_size):
                    raise SystemExit(f"{p}: non-trivial g_idx (act-order); cannot repack as plain groups")
                if not bool((zeros == 8).all()):
                    raise SystemExit(f"{p}: symmetric checkpoint with zero-points != 8")
                signed = (q.t().to(torch.int16) - 8).to(torch.int8).contiguous()  # [out, in], -8..7
                out[f"{p}.weight_packed"] = pack_to_int32(signed, 4)
                # compressed-tensors holds scales in the model's dtype (bf16 here): GPTQModel's
                # fp16 scales are rounded to it, as loading would do anyway
                out[f"{p}.weight_scale"] = scales.t().contiguous().to(dtype)
                out[f"{p}.weight_shape"] = torch.tensor([n_out, n_in], dtype=torch.int64)
                quantized.append(p)
        save_file(out, str(dst / shard.name), metadata={"format": "pt"})
        weight_map.update({k: shard.name for k in out})
    if (src / "model.safetensors.index.json").exists():
        index = json.loads((src / "model.safetensors.index.json").read_text())
        index["weight_map"] = weight_map
        (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    cfg["quantization_config"] = ct_quantization_config(
        group_size, sorted(_dense_linears(src, set(quantized))),
        producer={"tool": "gptqmodel", "repacked_from": fmt, "source_config": qcfg},
    )
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))


def ct_quantization_config(group_size: int, ignore: list, producer: dict) -> dict:
    """config.json's quantization_config for W4A16 sym group pack-quantized, built by compressed-tensors."""
    import compressed_tensors
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    weights = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=group_size)
    group = QuantizationScheme(targets=["Linear"], weights=weights, format="pack-quantized")
    config = QuantizationConfig(config_groups={"group_0": group}, format="pack-quantized",
                                quantization_status="compressed", ignore=ignore)
    return {**config.model_dump(exclude_none=False, mode="json"), "version": compressed_tensors.__version__,
            "producer": producer}


def _dense_linears(src: Path, quantized: set) -> set:
    """Names of the nn.Linear modules of the model that were not quantized."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(str(src))
    config.quantization_config = None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    cls = AutoModelForImageTextToText if getattr(config, "vision_config", None) is not None else AutoModelForCausalLM
    with torch.device("meta"):
        model = cls.from_config(config)
    return {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in quantized}


def copy_side_files(src: Path, dst: Path) -> None:
    """Processor and template files of SRC that the saved checkpoint lacks (GPTQModel saves the tokenizer only)."""
    for f in Path(src).iterdir():
        side = f.name.endswith(("processor_config.json", "chat_template.jinja", "chat_template.json")) \
            or f.name.startswith("tokenizer") or f.name == "special_tokens_map.json"
        if f.is_file() and side and not (dst / f.name).exists():
            shutil.copy2(f, dst / f.name)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("src")
    p.add_argument("out")
    p.add_argument("--calib-json", required=True, help="JSON list of calibration texts")
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--group-size", type=int, default=128, choices=[128, 32])
    p.add_argument("--format", choices=["compressed-tensors", "gptq"], default="compressed-tensors")
    args = p.parse_args()

    from gptqmodel import GPTQConfig, GPTQModel
    from transformers import AutoTokenizer

    random.seed(42)
    torch.manual_seed(42)
    texts = json.load(open(args.calib_json))
    tok = AutoTokenizer.from_pretrained(args.src)
    rows = calibration_rows(tok, texts, args.samples, args.seq_len)
    t0 = time.perf_counter()
    # Like ecoquant's gemma4-e preset: Gemma-4's PLE gate/projection stay bf16 (GPTQModel's
    # Gemma-4 module tree would quantize them); the patterns match nothing elsewhere.
    keep = {r"-:.*\.per_layer_input_gate$": {}, r"-:.*\.per_layer_projection$": {}}
    qcfg = GPTQConfig(bits=4, group_size=args.group_size, sym=True, desc_act=False, dynamic=keep)
    model = GPTQModel.load(args.src, qcfg, device="cpu", dtype=torch.bfloat16)
    model.quantize(rows, batch_size=1, tokenizer=tok)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as staging:
        native = Path(staging) / "gptq"
        model.save(str(native))
        tok.save_pretrained(str(native))
        copy_side_files(Path(args.src), native)
        made = native
        if args.format == "compressed-tensors":
            made = Path(staging) / "ct"
            gptq_to_compressed_tensors(native, made, args.group_size)
        shutil.rmtree(out, ignore_errors=True)
        made.rename(out)
    seconds = time.perf_counter() - t0
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps({"seconds": seconds, "peak_rss_gib": peak_gib, "samples": len(rows),
                      "format": args.format}))


if __name__ == "__main__":
    main()
