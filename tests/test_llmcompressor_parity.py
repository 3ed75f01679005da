"""ecoquant's min-max RTN against llmcompressor 0.14's QuantizationModifier: W4A16, FP8_DYNAMIC and W8A8.

Every saved tensor is compared as the bytes the safetensors file holds (plus
its dtype and shape), not as values: -0.0 and +0.0 are equal values but
different FP8 bytes. The source is the tiny Gemma-4 with weights planted that
quantize to zero (-0.0, +0.0 and tiny values of both signs), which random
weights almost never are and real checkpoints hold by the million.

llmcompressor pins its own transformers, so it runs in its own throw-away uv
environment (``uv run --isolated``), from the reference script in
``bench/external``. Needs the package registry (PyPI) and a few minutes the
first time; marked ``llmcompressor``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import checkpoint_tensors

from ecoquant.api import QuantizeConfig, quantize
from ecoquant.models.loading import tensor_infos
from ecoquant.models.presets import get_preset

REPO = Path(__file__).resolve().parents[1]
LLMCOMPRESSOR = ["--with", "llmcompressor==0.14.0.1", "--with", "torch==2.13.0", "--with", "torchvision==0.28.0"]

pytestmark = pytest.mark.llmcompressor


def run_llmcompressor(src: Path, out: Path, ignore: tuple[str, ...], scheme: str = "W4A16") -> None:
    uv = shutil.which("uv")
    assert uv, "uv is needed to build llmcompressor's environment"
    cmd = [uv, "run", "--isolated", "--no-project", *LLMCOMPRESSOR, "python",
           str(REPO / "bench/external/llmcompressor_oneshot.py"), str(src), str(out), "--scheme", scheme]
    for pattern in ignore:
        cmd += ["--ignore", pattern]
    subprocess.run(cmd, check=True, timeout=1800, capture_output=True)


def saved_bytes(path: Path) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """Each tensor of a checkpoint folder as stored: dtype, shape and its data bytes, read from the file."""
    out = {}
    for info in tensor_infos(path):
        with info.shard.open("rb") as f:
            f.seek(info.start)
            out[info.name] = (info.dtype, info.shape, f.read(info.nbytes))
    return out


def assert_same_bytes(ours: Path, theirs: Path) -> None:
    a, b = saved_bytes(ours), saved_bytes(theirs)
    assert set(a) == set(b)
    different = sorted(name for name in a if a[name] != b[name])
    assert not different, f"{len(different)} of {len(a)} tensors differ in bytes, first: {different[:3]}"


@pytest.fixture(scope="module")
def zeros_gemma4(tiny_gemma4: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Gemma-4 with every 97th decoder weight -0.0, +0.0, or +-amax * 1e-7 (codes that round to zero)."""
    from safetensors.torch import load_file, save_file

    dst = tmp_path_factory.mktemp("zeros") / "model"
    shutil.copytree(tiny_gemma4, dst)
    weights = load_file(dst / "model.safetensors")
    planted = 0
    for name, w in weights.items():
        if name.startswith("model.language_model.layers.") and name.endswith("_proj.weight"):
            flat = w.clone().reshape(-1)
            tiny = float(w.abs().max()) * 1e-7
            for offset, value in enumerate((-0.0, 0.0, -tiny, tiny)):
                flat[offset::97] = value
            weights[name] = flat.reshape(w.shape)
            planted += 1
    assert planted >= 30
    save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_bytes_tell_signed_zeros_apart(tmp_path: Path) -> None:
    """The comparison itself: -0.0 and +0.0 are equal values, different bytes."""
    from safetensors.torch import save_file

    for sign in ("plus", "minus"):
        (tmp_path / sign).mkdir()
        value = 0.0 if sign == "plus" else -0.0
        save_file({"w": torch.full((2,), value).to(torch.float8_e4m3fn)}, tmp_path / sign / "model.safetensors")
    assert torch.equal(checkpoint_tensors(tmp_path / "plus")["w"].float(), checkpoint_tensors(tmp_path / "minus")["w"].float())
    with pytest.raises(AssertionError, match="differ in bytes"):
        assert_same_bytes(tmp_path / "plus", tmp_path / "minus")


def test_rtn_minmax_is_bit_exact_with_llmcompressor(zeros_gemma4: Path, tmp_path: Path) -> None:
    preset = get_preset("gemma4-e")
    run_llmcompressor(zeros_gemma4, tmp_path / "llmc", preset.ignore)
    quantize(zeros_gemma4, tmp_path / "ours", QuantizeConfig(preset="gemma4-e"), show_progress=False)
    packed = [k for k in checkpoint_tensors(tmp_path / "ours") if k.endswith(".weight_packed")]
    assert len(packed) == 37
    assert_same_bytes(tmp_path / "ours", tmp_path / "llmc")
    qc_theirs = json.loads((tmp_path / "llmc/config.json").read_text())["quantization_config"]
    qc_ours = json.loads((tmp_path / "ours/config.json").read_text())["quantization_config"]
    assert sorted(qc_theirs["ignore"]) == sorted(qc_ours["ignore"])
    for key in ("num_bits", "group_size", "symmetric", "strategy", "type"):
        assert qc_theirs["config_groups"]["group_0"]["weights"][key] == qc_ours["config_groups"]["group_0"]["weights"][key]
    assert qc_theirs["format"] == qc_ours["format"] == "pack-quantized"


@pytest.mark.parametrize(("ours_name", "preset", "fmt"), [("w8a8-fp8", "FP8_DYNAMIC", "float-quantized"), ("w8a8-int8", "W8A8", "int-quantized")])
def test_w8a8_rtn_is_bit_exact_with_llmcompressor(zeros_gemma4: Path, tmp_path: Path, ours_name: str, preset: str, fmt: str) -> None:
    """Same tensors (FP8 / int8 codes and bf16 scales, compared as stored bytes) and the same config group."""
    from ecoquant.quantize.scheme import SCHEMES

    ignore = get_preset("gemma4-e").ignore
    run_llmcompressor(zeros_gemma4, tmp_path / "llmc", ignore, preset)
    quantize(zeros_gemma4, tmp_path / "ours", QuantizeConfig(preset="gemma4-e", scheme=SCHEMES[ours_name]), show_progress=False)
    scales = [k for k in checkpoint_tensors(tmp_path / "ours") if k.endswith(".weight_scale")]
    assert len(scales) == 37
    assert_same_bytes(tmp_path / "ours", tmp_path / "llmc")
    qc_theirs = json.loads((tmp_path / "llmc/config.json").read_text())["quantization_config"]
    qc_ours = json.loads((tmp_path / "ours/config.json").read_text())["quantization_config"]
    assert qc_theirs["format"] == qc_ours["format"] == fmt
    assert sorted(qc_theirs["ignore"]) == sorted(qc_ours["ignore"])
    g_theirs, g_ours = qc_theirs["config_groups"]["group_0"], qc_ours["config_groups"]["group_0"]
    # llmcompressor's compressed-tensors writes unset fields as null; ours leaves them out.
    def set_fields(args: dict) -> dict:
        return {k: v for k, v in args.items() if v not in (None, {})}

    assert set_fields(g_theirs["input_activations"]) == set_fields(g_ours["input_activations"])
    for key in ("num_bits", "group_size", "symmetric", "strategy", "type", "dynamic"):
        assert g_theirs["weights"][key] == g_ours["weights"][key], key
