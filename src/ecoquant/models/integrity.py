"""Is a checkpoint whole? Header and size checks before any work.

An interrupted or corrupted download is the common case for a 16 GB
checkpoint in several shards, not an exotic one. Without these checks a
truncated ``model.safetensors`` ran ``ecoquant quantize`` for 14 minutes on
uninitialized memory. Everything here reads only the safetensors headers, the
index and the file sizes, so it takes milliseconds even on E4B; it never reads
tensor data (non-finite values are found later, as each tensor is read anyway:
:func:`ecoquant.export.safetensors_stream.read_tensor`).

What is checked, for every shard (the format is the published one: an 8-byte
little-endian header length, a JSON header, then the data):

* the file is long enough for its header, and the header is a JSON object;
* each tensor entry has a known dtype, a shape of non-negative integers and
  ``data_offsets`` whose length is ``prod(shape) x itemsize``;
* the offsets tile the data area without gaps or overlaps (what the
  safetensors library itself requires), and the data area ends exactly at
  the end of the file: a shorter file was cut off, a longer one is not a
  safetensors file;

and for ``model.safetensors.index.json``: it is JSON with a ``weight_map``,
every shard it names exists inside the folder, and every tensor it maps is in
that shard (and every tensor of a shard is in the map).

``config.json`` must also agree with itself: its ``model_type`` must have a
place for each nested config it holds (:func:`check_model_type`).

Each problem is one :class:`~ecoquant.errors.EcoquantError` line naming the
file and the tensor (or field).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ecoquant.errors import EcoquantError
from ecoquant.models.quant_config import quantization_block

#: Bits per element of each safetensors dtype (the names of the format's spec,
#: safetensors ``Dtype``). Sub-byte types pack elements into whole bytes.
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "F64": 64,
    "I64": 64,
    "U64": 64,
    "F4": 4,  # fp4 (e2m1), two to a byte
    "F6_E2M3": 6,
    "F6_E3M2": 6,
}
#: The safetensors library refuses headers over 100 MB; a larger length field is garbage, not a header.
MAX_HEADER_BYTES = 100_000_000
INDEX_FILE = "model.safetensors.index.json"
_HINT = "the file is damaged or was not fully downloaded; download it again"


def check_checkpoint(path: Path) -> None:
    """Raise one :class:`EcoquantError` line if any weight file of the model folder ``path`` is damaged.

    A folder without safetensors weights (a config-only twin) passes: commands
    that need weights say so themselves.
    """
    if (path / "config.json").is_file():
        check_config_json(path)
        check_model_type(path)
    index = path / INDEX_FILE
    if index.is_file():
        mapped = read_index(index)
        shards = sorted(set(mapped.values()))
        headers = {name: check_shard(path / name) for name in shards}
        for tensor, shard in mapped.items():
            if tensor not in headers[shard]:
                raise EcoquantError(f"{index}: tensor {tensor} is mapped to {shard}, which does not hold it; {_HINT}")
        for shard, names in headers.items():
            extra = sorted(n for n in names if mapped.get(n) != shard)
            if extra:
                raise EcoquantError(
                    f"{path / shard}: tensor {extra[0]} is not mapped to this shard by {INDEX_FILE}; {_HINT}"
                )
        return
    for shard in sorted(path.glob("*.safetensors")):
        check_shard(shard)


def check_config_json(path: Path) -> None:
    """``config.json`` must be a JSON object, and its ``quantization_config``, if any, an object too."""
    config_path = path / "config.json"
    try:
        config = json.loads(config_path.read_bytes())
    except (ValueError, OSError) as exc:
        raise EcoquantError(f"{config_path} is not valid JSON ({type(exc).__name__}); {_HINT}") from None
    if not isinstance(config, dict):
        raise EcoquantError(f"{config_path} is not a JSON object; {_HINT}")
    quantization_block(config)  # one line when quantization_config is not an object


def read_index(index: Path) -> dict[str, str]:
    """The index's ``weight_map`` (tensor -> shard file name), each shard checked to exist in the folder."""
    try:
        raw = json.loads(index.read_bytes())
    except (ValueError, OSError) as exc:
        raise EcoquantError(f"{index} is not valid JSON ({type(exc).__name__}); {_HINT}") from None
    weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise EcoquantError(f"{index} has no weight_map (tensor -> shard); {_HINT}")
    for tensor, shard in weight_map.items():
        if not isinstance(shard, str) or not shard or Path(shard).name != shard or shard in (".", ".."):
            raise EcoquantError(f"{index}: tensor {tensor} maps to {shard!r}, which is not a file name in the folder")
        if not (index.parent / shard).is_file():
            raise EcoquantError(f"{index}: shard {shard} (holding tensor {tensor}) is missing; {_HINT}")
    return weight_map


