"""The vLLM feature table: versions compare numerically, and what a version lacks is named."""

import pytest

from ecoquant.errors import EcoquantError
from ecoquant.serve.vllm_features import FEATURES, TESTED_VLLM, min_version_for, missing_features, version_tuple


def test_version_tuple_compares_numerically() -> None:
    assert version_tuple("0.32.0+cpu") == (0, 32, 0)
    assert version_tuple("0.10.1.1") == (0, 10, 1, 1)
    assert version_tuple("0.9.2") < version_tuple("0.21.0") < version_tuple("0.32.0")


def test_mtp_is_missing_before_its_first_release_only() -> None:
    assert [f.name for f in missing_features("0.20.1", ["gemma4_mtp"])] == ["gemma4_mtp"]
    assert missing_features("0.21.0", ["gemma4_mtp"]) == ()


def test_every_feature_is_in_the_tested_version_and_has_a_source() -> None:
    assert missing_features(TESTED_VLLM, FEATURES) == ()
    assert all(f.source and f.what for f in FEATURES.values())


def test_min_version_is_the_newest_row_needed() -> None:
    assert min_version_for([]) is None
    assert min_version_for(["gemma4_mtp"]) == "0.21.0"
    assert min_version_for(["gemma4_mtp", "wna16"]) == "0.32.0"


def test_unknown_feature_is_one_line() -> None:
    with pytest.raises(EcoquantError, match="unknown vLLM feature"):
        missing_features("0.32.0", ["teleport"])
