"""The basic pages: deterministic, split by seed, and answerable only by looking at the image."""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from ecoquant.eval.builtin import builtin_suite
from ecoquant.eval.builtin.basic import BASIC_KINDS, COLOURS, SIZE, page_rng
from ecoquant.eval.loaders import load_suite
from ecoquant.eval.metrics import METRICS
from ecoquant.eval.tasks import CHOICE_LETTERS


def test_pages_are_deterministic_and_sized() -> None:
    for kind in BASIC_KINDS:
        a, b = kind.make("eval", 3), kind.make("eval", 3)
        assert a.png() == b.png() and a.questions == b.questions
        assert a.image().size == (SIZE, SIZE)


def test_train_and_eval_pages_come_from_disjoint_seeds() -> None:
    assert page_rng("train", "label", 0).random() != page_rng("eval", "label", 0).random()
    with pytest.raises(ValueError):
        page_rng("test", "label", 0)  # type: ignore[arg-type]
    for kind in BASIC_KINDS:
        evals = [hashlib.sha256(kind.make("eval", i).png()).hexdigest() for i in range(50)]
        train = [hashlib.sha256(kind.make("train", i).png()).hexdigest() for i in range(50)]
        assert sum(a == b for a, b in zip(evals, train, strict=True)) == 0, kind.task
        if kind.task != "basic_form":  # 12**3 possible forms: repeats are expected there
            assert len(set(evals)) == 50, kind.task


def test_training_stream_never_yields_an_evaluation_page(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forms can repeat by chance (1,728 of them); the training stream skips any that equals a guarded eval page."""
    from ecoquant.fixtures import train_tiny_vlm

    monkeypatch.setattr(train_tiny_vlm, "EVAL_GUARD", 60)

    class Pages:  # stands in for the Encoder: the "example" is the page's PNG itself
        def encode(self, kind, split, index, describe=False):  # type: ignore[no-untyped-def]
            png = kind.make(split, index).png()
            return png, png

    stream = train_tiny_vlm.PageStream(Pages())  # type: ignore[arg-type]
    form = next(k for k in BASIC_KINDS if k.task == "basic_form")
    guarded = {form.make("eval", i).png() for i in range(60)}
    drawn = [stream.example(form, i) for i in range(400)]
    assert stream.skipped > 0  # the space is small enough that 400 draws meet some guarded pages
    assert not guarded & set(drawn)


def test_multiple_choice_answers_point_at_the_right_option() -> None:
    kind = next(k for k in BASIC_KINDS if k.task == "basic_bar_choice")
    letters = Counter()
    for i in range(200):
        q = kind.make("eval", i).questions[0]
        assert q.choices is not None and set(q.choices) <= set(COLOURS)
        assert q.answer in CHOICE_LETTERS[: len(q.choices)]
        letters[q.answer] += 1
    # The right option is spread over the letters, so "always A" is no strategy.
    assert max(letters.values()) < 0.4 * 200


def _blind_scores(train_pages: int = 2000, eval_pages: int = 300) -> dict[str, float]:
    """The best an image-blind model can do: for each question text, the answer most often right in training."""
    out = {}
    for kind in BASIC_KINDS:
        by_question: dict[tuple[str, tuple[str, ...] | None], Counter[str]] = defaultdict(Counter)
        for i in range(train_pages):
            q = kind.make("train", i).questions[0]
            key = (q.question, q.choices if kind.metric == "mc_accuracy" else None)
            by_question[key][q.answer] += 1
        metric = METRICS[kind.metric]
        total = 0.0
        for i in range(eval_pages):
            q = kind.make("eval", i).questions[0]
            key = (q.question, q.choices if kind.metric == "mc_accuracy" else None)
            seen = by_question.get(key)
            # Unseen option orders: the blind guess is the first option (as good as any).
            guess = seen.most_common(1)[0][0] if seen else "A"
            total += metric(guess, (q.answer,))
        out[kind.task] = total / eval_pages
    return out


def test_a_model_that_ignores_the_image_scores_near_chance() -> None:
    blind = _blind_scores()
    # Chance per task: labels and forms ~0 (codes, prices, dates; 12 words a field), a 3-5 way
    # choice ~0.28, a 1-5 height 1/5, a 1-4 count 1/4, 6 colours 1/6.
    assert blind["basic_label"] < 0.1
    assert blind["basic_form"] < 0.15
    assert blind["basic_bar_choice"] < 0.4
    assert blind["basic_bar_value"] < 0.3
    assert blind["basic_count"] < 0.35
    assert blind["basic_colour"] < 0.3
    assert sum(blind.values()) / len(blind) < 0.25


def test_builtin_suite_holds_both_parts(tmp_path: Path) -> None:
    everything = builtin_suite(tmp_path, size=2)
    basic = load_suite("builtin-basic", cache_dir=tmp_path, size=3)
    realistic = load_suite("builtin-realistic", cache_dir=tmp_path, size=2)
    assert basic.name == "builtin-basic" and realistic.name == "builtin-realistic"
    assert [t.name for t in basic.tasks] == [k.task for k in BASIC_KINDS]
    assert all(len(t.samples) == 3 for t in basic.tasks)
    assert basic.kinds() == ("doc", "image")
    assert [t.name for t in everything.tasks] == [k.task for k in BASIC_KINDS] + [t.name for t in realistic.tasks]
    # Images are cached PNG files; a second call reuses them.
    first = basic.tasks[0].samples[0].images[0]
    assert isinstance(first, Path) and first.is_file()
    again = load_suite("builtin-basic", cache_dir=tmp_path, size=3)
    assert again.tasks[0].samples[0].images[0] == first
