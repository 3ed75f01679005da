"""One quality yardstick for every method: perplexity, KL to the base, top-1 agreement.

:func:`compare` loads a base model and its variants (bf16 folders or
compressed-tensors checkpoints, which transformers decompresses on load) and
measures, on the same inputs:

* **text**: an evaluation text of the shipped corpus, chosen by name
  (``QualityConfig.text``: ``"austen"``, *Persuasion* 1-8, the default, or
  ``"sqlite"``, SQLite's documentation, out of the calibration novel's domain;
  see :data:`ecoquant.data.corpus.EVALUATION_TEXTS`), cut into whole, non-overlapping
  windows of ``window_tokens`` tokens, each fed as ``<bos>`` + text and every
  text token scored once (see :func:`~ecoquant.quality.perplexity.window_inputs`);
* **image_text** (when images are given): each image with its prompt in the
  base's chat template, followed by the *base's own* greedy answer; every
  model is teacher-forced on that same sequence and scored at the text
  positions that can see the image, so the numbers say how faithfully a
  variant follows the base on multimodal input.

Per window, the base's logits are computed once and every variant is compared
to them before the next window, so memory holds one window of logits per
model, never all windows. All models stay loaded for the whole run: memory is
the sum of their sizes (fine for int4 variants of a model that fits once).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ecoquant.data.corpus import EVALUATION_TEXTS, load_corpus
from ecoquant.errors import EcoquantError
from ecoquant.quality.divergence import kl_divergence, top1_agreement
from ecoquant.quality.perplexity import IGNORE, perplexity, token_nll, window_inputs, window_starts

DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

#: Config attributes naming the placeholder tokens that a processor expands into image/audio/video
#: embeddings. Their positions carry no text to predict, so they are never scored.
PLACEHOLDER_TOKEN_ATTRS: tuple[str, ...] = (
    "image_token_id",
    "image_token_index",  # older configs (Gemma-3, LLaVA) use *_index
    "video_token_id",
    "audio_token_id",
)

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class ImagePrompt:
    """One image and the text asked about it."""

    image: Path
    text: str = "Describe this image."


@dataclass(frozen=True)
class QualityConfig:
    """What :func:`compare` measures and how."""

    window_tokens: int = 512
    max_windows: int | None = None  # None: every whole window of the evaluation text; 0: skip the text part
    images: tuple[ImagePrompt, ...] = ()
    answer_tokens: int = 32  # length of the base's greedy answer appended to each image prompt
    dtype: str = "bfloat16"
    device: str = "auto"  # "auto": cuda when available, else cpu
    text: str = "austen"  # the evaluation text, a key of EVALUATION_TEXTS

    def __post_init__(self) -> None:
        if self.window_tokens < 2:
            raise EcoquantError(f"window_tokens must be at least 2, got {self.window_tokens}")
        if self.max_windows is not None and self.max_windows < 0:
            raise EcoquantError(f"max_windows must be >= 0, got {self.max_windows}")
        if self.answer_tokens < 0:
            raise EcoquantError(f"answer_tokens must be >= 0, got {self.answer_tokens}")
        if self.dtype not in DTYPES:
            raise EcoquantError(f"dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.text not in EVALUATION_TEXTS:
            raise EcoquantError(f"evaluation text {self.text!r} is not one of {', '.join(EVALUATION_TEXTS)}")
        if self.max_windows == 0 and not self.images:
            raise EcoquantError("nothing to measure: max_windows is 0 and no images were given")

    def resolved_device(self) -> torch.device:
        """The device models run on."""
        from ecoquant.devices import cuda_devices, resolve_device

        return torch.device(resolve_device(self.device, cuda_devices()))


@dataclass(frozen=True)
class EvalBatch:
    """One sequence: the model's keyword inputs and the label scored at each position (or ``IGNORE``)."""

    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor  # (1, seq)


@dataclass(frozen=True)
class ModelScore:
    """One model's numbers on one part; for the base, KL is 0 and agreement 1 by definition."""

    model: str
    perplexity: float
    mean_nll: float
    perplexity_ratio: float  # this model's perplexity / the base's (1.0 for the base; lower is better)
    kl_mean: float  # mean over scored positions of KL(base ‖ this), nats
    top1_agreement: float  # fraction of scored positions where argmax equals the base's
    n_tokens: int


@dataclass(frozen=True)
class PartReport:
    """All models on one set of inputs."""

    name: str
    description: str
    n_sequences: int
    n_tokens: int
    base: ModelScore
    variants: tuple[ModelScore, ...]


