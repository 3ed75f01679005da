"""Run llmcompressor 0.14 on a model, in its own environment (it pins its own transformers).

Not part of the ecoquant package and never imports it: this is the reference
that ecoquant is compared against. Usage (no project environment involved)::

    uv run --isolated --no-project --with llmcompressor==0.14.0.1 --with torch==2.13.0 \\
        python bench/external/llmcompressor_oneshot.py SRC OUT --ignore lm_head --ignore 're:.*vision_tower.*'

``--method rtn`` (default) is ``QuantizationModifier(scheme="W4A16")`` with no
calibration data, exactly the seed model card's recipe; ``--scheme`` names
another preset (``FP8_DYNAMIC``, ``W8A8``: dynamic per-token activations, so
still no calibration data). ``--method gptq``
runs ``GPTQModifier`` with the given pipeline on text calibration samples
read from a JSON list of strings; ``--smoothquant ALPHA`` puts
``SmoothQuantModifier(smoothing_strength=ALPHA)`` before it (llmcompressor's
W8A8 recipe), with the architecture's registered mappings unless
``--sq-mapping BALANCE1,BALANCE2=SMOOTH`` (llmcompressor's ``re:`` patterns)
names them; the run stops if nothing was smoothed.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("src")
    p.add_argument("out")
    p.add_argument("--ignore", action="append", default=[])
    p.add_argument("--method", choices=["rtn", "gptq"], default="rtn")
    p.add_argument("--pipeline", default="basic", help="gptq: basic | sequential | independent")
    p.add_argument("--sequential-target", action="append", default=None)
    p.add_argument("--calib-json", help="gptq: JSON list of calibration texts")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--scheme", default="W4A16", help="compressed-tensors preset: W4A16, FP8_DYNAMIC, W8A8")
    p.add_argument("--smoothquant", type=float, default=None, help="gptq: SmoothQuant first, at this strength")
    p.add_argument("--sq-mapping", action="append", default=None, help="BALANCE,...=SMOOTH patterns")
    p.add_argument("--dampening", type=float, default=0.01)
    args = p.parse_args()

    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

    config = AutoConfig.from_pretrained(args.src)
    auto = AutoModelForImageTextToText if hasattr(config, "vision_config") else AutoModelForCausalLM
    model = auto.from_pretrained(args.src, dtype=torch.bfloat16)
    t0 = time.perf_counter()
    smoothed: list[str] = []
    if args.smoothquant is not None and args.method != "gptq":
        raise SystemExit("--smoothquant goes with --method gptq (llmcompressor's W8A8 recipe)")
    if args.method == "rtn":
        recipe = QuantizationModifier(targets="Linear", scheme=args.scheme, ignore=args.ignore)
        oneshot(model=model, recipe=recipe)
    else:
        from datasets import Dataset

        tok = AutoTokenizer.from_pretrained(args.src)
        texts = json.load(open(args.calib_json))
        enc = [tok(t, truncation=True, max_length=args.max_length, add_special_tokens=True) for t in texts]
        ds = Dataset.from_list([{"input_ids": e["input_ids"], "attention_mask": e["attention_mask"]} for e in enc])
        recipe = [GPTQModifier(targets="Linear", scheme=args.scheme, ignore=args.ignore, dampening_frac=args.dampening)]
        if args.smoothquant is not None:
            from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier

            mappings = None
            if args.sq_mapping:
                mappings = [[m.rsplit("=", 1)[0].split(","), m.rsplit("=", 1)[1]] for m in args.sq_mapping]
            recipe.insert(0, SmoothQuantModifier(smoothing_strength=args.smoothquant, mappings=mappings))
            from loguru import logger

            # llmcompressor logs each norm it smooths; none means the mappings matched nothing.
            logger.add(lambda m: smoothed.append(m), filter=lambda r: r["message"].startswith("Smoothing with"), level="INFO")
        kwargs = {}
        if args.sequential_target:
            kwargs["sequential_targets"] = args.sequential_target
        oneshot(model=model, recipe=recipe, dataset=ds, pipeline=args.pipeline, max_seq_length=args.max_length,
                num_calibration_samples=len(enc), **kwargs)
    seconds = time.perf_counter() - t0
    if args.smoothquant is not None:
        print(f"smoothed {len(smoothed)} norms")
        if not smoothed:
            raise SystemExit("SmoothQuant smoothed nothing: check --sq-mapping")
    model.save_pretrained(args.out, save_compressed=True)
    try:
        AutoTokenizer.from_pretrained(args.src).save_pretrained(args.out)
    except Exception as exc:  # a tokenizer-less synthetic model is fine
        print(f"note: no tokenizer copied ({type(exc).__name__})")
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps({"seconds": seconds, "peak_rss_gib": peak_gib}))


if __name__ == "__main__":
    main()
