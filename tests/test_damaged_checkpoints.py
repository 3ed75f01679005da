"""Damaged checkpoints are refused in one line before any work, by every command that reads a model.

Found by trying ecoquant as a new user would: a ``model.safetensors`` cut to
1 MB (an interrupted download) ran ``ecoquant quantize`` for 14 minutes on
uninitialized memory, and one NaN in a ``down_proj`` shipped in the checkpoint.
Each test damages a copy of the shipped tiny VLM one way and checks: exit 2,
one ``error:`` line naming the file and tensor, nothing written, a bounded time.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from ecoquant.cli import app
from ecoquant.errors import EcoquantError
from ecoquant.export.safetensors_stream import PlannedTensor, read_tensor, write_streaming
from ecoquant.fixtures.tiny_vlm import tiny_vlm_path
from ecoquant.models.integrity import check_checkpoint
from ecoquant.models.loading import TensorInfo, shard_tensors

DOWN = "model.language_model.layers.0.mlp.down_proj.weight"


def copy_model(dest: Path) -> Path:
    shutil.copytree(tiny_vlm_path(), dest)
    return dest


def rewrite_header(shard: Path, edit: object) -> None:
    """Apply ``edit(header)`` to a shard's JSON header, keeping its data bytes as they are."""
    raw = shard.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    edit(header)  # type: ignore[operator]
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    shard.write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + n :])


