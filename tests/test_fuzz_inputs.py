"""Every file and body ecoquant parses, fuzzed: a clear error or a correct result, in bounded time.

Bounded (examples and a per-example deadline) so the whole harness runs in
about a minute on two cores. Each target asserts the only two outcomes a
user may see: :class:`~ecoquant.errors.EcoquantError` (the CLI's one
``error:`` line; the server's 4xx for HTTP bodies) or a result that is right;
never another exception type (a traceback), a hang, or a file written.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from ecoquant.errors import EcoquantError
from ecoquant.export.safetensors_stream import read_tensor
from ecoquant.fixtures.tiny_vlm import tiny_vlm_path
from ecoquant.models.integrity import DTYPE_BITS, check_checkpoint
from ecoquant.models.loading import tensor_infos

FUZZ = settings(max_examples=40, deadline=timedelta(seconds=5), suppress_health_check=list(HealthCheck),
                database=None, derandomize=True)  # the same examples on every run: CI never fails by chance
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@contextmanager
def folder(files: dict[str, bytes]) -> Iterator[Path]:
    """A temporary folder holding ``files``; asserts on exit that nothing else was written into it."""
    root = Path(tempfile.mkdtemp(prefix="ecoquant-fuzz-"))
    try:
        for name, data in files.items():
            (root / name).write_bytes(data)
        yield root
        assert sorted(p.name for p in root.iterdir()) == sorted(files), "something was written"
    finally:
        shutil.rmtree(root)


def clear_or_ok(fn: Callable[[], Any]) -> Any:
    """``fn()``'s result, or None where it raised the one allowed error."""
    try:
        return fn()
    except EcoquantError as exc:
        assert str(exc) and "\n" not in str(exc).strip(), repr(exc)
        return None


# --- safetensors headers and shards ------------------------------------------------------------------

_VALID = Path(tempfile.mkdtemp(prefix="ecoquant-fuzz-seed-")) / "model.safetensors"
save_file({"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4, dtype=torch.bfloat16)},
          _VALID, metadata={"format": "pt"})
VALID_SHARD = _VALID.read_bytes()


def _read_all(path: Path) -> None:
    """Integrity passed: every tensor must then read with the shape its header declares."""
    for info in tensor_infos(path):
        value = clear_or_ok(lambda i=info: read_tensor(i))  # NaN/inf from random bytes: refused in one line
        if value is not None:
            assert tuple(value.shape) == info.shape


def _shard_target(data: bytes) -> None:
    with folder({"config.json": b"{}", "model.safetensors": data}) as root:
        if _passes(root):
            _read_all(root)


def _passes(root: Path) -> bool:
    try:
        check_checkpoint(root)
        return True
    except EcoquantError:
        return False


@FUZZ
@given(st.binary(max_size=256))
def test_fuzz_random_shard_bytes(data: bytes) -> None:
    _shard_target(data)


@FUZZ
@given(st.integers(0, len(VALID_SHARD)), st.integers(0, len(VALID_SHARD) - 1), st.integers(0, 255))
def test_fuzz_damaged_real_shard(cut: int, at: int, byte: int) -> None:
    damaged = bytearray(VALID_SHARD)
    damaged[at] = byte
    _shard_target(bytes(damaged[:cut]))


ENTRY = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from([*DTYPE_BITS, "F32", "BF16", "X9", 3]),
        "shape": st.lists(st.integers(-1, 5), max_size=3) | JSON,
        "data_offsets": st.lists(st.integers(-1, 64), min_size=0, max_size=3) | JSON,
    }
)


@FUZZ
@given(st.dictionaries(st.text(min_size=1, max_size=6), ENTRY | JSON, max_size=4), st.integers(0, 80))
def test_fuzz_safetensors_headers(header: dict[str, Any], data_len: int) -> None:
    raw = json.dumps(header).encode()
    _shard_target(len(raw).to_bytes(8, "little") + raw + bytes(data_len))


@FUZZ
@given(JSON, st.booleans())
def test_fuzz_index_json(weight_map: Any, wrap: bool) -> None:
    index = {"weight_map": weight_map} if wrap else weight_map
    files = {"config.json": b"{}", "model.safetensors.index.json": json.dumps(index).encode(),
             "model-1.safetensors": VALID_SHARD}
    with folder(files) as root:
        if _passes(root):
            _read_all(root)


# --- config.json, quantization_config, processor_config.json -----------------------------------------

CONFIGS = JSON | st.fixed_dictionaries(
    {"model_type": st.sampled_from(["gemma4", "gemma3", "llama", "nope"]) | JSON},
    optional={"quantization_config": JSON, "text_config": JSON, "vision_config": JSON},
)


