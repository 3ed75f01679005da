"""Where suites come from: the built-in generator, local JSONL files, Hugging Face datasets.

:func:`load_suite` is what ``ecoquant eval --suite SPEC`` calls:

* ``"builtin"`` -- the generated offline suite (:mod:`ecoquant.eval.builtin`),
  both halves, basic pages and realistic documents and charts. Always
  available; the default. ``"builtin-basic"`` and ``"builtin-realistic"``
  are one part each (the trained tiny model reads the basic pages).
* ``"doc"`` -- DocVQA and InfographicVQA validation sets (ANLS) from the
  Hugging Face Hub, as lmms-eval asks them.
* ``"image"`` -- ChartQA test (relaxed accuracy), TextVQA validation (VQA
  accuracy) and AI2D test (multiple choice) from the Hub.
* a path to a ``.jsonl`` file -- local samples, schema below.

``"doc"`` and ``"image"`` never fall back to the built-in suite: a report
must not call generated invoices "DocVQA". When the Hub is unreachable they
raise one :class:`~ecoquant.errors.EcoquantError` line that names the
dataset and the offline alternatives.

JSONL schema (one JSON object per line; blank lines are skipped)::

    {"id": "q1",                      # required, unique within its task (int ok)
     "image": "imgs/page1.png",       # or "images": [...]; relative to the JSONL's folder
     "question": "What is the total?",
     "answers": ["$12.00", "12.00"],  # or "answer": "12.00"; letters when "choices" is given
     "choices": ["cat", "dog"],       # optional: a multiple-choice question (answers "A", "B", ...)
     "task": "receipts",              # optional, default: the file name without ".jsonl"
     "suite": "doc",                  # optional, "doc" or "image"; default "doc" for anls, else "image"
     "metric": "anls",                # optional, a key of METRICS; default mc_accuracy with choices, else anls
     "prompt_suffix": "...",          # optional, default from PROMPT_DEFAULTS[metric]
     "max_new_tokens": 32}            # optional, default from PROMPT_DEFAULTS[metric]

Rows with the same ``task`` form one task, in file order; its suite, metric,
prompt suffix and max-new-tokens must agree on every row. Unknown keys are an
error, so a typo ("anwsers") cannot silently drop the gold answers.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from ecoquant.errors import EcoquantError
from ecoquant.eval.builtin import DEFAULT_SIZE, SUITE_PARTS, builtin_suite

#: ``--suite`` names for one part of the built-in suite.
BUILTIN_PART_SPECS: dict[str, str] = {f"builtin-{part}": part for part in SUITE_PARTS}
from ecoquant.eval.metrics import METRICS
from ecoquant.eval.tasks import (
    CHOICE_LETTERS,
    PROMPT_DEFAULTS,
    SUITE_KINDS,
    ImageRef,
    Sample,
    Suite,
    Task,
)

# ----------------------------------------------------------------------- JSONL

_ROW_KEYS = frozenset(
    {
        "id",
        "image",
        "images",
        "question",
        "answers",
        "answer",
        "choices",
        "task",
        "suite",
        "metric",
        "prompt_suffix",
        "max_new_tokens",
    }
)
_TASK_KEYS = ("metric", "suite", "prompt_suffix", "max_new_tokens")


def _row_error(path: Path, lineno: int, what: str) -> EcoquantError:
    return EcoquantError(f"{path}:{lineno}: {what}")


def _str_list(value: Any, key: str, path: Path, lineno: int) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and value and all(isinstance(v, (str, int, float)) for v in value):
        return tuple(str(v) for v in value)
    raise _row_error(path, lineno, f'"{key}" must be a string or a non-empty list of strings')


def _parse_row(row: Any, path: Path, lineno: int) -> tuple[str, dict[str, Any], Sample]:
    """One JSONL row -> (task name, task-level settings, sample)."""
    if not isinstance(row, dict):
        raise _row_error(path, lineno, "each line must be a JSON object")
    unknown = sorted(set(row) - _ROW_KEYS)
    if unknown:
        raise _row_error(path, lineno, f"unknown keys {unknown}; allowed: {sorted(_ROW_KEYS)}")
    for key in ("id", "question"):
        if key not in row:
            raise _row_error(path, lineno, f'missing "{key}"')
    if ("image" in row) == ("images" in row):
        raise _row_error(path, lineno, 'give exactly one of "image" or "images"')
    if ("answer" in row) == ("answers" in row):
        raise _row_error(path, lineno, 'give exactly one of "answer" or "answers"')

    images: list[ImageRef] = []
    for ref in _str_list(row.get("image", row.get("images")), "images", path, lineno):
        image = Path(ref).expanduser()
        image = image if image.is_absolute() else path.parent / image
        if not image.is_file():
            raise _row_error(path, lineno, f"image not found: {image}")
        images.append(image)
    answers = _str_list(row.get("answers", row.get("answer")), "answers", path, lineno)
    choices = _str_list(row["choices"], "choices", path, lineno) if "choices" in row else None

    metric = row.get("metric", "mc_accuracy" if choices else "anls")
    if metric not in METRICS:
        raise _row_error(path, lineno, f"unknown metric {metric!r}; known: {sorted(METRICS)}")
    defaults = PROMPT_DEFAULTS[metric]
    settings = {
        "suite": row.get("suite", "doc" if metric == "anls" else "image"),
        "metric": metric,
        "prompt_suffix": row.get("prompt_suffix", defaults.prompt_suffix),
        "max_new_tokens": row.get("max_new_tokens", defaults.max_new_tokens),
    }
    if settings["suite"] not in SUITE_KINDS:
        raise _row_error(path, lineno, f'"suite" must be one of {list(SUITE_KINDS)}, got {settings["suite"]!r}')
    if not isinstance(settings["max_new_tokens"], int) or settings["max_new_tokens"] <= 0:
        raise _row_error(path, lineno, '"max_new_tokens" must be a positive integer')
    if not isinstance(row["question"], str) or not isinstance(settings["prompt_suffix"], str):
        raise _row_error(path, lineno, '"question" and "prompt_suffix" must be strings')
    try:
        sample = Sample(str(row["id"]), tuple(images), row["question"], answers, choices)
    except ValueError as exc:
        raise _row_error(path, lineno, str(exc)) from exc
    return str(row.get("task", path.stem)), settings, sample


def load_jsonl(path: Path | str) -> Suite:
    """Read a JSONL file of samples (schema in the module docstring) as a suite named after the file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise EcoquantError(f"suite file not found: {path}")
    tasks: dict[str, tuple[dict[str, Any], list[Sample]]] = {}
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise EcoquantError(f"{path} is not UTF-8 text (byte {exc.start}); a suite is JSON lines") from None
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise _row_error(path, lineno, f"invalid JSON ({exc.msg})") from exc
        name, settings, sample = _parse_row(row, path, lineno)
        first, samples = tasks.setdefault(name, (settings, []))
        for key in _TASK_KEYS:
            if settings[key] != first[key]:
                raise _row_error(
                    path,
                    lineno,
                    f"task {name!r}: {key}={settings[key]!r} differs from its first row ({first[key]!r})",
                )
        if any(s.id == sample.id for s in samples):
            raise _row_error(path, lineno, f"task {name!r}: duplicate id {sample.id!r}")
        samples.append(sample)
    if not tasks:
        raise EcoquantError(f"{path} has no samples; see docs/tasks.md for the JSONL schema")
    return Suite(
        name=path.stem,
        tasks=tuple(
            Task(name, s["suite"], s["metric"], s["prompt_suffix"], s["max_new_tokens"], tuple(samples))
            for name, (s, samples) in tasks.items()
        ),
    )


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _image_suffix(ref: ImageRef) -> str:
    if isinstance(ref, Path) and ref.suffix:
        return ref.suffix.lower()
    with Image.open(io.BytesIO(ref) if isinstance(ref, bytes) else ref) as img:
        return "." + (img.format or "png").lower()


