"""The NF4 runtime baseline: a bf16 model quantized to 4-bit NF4 by bitsandbytes while loading.

Why it is in the evaluation: the first seed shipped exactly this (vLLM's
``quantization: bitsandbytes``) and measured 13.7% *more* energy than bf16.
A stored W4A16 checkpoint is only worth its trouble if it beats both bf16 and
this, so ``ecoquant eval`` puts base, NF4, RTN, GPTQ and AWQ in one table.

A variant spec says "NF4 of MODEL" as ``nf4:MODEL`` (``nf4:/models/gemma-4-E4B-it``
or ``nf4:google/gemma-4-E4B-it``): the same folder as the base, loaded another
way, so the table can hold both. :func:`load_nf4` loads it;
:func:`load_nf4_backend` wraps it in the transformers backend the runner uses.

What gets quantized follows the seed's Round-1 artifact (vLLM 0.20.2, where
"the vision tower stays bf16, the LM layers are NF4"): the language model's
Linear layers, while the towers, the modality projections and ``lm_head`` stay
bf16 (:data:`NF4_KEEP`, per model type). The compute dtype is bf16 (4-bit
tiles are dequantized to bf16 for each matmul) and double quantization is
off, as in vLLM's loader. Serving the same baseline with vLLM needs vLLM
0.27.1 or earlier: 0.28 removed bitsandbytes (see
:data:`ecoquant.serve.launch.LAST_VLLM_WITH_BITSANDBYTES`).

bitsandbytes (>= 0.48) runs NF4 on CUDA and, through its CPU backend, on x86
CPUs (slowly: a pure-PyTorch dequantize unless the ``kernels`` package
supplies a fused one). transformers also needs ``accelerate`` for it. Both are
the optional ``nf4`` extra; without them :func:`load_nf4` raises one line
saying how to install them.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

from ecoquant.errors import EcoquantError

NF4_PREFIX = "nf4:"

REQUIRED_PACKAGES: tuple[str, ...] = ("bitsandbytes", "accelerate")
"""What transformers' bitsandbytes path imports (accelerate for the quantized loading hooks)."""

INSTALL_HINT = "uv sync --extra nf4 (or: pip install bitsandbytes accelerate)"

NF4_KEEP: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        # The seed's NF4 artifact kept the vision tower bf16 and quantized the LM stack; the
        # audio tower and the embedders that project tower outputs into the LM are not LM
        # layers either. lm_head is tied to the embeddings (quantizing it would untie them).
        "gemma4": ("lm_head", "model.vision_tower", "model.audio_tower", "model.embed_vision", "model.embed_audio"),
        # Gemma-3: same rule, its projector is multi_modal_projector.
        "gemma3": ("lm_head", "model.vision_tower", "model.multi_modal_projector"),
    }
)
"""Module-name prefixes kept in bf16, per ``model_type``; other models get transformers' default (all but ``lm_head``)."""


def is_nf4_spec(source: str) -> bool:
    """Whether a model spec asks for the NF4 runtime variant (``nf4:MODEL``)."""
    return source.startswith(NF4_PREFIX)


def nf4_spec(model: str | Path) -> str:
    """``/models/base`` -> ``nf4:/models/base``."""
    return f"{NF4_PREFIX}{model}"


def nf4_model(source: str) -> str:
    """The model an ``nf4:MODEL`` spec names (the spec itself must be one)."""
    if not is_nf4_spec(source):
        raise EcoquantError(f"{source!r} is not an NF4 variant spec; write nf4:MODEL")
    model = source[len(NF4_PREFIX) :]
    if not model:
        raise EcoquantError("nf4: needs a model after the colon, e.g. nf4:/models/gemma-4-E4B-it")
    return model


def underlying_model(source: str) -> str:
    """The folder or hub id a model spec loads: MODEL for ``nf4:MODEL``, else the spec itself."""
    return nf4_model(source) if is_nf4_spec(source) else source


def missing_packages() -> list[str]:
    """The packages of :data:`REQUIRED_PACKAGES` this environment lacks."""
    return [name for name in REQUIRED_PACKAGES if importlib.util.find_spec(name) is None]


