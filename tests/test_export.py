"""RTN export end to end on the tiny Gemma-4 fixture: format, loading, safety, determinism."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.quantization import QuantizationScheme
from conftest import checkpoint_tensors
from safetensors import safe_open

from ecoquant.api import QuantizeConfig, plan_footprint, plan_model, quantize
from ecoquant.errors import EcoquantError
from ecoquant.export.compressed_tensors import export_checkpoint
from ecoquant.export.safetensors_stream import PlannedTensor, read_tensor, write_streaming
from ecoquant.models.loading import tensor_infos
from ecoquant.quantize.rtn import rtn_quantize
from ecoquant.quantize.scheme import QuantScheme


@pytest.fixture(scope="module")
def rtn_checkpoint(tiny_gemma4: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("rtn") / "tiny-rtn"
    quantize(tiny_gemma4, out, QuantizeConfig(), show_progress=False)
    return out


def test_checkpoint_layout_and_config(rtn_checkpoint: Path, tiny_gemma4: Path) -> None:
    plan = plan_model(tiny_gemma4)
    tensors = checkpoint_tensors(rtn_checkpoint)
    packed = sorted(k.removesuffix(".weight_packed") for k in tensors if k.endswith(".weight_packed"))
    assert packed == sorted(plan.selection.modules)
    # KV-shared layers have no k/v: 6 layers x (q,o,gate,up,down) + 3 x (k,v) + per_layer_model_projection.
    assert len(packed) == 6 * 5 + 3 * 2 + 1
    for m in packed:
        assert f"{m}.weight" not in tensors
        assert tensors[f"{m}.weight_packed"].dtype == torch.int32
        assert tensors[f"{m}.weight_scale"].dtype == torch.bfloat16
        assert tensors[f"{m}.weight_shape"].dtype == torch.int64
    # What the seed keeps in bf16 is still plain bf16 weights.
    for kept in ("model.language_model.layers.0.per_layer_input_gate.weight", "model.embed_vision.embedding_projection.weight"):
        assert tensors[kept].dtype == torch.bfloat16
    qc = json.loads((rtn_checkpoint / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    weights = qc["config_groups"]["group_0"]["weights"]
    assert {k: weights[k] for k in ("num_bits", "type", "symmetric", "group_size", "strategy", "dynamic")} == {
        "num_bits": 4, "type": "int", "symmetric": True, "group_size": 128, "strategy": "group", "dynamic": False,
    }
    assert qc["config_groups"]["group_0"]["targets"] == ["Linear"]
    assert "lm_head" in qc["ignore"]
    assert all(m not in qc["ignore"] for m in packed)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "processor_config.json", "generation_config.json"):
        assert (rtn_checkpoint / f).read_bytes() == (tiny_gemma4 / f).read_bytes()


def test_packing_is_bit_exact_with_compressed_tensors_compressor(rtn_checkpoint: Path, tiny_gemma4: Path) -> None:
    """Our packed tensors equal what compressed-tensors' own compressor makes from the same weight and scale."""
    scheme = QuantScheme()
    ct_scheme = QuantizationScheme(targets=["Linear"], weights=scheme.to_quantization_args())
    ours = checkpoint_tensors(rtn_checkpoint)
    base = {t.name: t for t in tensor_infos(tiny_gemma4)}
    for m in ("model.language_model.layers.0.self_attn.q_proj", "model.language_model.layers.5.mlp.down_proj",
              "model.language_model.per_layer_model_projection"):
        w = read_tensor(base[f"{m}.weight"])
        ref = PackedQuantizationCompressor.compress({"weight": w, "weight_scale": rtn_quantize(w, scheme).scale}, ct_scheme)
        assert torch.equal(ours[f"{m}.weight_packed"], ref["weight_packed"])
        assert torch.equal(ours[f"{m}.weight_scale"], ref["weight_scale"])
        assert torch.equal(ours[f"{m}.weight_shape"], ref["weight_shape"])


def test_transformers_loads_and_runs_image_text(rtn_checkpoint: Path, tiny_image_inputs) -> None:  # type: ignore[no-untyped-def]
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(rtn_checkpoint)
    inputs = tiny_image_inputs(rtn_checkpoint)
    assert "pixel_values" in inputs
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape[1] == inputs["input_ids"].shape[1]
    assert bool(torch.isfinite(logits).all())


def test_recipe_records_provenance(rtn_checkpoint: Path, tiny_gemma4: Path) -> None:
    r = json.loads((rtn_checkpoint / "quant_recipe.json").read_text())
    assert r["ecoquant"]["version"]
    assert r["source"]["model"] == str(tiny_gemma4)
    digest = hashlib.sha256((tiny_gemma4 / "model.safetensors").read_bytes()).hexdigest()
    assert r["source"]["files"]["model.safetensors"] == digest
    assert r["scheme"]["group_size"] == 128 and r["scheme"]["observer"] == "minmax"
    assert r["preset"] == "gemma4-e" and r["resolved_module_count"] == 37 == len(r["modules"])
    assert "re:.*vision_tower.*" in r["ignore"]
    assert r["calibration"] is None
    assert r["timings_s"]["total"] > 0
    fp = r["footprint"]
    on_disk = sum(f.stat().st_size for f in rtn_checkpoint.glob("*.safetensors"))
    assert fp["weights_after_bytes"] < fp["weights_before_bytes"]
    assert 0 < on_disk - fp["weights_after_bytes"] < 64 * 1024  # only the headers differ


