"""Calibration data: local files, the offline corpus, multimodal samples, and the recipe block."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from ecoquant.calibrate.data import CalibrationConfig, load_calibration
from ecoquant.errors import EcoquantError
from ecoquant.fixtures.tiny_gemma4 import tiny_gemma4_path


@pytest.fixture(scope="module")
def model() -> Path:
    return tiny_gemma4_path()


@pytest.fixture(scope="module")
def tokenizer(model: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model)


def test_jsonl_records_become_single_user_turns(model: Path, tokenizer: Any, tmp_path: Path) -> None:
    records = [{"instruction": f"Question number {i}: what is {i} plus {i}?", "input": "", "output": "x"}
               for i in range(6)]
    records[2]["input"] = "Show your work."
    path = tmp_path / "calib.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records))
    calib = load_calibration(model, CalibrationConfig(source=str(path), num_samples=4, max_length=64, seed=3))
    assert len(calib.batches) == 4 and calib.chat_template and calib.kind == "records"
    texts = [tokenizer.decode(b["input_ids"][0]) for b in calib.batches]
    for text in texts:
        # The tiny fixture's template: <bos><|turn>user\n ... <turn|>\n, with no answer.
        assert text.startswith(tokenizer.bos_token + "<|turn>user\n") and text.endswith("<turn|>\n")
        assert "Question number" in text and "x<turn|>" not in text
    block = calib.describe()
    assert block["source"] == str(path) and block["num_samples"] == 4 and block["seed"] == 3
    assert block["tokens"] == sum(b["input_ids"].shape[1] for b in calib.batches)
    # The seed decides which records: another seed, another draw (and another hash).
    other = load_calibration(model, CalibrationConfig(source=str(path), num_samples=4, max_length=64, seed=4))
    assert other.describe()["token_ids_sha256"] != block["token_ids_sha256"]
    again = load_calibration(model, CalibrationConfig(source=str(path), num_samples=4, max_length=64, seed=3))
    assert again.describe()["token_ids_sha256"] == block["token_ids_sha256"]


def test_json_records_field_and_truncation(model: Path, tmp_path: Path) -> None:
    path = tmp_path / "calib.json"
    path.write_text(json.dumps({"data": [{"question": "word " * 200}, {"question": "short"}]}))
    calib = load_calibration(model, CalibrationConfig(source=str(path), num_samples=2, max_length=32))
    assert max(b["input_ids"].shape[1] for b in calib.batches) == 32
    with pytest.raises(EcoquantError, match="none of the fields"):
        load_calibration(model, CalibrationConfig(source=str(path), num_samples=2, text_field="body"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(EcoquantError, match="not valid JSON"):
        load_calibration(model, CalibrationConfig(source=str(bad)))


def test_text_file_is_cut_into_windows(model: Path, tokenizer: Any, tmp_path: Path) -> None:
    path = tmp_path / "book.txt"
    path.write_text(" ".join(f"sentence {i} of a long story." for i in range(300)))
    calib = load_calibration(model, CalibrationConfig(source=str(path), num_samples=3, max_length=40))
    assert len(calib.batches) == 3 and not calib.chat_template
    for b in calib.batches:
        ids = b["input_ids"][0]
        assert ids[0].item() == tokenizer.bos_token_id and ids.shape[0] == 40
    # Windows never overlap: no two samples share their body.
    bodies = {tuple(b["input_ids"][0, 1:].tolist()) for b in calib.batches}
    assert len(bodies) == 3


def test_offline_corpus_and_hub_failure(model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calib = load_calibration(model, CalibrationConfig(source="corpus", num_samples=3, max_length=48))
    block = calib.describe()
    assert block["kind"] == "corpus" and block["num_samples"] == 3 and block["max_sample_length"] == 48
    assert load_calibration(model, CalibrationConfig(source="corpus", num_samples=3, max_length=48)).token_hash() == (
        calib.token_hash()
    )
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EcoquantError) as err:
        load_calibration(model, CalibrationConfig(num_samples=2))
    message = str(err.value)
    assert "garage-bAInd/Open-Platypus" in message and "\n" not in message and "corpus" in message
    assert "local cache" in message


def test_unreachable_hub_fails_at_once(model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Port 9 (discard) on loopback: nothing listens, so the connection is refused
    # at once; datasets itself would retry for about 30 s.
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    start = time.perf_counter()
    with pytest.raises(EcoquantError, match="127.0.0.1:9 is unreachable"):
        load_calibration(model, CalibrationConfig(num_samples=2))
    assert time.perf_counter() - start < 5.0


def test_multimodal_samples_go_through_the_processor(model: Path) -> None:
    calib = load_calibration(model, CalibrationConfig(source="corpus", num_samples=2, max_length=32, multimodal=True))
    text, image = calib.batches
    assert "pixel_values" not in text and image["pixel_values"].dtype == torch.float32
    from ecoquant.fixtures.tiny_gemma4 import special_token_id

    # The processor expanded the image placeholder into the image's soft tokens.
    assert (image["input_ids"] == special_token_id("<|image|>")).sum() > 1
    assert calib.describe()["image_samples"] == 1


def test_config_validation() -> None:
    with pytest.raises(EcoquantError):
        CalibrationConfig(num_samples=0)
    with pytest.raises(EcoquantError):
        CalibrationConfig(max_length=1)
    assert CalibrationConfig() == CalibrationConfig(
        source="garage-bAInd/Open-Platypus", split="train", num_samples=256, max_length=2048, seed=42
    )
