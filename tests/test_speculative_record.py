"""results.json's speculative fields: the per-run acceptance summary, its round trip, and old records."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from ecoquant.errors import EcoquantError
from ecoquant.eval.record import RunRecord, SampleResult, speculative_summary
from ecoquant.eval.runner import EvalConfig
from test_report import SEED, record


def counted(sample: SampleResult, steps: int, drafted: int, accepted: int) -> SampleResult:
    return replace(sample, target_steps=steps, drafted_tokens=drafted, accepted_tokens=accepted)


def test_summary_sums_requests_in_vllms_conventions() -> None:
    a, b = SEED[0].samples
    # Request a: 5 steps of k=4 drafts, 6 accepted; request b: 2 steps, 8 drafted, 0 accepted.
    summary = speculative_summary("asst", 4, [counted(a, 5, 20, 6), counted(b, 2, 8, 0)])
    assert summary == {
        "assistant": "asst",
        "num_speculative_tokens": 4,
        "mean_accepted_per_step": 6 / 7,
        "acceptance_rate": 6 / 28,
        "target_steps": 7,
        "drafted_tokens": 28,
        "accepted_tokens": 6,
    }
    # Nothing drafted (every answer one token long): zero, not a division error.
    empty = speculative_summary("asst", 2, [counted(a, 0, 0, 0)])
    assert (empty["mean_accepted_per_step"], empty["acceptance_rate"]) == (0.0, 0.0)


def test_speculative_fields_round_trip_and_old_records_load(tmp_path: Path) -> None:
    base, variant = SEED
    samples = tuple(counted(s, 3, 12, 5) for s in variant.samples)
    spec_run = replace(variant, samples=samples, speculative=speculative_summary("asst", 4, samples))
    original = record([base, spec_run])
    path = original.save(tmp_path / "results.json")
    data = json.loads(path.read_text())
    assert data["runs"][0]["speculative"] is None
    assert data["runs"][1]["speculative"]["accepted_tokens"] == 10
    assert data["runs"][1]["samples"][0]["drafted_tokens"] == 12
    assert RunRecord.load(path) == original

    # A results.json written before speculative decoding existed has neither field: it still loads, as None.
    for run in data["runs"]:
        del run["speculative"]
        for sample in run["samples"]:
            for key in ("target_steps", "drafted_tokens", "accepted_tokens"):
                del sample[key]
    path.write_text(json.dumps(data))
    old = RunRecord.load(path)
    assert old.runs[1].speculative is None
    assert old.runs[1].samples[0].target_steps is None


def test_assistant_options_are_checked_before_any_work() -> None:
    with pytest.raises(EcoquantError, match="--num-speculative-tokens must be at least 1"):
        EvalConfig(assistant="asst", num_speculative_tokens=0)
    with pytest.raises(EcoquantError, match="--backend transformers"):
        EvalConfig(backend="openai", urls=("http://x",), assistant="asst")
    assert EvalConfig().num_speculative_tokens == 4