def shard_copy(dest: Path) -> Path:
    """The tiny VLM split into two shards with a ``model.safetensors.index.json``, as hub checkpoints come."""
    src = tiny_vlm_path()
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("model.safetensors"))
    infos = shard_tensors(src / "model.safetensors")
    half = len(infos) // 2
    weight_map: dict[str, str] = {}
    for i, part in enumerate((infos[:half], infos[half:])):
        name = f"model-{i + 1:05d}-of-00002.safetensors"
        write_streaming(dest / name, [PlannedTensor(t.name, t.dtype, t.shape, source=t) for t in part], {"format": "pt"})
        weight_map.update({t.name: name for t in part})
    (dest / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dest


def run_cli(args: list[str], tmp_path: Path) -> tuple[int, str, float]:
    before = set(tmp_path.rglob("*"))
    t = time.perf_counter()
    result = CliRunner().invoke(app, args)
    seconds = time.perf_counter() - t
    assert set(tmp_path.rglob("*")) == before, "something was written"
    return result.exit_code, result.output, seconds


def assert_refused(args: list[str], tmp_path: Path, *needles: str) -> None:
    code, output, seconds = run_cli(args, tmp_path)
    assert code == 2, output
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in output, output
    for needle in needles:
        assert needle in output.replace("\n", ""), output
    assert seconds < 30, seconds


def test_the_shipped_model_and_a_sharded_copy_pass(tmp_path: Path) -> None:
    check_checkpoint(tiny_vlm_path())
    sharded = shard_copy(tmp_path / "sharded")
    check_checkpoint(sharded)
    a, b = load_file(tiny_vlm_path() / "model.safetensors"), {}
    for shard in sorted(sharded.glob("*.safetensors")):
        b.update(load_file(shard))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _truncated(tmp_path: Path) -> Path:
    model = copy_model(tmp_path / "model")
    with (model / "model.safetensors").open("r+b") as f:
        f.truncate(1 << 20)
    return model


COMMANDS = {
    "quantize": lambda m, t: ["quantize", str(m), "--out", str(t / "q"), "--no-progress"],
    "quantize-gptq": lambda m, t: ["quantize", str(m), "--out", str(t / "q"), "--method", "gptq", "--calib", "corpus", "--no-progress"],
    "optimize": lambda m, t: ["optimize", str(m), "--out", str(t / "opt")],
    "optimize-dry-run": lambda m, t: ["optimize", str(m), "--out", str(t / "opt"), "--dry-run"],
    "eval": lambda m, t: ["eval", "--base", str(m), "--out", str(t / "ev"), "--limit", "1"],
    "quality": lambda m, t: ["quality", str(m)],
    "verify": lambda m, t: ["verify", str(m), "--base", str(tiny_vlm_path())],
    "verify-base": lambda m, t: ["verify", str(tiny_vlm_path()), "--base", str(m)],
    "serve-config": lambda m, t: ["serve-config", str(m), "--max-model-len", "512", "--no-card"],
    "inspect": lambda m, t: ["inspect", str(m)],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_truncated_shard_is_refused_by_every_command(tmp_path: Path, command: str) -> None:
    model = _truncated(tmp_path)
    assert_refused(COMMANDS[command](model, tmp_path), tmp_path, "model.safetensors is truncated", "is cut off")


def test_a_shard_of_random_bytes_is_refused(tmp_path: Path) -> None:
    model = copy_model(tmp_path / "model")
    size = (model / "model.safetensors").stat().st_size
    (model / "model.safetensors").write_bytes(torch.randint(0, 256, (size,), generator=torch.Generator().manual_seed(0),
                                                            dtype=torch.uint8).numpy().tobytes())
    assert_refused(COMMANDS["quantize"](model, tmp_path), tmp_path, "model.safetensors: header length")


def test_a_missing_shard_named_in_the_index_is_refused(tmp_path: Path) -> None:
    model = shard_copy(tmp_path / "model")
    (model / "model-00002-of-00002.safetensors").unlink()
    assert_refused(COMMANDS["quantize"](model, tmp_path), tmp_path, "shard model-00002-of-00002.safetensors", "is missing")


def test_an_index_naming_a_tensor_its_shard_lacks_is_refused(tmp_path: Path) -> None:
    model = shard_copy(tmp_path / "model")
    index = json.loads((model / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.invented.weight"] = "model-00001-of-00002.safetensors"
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_refused(COMMANDS["inspect"](model, tmp_path), tmp_path, "tensor model.invented.weight is mapped to")


def test_a_tensor_shorter_than_declared_is_refused(tmp_path: Path) -> None:
    model = copy_model(tmp_path / "model")

    def grow(header: dict) -> None:  # the shape says one more row than the bytes hold
        header[DOWN]["shape"][0] += 1

    rewrite_header(model / "model.safetensors", grow)
    assert_refused(COMMANDS["quantize"](model, tmp_path), tmp_path, f"tensor {DOWN} is BF16", "data_offsets span")


def test_read_tensor_refuses_missing_or_short_bytes_instead_of_inventing_them(tmp_path: Path) -> None:
    """The reader itself, below the header check: it used to return ``torch.empty`` (garbage) for missing bytes."""
    shard = tmp_path / "x.safetensors"
    save_file({"w": torch.arange(12, dtype=torch.float32).reshape(3, 4)}, shard)
    (info,) = shard_tensors(shard)
    assert torch.equal(read_tensor(info), torch.arange(12, dtype=torch.float32).reshape(3, 4))
    with shard.open("r+b") as f:
        f.truncate(info.start + 20)
    with pytest.raises(EcoquantError, match=r"tensor w is cut off \(20 of 48 bytes"):
        read_tensor(info)
    short = TensorInfo("w", shard, "F32", (3, 4), info.start, info.start + 8)
    with pytest.raises(EcoquantError, match=r"F32\[3, 4\] \(48 bytes\) but its header gives 8 bytes"):
        read_tensor(short)


def _poisoned(tmp_path: Path) -> Path:
    model = copy_model(tmp_path / "model")
    tensors = load_file(model / "model.safetensors")
    tensors[DOWN] = tensors[DOWN].clone()
    tensors[DOWN][0, 0] = float("nan")
    tensors[DOWN][1, 3] = float("inf")
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    return model


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_nan_and_inf_weights_are_refused_with_the_tensor_and_count(tmp_path: Path, method: str) -> None:
    model = _poisoned(tmp_path)
    args = [*COMMANDS["quantize"](model, tmp_path), "--method", method]
    if method == "gptq":  # refused at the first layer calibration reads, before any solve
        args += ["--calib", "corpus", "--calib-samples", "2", "--calib-length", "32"]
    assert_refused(args, tmp_path, f"tensor {DOWN} holds 1 NaN and 1 inf values", "--allow-nonfinite")
    assert not (tmp_path / ".q.calib").exists()


def test_a_nan_in_a_copied_tensor_is_refused_too(tmp_path: Path) -> None:
    """Tensors copied unchanged (here a vision weight) are counted as their bytes pass through."""
    model = copy_model(tmp_path / "model")
    tensors = load_file(model / "model.safetensors")
    name = next(k for k in sorted(tensors) if "vision" in k and k.endswith(".weight"))
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[5] = float("nan")
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    assert_refused(COMMANDS["quantize"](model, tmp_path), tmp_path, f"tensor {name} holds 1 NaN and 0 inf")


def test_allow_nonfinite_quantizes_and_records_them(tmp_path: Path) -> None:
    model = _poisoned(tmp_path)
    result = CliRunner().invoke(app, [*COMMANDS["quantize"](model, tmp_path), "--allow-nonfinite"])
    assert result.exit_code == 0, result.output
    recipe = json.loads((tmp_path / "q" / "quant_recipe.json").read_text())
    assert recipe["nonfinite_weights"] == {DOWN: {"nan": 1, "inf": 1}}
    clean = CliRunner().invoke(app, [*COMMANDS["quantize"](tiny_vlm_path(), tmp_path / "c")])
    assert clean.exit_code == 0 and "nonfinite_weights" not in json.loads((tmp_path / "c" / "q" / "quant_recipe.json").read_text())


def test_the_header_check_reads_headers_only(tmp_path: Path) -> None:
    """A 2 GiB sparse shard (no data on disk) is checked in well under a second: no full read."""
    shard = tmp_path / "big" / "model.safetensors"
    shard.parent.mkdir()
    (shard.parent / "config.json").write_text("{}")
    header = json.dumps({"w": {"dtype": "BF16", "shape": [1 << 15, 1 << 15], "data_offsets": [0, 1 << 31]}}).encode()
    header += b" " * (-len(header) % 8)
    with shard.open("wb") as f:
        f.write(len(header).to_bytes(8, "little") + header)
        f.truncate(8 + len(header) + (1 << 31))
    t = time.perf_counter()
    check_checkpoint(shard.parent)
    assert time.perf_counter() - t < 1.0
    os.truncate(shard, 8 + len(header) + (1 << 31) - 2)
    with pytest.raises(EcoquantError, match="is truncated.*tensor w is cut off"):
        check_checkpoint(shard.parent)


def test_nonfinite_counts_work_on_float8_weights() -> None:
    """A W8A8-FP8 checkpoint is read back (verify, eval): torch has no isfinite for float8, so it is widened."""
    import torch

    from ecoquant.export.finite import NonFinite, count_nonfinite

    w = torch.tensor([1.0, -2.0, 0.5, float("nan")]).to(torch.float8_e4m3fn)
    assert count_nonfinite(w) == NonFinite(nan=1, inf=0)
    assert count_nonfinite(w[:3]) == NonFinite()


def _contradicting(tmp_path: Path) -> Path:
    """The tiny VLM's config relabelled ``model_type: llama``, keeping its ``text_config`` and ``vision_config``."""
    model = copy_model(tmp_path / "model")
    config = json.loads((model / "config.json").read_text())
    assert isinstance(config["text_config"], dict) and config["model_type"] != "llama"
    config["model_type"] = "llama"
    (model / "config.json").write_text(json.dumps(config))
    return model


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_config_whose_model_type_contradicts_it_is_one_line(tmp_path: Path, command: str) -> None:
    """Found by a user: transformers loads it as Llama and fails building the model with a traceback."""
    model = _contradicting(tmp_path)
    assert_refused(COMMANDS[command](model, tmp_path), tmp_path, "config.json", "field model_type 'llama'", "set model_type to")


def test_a_nested_config_of_the_wrong_family_is_refused(tmp_path: Path) -> None:
    from ecoquant.models.loading import load_config

    model = copy_model(tmp_path / "model")
    config = json.loads((model / "config.json").read_text())
    config["text_config"]["model_type"] = "llama"
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(EcoquantError, match=r"config\.json: field model_type .* contradicts field text_config"):
        load_config(model)
    load_config(tiny_vlm_path())
