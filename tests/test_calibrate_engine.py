"""The layer-sequential engine on real architectures: exactness, KV sharing, GPTQ/AWQ end to end, determinism."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from calibrate_models import IdentityCalibrator, layer_io, random_batches, save_tiny_gemma3
from ecoquant.api import plan_model
from ecoquant.calibrate.data import calibration_images
from ecoquant.calibrate.result import CalibrationResult
from ecoquant.calibrate.run import calibrate
from ecoquant.errors import EcoquantError
from ecoquant.export.compressed_tensors import export_checkpoint
from ecoquant.fixtures.tiny_gemma4 import tiny_gemma4_path
from ecoquant.quantize.awq import AWQConfig
from ecoquant.quantize.scheme import QuantScheme

SCHEME = QuantScheme()  # int4, group 128, symmetric: the default W4A16


def _load(path: Path) -> nn.Module:
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    for auto in (AutoModelForImageTextToText, AutoModelForCausalLM):
        try:
            return auto.from_pretrained(path, dtype=torch.float32).eval()
        except ValueError:
            continue
    raise AssertionError(f"cannot load {path}")


def _layers(model: nn.Module) -> nn.ModuleList:
    inner = model.model
    return inner.language_model.layers if hasattr(inner, "language_model") else inner.layers


class _Recorder:
    """``on_layer_output`` callback: keeps each layer's output and the shared K/V it saw."""

    def __init__(self) -> None:
        self.seen: dict[tuple[int, int], Any] = {}

    def __call__(self, i: int, b: int, args: tuple[Any, ...], kwargs: dict[str, Any], out: torch.Tensor) -> None:
        kv = kwargs.get("shared_kv_states")
        kv_copy = {k: tuple(t.clone() for t in v) for k, v in kv.items()} if kv is not None else None
        self.seen[(i, b)] = (out.clone(), kv_copy)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


@pytest.fixture(scope="module")
def gemma4() -> Path:
    return tiny_gemma4_path()