def check_nf4_available(device: str = "cpu") -> None:
    """Raise one clear line when NF4 cannot run here (packages missing, or no backend for ``device``)."""
    missing = missing_packages()
    if missing:
        raise EcoquantError(f"the NF4 variant needs {' and '.join(missing)}: {INSTALL_HINT}")
    from transformers.integrations import validate_bnb_backend_availability

    try:
        validate_bnb_backend_availability(raise_exception=True)
    except (RuntimeError, ImportError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EcoquantError(f"bitsandbytes cannot run NF4 on {device} here ({first}); use a CUDA GPU") from None


def nf4_quantization_config(model_type: str | None = None) -> Any:
    """transformers' ``BitsAndBytesConfig`` for the baseline (NF4, bf16 compute, no double quantization)."""
    import torch
    from transformers import BitsAndBytesConfig

    keep = NF4_KEEP.get(model_type or "")
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_use_double_quant=False,
        llm_int8_skip_modules=list(keep) if keep is not None else None,
    )


def load_nf4(path: str | Path, device: str = "auto") -> Any:
    """Load a bf16 model folder (or hub id) with its Linear weights quantized to NF4 in memory.

    ``device``: ``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda``,
    ``cuda:N``. bitsandbytes quantizes while the weights are placed, so the
    model is loaded straight onto its device (a 4-bit model cannot be moved
    with ``.to()`` afterwards).
    """
    import torch

    from ecoquant.models.loading import load_config, model_class, resolve_model

    model_path = resolve_model(path)
    config = load_config(model_path)
    if getattr(config, "quantization_config", None) is not None:
        raise EcoquantError(f"{model_path} is already quantized; NF4 is loaded from the bf16 base model folder")
    from ecoquant.devices import cuda_devices, resolve_device

    target = resolve_device(device, cuda_devices())
    check_nf4_available(target)
    cls = model_class(config)
    device_map = {"": torch.device(target).index or 0} if target.startswith("cuda") else {"": "cpu"}
    from ecoquant.quiet import quiet_loads

    with quiet_loads():
        model = cls.from_pretrained(  # type: ignore[attr-defined]
            model_path,
            dtype=torch.bfloat16,
            quantization_config=nf4_quantization_config(getattr(config, "model_type", None)),
            device_map=device_map,
        )
    return model.eval()


def nf4_linear_names(model: Any) -> list[str]:
    """Names of the modules bitsandbytes replaced with 4-bit NF4 layers (what the baseline quantized)."""
    import bitsandbytes as bnb

    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, bnb.nn.Linear4bit) and getattr(module.weight, "quant_type", "nf4") == "nf4"
    ]


def load_nf4_backend(source: str, options: Any = None) -> Any:
    """The transformers backend over ``load_nf4(nf4_model(source))``, for ``ecoquant eval`` and the fallback server.

    ``options`` is a :class:`~ecoquant.eval.backends.transformers_backend.TransformersOptions`;
    its ``dtype`` must be bfloat16 (the NF4 compute dtype).
    """
    from transformers import AutoProcessor

    from ecoquant.eval.backends.transformers_backend import TransformersBackend, TransformersOptions
    from ecoquant.models.loading import resolve_model

    options = options or TransformersOptions()
    if options.dtype != "bfloat16":
        raise EcoquantError(f"the NF4 variant computes in bfloat16; drop --dtype {options.dtype}")
    model_path = resolve_model(nf4_model(source))
    try:
        processor = AutoProcessor.from_pretrained(model_path)
    except (OSError, ValueError) as exc:
        raise EcoquantError(f"{model_path} has no processor transformers can load ({exc})") from None
    model = load_nf4(model_path, options.device)
    return TransformersBackend(model, processor, source, options)


def nf4_recipe(source: str, model_type: str | None = None) -> dict[str, Any]:
    """What the run record says about an NF4 variant (it has no ``quant_recipe.json``: nothing was written)."""
    return {
        "method": "bitsandbytes-nf4",
        "format": "runtime",
        "source": {"model": nf4_model(source)},
        "scheme": {"num_bits": 4, "type": "nf4", "compute_dtype": "bfloat16", "double_quant": False},
        "targets": ["Linear"],
        "ignore": list(NF4_KEEP.get(model_type or "", ("lm_head",))),
        "calibration": None,
    }
