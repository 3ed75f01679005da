"""The modelled energy: GPU table, cost terms from configs, and the roofline against hand calculations."""

from __future__ import annotations

import math
from types import MappingProxyType

import pytest
from torch import nn

from ecoquant.energy.costs import CostTerms, checkpoint_costs, linear_precisions, planned_costs
from ecoquant.energy.gpus import GPUS, gpu_spec
from ecoquant.energy.roofline import PARTS, ModelledEnergy, RequestTokens, modelled_energy
from ecoquant.errors import EcoquantError
from ecoquant.export.footprint import TokenBytes
from ecoquant.fixtures.tiny_vlm import tiny_vlm_path
from energy_toys import GPU, TOY

# ------------------------------------------------------------------ GPU table


def test_gpu_table_has_the_issue_gpus_each_value_sourced() -> None:
    assert set(GPUS) == {"L4", "A10G", "L40S", "A100", "H100", "H200"}
    for spec in GPUS.values():
        assert all(len(src) > 10 for src in spec.sources().values()), spec.name
        assert "ASSUMPTION" in spec.idle_power_w.source  # no datasheet states idle power
        assert spec.idle_w < spec.busy_w
    l4 = gpu_spec("l4")
    assert l4.tensor_flops("bf16") == pytest.approx(121e12)
    assert l4.tensor_flops("fp8") == pytest.approx(2 * l4.tensor_flops("bf16"), rel=0.01)  # 242.5 vs 121
    assert l4.bandwidth == pytest.approx(300e9) and l4.busy_w == 72.0


def test_a100_has_no_fp8_and_falls_back_to_bf16() -> None:
    a100 = gpu_spec("A100")
    assert a100.fp8_flops.value is None
    assert a100.tensor_flops("fp8") == a100.tensor_flops("bf16")
    assert a100.tensor_flops("int8") == pytest.approx(2 * a100.tensor_flops("bf16"))


def test_unknown_gpu_is_one_line_naming_the_known_ones() -> None:
    with pytest.raises(EcoquantError, match=r"unknown GPU 'B200'.*L4, A10G") as info:
        gpu_spec("B200")
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------ cost terms, tiny fixture


@pytest.fixture(scope="module")
def tiny_terms() -> CostTerms:
    return checkpoint_costs(tiny_vlm_path())


def test_tiny_decoder_and_head_flops_equal_hand_computed(tiny_terms: CostTerms) -> None:
    # tiny_vlm: 6 layers, hidden 256, MLP 512, 4 query heads, 1 KV head, head_dim 64 (sliding) / 128 (full,
    # layers 2 and 5), layers 3..5 share K/V (no k_proj/v_proj), PLE width 128, vocab 1024, tied head.
    h, inter, ple, layers = 256, 512, 128, 6
    q = 4 * 64 * 256 * 4 + 4 * 128 * 256 * 2  # q_proj (sliding x4, full x2); o_proj the same, transposed
    kv = 64 * 256 * 2 + 128 * 256  # k_proj of layers 0, 1 (sliding) and 2 (full); v_proj the same
    mlp = 3 * h * inter * layers
    decoder = 2 * (2 * q + 2 * kv + mlp)
    ple_flops = 2 * (2 * h * ple * layers + h * ple * layers)  # gate + projection per layer, model projection
    assert tiny_terms.linear_flops["decoder"]["bf16"] == decoder
    assert tiny_terms.linear_flops["ple"]["bf16"] == ple_flops
    assert tiny_terms.head_flops["bf16"] == 2 * 1024 * 256
    widths = [a.width for a in tiny_terms.attention]
    assert widths == [256, 256, 512, 256, 256, 512]
    # KV-shared layers read the cache of the last layer of their kind
    assert [a.kv_width for a in tiny_terms.attention] == [64, 64, 128, 64, 64, 128]
    assert [a.window for a in tiny_terms.attention] == [128, 128, None, 128, 128, None]


def test_tiny_vision_flops_per_image_equal_hand_computed(tiny_terms: CostTerms) -> None:
    # vision: patch 8 (192 inputs) -> 128, 2 layers (q,k,v,o 128x128; MLP 128x256 x3), 2 heads x 64,
    # pooling 2 (4 patches per soft token), projection 128 -> 256 per soft token.
    vision = tiny_terms.vision
    assert vision is not None
    per_patch = 2 * (192 * 128 + 2 * (4 * 128 * 128 + 3 * 128 * 256))
    assert vision.per_patch["bf16"] == per_patch
    assert vision.per_soft_token["bf16"] == 2 * 128 * 256
    for budget in (70, 280):
        n = 4 * budget
        assert vision.total_flops(budget) == per_patch * n + 2 * 128 * 256 * budget + 2 * 4 * 128 * n * n


