"""A toy GPU and a toy checkpoint whose roofline is easy to work out by hand (shared by the energy tests)."""

from __future__ import annotations

from types import MappingProxyType

from ecoquant.energy.costs import AttentionLayer, CostTerms, VisionCosts
from ecoquant.energy.gpus import Figure, GpuSpec
from ecoquant.export.footprint import TokenBytes

#: 1 TFLOP/s bf16, 2 fp8, no int8 path, 100 GB/s, 100 W busy, 10 W idle.
GPU = GpuSpec(
    name="toy",
    bf16_flops=Figure(1e12, "test"),
    fp8_flops=Figure(2e12, "test"),
    int8_flops=Figure(None, "test"),
    memory_bandwidth=Figure(1e11, "test"),
    board_power_w=Figure(100.0, "test"),
    idle_power_w=Figure(10.0, "test"),
)

#: 1 GFLOP of Linears and 0.1 GFLOP of head per token, one full-attention layer, 1.1 GB read per decode step.
TOY = CostTerms(
    model_type="toy",
    linear_flops=MappingProxyType({"decoder": {"bf16": 1e9}}),
    head_flops=MappingProxyType({"bf16": 1e8}),
    attention=(AttentionLayer(width=100, window=None, kv_width=50),),
    vision=VisionCosts({"bf16": 1e6}, {"bf16": 1e5}, (10,), pooling=2, budgets=(16,), default_budget=16),
    decode=TokenBytes(decoder=1_000_000_000, head=100_000_000, embedding_rows=1000, bf16_total=1_100_001_000),
)
