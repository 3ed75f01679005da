"""The built-in offline suite: generated documents and charts, cached as PNG files.

It is the default suite of ``ecoquant eval`` and the test data of the project,
so it must run anywhere (no network), quickly (a tiny model on CPU), and give
the same images and questions every time. It has two parts:

* ``basic``: large printed fields, simple bar charts and shapes that a tiny
  model can learn on a CPU (:mod:`ecoquant.eval.builtin.basic`; six tasks,
  ``size`` evaluation pages each, one question per page). The project's
  trained tiny model (``ecoquant fixtures tiny-vlm``) reads these.
* ``realistic``: invoices, receipts, forms and charts as a real model meets
  them; with the default ``size=2`` they are 24 samples in three tasks:

========================  =====  ================  =======
task                      suite  metric            samples
========================  =====  ================  =======
``builtin_documents``     doc    anls              12 (2 invoices, 2 receipts, 2 forms x 2 questions)
``builtin_charts``        image  relaxed_accuracy   8 (2 bar + 2 line charts x 2 questions)
``builtin_chart_choice``  image  mc_accuracy        4 (1 per chart)
========================  =====  ================  =======

``--suite builtin`` is both parts, ``builtin-basic`` and ``builtin-realistic``
one each. ``size=n`` takes ``n`` pages of each basic kind and document kind
and ``n`` charts of each chart kind. Page ``i`` of a kind is the same whatever
``size`` is, so larger suites extend smaller ones and share their cached images.

Images are written to ``<cache_dir>/builtin-v{GENERATOR_VERSION}/<id>.png``
(basic pages: ``<cache_dir>/basic-v{BASIC_VERSION}/``)
with a ``manifest.json`` of their SHA-256; a later call reuses a file only if
its hash matches the manifest, so a truncated or edited file is re-rendered.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

from ecoquant.errors import EcoquantError
from ecoquant.eval.builtin.basic import BASIC_KINDS, basic_task, page_samples
from ecoquant.eval.builtin.charts import CHART_MAKERS, ChartSpec, render_chart
from ecoquant.eval.builtin.documents import (
    DOCUMENT_MAKERS,
    DocumentSpec,
    render_document,
)
from ecoquant.eval.tasks import PROMPT_DEFAULTS, Sample, Suite, Task

GENERATOR_VERSION = 1
"""Bump when a generator or renderer changes what it draws: it names the cache folder."""

BASIC_VERSION = 1
"""Bump when a basic page generator changes what it draws: it names the basic pages' cache folder."""

DEFAULT_SIZE = 2
SUITE_PARTS: tuple[str, ...] = ("basic", "realistic")
"""The parts of the built-in suite, in suite order (see the module docstring)."""
QUESTIONS_PER_DOCUMENT = 2


