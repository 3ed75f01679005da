"""Calibration data: what GPTQ and AWQ see, and exactly how it was made.

Three kinds of source, one result (a list of model-input dicts, one sample each):

* **A hub dataset** (default: the seed's Open-Platypus ``train``, 256 samples,
  2048 tokens, seed 42): records are shuffled with ``datasets``' own
  ``shuffle(seed)`` (what llmcompressor examples do), and each record becomes
  a single-turn user message under the model's chat template, truncated to
  ``max_length`` tokens. Offline, this fails with one clear line.
* **A local file**: ``.json`` / ``.jsonl`` records are treated like hub
  records; a ``.txt`` file is running text.
* **The offline corpus** (``source="corpus"``): ecoquant's shipped
  calibration novel (:func:`ecoquant.data.corpus.load_corpus`). Running text
  (the corpus and ``.txt`` files) is cut into windows of ``max_length``
  tokens, ``<bos>`` first, and ``num_samples`` windows are drawn with the seed.

``multimodal=True`` makes every other sample an image plus a question about
it, run through the model's processor (so pixel tensors and image tokens are
exactly what inference sees): chart and document images drawn by the
built-in evaluation suite's generators, at indices far from the ones the
suite itself evaluates on, so calibration never sees an evaluation image.

:meth:`CalibrationSet.describe` is the recipe's ``calibration`` block: source,
split, count, length, seed and a sha256 of every token id, so two runs can
prove they calibrated on the same data.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import jinja2
import torch

from ecoquant.errors import EcoquantError

DEFAULT_SOURCE = "garage-bAInd/Open-Platypus"
CORPUS_SOURCE = "corpus"

#: Record fields that hold the user's text, tried in order (Open-Platypus uses ``instruction``).
TEXT_FIELDS: tuple[str, ...] = ("instruction", "text", "prompt", "question", "content")

#: First image index drawn from the evaluation generators: evaluation suites use small indices.
IMAGE_INDEX_BASE = 100_000


@dataclass(frozen=True)
class CalibrationConfig:
    """Where calibration samples come from and how many.

    Attributes:
        source: a hub dataset id, a local ``.json``/``.jsonl``/``.txt`` file, or ``"corpus"``.
        split: the hub dataset split (ignored for local sources).
        num_samples: samples to draw.
        max_length: tokens per sample at most (text samples are truncated).
        seed: drives the shuffle and the window draw.
        multimodal: every other sample is an image and a question, through the processor.
        text_field: the record field holding the text (default: the first of :data:`TEXT_FIELDS`).
    """

    source: str = DEFAULT_SOURCE
    split: str = "train"
    num_samples: int = 256
    max_length: int = 2048
    seed: int = 42
    multimodal: bool = False
    text_field: str | None = None

    def __post_init__(self) -> None:
        if not self.source.strip():
            raise EcoquantError("the calibration source is empty; pass a hub dataset id, a .json/.jsonl/.txt file or corpus")
        if self.num_samples < 1:
            raise EcoquantError(f"calibration num_samples={self.num_samples} must be at least 1")
        if self.max_length < 2:
            raise EcoquantError(f"calibration max_length={self.max_length} must be at least 2 tokens")


@dataclass(frozen=True)
class CalibrationSet:
    """Tokenized calibration samples and how they were made.

    ``batches`` holds one dict of model inputs per sample (``input_ids``
    ``[1, n]``, plus pixel tensors for image samples), ready for
    :func:`ecoquant.calibrate.run.calibrate`.
    """

    batches: tuple[dict[str, torch.Tensor], ...]
    config: CalibrationConfig
    kind: str  # "hub", "records", "text", "corpus"
    chat_template: bool
    source_detail: str

    @property
    def num_tokens(self) -> int:
        """Tokens over all samples."""
        return sum(int(b["input_ids"].numel()) for b in self.batches)

    def token_hash(self) -> str:
        """sha256 over every sample's token ids (int64, little-endian), samples in order."""
        h = hashlib.sha256()
        for b in self.batches:
            ids = b["input_ids"].reshape(-1).to(torch.int64)
            h.update(len(ids).to_bytes(8, "little"))
            h.update(ids.numpy().astype("<i8").tobytes())
        return h.hexdigest()

    def describe(self) -> dict[str, Any]:
        """The recipe's calibration block."""
        images = sum(1 for b in self.batches if "pixel_values" in b)
        lengths = [int(b["input_ids"].shape[-1]) for b in self.batches]
        return {
            "source": self.config.source,
            "kind": self.kind,
            "detail": self.source_detail,
            "split": self.config.split if self.kind == "hub" else None,
            "num_samples": len(self.batches),
            "requested_samples": self.config.num_samples,
            "max_length": self.config.max_length,
            "tokens": self.num_tokens,
            "min_length": min(lengths),
            "max_sample_length": max(lengths),
            "seed": self.config.seed,
            "chat_template": self.chat_template,
            "multimodal": self.config.multimodal,
            "image_samples": images,
            "token_ids_sha256": self.token_hash(),
        }


