"""Speculative decoding in the energy model: the assistant's cost terms and the roofline against hand calculations."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch
from safetensors.torch import save_file

from ecoquant.energy.costs import AttentionLayer, checkpoint_costs, planned_costs
from ecoquant.energy.gpus import GpuSpec, gpu_spec
from ecoquant.energy.roofline import PARTS, ModelledEnergy, RequestTokens, modelled_energy
from ecoquant.energy.speculative import (
    ASSUMED_MEAN_ACCEPTED_PER_STEP,
    AssistantTerms,
    Speculation,
    assistant_costs,
    assistant_terms,
    is_assistant_folder,
    speculation,
)
from ecoquant.errors import EcoquantError
from ecoquant.eval.modelled import run_modelled_energy
from ecoquant.eval.record import SampleResult
from ecoquant.fixtures.e4b_assistant import e4b_assistant_twin_path
from ecoquant.fixtures.tiny_vlm import tiny_vlm_path
from energy_toys import GPU, TOY

# ------------------------------------------------------------------ the assistant's cost terms


def tiny_assistant_config(masked: bool = True) -> dict[str, Any]:
    """Two layers (sliding, full), hidden 8, MLP 16, 2 query heads, 1 KV head, head dim 4 / 8, vocab 64,
    8 centroids (8 tokens each), top 2: 16 candidates."""
    return {
        "model_type": "gemma4_assistant",
        "backbone_hidden_size": 12,
        "num_centroids": 8,
        "centroid_intermediate_top_k": 2,
        "use_ordered_embeddings": masked,
        "text_config": {
            "model_type": "gemma4_text",
            "hidden_size": 8,
            "intermediate_size": 16,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 4,
            "global_head_dim": 8,
            "num_kv_shared_layers": 2,
            "vocab_size": 64,
            "sliding_window": 5,
            "layer_types": ["sliding_attention", "full_attention"],
        },
    }


def test_tiny_assistant_terms_equal_the_hand_calculation() -> None:
    t = assistant_terms(tiny_assistant_config())
    # pre_projection 24 -> 8; layer 0: q 8 -> 2x4, o back; layer 1: q 8 -> 2x8, o back; MLP 3 x 8 x 16 each;
    # post_projection 8 -> 12.
    params = 24 * 8 + (8 * 8 * 2) + (8 * 16 * 2) + 2 * (3 * 8 * 16) + 8 * 12
    assert t.linear_flops == 2 * params
    assert t.linear_bytes == 2 * params  # bf16 without a safetensors file
    # centroid head: score 8 centroids (8 x 8), then 2 clusters x 8 tokens = 16 candidate rows of width 8
    assert t.candidates == 16
    assert t.head_flops == 2 * 8 * 8 + 2 * 8 * 16
    assert t.head_bytes == 2 * 8 * 8 + 16 * 8 * 2 + 16 * 8  # centroids, candidate rows, their int64 indices
    assert t.input_bytes == 2 * 12  # one bf16 row of the target's embedding table
    assert t.attention == (AttentionLayer(8, 5, 4), AttentionLayer(16, None, 8))
    # at context 10: the sliding layer sees 5 tokens, the full one 10 (K and V, 2 bytes each)
    assert t.kv_bytes(10) == 2 * 4 * 2 * 5 + 2 * 8 * 2 * 10
    assert t.flops(10) == t.linear_flops + t.head_flops + 4 * 8 * 5 + 4 * 16 * 10


def test_without_centroids_the_head_scores_the_whole_vocabulary() -> None:
    t = assistant_terms(tiny_assistant_config(masked=False))
    assert t.candidates == 64
    assert t.head_flops == 2 * 8 * 64 and t.head_bytes == 64 * 8 * 2


def test_stored_bytes_price_a_quantized_draft_as_stored(tmp_path: Path) -> None:
    config = tiny_assistant_config()
    (tmp_path / "config.json").write_text(json.dumps(config))
    # a "quantized" pre_projection: packed int32 weight + scales, 40 bytes in all; the rest bf16
    tensors = {
        "pre_projection.weight_packed": torch.zeros(8, 1, dtype=torch.int32),
        "pre_projection.weight_scale": torch.zeros(4, dtype=torch.bfloat16),
        "model.embed_tokens.weight": torch.zeros(64, 8, dtype=torch.float32),  # 4 bytes per value: rows cost 32
    }
    save_file(tensors, str(tmp_path / "model.safetensors"))
    assert is_assistant_folder(tmp_path) and not is_assistant_folder(tiny_vlm_path())
    t = assistant_costs(tmp_path)
    assert t.linear_bytes == 8 * 4 + 4 * 2  # only what is stored counts
    assert t.head_bytes == 0 + 16 * 32 + 16 * 8  # no centroids stored here; 16 rows of 32 bytes; indices


def test_a_target_config_is_not_an_assistant() -> None:
    with pytest.raises(EcoquantError, match="not a Gemma-4 assistant"):
        assistant_terms({"model_type": "gemma4", "text_config": {}})


def test_e4b_assistant_reads_the_e4b_targets_cache_widths() -> None:
    from ecoquant.fixtures.e4b_twin import e4b_twin_path

    a = assistant_costs(e4b_assistant_twin_path())
    target = checkpoint_costs(e4b_twin_path())
    last = {a_.window: a_.kv_width for a_ in target.attention}  # sliding (512) and full (None) cache widths
    assert [x.kv_width for x in a.attention] == [last[512], last[512], last[512], last[None]] == [512] * 3 + [1024]
    # 4,096 of 262,144 rows scored: the ~45x smaller head vLLM's recipe reports
    assert a.candidates == 4096
    assert 2 * 256 * 262_144 / a.head_flops == pytest.approx(43, abs=1)
    # 11.4 M Linear and centroid parameters in bf16 (see the fixture's cross-check with 78.5 M in all)
    assert a.linear_bytes + 2 * 256 * 2048 == 2 * 11_403_264


# ------------------------------------------------------------------ acceptance


def test_acceptance_beyond_k_or_below_zero_is_refused() -> None:
    t = assistant_terms(tiny_assistant_config())
    with pytest.raises(EcoquantError, match="within 0..2"):
        Speculation(t, 2, 2.5, measured=True)
    with pytest.raises(EcoquantError, match="at least 1"):
        Speculation(t, 0, 0.0, measured=True)
    assumed = speculation(t, 4)
    assert not assumed.measured and assumed.mean_accepted_per_step == ASSUMED_MEAN_ACCEPTED_PER_STEP
    assert "ASSUMED" in assumed.label() and "measured" in speculation(t, 4, 2.0).label()


@given(n=st.integers(0, 400), k=st.integers(1, 8))
def test_full_acceptance_takes_ceil_of_the_rest_over_k_plus_one_steps(n: int, k: int) -> None:
    spec = Speculation(assistant_terms(tiny_assistant_config()), k, float(k), measured=True)
    assert spec.target_steps(n) == (math.ceil((n - 1) / (k + 1)) if n > 1 else 0)


# ------------------------------------------------------------------ the roofline

DRAFT = AssistantTerms(
    model_type="gemma4_assistant",
    linears=MappingProxyType({"pre_projection": (1000, 5000)}),  # 1e7 FLOPs per drafted token
    linear_bytes=10_000_000.0,
    head_flops=1e6,
    head_bytes=1_000_000.0,
    input_bytes=100.0,
    attention=(AttentionLayer(width=20, window=None, kv_width=50),),
    candidates=10,
    vocab=100,
)


def test_speculative_two_request_suite_equals_the_hand_calculation() -> None:
    spec = Speculation(DRAFT, 2, 1.5, measured=True, name="toy-assistant")
    suite = [RequestTokens(10, 0, 0, 6), RequestTokens(4, 0, 0, 2)]
    e = modelled_energy(suite, TOY, GPU, overhead_s=0.01, speculative=spec)
    w = 1_100_001_000
    # request 1: 5 decode tokens at 2.5 tokens per step: ceil(5 / 2.5) = 2 target steps, at contexts
    # 10 + 1 and 10 + 1 + 2.5. Each reads the weights and the KV (2 x 50 values x 2 bytes per context token):
    # memory-bound (the 3 positions' compute, 3 x (1.1e9 + 4 x 100 x ctx) / 1e12 = 3.3 ms, is below 11 ms).
    a_ctx = (11.0, 13.5)
    a_decode = sum((w + 200 * ctx) / 1e11 for ctx in a_ctx)
    assert 3 * (1.1e9 + 400 * 13.5) / 1e12 < (w + 200 * 13.5) / 1e11
    # each step is preceded by 2 drafted tokens: assistant weights + its input row + its KV reads, memory-bound
    a_draft = sum(2 * (11_000_000 + 100 + 200 * ctx) / 1e11 for ctx in a_ctx)
    # request 2: 1 decode token: one step at context 5, its draft round at the same context
    b_decode = (w + 200 * 5) / 1e11
    b_draft = 2 * (11_000_000 + 100 + 200 * 5) / 1e11
    assert e.parts["decode"] == pytest.approx(100 * (a_decode + b_decode), rel=1e-12)
    assert e.parts["draft"] == pytest.approx(100 * (a_draft + b_draft), rel=1e-12)
    assert e.parts["prefill_text"] == pytest.approx(100 * 2 * w / 1e11, rel=1e-12)  # both prompts memory-bound
    assert e.parts["idle"] == pytest.approx(2 * 0.01 * 10)
    assert e.total_j == pytest.approx(math.fsum(e.parts.values()))
    record = e.to_record()
    assert record["speculative"] == {
        "assistant": "toy-assistant",
        "num_speculative_tokens": 2,
        "mean_accepted_per_step": 1.5,
        "tokens_per_step": 2.5,
        "acceptance": "measured",
    }
    assert ModelledEnergy.from_record(record) == e
    assert e.label() == "modelled for toy, MTP k=2, 2.50 tokens per target step (measured)"


def test_verification_turns_compute_bound_when_positions_outweigh_the_shared_weights() -> None:
    # at concurrency 100 the weight share is 11 MB per request (0.11 ms), while 5 positions x 1.1 GFLOP is 5.5 ms
    spec = Speculation(DRAFT, 4, 4.0, measured=True)
    e = modelled_energy([RequestTokens(10, 0, 0, 6)], TOY, GPU, concurrency=100, overhead_s=0, speculative=spec)
    assert e.parts["decode"] == pytest.approx(100 * 5 * (1.1e9 + 400 * 11) / 1e12, rel=1e-12)


requests_st = st.lists(
    st.builds(RequestTokens, st.integers(1, 300), st.just(0), st.just(0), st.integers(2, 80)), min_size=1, max_size=4
)


@settings(max_examples=40, deadline=None)
@given(requests=requests_st, k=st.integers(1, 6), concurrency=st.sampled_from([1, 2, 8]))
def test_zero_acceptance_costs_more_than_plain_decoding(
    requests: list[RequestTokens], k: int, concurrency: int
) -> None:
    plain = modelled_energy(requests, TOY, GPU, concurrency)
    none_accepted = modelled_energy(requests, TOY, GPU, concurrency, speculative=Speculation(DRAFT, k, 0.0, True))
    assert none_accepted.parts["decode"] >= plain.parts["decode"]  # the same steps, more positions each
    assert none_accepted.parts["draft"] > 0
    assert none_accepted.total_j > plain.total_j


@settings(max_examples=40, deadline=None)
@given(requests=requests_st, k=st.integers(1, 6), share=st.floats(0, 1), concurrency=st.sampled_from([1, 8]))
def test_parts_sum_to_the_total_with_an_assistant(
    requests: list[RequestTokens], k: int, share: float, concurrency: int
) -> None:
    e = modelled_energy(requests, TOY, GPU, concurrency, speculative=Speculation(DRAFT, k, share * k, False))
    assert set(e.parts) == set(PARTS)
    assert math.fsum(e.parts.values()) == pytest.approx(e.total_j, rel=1e-12)
    assert e.to_record()["speculative"]["acceptance"] == "assumed"
    plain = modelled_energy(requests, TOY, GPU, concurrency)
    assert plain.parts["draft"] == 0.0 and e.parts["prefill_text"] == plain.parts["prefill_text"]


def test_concurrency_shrinks_what_accepted_drafts_save() -> None:
    # the saved steps' weight reads are already shared by c requests; their KV reads and the drafts' are not
    spec = Speculation(DRAFT, 4, 2.0, measured=True)
    suite = [RequestTokens(500, 0, 0, 50)]
    l4 = gpu_spec("L4")  # 403 FLOP per byte: verification stays memory-bound at c = 8

    def saving(c: int, gpu: GpuSpec = l4) -> float:
        plain = modelled_energy(suite, TOY, gpu, c, overhead_s=0)
        return 1 - modelled_energy(suite, TOY, gpu, c, overhead_s=0, speculative=spec).total_j / plain.total_j

    assert saving(1) > saving(8) > 0
    # the toy GPU's 10 FLOP per byte: at c = 8, five positions of compute outweigh the shared weight reads
    # and speculation costs more than it saves
    assert saving(1, GPU) > 0 > saving(8, GPU)


def test_records_from_before_the_draft_part_still_load() -> None:
    before = ("prefill_text", "prefill_image", "vision_encoder", "decode", "idle")
    old = {"gpu": "L4", "total_j": 3.0, "parts": dict.fromkeys(before, 0.6)}
    e = ModelledEnergy.from_record(old)
    assert e.parts["draft"] == 0.0 and e.speculative is None and e.label() == "modelled for L4"


# ------------------------------------------------------------------ a run's record


def _samples() -> list[SampleResult]:
    return [
        SampleResult(
            task="t", id=str(i), prediction="x", score=1.0, tokens_in=40, tokens_out=9, finish_reason="stop",
            text_tokens=40, image_tokens=0, images=0,
        )
        for i in range(2)
    ]


def test_a_runs_measured_acceptance_goes_into_its_modelled_energy(tmp_path: Path) -> None:
    folder = tmp_path / "assistant"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(tiny_assistant_config()))
    source = str(tiny_vlm_path())
    measured = {"assistant": str(folder), "num_speculative_tokens": 3, "mean_accepted_per_step": 2.0,
                "acceptance_rate": 2 / 3, "target_steps": 6, "drafted_tokens": 18, "accepted_tokens": 12}
    plain = run_modelled_energy(source, _samples(), "L4")
    spec = run_modelled_energy(source, _samples(), "L4", speculative=measured)
    assert plain is not None and spec is not None
    assert spec["speculative"]["acceptance"] == "measured" and spec["speculative"]["tokens_per_step"] == 3.0
    assert spec["parts"]["draft"] > 0 and spec["parts"]["decode"] < plain["parts"]["decode"]  # 8 tokens, 3 steps
    assumed = run_modelled_energy(source, _samples(), "L4", speculative={**measured, "mean_accepted_per_step": None})
    assert assumed is not None and assumed["speculative"]["acceptance"] == "assumed"
    # an assistant whose folder is nowhere: no figure rather than one without the lever the run used
    gone = run_modelled_energy(source, _samples(), "L4", speculative={**measured, "assistant": str(tmp_path / "nope")})
    assert gone is None
    beyond_k = run_modelled_energy(source, _samples(), "L4", speculative={**measured, "mean_accepted_per_step": 3.5})
    assert beyond_k is None


def test_e4b_w4a16_int4_head_with_its_assistant_at_two_tokens_per_step() -> None:
    from ecoquant.fixtures.e4b_twin import e4b_twin_path

    terms = planned_costs(e4b_twin_path(), "gemma4-e-int4-head")
    a = assistant_costs(e4b_assistant_twin_path())
    # a drafted token reads ~1% of what a target step reads (24.9 MB against 2.31 GiB)
    assert 0.005 < (a.weight_bytes + a.input_bytes) / terms.decode.total < 0.015
    l4 = gpu_spec("L4")
    suite = [RequestTokens(300, 0, 0, 50)]
    plain = modelled_energy(suite, terms, l4)
    spec = modelled_energy(suite, terms, l4, speculative=Speculation(a, 4, 1.0, False))
    # 49 steps become 25 (ceil(49 / 2)), each with 4 drafts of ~1% of a step: decode about halves
    assert spec.parts["decode"] / plain.parts["decode"] == pytest.approx(25 / 49, rel=0.02)
    assert spec.parts["draft"] / plain.parts["decode"] == pytest.approx(25 * 4 * 0.011 / 49, rel=0.25)


# ------------------------------------------------------------------ inspect


def test_inspect_prints_an_assistants_cost_terms_alone_and_beside_its_target() -> None:
    from typer.testing import CliRunner

    from ecoquant.cli import app
    from ecoquant.fixtures.e4b_twin import e4b_twin_path

    runner = CliRunner()
    folder = runner.invoke(app, ["fixtures", "e4b-assistant-twin"])
    assert folder.exit_code == 0, folder.output
    assistant = folder.stdout.strip().splitlines()[-1]
    alone = runner.invoke(app, ["inspect", assistant, "--json"])
    assert alone.exit_code == 0, alone.output
    record = json.loads(alone.stdout)["assistant"]
    assert record["head_candidates"] == 4096 and record["vocab"] == 262_144
    assert record == {"path": assistant, **assistant_costs(assistant).to_record()}
    text = runner.invoke(app, ["inspect", assistant]).stdout
    assert "4,096 of 262,144 vocabulary rows scored, centroid-masked" in text and "target's KV cache" in text
    twin = str(e4b_twin_path())
    both = runner.invoke(app, ["inspect", twin, "--preset", "gemma4-e-int4-head", "--assistant", assistant])
    assert both.exit_code == 0, both.output
    assert "a drafted token reads 1.01% of the weight bytes of one target decode step" in both.stdout
    wrong = runner.invoke(app, ["inspect", twin, "--assistant", twin])
    assert wrong.exit_code == 2 and "is not a Gemma-4 assistant" in wrong.output


def test_the_report_line_states_the_lever_and_whether_its_acceptance_was_measured() -> None:
    from ecoquant.report.table import ReportRow, modelled_lines

    spec = Speculation(DRAFT, 4, 1.0, measured=False, name="a")
    suite = [RequestTokens(10, 0, 0, 9)]
    with_mtp = modelled_energy(suite, TOY, GPU, speculative=spec).to_record()
    plain = modelled_energy(suite, TOY, GPU).to_record()

    def row(name: str, record: dict[str, Any]) -> ReportRow:
        return ReportRow(name, "variant", "default", None, None, None, {}, {}, None, "pass", 1, 1, 1, 0.0,
                         record["total_j"], record)

    (line,) = modelled_lines([row("plain", plain), row("mtp", with_mtp)])
    assert "MTP k=4, 2.00 tokens per target step (ASSUMED)" in line and "draft" in line
    assert "plain" in line.split("mtp")[0] and "draft" not in line.split("mtp")[0]  # no assistant: no draft share
