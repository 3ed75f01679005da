"""Reading and writing safetensors one tensor at a time.

``safetensors.torch.save_file`` needs every tensor of a file in memory at
once, and ``safe_open`` maps the whole file (mapped pages count towards RSS
as they are touched). E4B's per-layer embedding alone is a 5.6 GB tensor, so
a "near one shard" memory bound needs a writer that takes tensors one at a
time and copies untouched tensors with plain chunked reads. The format is the
published one (8-byte little-endian header length, JSON header padded to 8
bytes, then raw little-endian data); files written here are read back with
the safetensors library in the tests.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from ecoquant.errors import EcoquantError
from ecoquant.export.finite import NonFinite, check_finite, count_nonfinite, report_nonfinite
from ecoquant.models.loading import TensorInfo

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,  # W8A8-FP8 weights (safetensors' name for it)
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
_CHUNK = 64 << 20  # bytes per read when copying a tensor unchanged


def read_tensor(info: TensorInfo) -> torch.Tensor:
    """One tensor, read with a plain file read (no memory map).

    Raises:
        EcoquantError: the header entry's byte length is not ``shape x dtype``,
            the file ends before the tensor does (never uninitialized memory in its place),
            or the tensor holds NaN or inf (see :func:`check_finite`).
    """
    dtype = _torch_dtype(info)
    expected = math.prod(info.shape) * dtype.itemsize
    if info.nbytes != expected:
        raise EcoquantError(
            f"{info.shard}: tensor {info.name} is {info.dtype}{list(info.shape)} ({expected} bytes) "
            f"but its header gives {info.nbytes} bytes; the file is damaged"
        )
    buf = bytearray(expected)
    with info.shard.open("rb") as f:
        f.seek(info.start)
        got = f.readinto(buf) if expected else 0
    if got != expected:
        raise EcoquantError(
            f"{info.shard}: tensor {info.name} is cut off ({got} of {expected} bytes in the file); "
            "the file is damaged or was not fully downloaded"
        )
    value = torch.frombuffer(buf, dtype=dtype).reshape(info.shape) if expected else torch.zeros(info.shape, dtype=dtype)
    check_finite(info.name, value)
    return value


def _torch_dtype(info: TensorInfo) -> torch.dtype:
    dtype = DTYPES.get(info.dtype)
    if dtype is None:
        raise EcoquantError(f"{info.shard}: tensor {info.name} has dtype {info.dtype}, which ecoquant cannot read")
    return dtype


def read_rows(info: TensorInfo, rows: torch.Tensor) -> torch.Tensor:
    """Rows ``rows`` (sorted, unique) of a stored tensor along its first dimension, one read per run of neighbours.

    For lookups into a table far larger than what a pass reads: E4B's
    per-layer embedding is 262,144 rows of 21 KiB, and a calibration set
    touches a few thousand of them.

    Raises:
        EcoquantError: an index is outside the table.
    """
    if not info.shape:
        raise EcoquantError(f"{info.name} is a scalar; it has no rows to read")
    n = info.shape[0]
    ids = rows.tolist()
    if ids and (ids[0] < 0 or ids[-1] >= n):
        bad = ids[0] if ids[0] < 0 else ids[-1]
        raise EcoquantError(f"token id {bad} is outside {info.name} ({n} rows); the data and the model's vocabulary differ")
    dtype = _torch_dtype(info)
    row_bytes = math.prod(info.shape[1:]) * dtype.itemsize
    if info.nbytes != n * row_bytes:
        raise EcoquantError(f"{info.shard}: tensor {info.name}'s header gives {info.nbytes} bytes, not {n} rows of {row_bytes}")
    buf = bytearray(len(ids) * row_bytes)
    view = memoryview(buf)
    with info.shard.open("rb") as f:
        i = 0
        while i < len(ids):
            j = i
            while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
                j += 1
            f.seek(info.start + ids[i] * row_bytes)
            want = (j + 1 - i) * row_bytes
            if f.readinto(view[i * row_bytes : (j + 1) * row_bytes]) != want:
                raise EcoquantError(f"{info.shard}: tensor {info.name} is cut off; the file is damaged or was not fully downloaded")
            i = j + 1
    if not buf:
        return torch.zeros((len(ids), *info.shape[1:]), dtype=dtype)
    rows_read = torch.frombuffer(buf, dtype=dtype).reshape(len(ids), *info.shape[1:])
    check_finite(info.name, rows_read)
    return rows_read


@dataclass(frozen=True)
class PlannedTensor:
    """A tensor to be written: its header entry now, its bytes later.

    ``produce`` returns the tensor (computed tensors); ``produce_rows`` yields
    it as consecutive row blocks (for tensors too large to hold at once, such
    as a synthetic 5.6 GB embedding); or ``source`` names a tensor to copy
    byte for byte.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    produce: Callable[[], torch.Tensor] | None = None
    source: TensorInfo | None = None
    produce_rows: Callable[[], Iterable[torch.Tensor]] | None = None

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * DTYPES[self.dtype].itemsize