def test_tiny_decode_bytes_by_part(tiny_terms: CostTerms) -> None:
    d = tiny_terms.decode
    assert d.head == 1024 * 256 * 2  # the tied bf16 head, read in full
    assert d.embedding_rows == (256 + 6 * 128) * 2  # one row of embed_tokens and of the PLE table
    linear_bytes = tiny_terms.decoder_flops_per_token  # 2 FLOPs per weight = 2 bytes per bf16 weight
    assert linear_bytes <= d.decoder < 1.01 * linear_bytes  # plus norms and scalars


def test_precisions_follow_the_compressed_tensors_groups() -> None:
    from ecoquant.fixtures.tiny_gemma4 import build_tiny_model

    model = build_tiny_model().to("meta")
    groups = {
        "fp8": {"weights": {"num_bits": 8, "type": "float"}, "input_activations": {"num_bits": 8, "type": "float"}},
        "int8": {"weights": {"num_bits": 8, "type": "int"}, "input_activations": {"num_bits": 8, "type": "int"}},
        "bf16": {"weights": {"num_bits": 4, "type": "int"}, "input_activations": None},
    }
    for expected, group in groups.items():
        qc = {"config_groups": {"group_0": {"targets": ["Linear"], **group}}, "ignore": ["lm_head"]}
        p = linear_precisions(model, qc)
        assert p["model.language_model.layers.0.mlp.down_proj"] == expected
        assert p["lm_head"] == "bf16"  # ignored
    head = {"weights": {"num_bits": 8, "type": "int"}, "input_activations": {"num_bits": 8, "type": "int"}}
    qc = {"config_groups": {"group_0": {"targets": ["Linear"], **groups["fp8"]}, "lm_head": {"targets": ["lm_head"], **head}}, "ignore": []}
    assert linear_precisions(model, qc)["lm_head"] == "int8"  # a group naming the module wins


# ------------------------------------------------------------------ the E4B twin


def test_e4b_twin_decoder_flops_are_twice_its_decoder_linear_parameters() -> None:
    from ecoquant.fixtures.e4b_twin import build_e4b_twin, e4b_twin_path

    terms = checkpoint_costs(e4b_twin_path())
    twin = build_e4b_twin()
    params = sum(
        m.in_features * m.out_features
        for n, m in twin.named_modules()
        if isinstance(m, nn.Linear) and n.startswith("model.language_model.")
    )
    assert terms.decoder_flops_per_token == pytest.approx(2 * params, rel=0.01)
    assert terms.head_flops["bf16"] == 2 * 262_144 * 2560  # the tied head is a Linear for FLOPs
    assert sum(1 for a in terms.attention) == 42
    assert terms.vision is not None and terms.vision.pooling == 3 and terms.vision.default_budget == 280
    assert terms.decode.head == 262_144 * 2560 * 2


# ------------------------------------------------------------------ roofline

def test_two_request_suite_equals_the_hand_calculation() -> None:
    suite = [RequestTokens(10, 0, 0, 3), RequestTokens(4, 16, 1, 1)]
    e = modelled_energy(suite, TOY, GPU, overhead_s=0.01)
    weights_s = 1_100_001_000 / 1e11  # every weight read once, at 100 GB/s
    # request 1: 10 text tokens. Compute 1e9 x 10 + one head row 1e8 + attention 4 x 100 x (1+..+10),
    # at 1 TFLOP/s = 0.0101 s < the weight read: memory-bound.
    a_prefill = max((1e10 + 1e8 + 4 * 100 * 55) / 1e12, weights_s)
    assert a_prefill == weights_s
    # two decode steps (the first token came from prefill), at contexts 11 and 12: weights + K and V
    # (2 x 50 values x 2 bytes per context token)
    a_decode = sum((1_100_001_000 + 2 * 50 * 2 * ctx) / 1e11 for ctx in (11, 12))
    # request 2: 4 text + 16 image tokens: compute-bound, split 4:16 between text and image
    b_prefill = (2e10 + 1e8 + 4 * 100 * 210) / 1e12
    # one image of 16 soft tokens = 64 patches: Linears per patch, projection per soft token, attention
    b_vision = (1e6 * 64 + 1e5 * 16 + 4 * 10 * 64 * 64) / 1e12
    assert e.parts["prefill_text"] == pytest.approx(100 * (a_prefill + 0.2 * b_prefill), rel=1e-12)
    assert e.parts["prefill_image"] == pytest.approx(100 * 0.8 * b_prefill, rel=1e-12)
    assert e.parts["vision_encoder"] == pytest.approx(100 * b_vision, rel=1e-12)
    assert e.parts["decode"] == pytest.approx(100 * a_decode, rel=1e-12)
    assert e.parts["idle"] == pytest.approx(2 * 0.01 * 10)
    assert e.total_j == pytest.approx(math.fsum(e.parts.values()))
    assert e.to_record() == {"gpu": "toy", "total_j": e.total_j, "parts": dict(e.parts)}
    assert ModelledEnergy.from_record(e.to_record()) == e


