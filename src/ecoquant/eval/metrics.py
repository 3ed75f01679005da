"""Per-sample answer metrics: ``metric(prediction, gold_answers) -> score in [0, 1]``.

Every metric has the same shape so a task only needs the metric's *name*
(:data:`METRICS`), a results file can record which one was used, and the
transformers and OpenAI-compatible backends score identically for identical
outputs. A task's score is the mean of its per-sample scores
(:func:`ecoquant.eval.tasks.score`).

The five metrics follow the benchmarks they come from, because the point of
this project is a recovery ratio (variant score / base score) that reads like
published numbers:

* :func:`anls` -- DocVQA / InfographicVQA, exactly as lmms-eval computes it.
* :func:`exact_match` -- case- and punctuation-insensitive string equality.
* :func:`vqa_accuracy` -- VQAv2 / TextVQA annotator-consensus accuracy.
* :func:`relaxed_accuracy` -- ChartQA: 5% tolerance for numbers, exact otherwise.
* :func:`mc_accuracy` -- AI2D-style multiple choice, scored on the option letter.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType

from rapidfuzz.distance import Levenshtein

Metric = Callable[[str, Sequence[str]], float]
"""``metric(prediction, gold_answers) -> float in [0, 1]``."""


def _require_gold(gold_answers: Sequence[str]) -> None:
    # A bare ``str`` is a Sequence[str] too; scoring it would compare the
    # prediction with single characters, a silent and very wrong result.
    if isinstance(gold_answers, str):
        raise TypeError("gold_answers must be a sequence of strings, not a single str")
    if len(gold_answers) == 0:
        raise ValueError("a metric needs at least one gold answer")


# --------------------------------------------------------------------------- ANLS

ANLS_THRESHOLD = 0.5
"""Similarities below this score 0: past it, the answer is taken to be a wrong
field read correctly rather than the right field read with OCR slips."""


def _collapse(text: str) -> str:
    return " ".join(text.strip().lower().split())


def anls(prediction: str, gold_answers: Sequence[str]) -> float:
    """Average Normalized Levenshtein Similarity for one question, as lmms-eval defines it.

    For each gold answer ``g``: both strings are lower-cased and their
    whitespace collapsed, ``d`` is the Levenshtein distance between the
    *normalized* strings, and the similarity is ``1 - d / L`` where ``L`` is the
    length of the longer *raw* string (lmms-eval measures ``len(s.upper())`` of
    the strings as given, before normalization; we keep that quirk so our
    numbers match theirs). The question scores the best similarity over the
    gold answers, or 0 if that is below 0.5 (exactly 0.5 is kept).

    Worked examples::

        anls("Coca-Cola Company", ["The Coca-Cola Company"])  # d=4, L=21 -> 0.8095
        anls("abxy", ["abcd"])                                 # d=2, L=4  -> 0.5
        anls("xyz", ["abc"])                                   # 1 - 3/3 = 0 -> 0
        anls("ac  ", ["ab"])   # d=1 on "ac"/"ab", but L=len("ac  ")=4 -> 0.75
    """
    _require_gold(gold_answers)
    pred_norm = _collapse(prediction)
    pred_len = len(prediction.upper())
    best = 0.0
    for gold in gold_answers:
        length = max(len(gold.upper()), pred_len)
        if length == 0:
            similarity = 1.0  # both empty: lmms-eval scores distance 0 here
        else:
            similarity = 1.0 - Levenshtein.distance(_collapse(gold), pred_norm) / length
        best = max(best, similarity)
    return best if best >= ANLS_THRESHOLD else 0.0


# -------------------------------------------------------------------- exact match

_PUNCT_TABLE = str.maketrans({c: " " for c in string.punctuation})


def normalize_exact(text: str) -> str:
    """Lower-case, punctuation to spaces, whitespace collapsed (lmms-eval's
    ``exact_match`` with ``ignore_case`` and ``ignore_punctuation``)."""
    return " ".join(text.lower().translate(_PUNCT_TABLE).split())


def exact_match(prediction: str, gold_answers: Sequence[str]) -> float:
    """1.0 if the normalized prediction equals any normalized gold answer, else 0.0.

    ``"Paris."`` matches ``"paris"``; ``"in Paris"`` does not.
    """
    _require_gold(gold_answers)
    pred = normalize_exact(prediction)
    return 1.0 if any(pred == normalize_exact(g) for g in gold_answers) else 0.0


# ------------------------------------------------------------------- VQA accuracy

# The answer normalization of the VQA evaluation server (EvalAI), re-derived
# and simplified: both prediction and annotator answers go through it, so the
# goal is only that trivially different spellings of one answer compare equal.
_NUMBER_WORDS: Mapping[str, str] = MappingProxyType(
    {
        "none": "0",
        "zero": "0",
        "one": "1",
        "two": "2",
        "three": "3",
        "four": "4",
        "five": "5",
        "six": "6",
        "seven": "7",
        "eight": "8",
        "nine": "9",
        "ten": "10",
    }
)
_ARTICLES = frozenset({"a", "an", "the"})
# Apostrophe-less spellings annotators and models both produce; mapped to one form.
_CONTRACTIONS: Mapping[str, str] = MappingProxyType(
    {
        "arent": "aren't",
        "cant": "can't",
        "couldnt": "couldn't",
        "didnt": "didn't",
        "doesnt": "doesn't",
        "dont": "don't",
        "hasnt": "hasn't",
        "havent": "haven't",
        "isnt": "isn't",
        "its": "it's",
        "shouldnt": "shouldn't",
        "thats": "that's",
        "theres": "there's",
        "wasnt": "wasn't",
        "werent": "weren't",
        "whats": "what's",
        "wont": "won't",
        "wouldnt": "wouldn't",
        "youre": "you're",
    }
)
_DIGIT_COMMA = re.compile(r"(?<=\d),(?=\d)")
# A full stop is punctuation unless it is a decimal point ("3.5" keeps it).
_NON_DECIMAL_PERIOD = re.compile(r"(?<!\d)\.|\.(?!\d)")
# Everything in string.punctuation except the apostrophe (contractions keep it)
# and the full stop (handled above).
_VQA_PUNCT_TABLE = str.maketrans({c: " " for c in string.punctuation if c not in "'."})


def normalize_vqa(text: str) -> str:
    """Normalize an answer the way the VQA evaluation does.

    Lower-case; drop thousands commas (``"1,000"`` -> ``"1000"``); punctuation
    becomes spaces; full stops vanish except decimal points; number words up to
    ten become digits; articles are dropped; apostrophe-less contractions get
    their apostrophe. ``"Two dogs."`` -> ``"2 dogs"``, ``"The Coca-Cola"`` ->
    ``"coca cola"``.
    """
    text = text.lower().replace("\n", " ").replace("\t", " ").strip()
    text = _DIGIT_COMMA.sub("", text)
    text = _NON_DECIMAL_PERIOD.sub("", text)
    text = text.translate(_VQA_PUNCT_TABLE)
    words = []
    for word in text.split():
        word = _NUMBER_WORDS.get(word, word)
        if word in _ARTICLES:
            continue
        words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


VQA_CONSENSUS = 3
"""Annotators that must agree for full credit (VQA: "min(#humans that said ans / 3, 1)")."""


def vqa_accuracy(prediction: str, gold_answers: Sequence[str]) -> float:
    """VQA accuracy: ``min(#annotators who gave this answer / 3, 1)``, after normalization.

    With an annotator crowd (VQAv2 and TextVQA have 10 answers per question)
    this is the official form, which averages the formula over the 10 subsets
    that leave one annotator out: 3 matching answers out of 10 give
    ``(3 * 2/3 + 7 * 1) / 10 = 0.9``, 1 of 10 gives ``0.3``.

    Lists of 3 answers or fewer are not a crowd (a JSONL row or a generated
    sample with one or two accepted spellings): leaving one out could never
    reach full credit there, so they are scored without the leave-one-out
    average, ``min(#matches / min(3, n), 1)`` -- a single gold answer is then
    normalized exact match.
    """
    _require_gold(gold_answers)
    pred = normalize_vqa(prediction)
    golds = [normalize_vqa(g) for g in gold_answers]
    matches = [g == pred for g in golds]
    n = len(golds)
    if n <= VQA_CONSENSUS:
        return min(1.0, sum(matches) / n)
    total = sum(matches)
    # Leaving out annotator i removes their vote if it matched.
    per_subset = [min(1.0, (total - int(m)) / VQA_CONSENSUS) for m in matches]
    return sum(per_subset) / n


# -------------------------------------------------------------- relaxed accuracy

RELAXED_TOLERANCE = 0.05
"""ChartQA: a number within 5% (relative) of the gold value counts as correct."""

_THOUSANDS = re.compile(r"^[+-]?\d{1,3}(,\d{3})+(\.\d+)?$")
_CURRENCY = "$€£¥"


def _number_candidates(text: str) -> tuple[float, ...]:
    """The numeric values a chart answer may denote, or () if it is not a number.

    ``"1,234"`` -> 1234; ``"$5"`` -> 5; ``"12%"`` -> both 12 and 0.12, because
    ChartQA's gold answers write percentages either way while models answer
    "12" or "12%" for a bar labelled "12%" (lmms-eval only reads "12%" as 0.12,
    which marks "12" wrong; we accept both readings).
    """
    s = text.strip().rstrip(".").strip()
    s = s.lstrip(_CURRENCY).strip()
    percent = s.endswith("%")
    if percent:
        s = s[:-1].strip()
    if "," in s:
        if not _THOUSANDS.match(s):
            return ()
        s = s.replace(",", "")
    try:
        value = float(s)
    except ValueError:
        return ()
    if not math.isfinite(value):
        return ()  # "nan" / "inf" parse as floats but are not chart values
    return (value, value / 100.0) if percent else (value,)


def _within_tolerance(pred: float, gold: float) -> bool:
    if gold == 0.0:
        return pred == 0.0  # relative error is undefined at 0: ask for exact 0
    return abs(pred - gold) / abs(gold) <= RELAXED_TOLERANCE


def relaxed_accuracy(prediction: str, gold_answers: Sequence[str]) -> float:
    """ChartQA relaxed accuracy: numbers within 5%, anything else exact (case-insensitive).

    ``relaxed_accuracy("104", ["100"]) == 1.0``; ``"106"`` scores 0.0;
    ``"1,020"`` against ``"1000"`` is 1.0; ``"Blue."`` against ``"blue"`` is 1.0
    (surrounding whitespace and one trailing full stop are ignored, as small
    models often end a one-word answer with a full stop). Max over gold answers.
    """
    _require_gold(gold_answers)
    pred_numbers = _number_candidates(prediction)
    pred_text = prediction.strip().removesuffix(".").strip().lower()
    for gold in gold_answers:
        gold_numbers = _number_candidates(gold)
        if pred_numbers and gold_numbers:
            if any(_within_tolerance(p, g) for p in pred_numbers for g in gold_numbers):
                return 1.0
        elif pred_text == gold.strip().lower():
            return 1.0
    return 0.0


# ------------------------------------------------------------ multiple choice

# Tried in order; the first that matches decides. Letters must be capitals
# (only the surrounding words are case-insensitive) so that the article "a" in
# free text is not read as option A.
_LETTER_PATTERNS: tuple[re.Pattern[str], ...] = (
    # The whole answer is the letter: "B", "(B)", "B.", "[B]", "B)".
    re.compile(r"^[(\[]?([A-Z])[)\].:]?$"),
    # Starts with a marked letter: "B. cat", "(B) cat", "B) cat", "B: cat".
    re.compile(r"^(?:\(([A-Z])\)|([A-Z])[.:)])"),
    # "The answer is B", "Answer: (C)", "the correct answer is option D".
    re.compile(r"(?i:answer)(?:\s+is)?\s*[:\-]?\s*(?:(?i:option|choice)\s+)?[(\[]?([A-Z])\b"),
    # "option C", "choice (A)".
    re.compile(r"\b(?i:option|choice)\s+[(\[]?([A-Z])\b"),
    # A parenthesized letter anywhere: "I think (C) is right".
    re.compile(r"\(([A-Z])\)"),
)
_MARKUP = str.maketrans("", "", "*_`\"'")


def extract_choice_letter(text: str) -> str | None:
    """The option letter a model's answer picks, or None if it names none.

    ``"B"``, ``"(B)"``, ``"B. cat"``, ``"**B**"``, ``"The answer is B."`` and
    ``"Answer: (B)"`` all give ``"B"``; ``"a cat"`` gives None.
    """
    s = text.translate(_MARKUP).strip()
    for pattern in _LETTER_PATTERNS:
        match = pattern.search(s)
        if match:
            letter = next(g for g in match.groups() if g)
            return letter.upper()
    return None


def mc_accuracy(prediction: str, gold_answers: Sequence[str]) -> float:
    """1.0 if the letter extracted from the prediction is a gold letter, else 0.0.

    Gold answers are option letters (``"B"``); a prediction naming no letter scores 0.
    """
    _require_gold(gold_answers)
    letter = extract_choice_letter(prediction)
    if letter is None:
        return 0.0
    return 1.0 if any(letter == g.strip().upper() for g in gold_answers) else 0.0


METRICS: Mapping[str, Metric] = MappingProxyType(
    {
        "anls": anls,
        "exact_match": exact_match,
        "vqa_accuracy": vqa_accuracy,
        "relaxed_accuracy": relaxed_accuracy,
        "mc_accuracy": mc_accuracy,
    }
)
"""Metric name (as written in tasks, JSONL files and results) -> metric function."""
