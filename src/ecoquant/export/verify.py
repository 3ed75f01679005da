"""Check a quantized checkpoint against its base, the way a user will load it.

The checkpoint is loaded through transformers (which decompresses the packed
weights with compressed-tensors), so this tests the real loading path, not
ecoquant's own reader. Two checks:

* per module, the relative Frobenius error ``|W_q - W| / |W|`` of the
  decompressed weight against the base weight (read from the base's
  safetensors one tensor at a time);
* one forward pass on a fixed prompt (with an image when the model takes
  images): max and mean absolute logit difference and top-1 agreement.

Only one model is in memory at a time: the quantized model's logits are kept,
the model is freed, then the base model runs.
"""

from __future__ import annotations

import gc
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ecoquant.errors import EcoquantError
from ecoquant.export.safetensors_stream import read_tensor
from ecoquant.models.dense import decompress_now, loadable
from ecoquant.models.layout import model_tensor_infos
from ecoquant.models.loading import load_config, model_class, resolve_model
from ecoquant.models.quant_config import quantized_module_names

PROMPT = "The quick brown fox jumps over the lazy dog. Describe the picture in one sentence."


@dataclass(frozen=True)
class Verification:
    """Per-module weight errors and logit differences of a checkpoint against its base."""

    module_errors: dict[str, float]
    logits_max_abs_diff: float
    logits_mean_abs_diff: float
    top1_agreement: float
    with_image: bool

    @property
    def worst_module(self) -> tuple[str, float]:
        """The module with the largest relative weight error."""
        name = max(self.module_errors, key=self.module_errors.__getitem__)
        return name, self.module_errors[name]


def _quantized_modules(path: Path) -> list[str]:
    return quantized_module_names(t.name for t in model_tensor_infos(path))


def _inputs(path: Path) -> tuple[dict[str, torch.Tensor], bool]:
    """Tokenized prompt, with a small synthetic image when the processor takes images.

    A checkpoint without tokenizer files (a synthetic benchmark model) gets fixed token ids.
    """
    from transformers import AutoProcessor, AutoTokenizer

    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        vocab = int(getattr(load_config(path).get_text_config(), "vocab_size", 256))
        ids = (torch.arange(2, 34) * 7919 % vocab).unsqueeze(0)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, False
    processor = AutoProcessor.from_pretrained(path)
    if hasattr(processor, "image_processor"):
        from PIL import Image, ImageDraw

        image = Image.new("RGB", (96, 96), "white")
        ImageDraw.Draw(image).rectangle((20, 20, 76, 60), fill="navy")
        messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": PROMPT}]}]
        batch = processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        )
        return dict(batch), True
    tokenizer = AutoTokenizer.from_pretrained(path)
    return dict(tokenizer(PROMPT, return_tensors="pt")), False


@torch.no_grad()
def _logits(path: Path, inputs: dict[str, torch.Tensor], keep: list[str] | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Final-position-and-all logits of the model at ``path``, and (optionally) some of its weights."""
    cls = model_class(load_config(path))
    # Plain ``weight`` tensors to compare need transformers' dequantize path (the default keeps Linears
    # packed), or ecoquant's dense copy where that path would read mixed schemes wrong.
    with loadable(path, dense=bool(keep)) as (folder, extra), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="You passed `quantization_config`")
        model = decompress_now(cls.from_pretrained(folder, dtype=torch.bfloat16, **extra))  # type: ignore[attr-defined]
    model.eval()
    weights = {}
    if keep:
        modules = dict(model.named_modules())
        weights = {name: modules[name].weight.detach().float().clone() for name in keep}
    logits = model(**inputs).logits.float()
    del model
    gc.collect()
    return logits, weights


def _untied_head(path: Path) -> tuple[str, str] | None:
    """``(head, embedding)`` when the recipe says the head was written untied from that embedding."""
    recipe = path / "quant_recipe.json"
    if not recipe.is_file():
        return None
    head = (json.loads(recipe.read_text()).get("token_tables") or {}).get("lm_head")
    return None if not head else ("lm_head", str(head["untied_from"]))


def verify(checkpoint: str | Path, base: str | Path) -> Verification:
    """Compare the checkpoint at ``checkpoint`` with the model it was made from."""
    qpath, bpath = resolve_model(checkpoint), resolve_model(base)
    if "quantization_config" not in json.loads((qpath / "config.json").read_text()):
        raise EcoquantError(f"{qpath} is not a quantized checkpoint (config.json has no quantization_config)")
    modules = _quantized_modules(qpath)
    inputs, with_image = _inputs(qpath)
    q_logits, q_weights = _logits(qpath, inputs, modules)
    base_infos = {t.name: t for t in model_tensor_infos(bpath)}
    errors: dict[str, float] = {}
    untied = _untied_head(qpath)
    for name in modules:
        info = base_infos.get(f"{name}.weight")
        if info is None and untied is not None and name == untied[0]:
            info = base_infos.get(f"{untied[1]}.weight")  # a head written untied from the tied embedding
        if info is None:
            raise EcoquantError(f"{bpath} has no tensor {name}.weight: is it the model {qpath} was made from?")
        w = read_tensor(info).float()
        errors[name] = float((q_weights.pop(name) - w).norm() / w.norm().clamp_min(1e-12))
    b_logits, _ = _logits(bpath, inputs, None)
    diff = (q_logits - b_logits).abs()
    agree = (q_logits.argmax(-1) == b_logits.argmax(-1)).float().mean()
    return Verification(
        module_errors=errors,
        logits_max_abs_diff=float(diff.max()),
        logits_mean_abs_diff=float(diff.mean()),
        top1_agreement=float(agree),
        with_image=with_image,
    )


def summary(v: Verification) -> dict[str, Any]:
    """JSON-ready summary."""
    errs = list(v.module_errors.values())
    worst, worst_err = v.worst_module
    return {
        "modules": len(errs),
        "relative_error_mean": sum(errs) / len(errs),
        "relative_error_max": worst_err,
        "worst_module": worst,
        "logits_max_abs_diff": v.logits_max_abs_diff,
        "logits_mean_abs_diff": v.logits_mean_abs_diff,
        "top1_agreement": v.top1_agreement,
        "with_image": v.with_image,
    }
