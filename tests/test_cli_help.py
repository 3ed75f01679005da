"""``ecoquant --help``: commands in the order a user meets them, each summary one sentence on one line."""

from __future__ import annotations

import re

from typer.testing import CliRunner

from ecoquant.cli import app

# The order a user meets them (issue 31): the decision, the check of this machine, then the steps, then helpers.
EXPECTED = [
    "demo", "optimize", "doctor",
    "quantize", "inspect", "verify", "eval", "quality", "report", "serve-config", "serve",
    "fixtures", "presets", "prompt-variants",
]


def _command_rows() -> list[tuple[str, str]]:
    """(name, summary) per row of the Commands panel, as a user sees it on a wide terminal."""
    result = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "300", "NO_COLOR": "1"}, terminal_width=300)
    assert result.exit_code == 0, result.output
    panel = result.output.split("Commands")[1]
    rows: list[tuple[str, str]] = []
    for line in panel.splitlines():
        m = re.match(r"^│ (\S*)\s+(.*?)\s*│$", line)
        if m is None:
            continue
        name, text = m.groups()
        if name:
            rows.append((name, text))
        else:  # a continuation line: a summary broken in two
            rows.append(("", text))
    return rows


def test_commands_listed_in_the_order_a_user_meets_them() -> None:
    names = [n for n, _ in _command_rows() if n]
    assert names == EXPECTED


def test_each_summary_is_one_sentence_on_one_line() -> None:
    rows = _command_rows()
    assert all(name for name, _ in rows), [r for r in rows if not r[0]]  # no summary wraps onto a second row
    for name, text in rows:
        assert text.endswith("."), (name, text)
        assert text[0].isupper(), (name, text)
        # one sentence: no full stop followed by another sentence inside it
        assert not re.search(r"\.\s+[A-Z]", text), (name, text)
