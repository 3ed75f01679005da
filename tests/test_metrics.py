"""Metrics against worked examples, and ANLS against a from-scratch reading of lmms-eval's definition."""

from __future__ import annotations

import random

import pytest

from ecoquant.eval.metrics import (
    METRICS,
    anls,
    exact_match,
    extract_choice_letter,
    mc_accuracy,
    normalize_vqa,
    relaxed_accuracy,
    vqa_accuracy,
)

# ------------------------------------------------------------------------ ANLS


@pytest.mark.parametrize(
    ("prediction", "gold", "expected"),
    [
        # identical
        ("1/8/93", ["1/8/93"], 1.0),
        # case and whitespace are normalized away before the distance
        ("  HELLO   world ", ["Hello World"], 1.0),
        # d("coca-cola company", "the coca-cola company") = 4 over L = 21 -> 17/21
        ("Coca-Cola Company", ["The Coca-Cola Company"], 17 / 21),
        # one substitution in 10 characters
        ("0.28 mg/ml", ["0.29 mg/ml"], 0.9),
        # similarity exactly 0.5 is kept (lmms-eval zeroes only below the threshold)
        ("abxy", ["abcd"], 0.5),
        # similarity 0.4 < 0.5 -> 0
        ("abxyz", ["abcde"], 0.0),
        # nothing in common
        ("xyz", ["abc"], 0.0),
        # the best gold answer counts
        ("bar", ["foo", "bar"], 1.0),
        ("fob", ["xyzw", "foo"], 1 - 1 / 3),
        # lmms-eval divides by the longer RAW length (before whitespace collapsing):
        # d("ac", "ab") = 1, L = len("ac    ") = 6 -> 5/6, where normalized lengths would give 0.5
        ("ac    ", ["ab"], 1 - 1 / 6),
        # both empty: distance 0 -> 1.0
        ("", [""], 1.0),
        # empty prediction against a real answer: d = L -> 0
        ("", ["invoice"], 0.0),
    ],
)
def test_anls_worked_examples(prediction: str, gold: list[str], expected: float) -> None:
    assert anls(prediction, gold) == pytest.approx(expected, abs=1e-12)


def _levenshtein_dp(a: str, b: str) -> int:
    """Textbook Wagner-Fischer, independent of rapidfuzz."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def _anls_reference(prediction: str, golds: list[str]) -> float:
    """lmms-eval's ``anls`` as documented: 1 - min over golds of d(norm g, norm p) / max(raw lengths), zero below 0.5."""

    def norm(s: str) -> str:
        return " ".join(s.strip().lower().split())

    ratios = []
    for g in golds:
        length = max(len(g.upper()), len(prediction.upper()))
        ratios.append(0.0 if length == 0 else _levenshtein_dp(norm(g), norm(prediction)) / length)
    result = 1 - min(ratios)
    return 0.0 if result < 0.5 else result


def test_anls_matches_reference_definition_on_random_strings() -> None:
    rng = random.Random(0)
    alphabet = "abcAB 1.-"
    nonzero = 0
    for _ in range(600):
        pred = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 9)))
        golds = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 9))) for _ in range(rng.randint(1, 3))]
        # mutate one gold slightly so that many cases land above the threshold
        if rng.random() < 0.6 and golds[0]:
            i = rng.randrange(len(golds[0]))
            pred = golds[0][:i] + rng.choice(alphabet) + golds[0][i + 1 :]
        got, want = anls(pred, golds), _anls_reference(pred, golds)
        assert got == pytest.approx(want, abs=1e-12), (pred, golds)
        nonzero += got > 0
    assert nonzero > 200  # the comparison exercised the above-threshold branch, not just zeros


# ------------------------------------------------------------------ exact match


@pytest.mark.parametrize(
    ("prediction", "gold", "expected"),
    [
        ("Paris.", ["paris"], 1.0),
        ("  new   YORK ", ["New York"], 1.0),
        ("in Paris", ["Paris"], 0.0),
        ("INV-2959", ["inv 2959"], 1.0),  # punctuation becomes space on both sides
        ("b", ["a", "B"], 1.0),
    ],
)
def test_exact_match(prediction: str, gold: list[str], expected: float) -> None:
    assert exact_match(prediction, gold) == expected


# ----------------------------------------------------------------- VQA accuracy