def test_footprint_estimate_equals_written_bytes(rtn_checkpoint: Path, tiny_gemma4: Path) -> None:
    fp = plan_footprint(plan_model(tiny_gemma4), QuantScheme())
    r = json.loads((rtn_checkpoint / "quant_recipe.json").read_text())["footprint"]
    assert fp.before_bytes == r["weights_before_bytes"]
    assert fp.after_bytes == r["weights_after_bytes"]


def test_same_input_gives_byte_identical_weights(rtn_checkpoint: Path, tiny_gemma4: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    quantize(tiny_gemma4, again, QuantizeConfig(), show_progress=False)
    assert (again / "model.safetensors").read_bytes() == (rtn_checkpoint / "model.safetensors").read_bytes()
    assert (again / "config.json").read_bytes() == (rtn_checkpoint / "config.json").read_bytes()


def test_interrupted_export_leaves_nothing(tiny_gemma4: Path, tmp_path: Path) -> None:
    plan = plan_model(tiny_gemma4)
    calls = []

    def failing(name: str, w: torch.Tensor):  # type: ignore[no-untyped-def]
        calls.append(name)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return rtn_quantize(w, QuantScheme())

    out = tmp_path / "ckpt"
    with pytest.raises(KeyboardInterrupt):
        export_checkpoint(tiny_gemma4, out, selection=plan.selection, scheme=QuantScheme(), quantize_fn=failing,
                          ignore_linears=[])
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite(rtn_checkpoint: Path, tiny_gemma4: Path, tmp_path: Path) -> None:
    out = tmp_path / "x"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(EcoquantError, match="already exists"):
        quantize(tiny_gemma4, out, QuantizeConfig(), show_progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    quantize(tiny_gemma4, out, QuantizeConfig(overwrite=True), show_progress=False)
    assert not (out / "keep.txt").exists() and (out / "quant_recipe.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]


def test_mse_per_channel_variant_loads(tiny_gemma4: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForImageTextToText

    out = tmp_path / "mse"
    quantize(tiny_gemma4, out, QuantizeConfig(scheme=QuantScheme(group_size=None, observer="mse", mse_grid=10)),
             show_progress=False)
    model = AutoModelForImageTextToText.from_pretrained(out)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[2, 10, 11, 12]])).logits
    assert bool(torch.isfinite(logits).all())


def test_asymmetric_zero_points_decompress_with_compressed_tensors(tiny_gemma4: Path, tmp_path: Path) -> None:
    """Asymmetric checkpoints pack zero points as compressed-tensors (and vLLM) expect.

    transformers 5.23 with compressed-tensors 0.20 cannot load them (its meta-device
    layout leaves zero points unpacked), so this checks the tensors with the
    compressed-tensors decompressor directly.
    """
    scheme = QuantScheme(symmetric=False)
    out = tmp_path / "asym"
    quantize(tiny_gemma4, out, QuantizeConfig(scheme=scheme), show_progress=False)
    tensors = checkpoint_tensors(out)
    base = {t.name: t for t in tensor_infos(tiny_gemma4)}
    ct_scheme = QuantizationScheme(targets=["Linear"], weights=scheme.to_quantization_args())
    m = "model.language_model.layers.2.self_attn.k_proj"
    state = {k.removeprefix(m + "."): v for k, v in tensors.items() if k.startswith(m + ".")}
    assert set(state) == {"weight_packed", "weight_scale", "weight_shape", "weight_zero_point"}
    w = read_tensor(base[f"{m}.weight"])
    decompressed = PackedQuantizationCompressor.decompress(state, ct_scheme)["weight"]
    assert torch.equal(decompressed, rtn_quantize(w, scheme).dequantize(scheme))


def test_streaming_writer_round_trips_through_safetensors(tmp_path: Path) -> None:
    a = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    b = torch.randn(5, 2).to(torch.bfloat16)
    c = torch.arange(7 * 3, dtype=torch.int32).reshape(7, 3)
    path = tmp_path / "x.safetensors"
    write_streaming(
        path,
        [
            PlannedTensor("b", "BF16", (5, 2), produce=lambda: b),
            PlannedTensor("a", "F32", (3, 4), produce=lambda: a),
            PlannedTensor("c", "I32", (7, 3), produce_rows=lambda: (c[:4], c[4:])),
        ],
    )
    with safe_open(path, "pt") as st:
        assert torch.equal(st.get_tensor("a"), a) and torch.equal(st.get_tensor("b"), b)
        assert torch.equal(st.get_tensor("c"), c)
    infos = {t.name: t for t in tensor_infos(tmp_path)}
    assert torch.equal(read_tensor(infos["b"]), b)
    copy = tmp_path / "copy" / "model.safetensors"
    copy.parent.mkdir()
    write_streaming(copy, [PlannedTensor(n, i.dtype, i.shape, source=i) for n, i in infos.items()])
    with safe_open(copy, "pt") as st:
        assert torch.equal(st.get_tensor("c"), c)
    with pytest.raises(ValueError, match="planned"):
        write_streaming(tmp_path / "bad.safetensors", [PlannedTensor("a", "F32", (4, 3), produce=lambda: a)])