def check_shard(shard: Path) -> set[str]:
    """Check one safetensors file from its header and size; return its tensor names."""
    size = shard.stat().st_size
    with shard.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise EcoquantError(f"{shard} is {size} bytes, too short for a safetensors header; {_HINT}")
        n = int.from_bytes(head, "little")
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise EcoquantError(
                f"{shard}: header length {n} does not fit in the file ({size} bytes); {_HINT}"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except ValueError:
        raise EcoquantError(f"{shard}: the header is not valid JSON; {_HINT}") from None
    if not isinstance(header, dict):
        raise EcoquantError(f"{shard}: the header is not a JSON object; {_HINT}")
    spans: list[tuple[int, int, str]] = []
    for name, meta in header.items():
        if name == "__metadata__":
            if not isinstance(meta, dict):
                raise EcoquantError(f"{shard}: __metadata__ is not an object; {_HINT}")
            continue
        begin, end = _entry_span(shard, name, meta)
        spans.append((begin, end, name))
    spans.sort()
    at = 0
    for begin, end, name in spans:
        if begin != at:
            what = "overlaps the tensor before it" if begin < at else f"leaves a gap of {begin - at} bytes before it"
            raise EcoquantError(f"{shard}: tensor {name} {what}; {_HINT}")
        at = end
    data = size - 8 - n
    if at != data:
        last = spans[-1][2] if spans else "(none)"
        if at > data:
            raise EcoquantError(
                f"{shard} is truncated: its header declares {at} bytes of data, the file holds {data} "
                f"(tensor {_first_cut(spans, data)} is cut off); {_HINT}"
            )
        raise EcoquantError(
            f"{shard}: {data - at} bytes follow the last declared tensor ({last}); {_HINT}"
        )
    return {name for _, _, name in spans}


def _entry_span(shard: Path, name: str, meta: Any) -> tuple[int, int]:
    """``data_offsets`` of one header entry, checked against its dtype and shape."""
    if not isinstance(meta, dict):
        raise EcoquantError(f"{shard}: tensor {name} has no dtype/shape/data_offsets entry; {_HINT}")
    dtype, shape, offsets = meta.get("dtype"), meta.get("shape"), meta.get("data_offsets")
    if dtype not in DTYPE_BITS:
        raise EcoquantError(f"{shard}: tensor {name} has unknown dtype {dtype!r}; {_HINT}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise EcoquantError(f"{shard}: tensor {name} has shape {shape!r}, not a list of non-negative integers; {_HINT}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int and o >= 0 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise EcoquantError(f"{shard}: tensor {name} has data_offsets {offsets!r}, not [begin, end]; {_HINT}")
    bits = math.prod(shape) * DTYPE_BITS[dtype]
    if bits % 8 or bits // 8 != offsets[1] - offsets[0]:
        raise EcoquantError(
            f"{shard}: tensor {name} is {dtype}{shape} ({bits / 8:g} bytes) but its data_offsets span "
            f"{offsets[1] - offsets[0]} bytes; {_HINT}"
        )
    return offsets[0], offsets[1]


def _first_cut(spans: list[tuple[int, int, str]], data: int) -> str:
    return next(name for _, end, name in spans if end > data)


def check_model_type(path: Path) -> None:
    """Refuse a ``config.json`` whose ``model_type`` contradicts its own nested configs.

    transformers builds the config class ``model_type`` names and keeps any
    field it does not know as a plain value. A Gemma-4 config relabelled
    ``llama`` therefore loads, and keeps its ``text_config`` as a dict, until
    the model is built and transformers fails deep inside with
    ``'dict' object has no attribute 'to_dict'``. A nested config is a dict
    with its own ``model_type``; the config class declares the ones it holds
    (``sub_configs``), so the check is the library's own table, not ours.
    Reads the JSON and transformers' class table only: no config is built.
    An unknown ``model_type`` is left to :func:`load_config` to refuse.
    """
    from transformers import CONFIG_MAPPING

    raw = json.loads((path / "config.json").read_bytes())
    model_type = raw.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        return
    config_cls = CONFIG_MAPPING[model_type]
    slots = getattr(config_cls, "sub_configs", {}) or {}
    for field, value in raw.items():
        if not isinstance(value, dict) or "model_type" not in value:
            continue
        nested = value["model_type"]
        expected = getattr(slots.get(field), "model_type", None)
        if field in slots and expected in (None, "", nested):
            continue
        hint = _model_type_hint(raw)
        why = (f"{config_cls.__name__} has no {field}" if field not in slots
               else f"{config_cls.__name__}.{field} must be {expected!r}")
        raise EcoquantError(
            f"{path}/config.json: field model_type {model_type!r} contradicts field {field} "
            f"(a {nested!r} config; {why}); {hint}"
        )


def _model_type_hint(raw: dict[str, Any]) -> str:
    """How to fix a contradicting ``model_type``: the one its ``architectures`` field implies, when known."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    names = set(raw.get("architectures") or []) if isinstance(raw.get("architectures"), list) else set()
    for mapping in (MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        for model_type, cls_name in mapping.items():
            if cls_name in names:
                return f"architectures says {cls_name}: set model_type to {model_type!r}"
    return "set model_type to the family the file describes, or re-download the model"