@pytest.fixture(scope="module")
def gemma4_batches(gemma4: Path) -> list[dict[str, torch.Tensor]]:
    """Two text samples longer than the sliding window (32) and one image+question sample."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(gemma4)
    image, question = calibration_images(1, seed=0)[0]
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]
    enc = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    image_batch = {k: v for k, v in enc.items() if isinstance(v, torch.Tensor)}
    return [*random_batches(2, 40, 1000, seed=1), image_batch]


@pytest.fixture(scope="module")
def gemma4_reference(gemma4: Path, gemma4_batches: list[dict[str, torch.Tensor]]) -> dict[tuple[int, int], Any]:
    model = _load(gemma4)
    return layer_io(model, _layers(model), gemma4_batches)


@pytest.fixture(scope="module")
def gemma4_plan(gemma4: Path) -> Any:
    return plan_model(gemma4, "gemma4-e")


# --- exactness -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def identity_run(
    gemma4: Path, gemma4_batches: list[dict[str, torch.Tensor]], gemma4_plan: Any,
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[CalibrationResult, _Recorder, IdentityCalibrator]:
    recorder = _Recorder()
    calibrator = IdentityCalibrator()
    result = calibrate(
        gemma4, method=calibrator, selection=gemma4_plan.selection, batches=gemma4_batches,
        work_dir=tmp_path_factory.mktemp("identity"), on_layer_output=recorder,
    )
    return result, recorder, calibrator


def test_identity_walk_reproduces_every_layer_of_gemma4(
    identity_run: tuple[CalibrationResult, _Recorder, IdentityCalibrator], gemma4_reference: dict[tuple[int, int], Any]
) -> None:
    """With nothing quantized, each layer's output in the walk equals the full model's, text and image alike."""
    _, recorder, _ = identity_run
    assert set(recorder.seen) == set(gemma4_reference)
    for key, (want, _) in gemma4_reference.items():
        got, _ = recorder.seen[key]
        assert got.shape == want.shape
        assert _rel(got, want) < 1e-6, key


def test_embedding_tables_are_read_by_the_rows_the_data_uses(
    identity_run: tuple[CalibrationResult, _Recorder, IdentityCalibrator],
    gemma4_batches: list[dict[str, torch.Tensor]], gemma4: Path,
) -> None:
    """The capture holds only the rows it looks up (E4B's float32 tables alone are 14.7 GB), with exact outputs.

    The identity test above shows the outputs are the full tables' (the image sample
    also reads ``embed_tokens.weight[pad_token_id]`` directly); this shows the tables were compact.
    """
    import json

    result, _, _ = identity_run
    rows = result.stats["embedding_rows"]
    text = json.loads((gemma4 / "config.json").read_text())["text_config"]
    ids = torch.unique(torch.cat([b["input_ids"].flatten() for b in gemma4_batches]))
    tables = {name.rsplit(".", 1)[-1]: n for name, n in rows.items()}
    assert {"embed_tokens", "embed_tokens_per_layer"} <= set(tables), rows
    for name, n in tables.items():
        # the data's distinct ids (image placeholders become pad) plus rows 0 .. pad_token_id
        assert n <= ids.numel() + text["pad_token_id"] + 1, (name, n)
        assert n < text["vocab_size"], (name, n)


def test_kv_shared_layers_see_their_donors_kv(
    gemma4: Path, identity_run: tuple[CalibrationResult, _Recorder, IdentityCalibrator],
    gemma4_reference: dict[tuple[int, int], Any],
) -> None:
    """KV-shared layers read exactly the K/V the full model gives them, from the donor the config names."""
    from ecoquant.models.loading import load_config

    result, recorder, _ = identity_run
    text = load_config(gemma4).get_text_config()
    modes, types = text.kv_sharing_modes, text.layer_types
    donors = {t: i for i, (m, t) in enumerate(zip(modes, types, strict=True)) if m == "store"}
    shared = [i for i, m in enumerate(modes) if m == "reuse"]
    assert shared, "the fixture must have KV-shared layers"
    assert result.stats["kv_sharing"] == {str(i): {types[i]: donors[types[i]]} for i in shared}
    for (i, b), (_, want_kv) in gemma4_reference.items():
        if i not in shared:
            continue
        _, got_kv = recorder.seen[(i, b)]
        k_want, v_want = want_kv[types[i]]
        k_got, v_got = got_kv[types[i]]
        assert _rel(k_got, k_want) < 1e-6 and _rel(v_got, v_want) < 1e-6, (i, b)


def test_inputs_are_grouped_by_what_the_linears_read(
    identity_run: tuple[CalibrationResult, _Recorder, IdentityCalibrator],
) -> None:
    """q/k/v share one input stream, gate/up another; KV-shared layers have q alone; the PLE projection runs first."""
    _, _, calibrator = identity_run
    streams = {unit: sorted({tuple(n.rsplit(".", 2)[-2] + "." + n.rsplit(".", 1)[-1] for n in names)
                             for names, _ in seen}) for unit, seen in calibrator.observed.items()}
    assert streams["before layers"] == [("language_model.per_layer_model_projection",)]
    assert ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj") in streams["layer 0"]
    assert ("mlp.gate_proj", "mlp.up_proj") in streams["layer 0"]
    assert ("self_attn.q_proj",) in streams["layer 4"]
    assert not any("self_attn.k_proj" in s for s in streams["layer 4"])


def test_identity_walk_reproduces_gemma3(tmp_path: Path) -> None:
    """Any transformers decoder: Gemma-3 (causal LM, (1 + w) norms, sliding + full layers)."""
    path = save_tiny_gemma3(tmp_path / "gemma3")
    batches = random_batches(2, 24, 512, seed=2)
    recorder = _Recorder()
    calibrate(path, method=IdentityCalibrator(), selection=["model.layers.0.mlp.up_proj"], batches=batches,
              work_dir=tmp_path / "work", on_layer_output=recorder)
    model = _load(path)
    want = layer_io(model, model.model.layers, batches)
    assert set(recorder.seen) == set(want)
    for key, (w, _) in want.items():
        assert _rel(recorder.seen[key][0], w) < 1e-6, key


# --- GPTQ and AWQ end to end -------------------------------------------------------------------


def _export_and_compare(
    source: Path, result: CalibrationResult, plan: Any, recorder: _Recorder,
    batches: list[dict[str, torch.Tensor]], out: Path,
) -> nn.Module:
    """Export, load the checkpoint in transformers, and check its layers compute what the walk calibrated on."""
    export_checkpoint(source, out, selection=plan.selection, scheme=SCHEME, quantize_fn=result.quantize_fn,
                      ignore_linears=list(plan.ignore_linears), replace=result.replace)
    model = _load(out)
    got = layer_io(model, _layers(model), batches)
    for key, (want, want_kv) in got.items():
        # The walk ran the fake-quantized weights; the checkpoint decompresses to the same numbers,
        # so every layer's output and every shared K/V match what calibration saw.
        out, kv = recorder.seen[key]
        assert _rel(out, want) < 1e-4, key
        for name, tensors in (want_kv or {}).items():
            for t_got, t_want in zip(kv[name], tensors, strict=True):
                assert _rel(t_got, t_want) < 1e-4, (key, name)
    return model


def test_gptq_end_to_end_on_gemma4(
    gemma4: Path, gemma4_batches: list[dict[str, torch.Tensor]], gemma4_plan: Any, tmp_path: Path,
    gemma4_reference: dict[tuple[int, int], Any],
) -> None:
    recorder = _Recorder()
    result = calibrate(gemma4, method="gptq", selection=gemma4_plan.selection, batches=gemma4_batches,
                       work_dir=tmp_path / "work", scheme=SCHEME, on_layer_output=recorder)
    assert set(result.quantized) == set(gemma4_plan.selection.modules)
    assert "model.language_model.per_layer_model_projection" in result.quantized
    losses = {n: s for u in result.stats["units"].values() for n, s in u.items() if isinstance(s, dict) and "loss" in s}
    assert set(losses) == set(gemma4_plan.selection.modules)
    for name, s in losses.items():
        assert 0 < s["loss"] < s["rtn_loss"], name  # GPTQ beats rounding on its own calibration data
    # KV-shared layers were calibrated on the quantized donor's K/V (checked against the
    # exported model below), which differ from the float donor's.
    k_float = gemma4_reference[(3, 0)][1]["sliding_attention"][0]
    k_quant = recorder.seen[(3, 0)][1]["sliding_attention"][0]
    assert _rel(k_quant, k_float) > 1e-3
    model = _export_and_compare(gemma4, result, gemma4_plan, recorder, gemma4_batches, tmp_path / "out")
    with torch.no_grad():
        logits = model(**gemma4_batches[2]).logits  # image + text through the quantized checkpoint
    assert torch.isfinite(logits).all()


def test_awq_end_to_end_on_gemma4(
    gemma4: Path, gemma4_batches: list[dict[str, torch.Tensor]], gemma4_plan: Any, tmp_path: Path
) -> None:
    recorder = _Recorder()
    result = calibrate(gemma4, method="awq", selection=gemma4_plan.selection, batches=gemma4_batches,
                       work_dir=tmp_path / "work", scheme=SCHEME, awq=AWQConfig(grid=8, clip_grid=8),
                       on_layer_output=recorder)
    assert set(result.quantized) == set(gemma4_plan.selection.modules)
    replaced = dict(result.replace)
    # Folded norms come back in the checkpoint's dtype; up_proj is quantized, so only norms are replaced.
    assert replaced and all(t.dtype == torch.bfloat16 and "layernorm" in n for n, t in replaced.items())
    assert "model.language_model.layers.4.input_layernorm.weight" in replaced  # KV-shared layer: norm -> q only
    for unit in (f"layer {i}" for i in range(6)):
        # Smoothing alone is an identity up to bf16 rounding of the folded tensors.
        assert result.stats["units"][unit]["smoothing_rel_diff"] < 2e-2, unit
    model = _export_and_compare(gemma4, result, gemma4_plan, recorder, gemma4_batches, tmp_path / "out")
    norm = model.model.language_model.layers[0].input_layernorm.weight
    torch.testing.assert_close(norm, replaced["model.language_model.layers.0.input_layernorm.weight"].float())


def test_awq_smoothing_is_exact_in_float32(tmp_path: Path) -> None:
    """On a float32 Gemma-3 ((1 + w) norms) the engine's smoothing changes no layer output before quantization."""
    path = save_tiny_gemma3(tmp_path / "gemma3")
    plan = plan_model(path, "text-decoder")
    result = calibrate(path, method="awq", selection=plan.selection, batches=random_batches(2, 24, 512, seed=4),
                       work_dir=tmp_path / "work", scheme=SCHEME, awq=AWQConfig(grid=8, clip_search=False))
    applied = [s for u in result.stats["units"].values() for s in u.get("smoothing", []) if s["applied"]]
    assert len(applied) >= 3
    for i in range(3):
        assert result.stats["units"][f"layer {i}"].get("smoothing_rel_diff", 0.0) < 1e-5


