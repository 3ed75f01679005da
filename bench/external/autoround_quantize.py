"""Run AutoRound (PyPI ``auto-round``) on a model, in its own environment.

Not part of the ecoquant package and never imports it: this is the reference
that ecoquant's calibrated methods are compared against. AutoRound's defaults
(SignRound, 200 iterations per block, batch 8, its own learning rate) are
kept; only what the comparison fixes is set: W4A16 symmetric int4 with the
given group size (128 or 32), the calibration texts (the hub's default
dataset is unreachable offline), the sample count and length, CPU, seed 42.
AutoRound skips calibration texts shorter than ``--seq-len`` tokens (its own
rule), so it may use fewer samples than it was given.

Text-only decoders (Gemma-3 270M, ...) load with ``AutoModelForCausalLM``.
A config with a ``vision_config`` (Gemma-4 E: ``Gemma4ForConditionalGeneration``
with vision and audio towers, Per-Layer Embeddings, KV-shared layers) loads
with ``AutoModelForImageTextToText``; AutoRound then treats it as a
multimodal model and, by its default (``quant_nontext_module=False``),
quantizes only the language model's decoder blocks, calibrated on text alone.
Like ecoquant's ``gemma4-e`` preset, the Per-Layer-Embedding gate and
projection inside each decoder layer (``per_layer_input_gate``,
``per_layer_projection``) stay bf16; so do the vision/audio towers and their
projections, the embeddings and lm_head. One difference remains: the model-level
``per_layer_model_projection`` is outside AutoRound's decoder blocks, so it
stays bf16 here, where ecoquant's preset quantizes it.

The result is written in llm-compressor's compressed-tensors format
(``format="llm_compressor"``, pack-quantized) so that transformers loads it
beside the other variants. Usage (no project environment involved)::

    uv run --isolated --no-project --with auto-round==0.16.1 --with torch==2.13.0 \\
        --with transformers==5.23.0 --with compressed-tensors==0.20.0 --with pillow==13.0.0 --with torchvision==0.28.0 \\
        python bench/external/autoround_quantize.py SRC OUT --calib-json calib.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import torch

# no accelerator is used, even where one exists
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

# Decoder-layer Linears that stay bf16, as in ecoquant's gemma4-e preset (AutoRound
# matches ignore_layers as substrings of module names; these match nothing in Gemma-3).
KEEP_BF16 = ("per_layer_input_gate", "per_layer_projection")
BATCH = 8  # AutoRound's default batch size, passed explicitly because the batches below need it


def text_batches(tok, texts, samples, seq_len, batch):
    """Calibration for a multimodal model: token batches [batch, seq_len] of texts with >= seq_len tokens.

    AutoRound's multimodal calibrator counts every item of a list dataset as a whole
    batch, so a plain list of strings would calibrate on samples / batch texts. Giving
    it ready batches keeps the text path's meaning: the same tokens, the same rule
    (shorter texts skipped, longer ones truncated), the same sample count.
    """
    rows = [ids for ids in (tok(t, truncation=True, max_length=seq_len)["input_ids"] for t in texts)
            if len(ids) >= seq_len][:samples]
    if not rows:
        raise SystemExit(f"no calibration text has {seq_len} tokens")
    out = []
    for i in range(0, len(rows), batch):
        ids = torch.tensor(rows[i:i + batch])
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return out, len(rows)


def load(src: str):
    """(model, tokenizer, is_multimodal): the right auto class for the checkpoint."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

    config = AutoConfig.from_pretrained(src)
    multimodal = getattr(config, "vision_config", None) is not None
    cls = AutoModelForImageTextToText if multimodal else AutoModelForCausalLM
    tok = AutoTokenizer.from_pretrained(src)
    model = cls.from_pretrained(src, dtype=torch.bfloat16)
    return model, tok, multimodal


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("src")
    p.add_argument("out")
    p.add_argument("--calib-json", required=True, help="JSON list of calibration texts")
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--group-size", type=int, default=128, choices=[128, 32])
    p.add_argument("--iters", type=int, default=None, help="default: AutoRound's own (200)")
    args = p.parse_args()

    from auto_round import AutoRound

    torch.manual_seed(42)
    model, tok, multimodal = load(args.src)
    texts = json.load(open(args.calib_json))
    extra = {} if args.iters is None else {"iters": args.iters}
    dataset, samples = texts, args.samples
    if multimodal:
        from transformers import AutoProcessor

        # AutoRound's multimodal template wants the processor even for text-only calibration
        extra["processor"] = AutoProcessor.from_pretrained(args.src)
        extra["ignore_layers"] = ",".join(KEEP_BF16)
        dataset, samples = text_batches(tok, texts, args.samples, args.seq_len, BATCH)
    t0 = time.perf_counter()
    ar = AutoRound(model, tokenizer=tok, scheme="W4A16", group_size=args.group_size, sym=True,
                   dataset=dataset, nsamples=samples, seqlen=args.seq_len, batch_size=BATCH,
                   device_map="cpu", seed=42, **extra)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # AutoRound may write into a sub-folder named after the model and scheme; stage
    # it beside OUT and move the folder that holds config.json into place.
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as staging:
        ar.quantize_and_save(staging, format="llm_compressor")
        made = [p for p in [Path(staging), *Path(staging).iterdir()] if (p / "config.json").exists()]
        if len(made) != 1:
            raise SystemExit(f"expected one checkpoint folder in {staging}, found {made}")
        made = made[0]
        if made == Path(staging):  # written in place: move its contents into a folder of their own
            made = Path(staging) / "checkpoint"
            made.mkdir()
            for f in list(Path(staging).iterdir()):
                if f != made:
                    f.rename(made / f.name)
        shutil.rmtree(out, ignore_errors=True)
        made.rename(out)
    seconds = time.perf_counter() - t0
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps({"seconds": seconds, "peak_rss_gib": peak_gib}))


if __name__ == "__main__":
    main()