# --- Text sources ----------------------------------------------------------------------------


def _record_text(record: Any, field: str | None) -> str:
    """The user text of one record: a string, or a dict field (``input`` appended when present)."""
    if isinstance(record, str):
        return record
    if not isinstance(record, dict):
        raise EcoquantError(f"calibration record {str(record)[:60]!r} is neither text nor an object")
    names = (field,) if field else TEXT_FIELDS
    for name in names:
        value = record.get(name)
        if isinstance(value, str) and value.strip():
            extra = record.get("input")
            # Open-Platypus / Alpaca style: an optional "input" completes the instruction.
            if name == "instruction" and isinstance(extra, str) and extra.strip():
                return f"{value}\n\n{extra}"
            return value
    raise EcoquantError(
        f"calibration record has none of the fields {list(names)} (keys: {sorted(record)[:8]}); "
        "set CalibrationConfig.text_field in Python (the CLI reads instruction, text, prompt, question or content)"
    )


def _read_records(path: Path) -> list[Any]:
    """Records of a local .json (a list, or an object with a list under "data") or .jsonl file."""
    try:
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EcoquantError(f"{path} is not valid JSON: {exc}") from None
    if isinstance(doc, dict) and isinstance(doc.get("data"), list):
        doc = doc["data"]
    if not isinstance(doc, list):
        raise EcoquantError(f"{path} must hold a list of records (or {{\"data\": [...]}})")
    return doc


def _hub_reachable(endpoint: str, timeout: float = 3.0) -> bool:
    """Whether ``endpoint``'s host accepts a TCP connection within ``timeout`` seconds.

    ``datasets`` retries an unreachable hub with back-off for about 30 s and
    prints every retry; one quick connection attempt first lets an offline
    machine fall back to the shipped corpus at once.
    """
    import socket
    from urllib.parse import urlsplit

    url = urlsplit(endpoint)
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