def test_same_inputs_same_seed_give_identical_files(tmp_path: Path) -> None:
    """Two GPTQ runs write byte-identical quantized weights and byte-identical checkpoints."""
    path = save_tiny_gemma3(tmp_path / "gemma3", dtype=torch.bfloat16)
    plan = plan_model(path, "text-decoder")
    outputs = []
    for run in ("a", "b"):
        result = calibrate(path, method="gptq", selection=plan.selection, batches=random_batches(2, 24, 512, seed=6),
                           work_dir=tmp_path / f"work-{run}", scheme=SCHEME)
        export_checkpoint(path, tmp_path / f"out-{run}", selection=plan.selection, scheme=SCHEME,
                          quantize_fn=result.quantize_fn, ignore_linears=list(plan.ignore_linears),
                          replace=result.replace)
        outputs.append(result)
    a, b = outputs
    assert a.quantized.keys() == b.quantized.keys()
    for rel in sorted(set(a.quantized.values())):
        assert (a.work_dir / rel).read_bytes() == (b.work_dir / rel).read_bytes(), rel
    for f in sorted(p.name for p in (tmp_path / "out-a").iterdir()):
        assert (tmp_path / "out-a" / f).read_bytes() == (tmp_path / "out-b" / f).read_bytes(), f
    reopened = CalibrationResult.load(a.work_dir)
    name = plan.selection.modules[0]
    assert torch.equal(reopened.quantized_weight(name).q, a.quantized_weight(name).q)