@pytest.mark.parametrize(
    ("text", "normalized"),
    [
        ("Two dogs.", "2 dogs"),
        ("The Coca-Cola", "coca cola"),
        ("1,000", "1000"),
        ("3.5 m.", "3.5 m"),
        ("Yes!", "yes"),
        ("dont", "don't"),
        ("an apple", "apple"),
        ("ten", "10"),
    ],
)
def test_vqa_normalization(text: str, normalized: str) -> None:
    assert normalize_vqa(text) == normalized


@pytest.mark.parametrize(
    ("matching", "expected"),
    [
        # ten annotators, ``matching`` of them said the predicted answer; official leave-one-out average:
        (0, 0.0),
        (1, 0.3),  # 9 subsets see 1 match (1/3), 1 sees 0: 9 * (1/3) / 10
        (2, 0.6),  # 2 * (1/3) + 8 * (2/3) = 6, / 10
        (3, 0.9),  # 3 * (2/3) + 7 * 1 = 9, / 10
        (4, 1.0),
        (10, 1.0),
    ],
)
def test_vqa_accuracy_ten_annotators(matching: int, expected: float) -> None:
    golds = ["two"] * matching + ["three"] * (10 - matching)
    assert vqa_accuracy("2", golds) == pytest.approx(expected)


def test_vqa_accuracy_short_gold_lists() -> None:
    assert vqa_accuracy("The dog", ["dog"]) == 1.0
    assert vqa_accuracy("cat", ["dog"]) == 0.0
    assert vqa_accuracy("red", ["red", "blue"]) == 0.5
    assert vqa_accuracy("red", ["red", "red", "blue"]) == pytest.approx(2 / 3)
    assert vqa_accuracy("five", ["5", "5", "5"]) == 1.0


# ------------------------------------------------------------- relaxed accuracy


@pytest.mark.parametrize(
    ("prediction", "gold", "expected"),
    [
        ("104", ["100"], 1.0),
        ("105", ["100"], 1.0),  # exactly 5% is inside
        ("105.1", ["100"], 0.0),
        ("95", ["100"], 1.0),
        ("94.9", ["100"], 0.0),
        ("1,020", ["1000"], 1.0),  # thousands separator
        ("$1,234.50", ["1234.5"], 1.0),
        ("12%", ["12"], 1.0),  # percent sign as a unit
        ("12", ["12%"], 1.0),
        ("0.12", ["12%"], 1.0),  # lmms-eval's reading: 12% = 0.12
        ("13", ["12%"], 0.0),
        ("0", ["0"], 1.0),
        ("0.01", ["0"], 0.0),  # no relative tolerance around zero
        ("Blue.", ["blue"], 1.0),
        ("bluish", ["blue"], 0.0),
        ("1,5", ["1.5"], 0.0),  # not a number we read, so compared as text
        ("twelve", ["12"], 0.0),
        ("31", ["South", "30"], 1.0),  # max over gold answers
    ],
)
def test_relaxed_accuracy(prediction: str, gold: list[str], expected: float) -> None:
    assert relaxed_accuracy(prediction, gold) == expected


# -------------------------------------------------------------- multiple choice


@pytest.mark.parametrize(
    ("output", "letter"),
    [
        ("B", "B"),
        ("(B)", "B"),
        ("B.", "B"),
        ("B. cat", "B"),
        ("B) cat", "B"),
        ("**B**", "B"),
        ("The answer is B", "B"),
        ("The answer is B.", "B"),
        ("Answer: (C)", "C"),
        ("The correct answer is option D.", "D"),
        ("I think (A) fits best", "A"),
        ("a cat", None),  # the article is not option A
        ("The answer is a cat", None),
        ("", None),
    ],
)
def test_extract_choice_letter(output: str, letter: str | None) -> None:
    assert extract_choice_letter(output) == letter


def test_mc_accuracy() -> None:
    assert mc_accuracy("B. cat", ["B"]) == 1.0
    assert mc_accuracy("The answer is C", ["B"]) == 0.0
    assert mc_accuracy("cat", ["B"]) == 0.0


# ----------------------------------------------------------------- all metrics


@pytest.mark.parametrize("name", sorted(METRICS))
def test_metrics_reject_bad_gold(name: str) -> None:
    metric = METRICS[name]
    with pytest.raises(ValueError, match="at least one gold answer"):
        metric("x", [])
    with pytest.raises(TypeError, match="not a single str"):
        metric("x", "x")


@pytest.mark.parametrize("name", sorted(METRICS))
def test_metrics_range_and_identity(name: str) -> None:
    metric = METRICS[name]
    gold = ["C"] if name == "mc_accuracy" else ["42 apples"]
    assert metric(gold[0], gold) == 1.0
    assert 0.0 <= metric("something else entirely", gold) <= 1.0
