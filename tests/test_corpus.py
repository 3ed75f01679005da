"""The shipped corpus: disjoint calibration/evaluation parts, pinned by hash, big enough for their jobs."""

from __future__ import annotations

import dataclasses
import re
import shutil
from importlib.resources import files
from pathlib import Path

import pytest

from ecoquant.data import corpus as corpus_module
from ecoquant.data.corpus import (
    CALIBRATION,
    EVALUATION,
    EVALUATION_TEXTS,
    HEADINGS,
    SQLITE_DOCS,
    load_corpus,
    page_heading,
    part_sha256,
    split_chapters,
)
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
    assert calibration_tokens >= 128 * 512 * 2  # 128 samples of 512 tokens, twice over
    for name, part in EVALUATION_TEXTS.items():  # every evaluation text: a stable perplexity, a short CPU run
        evaluation_tokens = len(tok.encode(load_corpus(evaluation=part).evaluation_text).ids)
        assert 20_000 <= evaluation_tokens <= 50_000, (name, evaluation_tokens)


# --- the out-of-domain evaluation text: SQLite's documentation ----------------------------------------------


def test_evaluation_texts_by_name() -> None:
    assert EVALUATION_TEXTS == {"austen": EVALUATION, "sqlite": SQLITE_DOCS}
    assert load_corpus() == load_corpus(evaluation=EVALUATION_TEXTS["austen"])  # the default is unchanged


def test_page_lines_split_pages_and_stay_out_of_the_text() -> None:
    text = f"{page_heading('a.html')}\n\nTitle A\n\nBody of A.\n\n{page_heading('b.html')}\n\nTitle B\n"
    assert split_chapters(text, HEADINGS["page"]) == ["Title A\n\nBody of A.", "Title B"]


def test_sqlite_text_loads_with_its_pinned_hash() -> None:
    corpus = load_corpus(evaluation=SQLITE_DOCS)
    titles = [page.split("\n\n")[0] for page in corpus.evaluation]
    assert titles == [
        "Appropriate Uses For SQLite",
        "How To Corrupt An SQLite Database File",
        "Atomic Commit In SQLite",
        "Isolation In SQLite",
        "Write-Ahead Logging",
    ]
    assert corpus.sha256["evaluation"] == SQLITE_DOCS.sha256 == part_sha256(corpus.evaluation)
    assert corpus.sha256["calibration"] == CALIBRATION.sha256  # calibration is untouched
    assert "SQLite documentation" in corpus.source and "pages 1-end" in corpus.source
    assert "=== page" not in corpus.evaluation_text  # the page lines are not text
    assert not re.search(r"</?[a-z]+[ >]|&[a-z]+;", corpus.evaluation_text)  # no HTML tags or entities left
    assert 100_000 < len(corpus.evaluation_text) < 200_000  # ~29k Gemma tokens


def test_a_modified_sqlite_file_is_refused_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "data"  # a copy of the shipped data folder, one word changed in the SQLite text
    shutil.copytree(Path(str(files("ecoquant.data"))), data)
    text = data / SQLITE_DOCS.file
    text.write_text(text.read_text(encoding="utf-8").replace("SQLite", "SQLlite", 1), encoding="utf-8")
    monkeypatch.setattr(corpus_module, "files", lambda package: data)
    load_corpus()  # the Austen parts of the copy still load
    with pytest.raises(EcoquantError, match="was modified") as info:
        load_corpus(evaluation=SQLITE_DOCS)
    message = str(info.value)
    assert "\n" not in message and SQLITE_DOCS.file in message


def test_sqlite_text_shares_no_passage_with_the_calibration_novel() -> None:
    corpus = load_corpus(evaluation=SQLITE_DOCS)

    def twelve_grams(text: str) -> set[tuple[str, ...]]:
        words = re.findall(r"[a-z0-9']+", text.lower())
        return {tuple(words[i : i + 12]) for i in range(len(words) - 11)}

    sqlite = twelve_grams(corpus.evaluation_text)
    assert len(sqlite) > 20_000
    assert not sqlite & twelve_grams(corpus.calibration_text)


def test_the_conversion_keeps_prose_and_drops_navigation_code_and_tables() -> None:
    import runpy

    page_text = runpy.run_path(str(Path(__file__).resolve().parents[1] / "bench" / "make_sqlite_text.py"))["page_text"]
    html = """<html><head><title>T</title><script>var x = 1;</script></head><body>
    <div class=nosearch><div class="menu mainmenu"><ul><li><a href="index.html">Home</a></ul></div>
    <div class="tagline desktoponly">Small. Fast. Reliable.</div></div>
    <div class=fancy><div class=nosearch><div class="fancy_title">Page Title</div>
    <div class="fancy_toc"><a>Table Of Contents</a>
    <div id="toc_sub"><div class="fancy-toc1">1. Intro</div></div></div></div>
    <h1 id="intro"><span>1. </span>Intro</h1>
    <p>SQLite competes with
    <a href="x">fopen()</a>.  A &quot;wrapped&quot;
       line.</p>
    <blockquote><pre>PRAGMA journal_mode=WAL;</pre></blockquote>
    <table><tr><td>cell</td></tr></table>
    <ul><li>First item<li><p>Second item</p></ul>
    <p align="center"><small><i>This page last modified on 2022</i></small></p>
    </div></body></html>"""
    assert page_text(html) == [
        "Page Title",
        "1. Intro",
        'SQLite competes with fopen(). A "wrapped" line.',
        "First item",
        "Second item",
    ]