# --- errors ----------------------------------------------------------------------------------------


def test_clear_errors(gemma4: Path, tmp_path: Path) -> None:
    batches = random_batches(1, 8, 1000)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    with pytest.raises(EcoquantError, match="not empty"):
        calibrate(gemma4, method="gptq", selection=["model.language_model.layers.0.mlp.up_proj"], batches=batches,
                  work_dir=busy)
    vision = "model.vision_tower.encoder.layers.0.mlp.up_proj.linear"
    with pytest.raises(EcoquantError, match="never ran on the calibration data"):
        calibrate(gemma4, method="gptq", selection=[vision], batches=batches, work_dir=tmp_path / "w1")
    with pytest.raises(EcoquantError, match="not a Linear"):
        calibrate(gemma4, method="gptq", selection=["model.language_model.layers.0.mlp"], batches=batches,
                  work_dir=tmp_path / "w2")
    with pytest.raises(EcoquantError, match="at least one sample"):
        calibrate(gemma4, method="gptq", selection=["model.language_model.layers.0.mlp.up_proj"], batches=[],
                  work_dir=tmp_path / "w3")
    if not torch.cuda.is_available():
        with pytest.raises(EcoquantError, match="CUDA is not available"):
            calibrate(gemma4, method="gptq", selection=["model.language_model.layers.0.mlp.up_proj"],
                      batches=batches, work_dir=tmp_path / "w4", device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_walk_matches_cpu(
    gemma4: Path, gemma4_batches: list[dict[str, torch.Tensor]], gemma4_plan: Any, tmp_path: Path
) -> None:
    """The same calibration on CUDA (fp32) gives nearly the same codes, and runs in bf16 too."""
    runs = {}
    for device in ("cpu", "cuda"):
        runs[device] = calibrate(gemma4, method="gptq", selection=gemma4_plan.selection, batches=gemma4_batches,
                                 work_dir=tmp_path / device, device=device, dtype=torch.float32)
    assert runs["cuda"].stats["kv_sharing"] == runs["cpu"].stats["kv_sharing"]
    for name in gemma4_plan.selection.modules:
        same = (runs["cuda"].quantized_weight(name).q == runs["cpu"].quantized_weight(name).q).float().mean()
        assert same > 0.97, name
    bf16 = calibrate(gemma4, method="awq", selection=gemma4_plan.selection, batches=gemma4_batches,
                     work_dir=tmp_path / "bf16", device="cuda")
    assert bf16.stats["compute_dtype"] == "bfloat16" and bf16.stats["peak_cuda_bytes"] > 0
