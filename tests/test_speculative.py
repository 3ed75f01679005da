"""Speculative decoding on the shipped tiny pair: the assistant fixture, identical greedy answers with and
without it, consistent acceptance counts in results.json, and one-line errors for a bad --assistant."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ecoquant.cli import app
from ecoquant.errors import EcoquantError
from ecoquant.eval.backends.base import generation_settings
from ecoquant.eval.runner import EvalConfig, RunRecord, run_eval
from ecoquant.eval.speculative import DraftCounter, assistant_folder
from ecoquant.fixtures.tiny_assistant import SHIPPED_ASSISTANT_DIR, tiny_vlm_assistant_path
from ecoquant.fixtures.tiny_vlm import tiny_vlm_path

K = 3
SETTINGS = generation_settings()


def test_assistant_fixture_is_small_offline_and_all_kv_shared() -> None:
    from transformers import Gemma4AssistantForCausalLM

    from ecoquant.eval.speculative import load_assistant
    import torch

    folder = tiny_vlm_assistant_path()
    assert folder == SHIPPED_ASSISTANT_DIR
    assert sum(p.stat().st_size for p in folder.iterdir()) < 5 * 2**20
    model = load_assistant(str(folder), "gemma4", torch.device("cpu"), torch.bfloat16, K)
    assert isinstance(model, Gemma4AssistantForCausalLM)
    text = model.config.get_text_config()
    assert text.num_kv_shared_layers == text.num_hidden_layers  # every layer reads the target's KV
    assert all(not hasattr(layer.self_attn, "k_proj") for layer in model.model.layers)
    assert model.config.backbone_hidden_size == json.loads((tiny_vlm_path() / "config.json").read_text())[
        "text_config"]["hidden_size"]
    assert model.generation_config.num_assistant_tokens == K
    training = json.loads((folder / "TRAINING.json").read_text())
    assert training["command"].startswith("uv run python bench/train_tiny_assistant.py")


def test_draft_counter_arithmetic() -> None:
    counter = DraftCounter()
    counter.target_forwards, counter.drafted_tokens = 3, 2 * K  # prefill + 2 verifying passes
    counts = counter.counts(generated=6)  # 1 from the prefill, 2 bonus tokens, so 3 accepted drafts
    assert (counts.target_steps, counts.drafted_tokens, counts.accepted_tokens) == (2, 2 * K, 3)
    with pytest.raises(RuntimeError, match="do not add up"):
        counter.counts(generated=2 + 2 * K + 2)  # more accepted than drafted


def test_bad_assistant_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(EcoquantError, match="no such folder"):
        assistant_folder(str(tmp_path / "missing"))
    with pytest.raises(EcoquantError, match="'gemma4' model, not a drafting assistant") as err:
        assistant_folder(str(tiny_vlm_path()))
    assert "\n" not in str(err.value)
    with pytest.raises(EcoquantError, match="drafts for gemma4, gemma3n models, not 'llama'"):
        assistant_folder(str(tiny_vlm_assistant_path()), "llama")
    for bad in (str(tmp_path / "missing"), str(tiny_vlm_path())):
        result = CliRunner().invoke(
            app, ["eval", "--base", str(tiny_vlm_path()), "--assistant", bad, "--out", str(tmp_path / "o")]
        )
        assert result.exit_code == 2, result.output
        assert result.output.count("error:") == 1 and len(result.output.strip().splitlines()) <= 2, result.output


@pytest.fixture(scope="module")
def pair_records(tmp_path_factory: pytest.TempPathFactory) -> tuple[RunRecord, RunRecord]:
    """The tiny VLM on the basic pages (one page per kind), one request at a time, without and with the assistant."""
    cache = tmp_path_factory.mktemp("pages")
    plain = EvalConfig(suite="builtin-basic", size=1, cache_dir=cache, generation=SETTINGS, idle_seconds=0.0,
                       warmup_requests=0, device="cpu", batch_size=1)
    spec = EvalConfig(**{**plain.__dict__, "assistant": str(tiny_vlm_assistant_path()), "num_speculative_tokens": K})
    return (run_eval(str(tiny_vlm_path()), [], plain, show_progress=False),
            run_eval(str(tiny_vlm_path()), [], spec, show_progress=False))


def test_greedy_answers_are_identical_with_the_assistant(pair_records: tuple[RunRecord, RunRecord]) -> None:
    plain, spec = (r.runs[0] for r in pair_records)
    assert len(plain.samples) == 6
    assert [(s.id, s.prediction, s.tokens_out) for s in spec.samples] == [
        (s.id, s.prediction, s.tokens_out) for s in plain.samples
    ]
    assert plain.speculative is None and all(s.target_steps is None for s in plain.samples)


def test_results_json_carries_consistent_acceptance(
    pair_records: tuple[RunRecord, RunRecord], tmp_path: Path
) -> None:
    record = pair_records[1]
    run = RunRecord.load(record.save(tmp_path / "results.json")).runs[0]
    for s in run.samples:
        assert s.target_steps is not None and s.drafted_tokens is not None and s.accepted_tokens is not None
        n = s.tokens_out
        assert s.tokens_out == 1 + s.target_steps + s.accepted_tokens  # prefill token, then accepted + 1 per step
        assert 0 <= s.accepted_tokens <= s.drafted_tokens <= K * s.target_steps
        assert s.target_steps >= math.ceil((n - 1) / (K + 1))  # full acceptance is the fewest steps
    spec = run.speculative
    assert spec is not None
    assert (spec["assistant"], spec["num_speculative_tokens"]) == (str(tiny_vlm_assistant_path()), K)
    assert spec["target_steps"] == sum(s.target_steps or 0 for s in run.samples)
    assert spec["accepted_tokens"] == sum(s.accepted_tokens or 0 for s in run.samples)
    assert spec["mean_accepted_per_step"] == spec["accepted_tokens"] / spec["target_steps"]
    assert spec["acceptance_rate"] == spec["accepted_tokens"] / spec["drafted_tokens"]
    assert spec["accepted_tokens"] > 0  # the distilled assistant is really accepted, not only drafting
    assert run.backend["batch_size"] == 1 and run.backend["num_speculative_tokens"] == K
