"""Sample / Task / Suite validation, prompts, and scoring predictions."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from ecoquant.errors import EcoquantError
from ecoquant.eval.metrics import METRICS
from ecoquant.eval.tasks import (
    PROMPT_DEFAULTS,
    Sample,
    Suite,
    Task,
    score,
    score_in_order,
    suite_scores,
)


def _png(color: str = "red", size: tuple[int, int] = (8, 6)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _task(metric: str, samples: list[Sample], suite: str = "doc", name: str = "t") -> Task:
    d = PROMPT_DEFAULTS[metric]
    return Task(name, suite, metric, d.prompt_suffix, d.max_new_tokens, tuple(samples))  # type: ignore[arg-type]


def test_every_metric_has_prompt_defaults() -> None:
    assert set(PROMPT_DEFAULTS) == set(METRICS)


def test_sample_validation() -> None:
    img = _png()
    with pytest.raises(ValueError, match="no image"):
        Sample("a", (), "q?", ("x",))
    with pytest.raises(ValueError, match="at least one gold answer"):
        Sample("a", (img,), "q?", ())
    with pytest.raises(ValueError, match="not option letters"):
        Sample("a", (img,), "q?", ("C",), ("cat", "dog"))
    with pytest.raises(ValueError, match="2 to 26 choices"):
        Sample("a", (img,), "q?", ("A",), ("cat",))
    s = Sample("a", [img], "q?", ["x"])  # type: ignore[arg-type]  # lists become tuples
    assert isinstance(s.images, tuple) and isinstance(s.answers, tuple)


def test_sample_images_from_bytes_and_path(tmp_path: Path) -> None:
    data = _png("blue", (5, 4))
    path = tmp_path / "img.png"
    path.write_bytes(_png("green", (3, 2)))
    s = Sample("a", (data, str(path)), "q?", ("x",))
    assert s.images[1] == path  # str paths become Path
    images = s.load_images()
    assert [i.size for i in images] == [(5, 4), (3, 2)]
    assert images[0].mode == "RGB" and images[0].getpixel((0, 0)) == (0, 0, 255)
    assert s.image_bytes() == [data, path.read_bytes()]


def test_task_validation() -> None:
    s = Sample("a", (_png(),), "q?", ("x",))
    with pytest.raises(ValueError, match="unknown metric"):
        Task("t", "doc", "bleu", "", 8, (s,))
    with pytest.raises(ValueError, match="suite must be one of"):
        Task("t", "video", "anls", "", 8, (s,))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="duplicate sample ids"):
        Task("t", "doc", "anls", "", 8, (s, s))
    with pytest.raises(ValueError, match="max_new_tokens"):
        Task("t", "doc", "anls", "", 0, (s,))
    with pytest.raises(ValueError, match="duplicate task names"):
        Suite("s", (_task("anls", [s]), _task("anls", [s])))


def test_prompt_layout() -> None:
    open_q = Sample("a", (_png(),), "What is the total?", ("$5",))
    mc = Sample("b", (_png(),), "Which is a fruit?", ("B",), ("Chair", "Apple", "Cloud"))
    assert (
        _task("anls", [open_q]).prompt(open_q)
        == "What is the total?\nAnswer the question using a single word or phrase."
    )
    assert _task("mc_accuracy", [mc]).prompt(mc) == (
        "Which is a fruit?\nA. Chair\nB. Apple\nC. Cloud\nAnswer with the option's letter from the given choices directly."
    )


def test_score_worked_example() -> None:
    img = _png()
    task = _task(
        "anls",
        [
            Sample("q0", (img,), "Invoice number?", ("INV-1234",)),
            Sample("q1", (img,), "Total?", ("$12.00", "12.00")),
            Sample("q2", (img,), "Company?", ("Blue Heron Printing",)),
        ],
    )
    result = score(task, ["INV-1234", "12.0", "no idea"])
    # q0 exact; q1: best gold "12.00" vs "12.0": d=1, L=5 -> 0.8; q2 below threshold -> 0
    assert result.per_sample == pytest.approx({"q0": 1.0, "q1": 0.8, "q2": 0.0})
    assert list(result.per_sample) == ["q0", "q1", "q2"]
    assert result.score == pytest.approx(1.8 / 3)
    assert (result.task, result.suite, result.metric, result.n_samples) == ("t", "doc", "anls", 3)


def test_score_rejects_misaligned_predictions() -> None:
    task = _task("exact_match", [Sample("q0", (_png(),), "?", ("a",)), Sample("q1", (_png(),), "?", ("b",))])
    with pytest.raises(ValueError, match="1 predictions for 2 samples"):
        score(task, ["a"])
    with pytest.raises(TypeError):
        score(task, "ab")


def test_suite_scores_average_tasks_per_half() -> None:
    img = _png()
    doc_a = _task("exact_match", [Sample("1", (img,), "?", ("a",))], "doc", "doc_a")
    doc_b = _task("exact_match", [Sample(str(i), (img,), "?", ("a",)) for i in range(4)], "doc", "doc_b")
    img_t = _task("mc_accuracy", [Sample("1", (img,), "?", ("A",), ("x", "y"))], "image", "img")
    scores = [score(doc_a, ["a"]), score(doc_b, ["a", "b", "b", "b"]), score(img_t, ["(B)"])]
    # doc: mean of task scores 1.0 and 0.25 (not of the 5 samples, which would be 0.4)
    assert suite_scores(scores) == {"doc": pytest.approx(0.625), "image": 0.0}


def test_suite_select_and_kinds() -> None:
    img = _png()
    doc = _task("anls", [Sample("1", (img,), "?", ("a",))], "doc", "d")
    image = _task("relaxed_accuracy", [Sample("1", (img,), "?", ("1",))], "image", "i")
    suite = Suite("s", (image, doc))
    assert suite.kinds() == ("doc", "image")
    assert suite.n_samples == 2
    assert [t.name for t in suite.select("image").tasks] == ["i"]
    with pytest.raises(EcoquantError, match="no 'image' tasks"):
        Suite("s", (doc,)).select("image")


def test_score_in_order_gathers_each_tasks_predictions_in_request_order() -> None:
    a = _task("exact_match", [Sample("1", (_png(),), "q", ("x",)), Sample("2", (_png(),), "q", ("y",))], name="a")
    b = _task("exact_match", [Sample("1", (_png(),), "q", ("z",))], suite="image", name="b")
    scores = score_in_order([a, a, b], ["x", "nope", "z"])
    assert [(s.task, s.score) for s in scores] == [("a", 0.5), ("b", 1.0)]
    assert scores[0].per_sample == {"1": 1.0, "2": 0.0}
    with pytest.raises(ValueError, match="1 predictions for 2 samples"):
        score_in_order([a, b], ["x", "z"])  # a task short of predictions is an error, not a prefix score