@dataclass(frozen=True)
class QualityReport:
    """Result of :func:`compare`, with what it was measured on."""

    base: str
    variants: tuple[str, ...]
    parts: tuple[PartReport, ...]
    corpus_source: str
    corpus_sha256: dict[str, str]
    config: QualityConfig
    device: str = ""

    def part(self, name: str) -> PartReport:
        """The part called ``name`` (``"text"`` or ``"image_text"``)."""
        for p in self.parts:
            if p.name == name:
                return p
        raise KeyError(f"no part {name!r}; have {[p.name for p in self.parts]}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data (paths as strings)."""
        return json.loads(json.dumps(asdict(self), default=str))


class _Tally:
    """Running sums for one model on one part."""

    def __init__(self) -> None:
        self.nll = 0.0
        self.kl = 0.0
        self.agree = 0
        self.n = 0

    def score(self, name: str, base_ppl: float | None) -> ModelScore:
        if self.n == 0:
            raise EcoquantError("no scored tokens: the inputs are shorter than one window")
        ppl = perplexity(self.nll, self.n)
        return ModelScore(
            model=name,
            perplexity=ppl,
            mean_nll=self.nll / self.n,
            perplexity_ratio=1.0 if base_ppl is None else ppl / base_ppl,
            kl_mean=self.kl / self.n,
            top1_agreement=self.agree / self.n if base_ppl is not None else 1.0,
            n_tokens=self.n,
        )


def _logits(model: nn.Module, batch: EvalBatch, device: torch.device) -> torch.Tensor:
    inputs = {k: v.to(device) for k, v in batch.inputs.items()}
    with torch.inference_mode():
        return model(**inputs, use_cache=False).logits[0]


def score_part(
    name: str,
    description: str,
    base: tuple[str, nn.Module],
    variants: Sequence[tuple[str, nn.Module]],
    batches: Sequence[EvalBatch],
    device: torch.device,
    progress: Progress | None = None,
) -> PartReport:
    """Run base and variants on every batch, base logits once per batch, and total the scores."""
    base_tally, tallies = _Tally(), [_Tally() for _ in variants]
    for i, batch in enumerate(batches):
        labels = batch.labels[0].to(device)
        scored = labels != IGNORE
        base_logits = _logits(base[1], batch, device)
        base_tally.nll += token_nll(base_logits, labels).sum().item()
        base_tally.n += int(scored.sum())
        base_scored = base_logits[scored]
        del base_logits
        for (vname, model), tally in zip(variants, tallies):
            v_logits = _logits(model, batch, device)
            if v_logits.shape[-1] != base_scored.shape[-1]:
                raise EcoquantError(
                    f"{vname} predicts over {v_logits.shape[-1]} tokens but the base over {base_scored.shape[-1]}; "
                    "a variant must share the base's vocabulary"
                )
            tally.nll += token_nll(v_logits, labels).sum().item()
            v_scored = v_logits[scored]
            del v_logits
            tally.kl += kl_divergence(base_scored, v_scored).sum().item()
            tally.agree += int(top1_agreement(base_scored, v_scored).sum())
            tally.n += int(scored.sum())
        if progress is not None:
            progress(i + 1, len(batches))
    base_score = base_tally.score(base[0], None)
    return PartReport(
        name=name,
        description=description,
        n_sequences=len(batches),
        n_tokens=base_tally.n,
        base=base_score,
        variants=tuple(t.score(n, base_score.perplexity) for (n, _), t in zip(variants, tallies)),
    )


def text_batches(text_ids: torch.Tensor, window: int, max_windows: int | None, bos_id: int | None) -> list[EvalBatch]:
    """The evaluation windows of a tokenized text (see :func:`window_inputs`)."""
    batches = []
    for start in window_starts(len(text_ids), window, max_windows):
        input_ids, labels = window_inputs(text_ids, start, window, bos_id)
        batches.append(EvalBatch({"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}, labels))
    return batches


def placeholder_ids(config: Any) -> frozenset[int]:
    """Ids of the image/video/audio placeholder tokens named in a (possibly nested) config."""
    found: set[int] = set()
    for attr in PLACEHOLDER_TOKEN_ATTRS:
        value = getattr(config, attr, None)
        if isinstance(value, int):
            found.add(value)
    return frozenset(found)


def multimodal_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor, placeholders: frozenset[int]) -> torch.Tensor:
    """Labels that score text-to-text predictions from the first placeholder on.

    Positions before the first image cannot see it (the text part covers plain
    text); placeholder positions hold image embeddings, not text to predict.
    """
    ids = input_ids[0]
    labels = torch.full_like(ids, IGNORE)
    is_ph = torch.zeros_like(ids, dtype=torch.bool)
    for p in placeholders:
        is_ph |= ids == p
    first = int(is_ph.nonzero()[0]) if bool(is_ph.any()) else 0
    valid = attention_mask[0].bool()
    for t in range(first, len(ids) - 1):
        if not is_ph[t] and not is_ph[t + 1] and valid[t] and valid[t + 1]:
            labels[t] = ids[t + 1]
    return labels.unsqueeze(0)


def image_batches(
    processor: Any, base_model: nn.Module, prompts: Sequence[ImagePrompt], answer_tokens: int, device: torch.device
) -> list[EvalBatch]:
    """Each image prompt in the chat template plus the base's greedy answer, ready to teacher-force."""
    from PIL import Image

    placeholders = placeholder_ids(base_model.config)
    if not placeholders:
        raise EcoquantError("the base model's config names no image token; --image needs an image-text model")
    batches = []
    for prompt in prompts:
        try:
            image = Image.open(prompt.image).convert("RGB")
        except (OSError, ValueError) as exc:
            raise EcoquantError(f"cannot read image {prompt.image}: {exc}") from None
        messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": prompt.text}]}]
        inputs = processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        )
        inputs = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        if answer_tokens > 0:
            with torch.inference_mode():
                out = base_model.generate(
                    **{k: v.to(device) for k, v in inputs.items()}, max_new_tokens=answer_tokens, do_sample=False
                )
            answer = out[:, inputs["input_ids"].shape[1] :].cpu()
            inputs = _append_tokens(inputs, answer)
        labels = multimodal_labels(inputs["input_ids"], inputs["attention_mask"], placeholders)
        batches.append(EvalBatch(inputs, labels))
    return batches


def _append_tokens(inputs: dict[str, torch.Tensor], tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """Extend the per-token inputs (ids, mask, token-type ids) by ``tokens``, which are plain text."""
    n = inputs["input_ids"].shape[1]
    out = dict(inputs)
    out["input_ids"] = torch.cat([inputs["input_ids"], tokens], dim=1)
    for key, value in inputs.items():
        if key == "input_ids" or value.dim() != 2 or value.shape[1] != n:
            continue
        fill = 1 if key == "attention_mask" else 0  # token-type ids: 0 marks text
        out[key] = torch.cat([value, value.new_full(tokens.shape, fill)], dim=1)
    return out


def _vocab_size(model: nn.Module) -> int:
    return int(model.config.get_text_config().vocab_size)  # type: ignore[union-attr, operator]


def load_for_eval(path: Path, dtype: str, device: torch.device) -> nn.Module:
    """A model folder loaded by the transformers class its config names, in eval mode on ``device``."""
    from ecoquant.models.dense import decompress_now, loadable
    from ecoquant.models.loading import load_config, model_class, resolve_model

    folder = resolve_model(path)
    config = load_config(folder)
    cls: Any = model_class(config)
    with loadable(Path(folder)) as (where, kwargs):  # a dense copy where transformers would misread the schemes
        model = decompress_now(cls.from_pretrained(where, dtype=DTYPES[dtype], **kwargs))
    return model.to(device).eval()


def compare(
    base: Path, variants: Sequence[Path], cfg: QualityConfig, progress: Progress | None = None
) -> QualityReport:
    """Measure ``variants`` against ``base`` on the evaluation text ``cfg.text`` (and images, if any).

    Raises:
        EcoquantError: a model folder is missing or unreadable, a variant's vocabulary differs, or
            images were given for a text-only model.
    """
    from ecoquant.models.loading import resolve_model

    device = cfg.resolved_device()
    corpus = load_corpus(evaluation=EVALUATION_TEXTS[cfg.text])
    base_dir = resolve_model(base)
    base_model = load_for_eval(base_dir, cfg.dtype, device)
    if cfg.images and not placeholder_ids(base_model.config):
        raise EcoquantError(f"{base} is a text-only model (its config names no image token); --image needs an image-text model")
    loaded = [(str(v), load_for_eval(v, cfg.dtype, device)) for v in variants]
    base_vocab = _vocab_size(base_model)
    for name, model in loaded:
        if _vocab_size(model) != base_vocab:
            raise EcoquantError(
                f"{name} has a vocabulary of {_vocab_size(model)} tokens, the base {base_vocab}; "
                "a variant must be the same model as the base, compressed"
            )
    parts: list[PartReport] = []

    if cfg.max_windows != 0:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(base_dir)
        ids = torch.tensor(tokenizer(corpus.evaluation_text, add_special_tokens=False)["input_ids"])
        batches = text_batches(ids, cfg.window_tokens, cfg.max_windows, tokenizer.bos_token_id)
        if not batches:
            raise EcoquantError(f"the evaluation text ({len(ids)} tokens) is shorter than one window of {cfg.window_tokens}")
        description = (
            f"{len(batches)} non-overlapping windows of {cfg.window_tokens} tokens (<bos> + text, every text "
            f"token scored once) from {corpus.source.split('; ')[1]}"
        )
        parts.append(score_part("text", description, (str(base), base_model), loaded, batches, device, progress))

    if cfg.images:
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(base_dir)
        batches = image_batches(processor, base_model, cfg.images, cfg.answer_tokens, device)
        description = (
            f"{len(batches)} image prompts + the base's {cfg.answer_tokens}-token greedy answer, scored at text "
            "positions that see the image"
        )
        parts.append(score_part("image_text", description, (str(base), base_model), loaded, batches, device, progress))

    return QualityReport(
        base=str(base),
        variants=tuple(str(v) for v in variants),
        parts=tuple(parts),
        corpus_source=corpus.source,
        corpus_sha256=corpus.sha256,
        config=cfg,
        device=str(device),
    )


def write_json(report: QualityReport, path: Path) -> None:
    """Write the report as indented JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