def write_streaming(
    path: Path,
    tensors: Iterable[PlannedTensor],
    metadata: dict[str, str] | None = None,
    on_tensor: Callable[[PlannedTensor], None] | None = None,
) -> int:
    """Write a safetensors file, producing or copying one tensor at a time. Returns bytes of data.

    The header must be known before any data, so shapes and dtypes are planned
    first; a produced tensor whose shape or dtype differs from its plan is a bug
    and raises ``ValueError``.
    """
    planned = sorted(tensors, key=lambda t: t.name)
    header: dict[str, object] = {}
    offset = 0
    for t in planned:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with path.open("wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for t in planned:
            _write_one(f, t)
            if on_tensor is not None:
                on_tensor(t)
    return offset


def _write_one(f: BinaryIO, t: PlannedTensor) -> None:
    if t.source is not None:
        dtype = _torch_dtype(t.source)
        counts = NonFinite()
        buf = bytearray(min(_CHUNK, t.source.nbytes))
        view = memoryview(buf)
        with t.source.shard.open("rb") as src:
            src.seek(t.source.start)
            left = t.source.nbytes
            while left:
                got = src.readinto(view[: min(_CHUNK, left)])
                if not got:
                    raise EcoquantError(f"{t.source.shard}: tensor {t.name} is cut off; the file is damaged or was not fully downloaded")
                if dtype.is_floating_point:  # the bytes are in memory anyway: count NaN/inf on the way through
                    counts += count_nonfinite(torch.frombuffer(buf, dtype=dtype, count=got // dtype.itemsize))
                f.write(view[:got])
                left -= got
        report_nonfinite(t.source.name, counts)
        return
    if t.produce_rows is not None:
        written = 0
        for block in t.produce_rows():
            _check(t, block, t.shape[1:])
            data = block.contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
            f.write(memoryview(data))
            written += data.nbytes
        if written != t.nbytes:
            raise ValueError(f"{t.name}: row blocks gave {written} bytes, planned {t.nbytes}")
        return
    assert t.produce is not None, f"{t.name} has neither a source nor a producer"
    value = t.produce().contiguous().cpu()
    _check(t, value, t.shape)
    f.write(memoryview(value.reshape(-1).view(torch.uint8).numpy()))


def _check(t: PlannedTensor, value: torch.Tensor, shape: tuple[int, ...]) -> None:
    """A produced tensor must match its header entry (for row blocks: all but the first dim)."""
    got = tuple(value.shape) if shape == t.shape else tuple(value.shape[1:])
    if got != shape or DTYPE_NAMES.get(value.dtype) != t.dtype:
        raise ValueError(
            f"{t.name}: produced {DTYPE_NAMES.get(value.dtype)}{list(value.shape)}, planned {t.dtype}{list(t.shape)}"
        )
