"""The generated offline suite: deterministic, cached, and its gold answers match what is drawn."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ecoquant.eval.builtin import GENERATOR_VERSION, builtin_specs, builtin_suite
from ecoquant.eval.builtin import suite as suite_module
from ecoquant.eval.builtin.charts import (
    BAR_COLOR,
    YEARS,
    ChartSpec,
    make_bar_chart,
    make_line_chart,
    render_chart,
)
from ecoquant.eval.builtin.documents import (
    DOCUMENT_MAKERS,
    Box,
    DocumentSpec,
    Text,
)
from ecoquant.eval.tasks import CHOICE_LETTERS, Suite

# Digest of every generated question, gold answer and choice at size 2. It pins
# the generators: if it changes on purpose, bump GENERATOR_VERSION (it names
# the image cache) and update this value.
GOLDEN_QUESTIONS_SHA256 = {1: "e731e1c01491adb1ca6ce9b21cbef745740bb61704de593d5bc0e785310c9ba6"}


def _questions_digest(suite: Suite) -> str:
    rows = [
        (t.name, t.suite, t.metric, s.id, s.question, list(s.answers), list(s.choices or ()))
        for t in suite.tasks
        for s in t.samples
    ]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


#: These tests are about the realistic part; the basic pages have tests/test_basic_pages.py.
REALISTIC = ("realistic",)


def _image_digests(suite: Suite) -> dict[str, str]:
    return {
        f"{t.name}/{s.id}": hashlib.sha256(b"".join(s.image_bytes())).hexdigest()
        for t in suite.tasks
        for s in t.samples
    }


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> Suite:
    return builtin_suite(tmp_path_factory.mktemp("builtin-a"), parts=REALISTIC)


def test_default_suite_shape(suite: Suite) -> None:
    shape = [(t.name, t.suite, t.metric, len(t.samples)) for t in suite.tasks]
    assert shape == [
        ("builtin_documents", "doc", "anls", 12),
        ("builtin_charts", "image", "relaxed_accuracy", 8),
        ("builtin_chart_choice", "image", "mc_accuracy", 4),
    ]
    for task in suite.tasks:
        for sample in task.samples:
            (img,) = sample.load_images()
            assert max(img.size) <= 448 and min(img.size) >= 256


def test_generation_is_deterministic_across_runs(suite: Suite, tmp_path: Path) -> None:
    again = builtin_suite(tmp_path, parts=REALISTIC)  # fresh cache: everything rendered anew
    assert _questions_digest(again) == _questions_digest(suite)
    assert _image_digests(again) == _image_digests(suite)
    assert len(set(_image_digests(suite).values())) == 10  # 6 pages + 4 charts, all different


def test_generation_is_deterministic_across_processes(suite: Suite, tmp_path: Path) -> None:
    # Another interpreter with another hash seed: catches any dependence on set/dict order of strings.
    code = (
        "import hashlib, json, sys\n"
        "from ecoquant.eval.builtin import builtin_suite\n"
        "s = builtin_suite(sys.argv[1], parts=('realistic',))\n"
        "print(json.dumps({f'{t.name}/{x.id}': hashlib.sha256(b''.join(x.image_bytes())).hexdigest()"
        " for t in s.tasks for x in t.samples}))\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], env=env, capture_output=True, text=True, check=True
    )
    assert json.loads(out.stdout) == _image_digests(suite)


def test_questions_match_golden_digest(suite: Suite) -> None:
    assert _questions_digest(suite) == GOLDEN_QUESTIONS_SHA256[GENERATOR_VERSION]


def test_larger_sizes_extend_smaller_ones(suite: Suite, tmp_path: Path) -> None:
    small = builtin_suite(tmp_path, size=1, parts=REALISTIC)
    big = _image_digests(suite)
    for key, digest in _image_digests(small).items():
        assert big[key] == digest
    docs, charts = builtin_specs(3)
    assert (len(docs), len(charts)) == (9, 6)


def test_cache_is_reused_and_repaired(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = builtin_suite(tmp_path, parts=REALISTIC)
    folder = tmp_path / f"builtin-v{GENERATOR_VERSION}"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert sorted(manifest) == sorted(p.name for p in folder.glob("*.png"))

    def must_not_render(spec: object) -> bytes:
        raise AssertionError("cached image was rendered again")

    with monkeypatch.context() as m:
        m.setattr(suite_module, "render_document", must_not_render)
        m.setattr(suite_module, "render_chart", must_not_render)
        assert _image_digests(builtin_suite(tmp_path, parts=REALISTIC)) == _image_digests(first)

    damaged = folder / "bar-0.png"
    damaged.write_bytes(damaged.read_bytes()[:100])
    repaired = builtin_suite(tmp_path, parts=REALISTIC)
    assert _image_digests(repaired) == _image_digests(first)
    assert hashlib.sha256(damaged.read_bytes()).hexdigest() == manifest["bar-0.png"]


# --------------------------------------------------- gold answers vs drawn data


def _texts(doc: DocumentSpec) -> list[Text]:
    return [op for op in doc.ops if isinstance(op, Text)]


@pytest.mark.parametrize("kind", sorted(DOCUMENT_MAKERS))
@pytest.mark.parametrize("index", range(4))
def test_document_answers_are_drawn_legibly(kind: str, index: int) -> None:
    doc = DOCUMENT_MAKERS[kind](index, 7)  # every question of the pool
    texts = _texts(doc)
    for q in doc.questions:
        assert any(q.answers[0] in t.text for t in texts), (q, [t.text for t in texts])
    boxes = [t.bbox() for t in texts]
    for left, top, right, bottom in boxes:
        assert 0 <= left < right <= doc.width and 0 <= top < bottom <= doc.height
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            overlap = a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]
            assert not overlap, (a, b)
    assert all(t.size >= 10 for t in texts)


def _money(text: str) -> float:
    return float(re.sub(r"[^0-9.]", "", text))


@pytest.mark.parametrize("index", range(4))
def test_invoice_arithmetic_and_total_answer(index: int) -> None:
    doc = DOCUMENT_MAKERS["invoice"](index, 6)
    # The right-hand column holds the line amounts, then subtotal, tax, total.
    column = [t for t in _texts(doc) if t.anchor == "ra" and t.x == doc.width - 16 and t.text.startswith("$")]
    *amounts, subtotal, tax, total = (_money(t.text) for t in column)
    assert 3 <= len(amounts) <= 4
    assert subtotal == pytest.approx(sum(amounts), abs=0.005)
    assert tax == pytest.approx(round(subtotal * 0.08, 2), abs=0.005)
    assert total == pytest.approx(subtotal + tax, abs=0.005)
    (total_q,) = [q for q in doc.questions if q.question == "What is the total amount?"]
    assert total_q.answers[0] == column[-1].text


@pytest.mark.parametrize("index", range(4))
def test_form_checked_box_matches_answer(index: int) -> None:
    doc = DOCUMENT_MAKERS["form"](index, 7)
    texts = _texts(doc)
    (mark,) = [t for t in texts if t.text == "X"]
    box = next(b for b in doc.ops if isinstance(b, Box) and b.x0 <= mark.x <= b.x1 and b.y0 == mark.y)
    label = next(t for t in texts if t.x == box.x1 + 6 and t.y == mark.y)
    (q,) = [q for q in doc.questions if q.question == "Which membership type is checked?"]
    assert q.answers == (label.text,)


def _answer(spec: ChartSpec, prefix: str) -> str:
    (q,) = [q for q in spec.questions if q.question.startswith(prefix)]
    return q.answers[0]


@pytest.mark.parametrize("index", range(6))
def test_bar_chart_answers_match_data(index: int) -> None:
    spec = make_bar_chart(index)
    values = spec.series[0].values
    assert _answer(spec, "Which") == spec.x_values[values.index(max(values))]
    (value_q,) = [q for q in spec.questions if q.question.startswith("What is the value of ")]
    category = value_q.question.removeprefix("What is the value of ").rstrip("?")
    assert value_q.answers == (str(values[spec.x_values.index(category)]),)
    (mc,) = spec.choice_questions
    assert mc.choices[CHOICE_LETTERS.index(mc.answer)] == spec.x_values[values.index(min(values))]
    assert len(set(mc.choices)) == 4 and set(mc.choices) <= set(spec.x_values)


@pytest.mark.parametrize("index", range(6))
def test_line_chart_answers_match_data(index: int) -> None:
    spec = make_line_chart(index)
    by_name = {s.name: s.values for s in spec.series}
    value_q, peak_q = spec.questions
    name, year = re.fullmatch(r"What is the value of (.+) in (\d{4})\?", value_q.question).groups()  # type: ignore[union-attr]
    assert value_q.answers == (str(by_name[name][YEARS.index(year)]),)
    name = re.fullmatch(r"In which year did (.+) reach its highest value\?", peak_q.question).group(1)  # type: ignore[union-attr]
    assert peak_q.answers == (YEARS[by_name[name].index(max(by_name[name]))],)
    (mc,) = spec.choice_questions
    name = re.fullmatch(r"In which year was (.+) at its lowest\?", mc.question).group(1)  # type: ignore[union-attr]
    assert mc.choices[CHOICE_LETTERS.index(mc.answer)] == YEARS[by_name[name].index(min(by_name[name]))]


@pytest.mark.parametrize("index", range(2))
def test_rendered_bars_have_the_heights_of_the_data(index: int) -> None:
    """Measure the bars in the PNG: the tallest is the gold answer, heights are proportional to values."""
    spec = make_bar_chart(index)
    rgb = np.asarray(Image.open(io.BytesIO(render_chart(spec))).convert("RGB"))
    target = np.array([int(BAR_COLOR[i : i + 2], 16) for i in (1, 3, 5)])
    per_column = (rgb == target).all(axis=2).sum(axis=0)
    columns = np.flatnonzero(per_column)
    runs = np.split(columns, np.flatnonzero(np.diff(columns) > 1) + 1)
    heights = np.array([per_column[r].max() for r in runs], dtype=float)
    values = np.array(spec.series[0].values, dtype=float)
    assert len(runs) == len(values)
    assert spec.x_values[int(heights.argmax())] == spec.questions[0].answers[0]
    scale = heights.max() / values.max()
    assert np.abs(heights - values * scale).max() <= 1.5  # pixels
