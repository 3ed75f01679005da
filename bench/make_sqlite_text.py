"""Build ``src/ecoquant/data/sqlite/sqlite_docs.txt``, the out-of-domain evaluation text, from Debian's ``sqlite3-doc``.

Why: calibrating on one Austen novel and evaluating on another flatters the
methods that fit their calibration; technical English from another source
tells whether a compressed model kept what the calibration text never showed.
SQLite's documentation is public domain and ships in a Debian package, so it
can be taken from a file pinned by hash, like the novels.

This runs once, by hand; the output is committed and its sha256 pinned in
``ecoquant/data/corpus.py``. Only the stdlib is used (``html.parser``), so the
conversion is easy to audit: per page, the menus, search form, table of
contents, scripts, code blocks and tables are dropped (they are navigation or
syntax, not running prose); every paragraph, list item and heading becomes
one line, whitespace collapsed; paragraphs are separated by one blank line,
and each page starts with the heading line that ``corpus.split_chapters``
recognises as a page boundary.

Usage::

    uv run python bench/make_sqlite_text.py --deb sqlite3-doc_3.40.1-2+deb12u2_all.deb \\
        --out src/ecoquant/data/sqlite/sqlite_docs.txt
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

from ecoquant.data.corpus import page_heading

#: Where the HTML pages live inside the extracted package.
DOC_DIR = "usr/share/doc/sqlite3"

#: The pages, in order. Chosen because they read as running technical prose (design, failure modes),
#: not as syntax reference or tables of options; together ~29k Gemma tokens, the size of the Austen
#: evaluation part. Left out: testing.html (9k tokens, mostly lists of test kinds) and lockingv3.html
#: (a state table, and the same ground as atomiccommit.html), which would take the text past 40k.
PAGES: tuple[str, ...] = (
    "whentouse.html",  # where SQLite fits and where it does not: an essay
    "howtocorrupt.html",  # failure modes of files, locks, disks: explanatory prose
    "atomiccommit.html",  # the rollback-journal commit, step by step
    "isolation.html",  # isolation between connections: short, all prose
    "wal.html",  # write-ahead logging: design, trade-offs, checkpoints
)

#: Elements whose whole content is dropped: not prose (scripts, page head, code, tables, the search form).
SKIP_TAGS = frozenset({"script", "style", "head", "pre", "table", "form", "select"})
#: ``<div class=...>`` whose content is dropped: the site menus, the tagline and the table of contents.
SKIP_CLASSES = frozenset({"menu", "searchmenu", "tagline", "fancy_toc", "codeblock"})
#: Elements that end a paragraph: their text never runs into the next block's.
BLOCK_TAGS = frozenset(
    {"p", "li", "ul", "ol", "dl", "dt", "dd", "div", "blockquote", "center", "h1", "h2", "h3", "h4", "h5", "h6", "br"}
)
#: Void elements: they have no end tag, so they never open a skipped region.
VOID_TAGS = frozenset({"br", "img", "meta", "link", "input", "hr", "area", "base", "col", "source", "wbr"})
#: Paragraphs that are page furniture (the footer), dropped by prefix.
FURNITURE = ("This page last modified",)


class ProseExtractor(HTMLParser):
    """Collects the paragraphs of one page, skipping the regions named in ``SKIP_TAGS`` and ``SKIP_CLASSES``."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[str] = []
        self._chunks: list[str] = []  # text of the paragraph so far, as the parser delivered it
        self._skip_tag: str | None = None  # the element a skipped region started with
        self._skip_depth = 0  # open elements of that name inside the region (nested divs)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if self._skip_tag is not None:
            if tag == self._skip_tag:
                self._skip_depth += 1
            return
        classes = set((dict(attrs).get("class") or "").split())
        if tag not in VOID_TAGS and (tag in SKIP_TAGS or (tag == "div" and classes & SKIP_CLASSES)):
            self._flush()
            self._skip_tag, self._skip_depth = tag, 1
        elif tag in BLOCK_TAGS:
            self._flush()

    def handle_endtag(self, tag: str) -> None:
        if self._skip_tag is not None:
            if tag == self._skip_tag:
                self._skip_depth -= 1
                if self._skip_depth == 0:
                    self._skip_tag = None
            return
        if tag in BLOCK_TAGS:
            self._flush()

    def handle_data(self, data: str) -> None:
        if self._skip_tag is None:
            self._chunks.append(data)

    def close(self) -> None:
        super().close()
        self._flush()

    def _flush(self) -> None:
        text = " ".join("".join(self._chunks).split())  # joined before splitting: "<a>fopen()</a>." stays "fopen()."
        self._chunks.clear()
        if text and not text.startswith(FURNITURE):
            self.paragraphs.append(text)


def page_text(html: str) -> list[str]:
    """The prose paragraphs of one HTML page, in document order."""
    parser = ProseExtractor()
    parser.feed(html)
    parser.close()
    return parser.paragraphs


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass(frozen=True)
class Built:
    """What PROVENANCE.md records: the text and the hash of every input."""

    text: str
    deb_sha256: str
    page_sha256: dict[str, str]


def build(deb: Path) -> Built:
    """Extract ``deb`` with ``dpkg-deb -x`` and convert ``PAGES`` into one text."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["dpkg-deb", "-x", str(deb), tmp], check=True)
        docs = Path(tmp) / DOC_DIR
        blocks, hashes = [], {}
        for name in PAGES:
            page = docs / name
            hashes[f"/{DOC_DIR}/{name}"] = sha256(page)
            paragraphs = page_text(page.read_text(encoding="utf-8"))
            blocks.append("\n\n".join([page_heading(name), *paragraphs]))
    return Built("\n\n".join(blocks) + "\n", sha256(deb), hashes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--deb", type=Path, required=True, help="The sqlite3-doc .deb (apt-get download sqlite3-doc).")
    parser.add_argument("--out", type=Path, required=True, help="Where to write the text.")
    args = parser.parse_args(argv)
    built = build(args.deb)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(built.text, encoding="utf-8")
    print(f"{args.deb.name}  sha256 {built.deb_sha256}")
    for path, digest in built.page_sha256.items():
        print(f"{path}  sha256 {digest}")
    print(f"{args.out}  {len(built.text)} characters  sha256 {sha256(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