def write_jsonl(suite: Suite, path: Path | str) -> Path:
    """Write a suite as JSONL plus an ``images/`` folder next to it; :func:`load_jsonl` reads it back.

    Useful to freeze the built-in suite, or a Hub subset, into files that
    another machine or tool can read without ecoquant's generators.
    """
    path = Path(path).expanduser()
    image_dir = path.parent / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for task in suite.tasks:
        for sample in task.samples:
            refs = []
            for k, (ref, data) in enumerate(zip(sample.images, sample.image_bytes(), strict=True)):
                name = _UNSAFE.sub("_", f"{task.name}__{sample.id}_{k}") + _image_suffix(ref)
                (image_dir / name).write_bytes(data)
                refs.append(f"images/{name}")
            row: dict[str, Any] = {
                "id": sample.id,
                "images": refs,
                "question": sample.question,
                "answers": list(sample.answers),
            }
            if sample.choices is not None:
                row["choices"] = list(sample.choices)
            row |= {
                "task": task.name,
                "suite": task.suite,
                "metric": task.metric,
                "prompt_suffix": task.prompt_suffix,
                "max_new_tokens": task.max_new_tokens,
            }
            lines.append(json.dumps(row, ensure_ascii=False))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ---------------------------------------------------------------- Hugging Face

Row = Mapping[str, Any]


@dataclass(frozen=True)
class HFTaskSpec:
    """How to read one benchmark from the Hub into a :class:`Task`.

    ``fields(row, index) -> (id, question, answers, choices)`` adapts the
    dataset's columns; the image column is always ``"image"``.
    """

    name: str
    suite: str
    metric: str
    dataset: str
    config: str | None
    split: str
    fields: Callable[[Row, int], tuple[str, str, tuple[str, ...], tuple[str, ...] | None]]


def _docvqa_fields(row: Row, index: int) -> tuple[str, str, tuple[str, ...], None]:
    return str(row["questionId"]), row["question"], tuple(row["answers"]), None


def _chartqa_fields(row: Row, index: int) -> tuple[str, str, tuple[str, ...], None]:
    # ChartQA rows carry no id; the row index within the split is stable.
    return str(index), row["question"], (str(row["answer"]),), None


