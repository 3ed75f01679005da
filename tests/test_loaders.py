"""Suite loaders: JSONL round trip and errors, suite specs, and the offline Hugging Face error."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from ecoquant.errors import EcoquantError
from ecoquant.eval.builtin import builtin_suite
from ecoquant.eval.loaders import (
    HF_SUITES,
    HF_TASKS,
    load_jsonl,
    load_suite,
    write_jsonl,
)
from ecoquant.eval.tasks import PROMPT_DEFAULTS, score


def _write_png(path: Path, color: str = "white") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 10), color).save(path)


def _write_rows(path: Path, rows: list[object]) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_jsonl_round_trip_of_builtin_suite(tmp_path: Path) -> None:
    original = builtin_suite(tmp_path / "cache")
    path = write_jsonl(original, tmp_path / "export" / "suite.jsonl")
    loaded = load_jsonl(path)
    assert loaded.name == "suite"
    assert [t.name for t in loaded.tasks] == [t.name for t in original.tasks]
    for a, b in zip(original.tasks, loaded.tasks, strict=True):
        assert (a.suite, a.metric, a.prompt_suffix, a.max_new_tokens) == (
            b.suite,
            b.metric,
            b.prompt_suffix,
            b.max_new_tokens,
        )
        for sa, sb in zip(a.samples, b.samples, strict=True):
            assert (sa.id, sa.question, sa.answers, sa.choices) == (sb.id, sb.question, sb.answers, sb.choices)
            assert sa.image_bytes() == sb.image_bytes()
            assert all(p.parent == tmp_path / "export" / "images" for p in sb.images)  # type: ignore[union-attr]
            assert a.prompt(sa) == b.prompt(sb)
    # Scoring the gold answers of either copy gives the same perfect scores.
    for a, b in zip(original.tasks, loaded.tasks, strict=True):
        golds = [s.answers[0] for s in a.samples]
        assert score(a, golds).score == score(b, golds).score == 1.0


def test_jsonl_defaults_and_relative_images(tmp_path: Path) -> None:
    _write_png(tmp_path / "imgs" / "p1.png")
    _write_png(tmp_path / "imgs" / "p2.png", "black")
    path = _write_rows(
        tmp_path / "mydocs.jsonl",
        [
            {"id": 1, "image": "imgs/p1.png", "question": "Total?", "answer": "$5"},
            "",
            {"id": 2, "images": ["imgs/p1.png", "imgs/p2.png"], "question": "Same?", "answers": ["no", "No."]},
            {
                "id": "c1",
                "image": "imgs/p2.png",
                "question": "Colour?",
                "answer": "B",
                "choices": ["white", "black"],
                "task": "mc",
            },
            {
                "id": "v1",
                "image": str(tmp_path / "imgs" / "p1.png"),
                "question": "Value?",
                "answer": "10",
                "task": "chart",
                "metric": "relaxed_accuracy",
                "max_new_tokens": 8,
                "prompt_suffix": " Answer:",
            },
        ],
    )
    suite = load_jsonl(path)
    docs, mc, chart = suite.tasks
    assert (docs.name, docs.suite, docs.metric) == ("mydocs", "doc", "anls")
    assert docs.prompt_suffix == PROMPT_DEFAULTS["anls"].prompt_suffix
    assert [s.id for s in docs.samples] == ["1", "2"]
    assert docs.samples[1].images == (tmp_path / "imgs" / "p1.png", tmp_path / "imgs" / "p2.png")
    assert (mc.suite, mc.metric, mc.samples[0].choices, mc.samples[0].answers) == (
        "image",
        "mc_accuracy",
        ("white", "black"),
        ("B",),
    )
    assert (chart.metric, chart.max_new_tokens, chart.prompt_suffix) == ("relaxed_accuracy", 8, " Answer:")


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (
            {"id": 1, "image": "p.png", "question": "?", "answers": ["a"], "anwsers": ["a"]},
            r"2: unknown keys \['anwsers'\]",
        ),
        ({"id": 1, "image": "missing.png", "question": "?", "answer": "a"}, "2: image not found"),
        ({"id": 1, "image": "p.png", "question": "?"}, 'exactly one of "answer" or "answers"'),
        ({"image": "p.png", "question": "?", "answer": "a"}, 'missing "id"'),
        ({"id": 1, "image": "p.png", "question": "?", "answer": "C", "choices": ["x", "y"]}, "not option letters"),
        ({"id": 1, "image": "p.png", "question": "?", "answer": "a", "metric": "bleu"}, "unknown metric 'bleu'"),
        (
            {"id": 1, "image": "p.png", "question": "?", "answer": "a", "metric": "exact_match"},
            "metric='exact_match' differs",
        ),
        ({"id": 0, "image": "p.png", "question": "?", "answer": "a"}, "duplicate id '0'"),
        ("{not json", "2: invalid JSON"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path: Path, row: object, message: str) -> None:
    _write_png(tmp_path / "p.png")
    path = _write_rows(tmp_path / "s.jsonl", [{"id": 0, "image": "p.png", "question": "?", "answer": "a"}, row])
    with pytest.raises(EcoquantError, match=message) as info:
        load_jsonl(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_load_suite_specs(tmp_path: Path) -> None:
    built = load_suite("builtin", cache_dir=tmp_path / "cache", size=1)
    assert built.name == "builtin" and built.n_samples == 6 + 12  # basic pages + realistic documents and charts
    path = write_jsonl(built, tmp_path / "b.jsonl")
    assert load_suite(str(path)).n_samples == 18
    with pytest.raises(EcoquantError, match="suite file not found"):
        load_suite(str(tmp_path / "nope.jsonl"))
    with pytest.raises(EcoquantError, match="unknown suite 'imagez'"):
        load_suite("imagez")


def test_hub_tables_are_consistent() -> None:
    for kind, names in HF_SUITES.items():
        assert all(HF_TASKS[n].suite == kind for n in names)
    assert {n for names in HF_SUITES.values() for n in names} == set(HF_TASKS)


def test_hub_suites_fail_offline_with_one_clear_line(tmp_path: Path) -> None:
    # A fresh interpreter, because huggingface_hub reads the offline switches at import.
    code = (
        "from ecoquant.errors import EcoquantError\n"
        "from ecoquant.eval.loaders import load_suite\n"
        "for spec in ('doc', 'image'):\n"
        "    try:\n"
        "        load_suite(spec, limit=2)\n"
        "    except EcoquantError as exc:\n"
        "        print(exc)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, timeout=120)
    lines = out.stdout.splitlines()
    assert len(lines) == 2, out.stdout + out.stderr
    assert lines[0].startswith("cannot load Hugging Face dataset lmms-lab/DocVQA (DocVQA) for task docvqa_val:")
    assert lines[1].startswith("cannot load Hugging Face dataset lmms-lab/ChartQA for task chartqa:")
    assert all("--suite builtin" in line for line in lines)
    assert time.monotonic() - start < 60  # offline mode fails at once, no network retries


def test_image_bytes_survive_round_trip_for_in_memory_images(tmp_path: Path) -> None:
    from ecoquant.eval.tasks import Sample, Suite, Task

    buf = io.BytesIO()
    Image.new("RGB", (4, 4), "red").save(buf, format="JPEG")
    task = Task("t/1", "image", "exact_match", "", 4, (Sample("a b", (buf.getvalue(),), "?", ("x",)),))
    loaded = load_jsonl(write_jsonl(Suite("s", (task,)), tmp_path / "s.jsonl"))
    (sample,) = loaded.tasks[0].samples
    assert sample.images[0].name == "t_1__a_b_0.jpeg"  # type: ignore[union-attr]
    assert sample.image_bytes() == [buf.getvalue()]