def default_cache_dir() -> Path:
    """``$ECOQUANT_CACHE_DIR``, else ``$XDG_CACHE_HOME/ecoquant``, else ``~/.cache/ecoquant``."""
    if env := os.environ.get("ECOQUANT_CACHE_DIR"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(base).expanduser() / "ecoquant"


def builtin_specs(size: int = DEFAULT_SIZE) -> tuple[tuple[DocumentSpec, ...], tuple[ChartSpec, ...]]:
    """The documents and charts of a suite of this size (data only, nothing drawn)."""
    if size < 1:
        raise EcoquantError(f"builtin suite size must be at least 1, got {size}")
    docs = tuple(make(i, QUESTIONS_PER_DOCUMENT) for make in DOCUMENT_MAKERS.values() for i in range(size))
    charts = tuple(make(i) for make in CHART_MAKERS.values() for i in range(size))
    return docs, charts


class _ImageCache:
    """PNG files in one folder, trusted only when their hash matches the manifest."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.manifest_path = folder / "manifest.json"
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise EcoquantError(
                f"cannot create the builtin image cache {folder} ({exc.strerror}); pass cache_dir or set ECOQUANT_CACHE_DIR"
            ) from exc
        self.hashes: dict[str, str] = {}
        if self.manifest_path.is_file():
            try:
                self.hashes = dict(json.loads(self.manifest_path.read_text()))
            except (json.JSONDecodeError, TypeError, ValueError):
                self.hashes = {}  # a damaged manifest only costs a re-render
        self.dirty = False

    def path(self, name: str, render: Callable[[], bytes]) -> Path:
        path = self.folder / name
        expected = self.hashes.get(name)
        if expected is not None and path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == expected:
            return path
        data = render()
        _write_atomic(path, data)
        self.hashes[name] = hashlib.sha256(data).hexdigest()
        self.dirty = True
        return path

    def save(self) -> None:
        if self.dirty:
            _write_atomic(self.manifest_path, json.dumps(self.hashes, indent=1, sort_keys=True).encode())


def _write_atomic(path: Path, data: bytes) -> None:
    # Write then rename, so a concurrent run never reads a half-written file.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as exc:
        raise EcoquantError(
            f"cannot write {path} ({exc.strerror}); pass another cache_dir or set ECOQUANT_CACHE_DIR"
        ) from exc


def builtin_suite(
    cache_dir: Path | None = None, size: int = DEFAULT_SIZE, parts: tuple[str, ...] = SUITE_PARTS
) -> Suite:
    """Generate (or reuse from ``cache_dir``) the built-in suite, or some of its parts; see the module docstring.

    ``cache_dir`` defaults to :func:`default_cache_dir`. Samples refer to the
    cached PNG files by path.
    """
    unknown = [p for p in parts if p not in SUITE_PARTS]
    if unknown or not parts:
        raise EcoquantError(f"unknown built-in suite part {unknown or parts}; use {' or '.join(SUITE_PARTS)}")
    if size < 1:
        raise EcoquantError(f"builtin suite size must be at least 1, got {size}")
    root = Path(cache_dir or default_cache_dir())
    tasks: list[Task] = []
    if "basic" in parts:
        tasks += _basic_tasks(root, size)
    if "realistic" in parts:
        tasks += _realistic_tasks(root, size)
    name = "builtin" if set(parts) == set(SUITE_PARTS) else f"builtin-{parts[0]}"
    return Suite(name=name, tasks=tuple(tasks))


def _basic_tasks(root: Path, size: int) -> list[Task]:
    """``size`` evaluation pages of each basic kind, one task per kind."""
    cache = _ImageCache(root / f"basic-v{BASIC_VERSION}")
    tasks = []
    for kind in BASIC_KINDS:
        samples = []
        for i in range(size):
            page = kind.make("eval", i)
            samples += page_samples(page, cache.path(f"{page.id}.png", page.png))
        tasks.append(basic_task(kind, samples))
    cache.save()
    return tasks


def _realistic_tasks(root: Path, size: int) -> list[Task]:
    """The invoices, receipts, forms and charts."""
    docs, charts = builtin_specs(size)
    cache = _ImageCache(root / f"builtin-v{GENERATOR_VERSION}")

    doc_samples = []
    for doc in docs:
        image = cache.path(f"{doc.id}.png", functools.partial(render_document, doc))
        for k, q in enumerate(doc.questions):
            doc_samples.append(Sample(f"{doc.id}-q{k}", (image,), q.question, q.answers))

    chart_samples, choice_samples = [], []
    for chart in charts:
        image = cache.path(f"{chart.id}.png", functools.partial(render_chart, chart))
        for k, q in enumerate(chart.questions):
            chart_samples.append(Sample(f"{chart.id}-q{k}", (image,), q.question, q.answers))
        for k, c in enumerate(chart.choice_questions):
            choice_samples.append(Sample(f"{chart.id}-mc{k}", (image,), c.question, (c.answer,), c.choices))
    cache.save()

    def task(name: str, suite: str, metric: str, samples: list[Sample]) -> Task:
        d = PROMPT_DEFAULTS[metric]
        return Task(name, suite, metric, d.prompt_suffix, d.max_new_tokens, tuple(samples))  # type: ignore[arg-type]

    return [
        task("builtin_documents", "doc", "anls", doc_samples),
        task("builtin_charts", "image", "relaxed_accuracy", chart_samples),
        task("builtin_chart_choice", "image", "mc_accuracy", choice_samples),
    ]
