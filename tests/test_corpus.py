"""The shipped corpus: disjoint calibration/evaluation parts, pinned by hash, big enough for their jobs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from ecoquant.data.corpus import CALIBRATION, EVALUATION, load_corpus, part_sha256, split_chapters
from ecoquant.errors import EcoquantError

BOOK = """TITLE OF THE BOOK

By Someone



Chapter 1


It was a dark and
stormy night.

"Was it?" she
asked.

CHAPTER II

Short second chapter.



Finis
"""


def test_split_chapters_drops_front_matter_headings_and_joins_wrapped_lines() -> None:
    assert split_chapters(BOOK) == ['It was a dark and stormy night.\n\n"Was it?" she asked.', "Short second chapter."]


def test_parts_are_the_pinned_chapters() -> None:
    corpus = load_corpus()
    assert len(corpus.calibration) == 61  # all of Pride and Prejudice
    assert len(corpus.evaluation) == 8  # Persuasion, chapters 1-8
    assert corpus.calibration[0].startswith("It is a truth universally acknowledged")
    assert corpus.evaluation[0].startswith("Sir Walter Elliot, of Kellynch Hall")
    assert corpus.sha256 == {"calibration": CALIBRATION.sha256, "evaluation": EVALUATION.sha256}
    assert corpus.sha256["evaluation"] == part_sha256(corpus.evaluation)
    assert "Pride and Prejudice" in corpus.source and "Persuasion" in corpus.source


def test_calibration_and_evaluation_never_overlap() -> None:
    corpus = load_corpus()
    calibration = corpus.calibration_text
    evaluation_paragraphs = [p for ch in corpus.evaluation for p in ch.split("\n\n")]
    # No evaluation sentence of any length appears in the calibration text.
    long_ones = [p for p in evaluation_paragraphs if len(p) >= 40]
    assert len(long_ones) > 200
    assert not [p for p in long_ones if p in calibration]


def test_a_modified_text_is_refused() -> None:
    wrong = dataclasses.replace(EVALUATION, sha256="0" * 64)
    with pytest.raises(EcoquantError, match="was modified"):
        load_corpus(evaluation=wrong)


def test_sizes_fit_calibration_and_evaluation(gemma3_270m: Path) -> None:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(gemma3_270m / "tokenizer.json"))
    corpus = load_corpus()
    calibration_tokens = sum(len(e.ids) for e in tok.encode_batch(corpus.calibration))
    evaluation_tokens = len(tok.encode(corpus.evaluation_text).ids)
    assert calibration_tokens >= 128 * 512 * 2  # 128 samples of 512 tokens, twice over
    assert 20_000 <= evaluation_tokens <= 50_000