def _textvqa_fields(row: Row, index: int) -> tuple[str, str, tuple[str, ...], None]:
    return str(row["question_id"]), row["question"], tuple(row["answers"]), None


def _ai2d_fields(row: Row, index: int) -> tuple[str, str, tuple[str, ...], tuple[str, ...]]:
    # "answer" is the index of the right option, as a string.
    return str(index), row["question"], (CHOICE_LETTERS[int(row["answer"])],), tuple(row["options"])


# The lmms-lab mirrors lmms-eval reads, with the splits it reports on.
HF_TASKS: Mapping[str, HFTaskSpec] = {
    "docvqa_val": HFTaskSpec("docvqa_val", "doc", "anls", "lmms-lab/DocVQA", "DocVQA", "validation", _docvqa_fields),
    # InfographicVQA is a config of the same repository, with DocVQA's columns.
    "infovqa_val": HFTaskSpec(
        "infovqa_val", "doc", "anls", "lmms-lab/DocVQA", "InfographicVQA", "validation", _docvqa_fields
    ),
    "chartqa": HFTaskSpec("chartqa", "image", "relaxed_accuracy", "lmms-lab/ChartQA", None, "test", _chartqa_fields),
    "textvqa_val": HFTaskSpec(
        "textvqa_val", "image", "vqa_accuracy", "lmms-lab/textvqa", None, "validation", _textvqa_fields
    ),
    "ai2d": HFTaskSpec("ai2d", "image", "mc_accuracy", "lmms-lab/ai2d", None, "test", _ai2d_fields),
}
HF_SUITES: Mapping[str, tuple[str, ...]] = {
    "doc": ("docvqa_val", "infovqa_val"),
    "image": ("chartqa", "textvqa_val", "ai2d"),
}


def _image_ref(value: Any) -> ImageRef:
    """An undecoded ``datasets.Image`` value ({"bytes", "path"}) as bytes or a path."""
    if isinstance(value, Mapping):
        if value.get("bytes"):
            return bytes(value["bytes"])
        if value.get("path"):
            return Path(value["path"])
    raise EcoquantError(f"unexpected image value in the dataset: {type(value).__name__}")


def load_hf_task(name: str, limit: int | None = None) -> Task:
    """Load one benchmark of :data:`HF_TASKS` (the first ``limit`` rows if given).

    Images stay encoded (``datasets.Image(decode=False)``): decoding thousands
    of pages up front would cost minutes and gigabytes before the first
    question is asked.
    """
    import datasets  # heavy import, only needed here

    if name not in HF_TASKS:
        raise EcoquantError(f"unknown Hub task {name!r}; known: {sorted(HF_TASKS)}")
    if limit is not None and limit < 1:
        raise EcoquantError(f"limit must be at least 1, got {limit}")
    spec = HF_TASKS[name]
    split = spec.split if limit is None else f"{spec.split}[:{limit}]"
    try:
        ds = datasets.load_dataset(spec.dataset, spec.config, split=split)
    except (OSError, datasets.exceptions.DatasetsError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise EcoquantError(
            f"cannot load Hugging Face dataset {spec.dataset}"
            + (f" ({spec.config})" if spec.config else "")
            + f" for task {name}: {reason}; connect to the Hub (and log in if it is gated),"
            " or use --suite builtin or a local .jsonl"
        ) from exc
    ds = ds.cast_column("image", datasets.Image(decode=False))
    d = PROMPT_DEFAULTS[spec.metric]
    samples = []
    for index, row in enumerate(ds):
        sid, question, answers, choices = spec.fields(row, index)
        samples.append(Sample(sid, (_image_ref(row["image"]),), question, answers, choices))
    return Task(spec.name, spec.suite, spec.metric, d.prompt_suffix, d.max_new_tokens, tuple(samples))  # type: ignore[arg-type]


def load_hf_suite(kind: str, limit: int | None = None) -> Suite:
    """The ``"doc"`` or ``"image"`` half from the Hub (see :data:`HF_SUITES`)."""
    return Suite(name=kind, tasks=tuple(load_hf_task(n, limit) for n in HF_SUITES[kind]))


def load_suite(
    spec: str, *, cache_dir: Path | None = None, size: int = DEFAULT_SIZE, limit: int | None = None
) -> Suite:
    """Resolve ``--suite SPEC``: ``"builtin"`` (or one part), ``"doc"``, ``"image"`` or a ``.jsonl`` path.

    ``cache_dir`` and ``size`` apply to the built-in suite, ``limit`` (samples
    per task) to the Hub suites.
    """
    if spec == "builtin":
        return builtin_suite(cache_dir, size)
    if spec in BUILTIN_PART_SPECS:
        return builtin_suite(cache_dir, size, (BUILTIN_PART_SPECS[spec],))
    if spec in HF_SUITES:
        return load_hf_suite(spec, limit)
    path = Path(spec).expanduser()
    if path.suffix == ".jsonl" or path.is_file():
        return load_jsonl(path)
    raise EcoquantError(
        f"unknown suite {spec!r}: use builtin, {', '.join(BUILTIN_PART_SPECS)}, doc, image, or a path to a .jsonl file"
    )