def _hub_records(config: CalibrationConfig) -> list[Any]:
    """``num_samples`` records of a hub dataset, shuffled by ``datasets`` with the seed.

    With ``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE`` set, ``datasets`` reads its
    local cache only; otherwise an unreachable hub fails at once.
    """
    offline = any(os.environ.get(name, "") not in ("", "0") for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    if not offline and not _hub_reachable(endpoint):
        why = f"{endpoint} is unreachable"
    else:
        try:
            import datasets

            ds = datasets.load_dataset(config.source, split=config.split)
            ds = ds.shuffle(seed=config.seed)
            return [ds[i] for i in range(min(config.num_samples, len(ds)))]
        except Exception as exc:  # the hub raises many classes; all mean "not available here"
            why = "offline mode, not in the local cache" if offline else type(exc).__name__
    raise EcoquantError(
        f"cannot load calibration dataset {config.source!r} ({config.split}) from the Hugging Face hub ({why}); "
        "pass a local .json/.jsonl/.txt file or --calib corpus"
    )


def _user_message_ids(tokenizer: Any, text: str, max_length: int) -> tuple[list[int], bool]:
    """Token ids of ``text`` as a single-turn user message (chat template when the tokenizer has one)."""
    if getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False)
        ids = tokenizer(rendered, add_special_tokens=False, truncation=True, max_length=max_length)["input_ids"]
        return list(ids), True
    ids = tokenizer(text, add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"]
    return list(ids), False


def _windows(tokenizer: Any, texts: Sequence[str], config: CalibrationConfig) -> list[list[int]]:
    """``num_samples`` windows of running text, ``<bos>`` first, drawn with the seed.

    Each text is cut into consecutive windows of ``max_length - 1`` tokens (a
    tail shorter than half a window is dropped), so samples never overlap.
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    body = config.max_length - (1 if bos is not None else 0)
    windows: list[list[int]] = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids), body):
            piece = ids[start : start + body]
            if len(piece) >= max(1, body // 2):
                windows.append(([bos] if bos is not None else []) + list(piece))
    if not windows:
        raise EcoquantError("the calibration text is too short for even one sample; lower --calib-length")
    random.Random(config.seed).shuffle(windows)
    return windows[: config.num_samples]


# --- Images ------------------------------------------------------------------------------------


def calibration_images(count: int, seed: int) -> list[tuple[Any, str]]:
    """``count`` (PIL image, question) pairs: charts and documents from the evaluation generators.

    Indices start at :data:`IMAGE_INDEX_BASE` (plus a seed-dependent offset),
    far from the small indices evaluation suites use.
    """
    from PIL import Image

    from ecoquant.eval.builtin.charts import CHART_MAKERS, render_chart
    from ecoquant.eval.builtin.documents import DOCUMENT_MAKERS, render_document

    makers: list[tuple[Any, Any, bool]] = [(m, render_chart, False) for m in CHART_MAKERS.values()]
    makers += [(m, render_document, True) for m in DOCUMENT_MAKERS.values()]
    out: list[tuple[Any, str]] = []
    base = IMAGE_INDEX_BASE + 1000 * (seed % 1000)
    for k in range(count):
        make, render, is_doc = makers[k % len(makers)]
        index = base + k // len(makers)
        spec = make(index, 1) if is_doc else make(index)
        image = Image.open(io.BytesIO(render(spec))).convert("RGB")
        out.append((image, spec.questions[0].question))
    return out


def _image_sample(processor: Any, image: Any, question: str) -> dict[str, torch.Tensor]:
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]
    enc = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    return {k: v for k, v in enc.items() if isinstance(v, torch.Tensor)}


# --- Putting it together -----------------------------------------------------------------------


def _tokenizer_for(model: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model)
    except (OSError, ValueError) as exc:
        raise EcoquantError(f"cannot load a tokenizer from {model}: {str(exc).splitlines()[0]}") from None


def _processor_for(model: Path) -> Any:
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(model)
    except (OSError, ValueError) as exc:
        why = str(exc).splitlines()[0]
        raise EcoquantError(f"multimodal calibration needs a processor in {model}: {why}") from None
    if not hasattr(processor, "image_processor"):
        raise EcoquantError(f"{model} has no image processor; multimodal calibration needs one (or drop --calib-multimodal)")
    return processor


def load_calibration(
    model: Path, config: CalibrationConfig = CalibrationConfig(), tokenizer: Any = None, processor: Any = None
) -> CalibrationSet:
    """Build the calibration samples for ``model`` (its tokenizer, and processor when multimodal).

    Raises:
        EcoquantError: unreachable hub dataset, unreadable local file, missing tokenizer or processor.
    """
    n_images = config.num_samples // 2 if config.multimodal else 0
    n_text = config.num_samples - n_images
    text_config = CalibrationConfig(**{**asdict(config), "num_samples": n_text})
    if tokenizer is None:
        tokenizer = getattr(processor, "tokenizer", None) or _tokenizer_for(model)

    source = Path(config.source).expanduser()
    templated = False
    if config.source == CORPUS_SOURCE:
        from ecoquant.data.corpus import load_corpus

        corpus = load_corpus()
        ids_list = _windows(tokenizer, corpus.calibration, text_config)
        kind, detail = "corpus", f"ecoquant corpus, calibration part (sha256 {corpus.sha256['calibration'][:16]})"
    elif source.suffix == ".txt" or (source.exists() and source.suffix not in (".json", ".jsonl")):
        if not source.is_file():
            raise EcoquantError(f"calibration file {source} does not exist")
        ids_list = _windows(tokenizer, [source.read_text(encoding="utf-8")], text_config)
        kind, detail = "text", str(source)
    elif source.suffix in (".json", ".jsonl"):
        if not source.is_file():
            raise EcoquantError(f"calibration file {source} does not exist")
        records = _read_records(source)
        order = list(range(len(records)))
        random.Random(config.seed).shuffle(order)
        ids_list, templated = _records_to_ids(tokenizer, [records[i] for i in order[:n_text]], text_config)
        kind, detail = "records", str(source)
    else:
        records = _hub_records(text_config)
        ids_list, templated = _records_to_ids(tokenizer, records, text_config)
        kind, detail = "hub", f"{config.source}:{config.split}"

    texts = [{"input_ids": torch.tensor([ids], dtype=torch.long)} for ids in ids_list if ids]
    batches: list[dict[str, torch.Tensor]] = list(texts)
    if n_images:
        processor = processor or _processor_for(model)
        images = [_image_sample(processor, img, q) for img, q in calibration_images(n_images, config.seed)]
        # Interleave: image samples at odd positions, so a truncated run still sees both kinds.
        batches = []
        for k in range(max(len(texts), len(images))):
            batches.extend(texts[k : k + 1])
            batches.extend(images[k : k + 1])
    if not batches:
        raise EcoquantError(f"calibration source {config.source!r} produced no samples")
    return CalibrationSet(tuple(batches), config, kind, templated, detail)


def _records_to_ids(tokenizer: Any, records: Sequence[Any], config: CalibrationConfig) -> tuple[list[list[int]], bool]:
    """Each record as a single-turn user message, truncated to ``max_length``."""
    out: list[list[int]] = []
    templated = False
    for record in records:
        if isinstance(record, dict) and isinstance(record.get("messages"), list):
            if not record["messages"]:
                raise EcoquantError("a calibration record has an empty 'messages' list: give each at least one turn")
            if not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in record["messages"]):
                raise EcoquantError("a calibration record's 'messages' must be objects with a 'role' and a 'content'")
            try:
                ids = tokenizer.apply_chat_template(record["messages"], tokenize=True, truncation=True,
                                                    max_length=config.max_length)
            except (TypeError, ValueError, KeyError, IndexError, AttributeError, jinja2.TemplateError) as exc:
                first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise EcoquantError(f"a calibration record's 'messages' cannot be rendered by the chat template ({first})") from None
            ids = ids["input_ids"] if isinstance(ids, dict) else ids
            out.append(list(ids)[: config.max_length])
            templated = True
            continue
        ids, used = _user_message_ids(tokenizer, _record_text(record, config.text_field), config.max_length)
        out.append(ids)
        templated = templated or used
    return out, templated


# ------------------------------------------------------------------ calibration data that would mislead

DOMINANT_SHARE = 0.5
"""One token id making up more than half of the calibration tokens: the inputs are close to constant."""
UNKNOWN_SHARE = 0.1
"""More than a tenth unknown tokens: the tokenizer does not cover the text (a wrong tokenizer or language)."""


def token_warnings(ids: torch.Tensor, unk_id: int | None) -> list[str]:
    """Why these calibration token ids would mislead GPTQ/AWQ, one sentence each (empty when they look like text).

    GPTQ and AWQ fit the statistics of their inputs; on a constant-like input
    they fit that constant and can end up no closer to the base than RTN, with
    no error anywhere. Three signs, each a threshold with its reason:
    :data:`DOMINANT_SHARE`, :data:`UNKNOWN_SHARE`, and a vocabulary far below
    what text of that length has (natural text of N tokens uses on the order
    of sqrt(N) x a few distinct ids or more, Heaps' law; fewer than 2 sqrt(N)
    is a sign of repeated or padded data).
    """
    flat = ids.reshape(-1)
    n = int(flat.numel())
    if n == 0:
        return ["the calibration set holds no tokens"]
    values, counts = torch.unique(flat, return_counts=True)
    out = []
    top = int(counts.max())
    if top / n > DOMINANT_SHARE:
        out.append(f"token id {int(values[counts.argmax()])} is {top / n:.0%} of the {n} calibration tokens")
    if unk_id is not None:
        unk = int(counts[values == unk_id].sum())
        if unk / n > UNKNOWN_SHARE:
            out.append(f"{unk / n:.0%} of the calibration tokens are the unknown token (does this tokenizer read the data?)")
    distinct = int(values.numel())
    if n >= 256 and distinct < 2 * n**0.5:
        out.append(f"only {distinct} distinct ids in {n} calibration tokens (repeated or padded data?)")
    return out


def calibration_warnings(calib: CalibrationSet, unk_id: int | None) -> list[str]:
    """:func:`token_warnings` over every sample of a calibration set, phrased for the user."""
    ids = torch.cat([b["input_ids"].reshape(-1) for b in calib.batches]) if calib.batches else torch.empty(0, dtype=torch.long)
    found = token_warnings(ids, unk_id)
    return [f"calibration data looks degenerate: {w}; GPTQ/AWQ would fit it and may end no better than RTN" for w in found]
