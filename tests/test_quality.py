"""The quality yardstick: metric functions against torch, then whole runs on variants we perturb ourselves."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from ecoquant.errors import EcoquantError
from ecoquant.quality.divergence import kl_divergence, top1_agreement
from ecoquant.quality.perplexity import IGNORE, perplexity, token_nll, window_inputs, window_starts
from ecoquant.quality.run import ImagePrompt, QualityConfig, compare, multimodal_labels

# --- metrics on tensors ----------------------------------------------------------------------------------------


def test_kl_worked_example_from_the_docstring() -> None:
    base = torch.log(torch.tensor([[0.5, 0.5]]))
    variant = torch.log(torch.tensor([[0.9, 0.1]]))
    expected = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert kl_divergence(base, variant).item() == pytest.approx(expected, rel=1e-6)


def test_kl_matches_torch_and_is_zero_only_for_equal_distributions() -> None:
    g = torch.Generator().manual_seed(0)
    p, q = torch.randn(37, 50, generator=g) * 3, torch.randn(37, 50, generator=g) * 3
    ref = F.kl_div(F.log_softmax(q, -1), F.log_softmax(p, -1), log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(kl_divergence(p, q, chunk=5), ref, rtol=1e-5, atol=1e-6)
    assert torch.equal(kl_divergence(p, p), torch.zeros(37))
    assert (kl_divergence(p, q) > 0).all()
    # Shifting all logits of a row changes nothing: KL sees distributions, not logits.
    assert kl_divergence(p, p + 7.0).max() < 1e-5


def test_top1_agreement_compares_argmaxes() -> None:
    base = torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    variant = torch.tensor([[0.0, 5.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    assert top1_agreement(base, variant).tolist() == [True, False, True]


def test_token_nll_is_cross_entropy_over_scored_labels() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 6, 11, generator=g)
    labels = torch.randint(0, 11, (2, 6), generator=g)
    labels[0, 2] = IGNORE
    ref = F.cross_entropy(logits.reshape(-1, 11), labels.reshape(-1), ignore_index=IGNORE, reduction="sum")
    torch.testing.assert_close(token_nll(logits, labels).sum(), ref)
    assert token_nll(logits, labels).numel() == 11
    assert perplexity(2 * math.log(4.0), 2) == pytest.approx(4.0)


def test_windows_score_every_text_token_exactly_once() -> None:
    ids = torch.arange(100, 123)  # 23 "text tokens"
    starts = window_starts(len(ids), 5, None)
    assert starts == [0, 5, 10, 15]  # the 3-token tail is dropped
    scored = []
    for s in starts:
        inputs, labels = window_inputs(ids, s, 5, bos_id=2)
        assert inputs.shape == labels.shape == (1, 5)
        assert inputs[0, 0] == 2 and torch.equal(inputs[0, 1:], ids[s : s + 4])
        scored += labels[0].tolist()
    assert scored == ids[:20].tolist()
    assert window_starts(len(ids), 5, 2) == [0, 5]


def test_multimodal_labels_score_text_that_sees_the_image() -> None:
    img = 9
    ids = torch.tensor([[2, 40, img, img, img, 41, 42, 43, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1, 0]])
    labels = multimodal_labels(ids, mask, frozenset({img}))
    # Before the image: not scored; into/inside the image: not scored; into padding: not scored.
    assert labels[0].tolist() == [IGNORE, IGNORE, IGNORE, IGNORE, IGNORE, 42, 43, IGNORE, IGNORE]


def test_config_rejects_nonsense() -> None:
    with pytest.raises(EcoquantError, match="dtype"):
        QualityConfig(dtype="int4")
    with pytest.raises(EcoquantError, match="window_tokens"):
        QualityConfig(window_tokens=1)
    with pytest.raises(EcoquantError, match="nothing to measure"):
        QualityConfig(max_windows=0)
    with pytest.raises(EcoquantError, match="evaluation text 'shakespeare' is not one of austen, sqlite"):
        QualityConfig(text="shakespeare")


# --- whole runs on the tiny Gemma-4 (text and image+text) -----------------------------------------------------


def perturbed_copy(src: Path, dst: Path, select: Callable[[str], bool], relative_noise: float, seed: int = 0) -> Path:
    """A model folder equal to ``src`` except for Gaussian noise (``relative_noise`` x each tensor's std) on ``select``ed weights."""
    shutil.copytree(src, dst)
    weights = load_file(str(src / "model.safetensors"))
    g = torch.Generator().manual_seed(seed)
    touched = 0
    for name, w in weights.items():
        if select(name) and w.is_floating_point() and w.dim() == 2:
            noise = torch.randn(w.shape, generator=g) * w.float().std() * relative_noise
            weights[name] = (w.float() + noise).to(w.dtype)
            touched += 1
    assert touched > 0, "the selection matched no weight"
    save_file(weights, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def red_circle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("img") / "circle.png"
    image = Image.new("RGB", (64, 48), "white")
    ImageDraw.Draw(image).ellipse((8, 4, 44, 40), fill="red")
    image.save(path)
    return path


def test_tiny_gemma4_variants_text_and_image(tiny_gemma4: Path, tmp_path: Path, red_circle: Path) -> None:
    text_noisy = perturbed_copy(
        tiny_gemma4, tmp_path / "text_noisy", lambda n: "language_model.layers" in n and n.endswith("proj.weight"), 0.5
    )
    vision_noisy = perturbed_copy(tiny_gemma4, tmp_path / "vision_noisy", lambda n: "vision_tower" in n, 0.5)
    cfg = QualityConfig(
        window_tokens=48, max_windows=2, images=(ImagePrompt(red_circle, "What is this?"),), answer_tokens=6,
        dtype="float32", device="cpu",
    )
    report = compare(tiny_gemma4, [tiny_gemma4, text_noisy, vision_noisy], cfg)
    text, image = report.part("text"), report.part("image_text")
    assert text.n_tokens == 96 and text.n_sequences == 2
    assert image.n_tokens > 6  # the answer and the prompt text after the image

    s, t, v = text.variants
    # The base against itself: identical logits, so exactly zero divergence.
    assert (s.kl_mean, s.top1_agreement, s.perplexity_ratio) == (0.0, 1.0, 1.0)
    assert image.variants[0].kl_mean == 0.0 and image.variants[0].top1_agreement == 1.0
    # Noise in the language model shows on both parts.
    assert t.kl_mean > 0.0 and t.top1_agreement < 1.0 and t.perplexity_ratio != 1.0
    assert image.variants[1].kl_mean > 0.0
    # Noise in the vision tower cannot touch text-only input, but must show once an image is in the prompt.
    assert (v.kl_mean, v.top1_agreement) == (0.0, 1.0)
    assert image.variants[2].kl_mean > 0.0
    assert text.base.perplexity > 1.0 and math.isfinite(text.base.perplexity)
    data = report.to_dict()
    assert data["corpus_sha256"]["evaluation"] == report.corpus_sha256["evaluation"]
    assert data["parts"][1]["variants"][2]["kl_mean"] == image.variants[2].kl_mean


def test_images_need_an_image_text_model(gemma3_270m: Path, red_circle: Path) -> None:
    cfg = QualityConfig(max_windows=0, images=(ImagePrompt(red_circle),), device="cpu")
    with pytest.raises(EcoquantError, match="image"):
        compare(gemma3_270m, [gemma3_270m], cfg)


def test_cli_table_and_json(tiny_gemma4: Path, tmp_path: Path) -> None:
    from ecoquant.cli import app

    out = tmp_path / "q.json"
    args = ["quality", str(tiny_gemma4), str(tiny_gemma4), "--window-tokens", "32", "--max-windows", "1"]
    result = CliRunner().invoke(app, [*args, "--json", str(out), "--no-progress", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "100.00%" in result.stdout and "text" in result.stdout
    data = json.loads(out.read_text())
    assert data["parts"][0]["name"] == "text" and data["parts"][0]["n_tokens"] == 32
    assert data["parts"][0]["variants"][0]["kl_mean"] == 0.0

    missing = CliRunner().invoke(app, ["quality", str(tiny_gemma4), str(tmp_path / "nope"), "--no-progress"])
    assert missing.exit_code == 2
    assert "nope" in missing.output and "Traceback" not in missing.output

    unknown = CliRunner().invoke(app, ["quality", str(tiny_gemma4), "--text", "klingon", "--no-progress"])
    assert unknown.exit_code == 2
    assert "'klingon' is not one of austen, sqlite" in unknown.output and "Traceback" not in unknown.output


# --- the real Gemma-3 270M ------------------------------------------------------------------------------------


def test_gemma3_270m_perplexity_is_sane_on_a_short_window(gemma3_270m: Path) -> None:
    cfg = QualityConfig(window_tokens=128, max_windows=1, device="cpu")
    report = compare(gemma3_270m, [], cfg)
    ppl = report.part("text").base.perplexity
    # Uniform guessing over 262k tokens would be 262144; a working 270M model is in the tens on Austen.
    assert 5.0 < ppl < 100.0, ppl


def test_gemma3_270m_on_the_sqlite_text(gemma3_270m: Path) -> None:
    from ecoquant.data.corpus import SQLITE_DOCS

    report = compare(gemma3_270m, [], QualityConfig(window_tokens=128, max_windows=1, device="cpu", text="sqlite"))
    part = report.part("text")
    assert part.n_tokens == 128
    assert 1.5 < part.base.perplexity < 100.0, part.base.perplexity  # a working model on technical English
    # The report names the text it measured on: title and file in the description and source, and its hash.
    assert SQLITE_DOCS.title in part.description and SQLITE_DOCS.file in part.description
    assert f"evaluation: {SQLITE_DOCS.title}" in report.corpus_source
    data = report.to_dict()
    assert data["corpus_sha256"]["evaluation"] == SQLITE_DOCS.sha256 and data["config"]["text"] == "sqlite"


@pytest.mark.slow
def test_gemma3_270m_noisy_variant(gemma3_270m: Path, tmp_path: Path) -> None:
    noisy = perturbed_copy(gemma3_270m, tmp_path / "noisy", lambda n: n.endswith("proj.weight"), 0.05)
    cfg = QualityConfig(window_tokens=256, max_windows=2, device="cpu")
    report = compare(gemma3_270m, [gemma3_270m, noisy], cfg)
    same, variant = report.part("text").variants
    assert same.kl_mean == 0.0 and same.top1_agreement == 1.0
    assert 0.0 < variant.kl_mean < 1.0
    assert 0.5 < variant.top1_agreement < 1.0
    assert variant.perplexity_ratio > 1.0


@pytest.mark.slow
def test_gemma3_270m_full_evaluation_perplexity(gemma3_270m: Path) -> None:
    report = compare(gemma3_270m, [], QualityConfig(window_tokens=512))
    part = report.part("text")
    assert part.n_tokens > 25_000
    assert 10.0 < part.base.perplexity < 60.0, part.base.perplexity


def test_compressed_tensors_variant_loads_and_is_measured(tiny_gemma4: Path, tmp_path: Path) -> None:
    """An ecoquant RTN checkpoint (compressed-tensors pack-quantized) is decompressed by transformers on load."""
    from ecoquant.api import QuantizeConfig, quantize

    rtn = tmp_path / "rtn"
    quantize(str(tiny_gemma4), rtn, QuantizeConfig(method="rtn"), show_progress=False)
    assert json.loads((rtn / "config.json").read_text())["quantization_config"]["format"] == "pack-quantized"
    report = compare(tiny_gemma4, [rtn], QualityConfig(window_tokens=32, max_windows=1, device="cpu"))
    variant = report.part("text").variants[0]
    assert variant.kl_mean > 0.0 and variant.n_tokens == 32
    assert math.isfinite(variant.perplexity)


def test_a_variant_of_another_model_is_refused(tiny_gemma4: Path, gemma3_270m: Path) -> None:
    with pytest.raises(EcoquantError, match="vocabulary"):
        compare(tiny_gemma4, [gemma3_270m], QualityConfig(window_tokens=16, max_windows=1, device="cpu"))
