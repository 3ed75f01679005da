"""Small real-architecture models and helpers for the calibration tests.

The tiny Gemma-4 fixture comes from :mod:`ecoquant.fixtures.tiny_gemma4`;
Gemma-3 and Llama are built here from configs (random weights, with norms
randomised too so that folding a scale into them is a real test).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ecoquant.calibrate.methods import Outcome, Unit
from ecoquant.quantize.scheme import QuantScheme


class IdentityCalibrator:
    """Quantizes nothing: the walk must then reproduce the unquantized model exactly."""

    name = "identity"

    def __init__(self) -> None:
        self.observed: dict[str, list[tuple[tuple[str, ...], tuple[int, ...]]]] = {}
        self.scheme = QuantScheme()

    def begin(self, unit: Unit) -> Any:
        seen = self.observed.setdefault(unit.name, [])

        class _Session:
            def observe(self, names: tuple[str, ...], x: torch.Tensor) -> None:
                seen.append((names, tuple(x.shape)))

            def finish(self) -> Outcome:
                return Outcome()

        return _Session()

    def describe(self) -> dict[str, Any]:
        return {"method": self.name}


def _randomise_norms(model: nn.Module, generator: torch.Generator, center: float) -> None:
    """Non-trivial norm weights around ``center``, so that a wrong fold shows up in the outputs."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.dim() == 1:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3 + center)


def save_tiny_gemma3(out: Path, dtype: torch.dtype = torch.float32) -> Path:
    """A 3-layer Gemma3ForCausalLM (sliding + full attention, GQA) saved to ``out``."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        sliding_window=16,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=1,
    )
    torch.manual_seed(1234)
    model = Gemma3ForCausalLM(config).eval()
    _randomise_norms(model, torch.Generator().manual_seed(1), center=0.0)  # Gemma-3 norms compute (1 + w)
    model.to(dtype).save_pretrained(out)
    return out


def save_tiny_llama(out: Path, dtype: torch.dtype = torch.float32) -> Path:
    """A 2-layer multi-head (no GQA) LlamaForCausalLM saved to ``out``: v -> o smoothing applies."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    torch.manual_seed(4321)
    model = LlamaForCausalLM(config).eval()
    _randomise_norms(model, torch.Generator().manual_seed(2), center=1.0)
    model.to(dtype).save_pretrained(out)
    return out


def random_batches(n: int, length: int, vocab: int, seed: int = 0, low: int = 20) -> list[dict[str, torch.Tensor]]:
    """``n`` single-sample batches of random token ids (special ids below ``low`` avoided)."""
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(low, vocab, (1, length), generator=g)} for _ in range(n)]


def layer_io(model: nn.Module, layers: nn.ModuleList, batches: list[dict[str, Any]]) -> dict[tuple[int, int], Any]:
    """Run the full model and record, per (layer, batch): output and a copy of the shared K/V it saw."""
    seen: dict[tuple[int, int], Any] = {}
    current = [0]
    handles = []
    for i, layer in enumerate(layers):

        def hook(module: nn.Module, args: Any, kwargs: Any, out: Any, i: int = i) -> None:
            kv = kwargs.get("shared_kv_states")
            kv_copy = {k: tuple(t.clone() for t in v) for k, v in kv.items()} if kv is not None else None
            seen[(i, current[0])] = ((out[0] if isinstance(out, tuple) else out).clone(), kv_copy)

        handles.append(layer.register_forward_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            for b, batch in enumerate(batches):
                current[0] = b
                model(**batch, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return seen


def save_synthetic_llama(
    out: Path, *, layers: int = 32, hidden: int = 1024, intermediate: int = 4096, dtype: str = "F32"
) -> int:
    """A Llama checkpoint written one tensor at a time (never all in memory); returns its weight bytes.

    Defaults give 2.15 GB of float32 weights, 67 MB per decoder layer.
    """
    from transformers import LlamaConfig

    from ecoquant.export.safetensors_stream import DTYPES, PlannedTensor, write_streaming
    from ecoquant.models.loading import meta_model

    config = LlamaConfig(
        vocab_size=1024,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 128,
        num_key_value_heads=hidden // 128,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        dtype="float32" if dtype == "F32" else "bfloat16",
    )
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    model = meta_model(config)

    def produce(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        g = torch.Generator().manual_seed(sum(name.encode()) * 7919 + len(name))
        if len(shape) == 1:
            return (1.0 + 0.1 * torch.randn(shape, generator=g)).to(DTYPES[dtype])
        return (torch.randn(shape, generator=g) * shape[-1] ** -0.5).to(DTYPES[dtype])

    planned = [
        PlannedTensor(name, dtype, tuple(p.shape), produce=lambda n=name, s=tuple(p.shape): produce(n, s))
        for name, p in model.named_parameters()
    ]
    return write_streaming(out / "model.safetensors", planned)