@FUZZ
@given(CONFIGS)
def test_fuzz_config_json(config: Any) -> None:
    from ecoquant.models.loading import load_config
    from ecoquant.plan import require_unquantized
    from ecoquant.serve.config import checkpoint_config, quantization_format

    with folder({"config.json": json.dumps(config).encode()}) as root:
        clear_or_ok(lambda: load_config(root))
        clear_or_ok(lambda: require_unquantized(root))
        raw = clear_or_ok(lambda: checkpoint_config(root))
        if isinstance(raw, dict):
            clear_or_ok(lambda: quantization_format(raw))


@FUZZ
@given(JSON | st.fixed_dictionaries({"image_processor": JSON, "image_processor_type": JSON}), st.binary(max_size=8))
def test_fuzz_processor_config(data: Any, junk: bytes) -> None:
    from ecoquant.eval.image_budget import check_max_soft_tokens, image_processor_type

    for raw in (json.dumps(data).encode(), junk):
        with folder({"config.json": b"{}", "processor_config.json": raw}) as root:
            kind = clear_or_ok(lambda: image_processor_type(root))
            assert kind is None or isinstance(kind, str)
            clear_or_ok(lambda: check_max_soft_tokens(root, 280))


# --- calibration files, suites, grids -------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_vlm_path())


RECORDS = st.lists(JSON | st.fixed_dictionaries({"text": JSON}) | st.fixed_dictionaries({"messages": JSON}), max_size=4)


@FUZZ
@given(st.sampled_from([".txt", ".json", ".jsonl"]), RECORDS, st.text(max_size=64), st.booleans())
def test_fuzz_calibration_files(tokenizer: Any, suffix: str, records: list[Any], text: str, as_text: bool) -> None:
    from ecoquant.calibrate.data import CalibrationConfig, load_calibration

    if as_text:
        raw = text.encode("utf-8", "surrogatepass")
    elif suffix == ".jsonl":
        raw = "\n".join(json.dumps(r) for r in records).encode()
    else:
        raw = json.dumps(records).encode()
    with folder({f"calib{suffix}": raw}) as root:
        config = CalibrationConfig(source=str(root / f"calib{suffix}"), num_samples=2, max_length=16)
        result = clear_or_ok(lambda: load_calibration(tiny_vlm_path(), config, tokenizer=tokenizer))
        if result is not None:
            assert result.batches and all(b["input_ids"].shape[-1] <= 16 for b in result.batches)


SUITE_ROWS = st.lists(
    JSON | st.fixed_dictionaries({"id": JSON, "question": JSON}, optional={"answers": JSON, "images": JSON,
                                                                           "choices": JSON, "task": JSON}),
    max_size=3,
)


@FUZZ
@given(SUITE_ROWS, st.binary(max_size=16))
def test_fuzz_suite_jsonl(rows: list[Any], junk: bytes) -> None:
    from ecoquant.eval.loaders import load_jsonl

    for raw in ("\n".join(json.dumps(r) for r in rows).encode(), junk):
        with folder({"suite.jsonl": raw}) as root:
            clear_or_ok(lambda: load_jsonl(root / "suite.jsonl"))


GRIDS = JSON | st.fixed_dictionaries(
    {}, optional={"grid": JSON | st.dictionaries(st.sampled_from(["method", "preset", "group_size", "observer"]), JSON),
                  "candidates": JSON, "calibration": JSON}
)


@FUZZ
@given(GRIDS, st.text(max_size=40))
def test_fuzz_grid_yaml(grid: Any, text: str) -> None:
    import yaml

    from ecoquant.optimize.grid import load_grid

    for raw in (yaml.safe_dump(grid).encode(), text.encode("utf-8", "surrogatepass")):
        with folder({"grid.yaml": raw}) as root:
            clear_or_ok(lambda: load_grid(root / "grid.yaml"))


# --- the built-in server's request bodies -------------------------------------------------------------

BODIES = JSON | st.fixed_dictionaries(
    {"messages": JSON | st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "tool"]) | JSON,
                                                        "content": JSON}), max_size=2)},
    optional={k: JSON for k in ("max_tokens", "temperature", "top_p", "top_k", "seed", "n", "stream", "stream_options")},
)


@FUZZ
@given(BODIES)
def test_fuzz_chat_request_bodies(body: Any) -> None:
    from ecoquant.serve.openai_server import RequestError, parse_messages, parse_settings, parse_stream

    for parse in (lambda: parse_messages(body.get("messages") if isinstance(body, dict) else body),
                  lambda: parse_settings(body if isinstance(body, dict) else {}),
                  lambda: parse_stream(body if isinstance(body, dict) else {})):
        try:
            parse()
        except RequestError as exc:  # the server's 400 with this message
            assert str(exc)
