"""Finding a model and looking at it without loading its weights.

A MODEL argument is a local folder or a hub id. Everything here works from
``config.json`` and safetensors headers: the module tree is built on the meta
device (no weight memory), and tensors are read one at a time when needed.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ecoquant.errors import EcoquantError
from ecoquant.models.integrity import check_checkpoint, check_config_json, check_model_type

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

#: Files copied verbatim from a source model into a quantized checkpoint.
SIDECAR_FILES: tuple[str, ...] = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "processor_config.json",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "generation_config.json",
)


def is_hub_id(text: str) -> bool:
    """Whether ``text`` reads as a hub id (``owner/name``) rather than a local path."""
    return bool(_HUB_ID.match(text)) and not text.startswith((".", "/", "~"))


def resolve_model(model: str | Path) -> Path:
    """A local folder holding ``config.json`` for ``model`` (downloading a hub id if reachable), checked whole.

    Every command that reads a model opens it here, so every command gets the
    header and size checks of :func:`ecoquant.models.integrity.check_checkpoint`
    before any work.

    Raises:
        EcoquantError: the path does not exist, is not a model folder, the hub is
            unreachable, or a weight file is damaged.
    """
    path = _locate(model)
    check_checkpoint(path)
    return path


def _locate(model: str | Path) -> Path:
    if not str(model).strip():
        raise EcoquantError("MODEL is empty; pass a model folder (with config.json) or a hub id")
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise EcoquantError(f"{path} is a file; MODEL must be a model folder (with config.json) or a hub id")
        if not (path / "config.json").is_file():
            raise EcoquantError(f"{path} is not a model folder: it has no config.json")
        return path
    text = str(model)
    check_folder_or_hub_id(text)
    return _download(text)


def check_folder_or_hub_id(text: str) -> None:
    """Refuse ``text`` when it is neither an existing path nor reads as a hub id (nothing is looked up)."""
    if not Path(text).expanduser().exists() and not is_hub_id(text):
        raise EcoquantError(f"{text}: no such folder (and not a hub id like 'google/gemma-4-E4B-it')")


def _download(repo_id: str) -> Path:
    """Fetch config, weights and tokenizer files of a hub model; one clear line when offline."""
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                repo_id,
                allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt"],
            )
        )
    except Exception as exc:  # hub errors come in many classes; all mean "not available"
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        why = "HF_HUB_OFFLINE is set" if offline else type(exc).__name__
        raise EcoquantError(
            f"cannot download {repo_id!r} from the Hugging Face hub ({why}); "
            "pass a local model folder instead"
        ) from None


def load_config(path: Path) -> Any:
    """The transformers config of a model folder."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig

    check_config_json(path)
    try:
        config = AutoConfig.from_pretrained(path)
    except (ValueError, KeyError, OSError, TypeError, AttributeError, StrictDataclassError) as exc:  # odd values
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EcoquantError(f"{path}/config.json is not a config transformers can read: {why}") from None
    check_model_type(path)
    return config


def model_class(config: Any) -> type[nn.Module]:
    """The transformers class that owns a checkpoint: image-text models first, then causal LMs."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    for auto in (AutoModelForImageTextToText, AutoModelForCausalLM):
        mapping = auto._model_mapping  # type: ignore[attr-defined]
        if type(config) in mapping:
            return mapping[type(config)]
    raise EcoquantError(f"model type {config.model_type!r} is neither an image-text nor a causal LM")


def meta_model(config: Any) -> nn.Module:
    """The model's module tree on the meta device: names and shapes, no memory."""
    cls = model_class(config)
    with torch.device("meta"):
        return cls._from_config(config, dtype=torch.bfloat16)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it is, from the safetensors header alone.

    ``start`` and ``end`` are absolute byte offsets of its data in ``shard``. ``name`` is the name
    the reader works with; ``stored_name`` is set where that differs from the name in the file
    (a module-tree name, :mod:`ecoquant.models.layout`).
    """

    name: str
    shard: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int
    stored_name: str = ""

    @property
    def file_name(self) -> str:
        """The tensor's name in its safetensors file."""
        return self.stored_name or self.name

    @property
    def nbytes(self) -> int:
        """Bytes on disk."""
        return self.end - self.start


def shard_files(path: Path) -> list[Path]:
    """The model's safetensors shards, in index order."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / n for n in names]
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    found = sorted(path.glob("*.safetensors"))
    if not found:
        raise EcoquantError(f"{path} has no *.safetensors weights (is it a config-only folder?)")
    return found


def read_header(shard: Path) -> tuple[int, dict[str, Any]]:
    """Header length and JSON header of one safetensors file (8-byte length, then JSON)."""
    with shard.open("rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return n, json.loads(f.read(n))


def shard_tensors(shard: Path) -> list[TensorInfo]:
    """Every tensor of one safetensors file, in file order."""
    n, header = read_header(shard)
    infos = [
        TensorInfo(name, shard, meta["dtype"], tuple(meta["shape"]), 8 + n + meta["data_offsets"][0],
                   8 + n + meta["data_offsets"][1])
        for name, meta in header.items()
        if name != "__metadata__"
    ]
    return sorted(infos, key=lambda t: t.start)


def tensor_infos(path: Path) -> Iterator[TensorInfo]:
    """Every tensor of a checkpoint, from headers only."""
    for shard in shard_files(path):
        yield from shard_tensors(shard)