def test_concurrency_shares_weight_reads_not_kv() -> None:
    one = modelled_energy([RequestTokens(10, 0, 0, 3)], TOY, GPU, concurrency=1, overhead_s=0)
    four = modelled_energy([RequestTokens(10, 0, 0, 3)], TOY, GPU, concurrency=4, overhead_s=0)
    assert four.parts["decode"] < one.parts["decode"] / 3


def test_parts_must_sum_to_the_total() -> None:
    parts = dict.fromkeys(PARTS, 1.0)
    with pytest.raises(ValueError, match="sum"):
        ModelledEnergy("L4", 4.0, parts)
    with pytest.raises(ValueError, match="parts"):
        ModelledEnergy("L4", 1.0, {"decode": 1.0})


def test_larger_image_budget_raises_the_image_parts(tiny_terms: CostTerms) -> None:
    l4 = gpu_spec("L4")
    small = modelled_energy([RequestTokens(30, 70, 1, 5)], tiny_terms, l4)
    large = modelled_energy([RequestTokens(30, 280, 1, 5)], tiny_terms, l4)
    assert large.parts["vision_encoder"] > small.parts["vision_encoder"]
    assert large.parts["prefill_image"] > small.parts["prefill_image"]
    assert large.parts["idle"] == small.parts["idle"]


def test_int4_head_lowers_decode_joules_per_output_token() -> None:
    l4 = gpu_spec("L4")
    suite = [RequestTokens(40, 0, 0, 50)]
    w4a16 = modelled_energy(suite, planned_costs(tiny_vlm_path(), "gemma4-e"), l4)
    int4_head = modelled_energy(suite, planned_costs(tiny_vlm_path(), "gemma4-e-int4-head"), l4)
    bf16 = modelled_energy(suite, checkpoint_costs(tiny_vlm_path()), l4)
    assert int4_head.parts["decode"] / 50 < w4a16.parts["decode"] / 50 < bf16.parts["decode"] / 50
    # weight-only schemes compute in bf16: prefill compute is unchanged where it is compute-bound
    assert w4a16.parts["vision_encoder"] == pytest.approx(bf16.parts["vision_encoder"])


def test_fp8_prefill_compute_is_half_the_bf16_one_on_an_l4(tiny_terms: CostTerms) -> None:
    l4 = gpu_spec("L4")
    no_memory = TokenBytes(0, 0, 0, 1)  # no weight bytes: compute alone decides
    total = MappingProxyType({c: sum(v.values()) for c, v in tiny_terms.linear_flops.items()})
    bf16 = CostTerms("gemma4", MappingProxyType({c: {"bf16": f} for c, f in total.items()}), {}, (), None, no_memory)
    fp8 = CostTerms("gemma4", MappingProxyType({c: {"fp8": f} for c, f in total.items()}), {}, (), None, no_memory)
    r = [RequestTokens(1000, 0, 0, 1)]
    assert modelled_energy(r, fp8, l4, overhead_s=0).total_j == pytest.approx(
        modelled_energy(r, bf16, l4, overhead_s=0).total_j / 2, rel=0.01  # datasheet: 242.5 vs 121 TFLOPS
    )


def test_images_on_a_text_model_are_one_clear_error() -> None:
    text_only = CostTerms("gemma3_text", TOY.linear_flops, TOY.head_flops, TOY.attention, None, TOY.decode)
    with pytest.raises(EcoquantError, match="no vision encoder"):
        modelled_energy([RequestTokens(1, 4, 1, 1)], text_only, GPU)
