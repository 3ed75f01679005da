"""The modelled energy of an evaluated run: its recorded token counts through the roofline of a target GPU.

The glue between an evaluation's record and :mod:`ecoquant.energy.roofline`:
each request's prompt split into text tokens, image soft tokens and images,
and the checkpoint's cost terms (read from its folder once per process). A
run whose model is not a local folder (a served name), whose family ecoquant
cannot model, or whose token split was not recorded (a ``results.json`` from
before the split existed) gets no modelled energy: ``None``, never a guess.

How the split is counted: images from the request itself; image soft tokens
as the transformers backend tokenized them (the processor's image token), or,
where the backend only reports the prompt total (OpenAI-compatible servers),
as images x the image budget (``--max-soft-tokens``, else the checkpoint's
default) -- an upper bound, since an image whose aspect ratio fills fewer
patches becomes fewer soft tokens; text tokens are the rest of the prompt.

A run with an MTP assistant (its ``speculative`` record: assistant,
``num_speculative_tokens``, ``mean_accepted_per_step``, ...) is modelled with
speculative decoding: the assistant's cost terms from its folder's
``config.json`` (a hub id is looked up in the local Hugging Face cache only,
never downloaded), the acceptance as measured, or
:data:`~ecoquant.energy.speculative.ASSUMED_MEAN_ACCEPTED_PER_STEP` where the
record has none, in which case the modelled record says ``"acceptance":
"assumed"``. An assistant whose folder cannot be found, or a record the
roofline cannot read (k below 1, more accepted drafts per step than k), gives
no modelled energy: a figure without the lever the run used would be wrong.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

from ecoquant.energy.costs import FAMILIES, CostTerms, checkpoint_costs
from ecoquant.energy.gpus import gpu_spec
from ecoquant.energy.roofline import RequestTokens, modelled_energy
from ecoquant.energy.speculative import AssistantTerms, Speculation, assistant_costs, speculation
from ecoquant.eval.backends.base import ChatRequest, ImagePart


class TokenCounts(Protocol):
    """What a recorded sample carries (:class:`ecoquant.eval.runner.SampleResult`)."""

    text_tokens: int | None
    image_tokens: int | None
    images: int | None
    tokens_out: int


def count_images(request: ChatRequest) -> int:
    """Images in a request's messages."""
    return sum(isinstance(part, ImagePart) for m in request.messages for part in m.parts)


def _local_folder(source: str) -> Path | None:
    from ecoquant.eval.nf4 import is_nf4_spec

    if is_nf4_spec(source):
        return None  # quantized at load time: no folder holds what runs
    path = Path(source).expanduser()
    return path if (path / "config.json").is_file() else None


def default_image_budget(source: str) -> int | None:
    """The checkpoint's own soft tokens per image (Gemma-4: ``vision_config.default_output_length``), if known."""
    path = _local_folder(source)
    if path is None:
        return None
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    fam = FAMILIES.get(config.get("model_type") or "")
    if fam is None or fam.default_budget is None:
        return None
    value = (config.get("vision_config") or {}).get(fam.default_budget)
    return None if value is None else int(value)


def split_prompt(
    tokens_in: int, images: int, counted_image_tokens: int | None, budget: int | None
) -> tuple[int | None, int | None]:
    """``(text tokens, image tokens)`` of a prompt; ``(None, None)`` when the image tokens are unknown."""
    image_tokens = counted_image_tokens
    if image_tokens is None:
        image_tokens = 0 if images == 0 else (None if budget is None else images * budget)
    if image_tokens is None:
        return None, None
    image_tokens = min(image_tokens, tokens_in)
    return tokens_in - image_tokens, image_tokens


@lru_cache(maxsize=16)
def _terms(folder: str, mtime_ns: int) -> CostTerms | None:
    from ecoquant.errors import EcoquantError

    try:
        return checkpoint_costs(folder)
    except EcoquantError:
        return None  # a family ecoquant cannot model: no figure rather than a wrong one


def cost_terms_for(source: str) -> CostTerms | None:
    """The checkpoint's cost terms, cached per folder (and its config's mtime); None where not modellable."""
    path = _local_folder(source)
    if path is None:
        return None
    return _terms(str(path.resolve()), (path / "config.json").stat().st_mtime_ns)


def request_tokens(samples: Sequence[TokenCounts]) -> list[RequestTokens] | None:
    """The roofline's view of recorded samples; None when any lacks the text/image split."""
    out: list[RequestTokens] = []
    for s in samples:
        if s.text_tokens is None or s.image_tokens is None or s.images is None:
            return None
        out.append(RequestTokens(s.text_tokens, s.image_tokens, s.images, s.tokens_out))
    return out


def _assistant_folder(source: str) -> Path | None:
    """A local assistant folder, or a hub id's snapshot already in the Hugging Face cache (nothing downloaded)."""
    path = Path(source).expanduser()
    if (path / "config.json").is_file():
        return path
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(source, "config.json")
    except ValueError:  # not a valid repo id either
        return None
    return Path(cached).parent if isinstance(cached, str) else None


@lru_cache(maxsize=16)
def _assistant(folder: str, mtime_ns: int) -> AssistantTerms | None:
    from ecoquant.errors import EcoquantError

    try:
        return assistant_costs(folder)
    except EcoquantError:
        return None


def run_speculation(speculative: Mapping[str, Any] | None) -> Speculation | None:
    """The roofline's view of a run's ``speculative`` record; None without one or where its assistant's
    folder cannot be read (see the module docstring)."""
    if not speculative or not speculative.get("assistant"):
        return None
    folder = _assistant_folder(str(speculative["assistant"]))
    if folder is None:
        return None
    terms = _assistant(str(folder.resolve()), (folder / "config.json").stat().st_mtime_ns)
    if terms is None:
        return None
    from ecoquant.errors import EcoquantError

    k = int(speculative.get("num_speculative_tokens") or 0)
    accepted = speculative.get("mean_accepted_per_step")
    try:
        return speculation(terms, k, None if accepted is None else float(accepted), str(speculative["assistant"]))
    except EcoquantError:  # k < 1 or more accepted per step than k: a record the roofline cannot read
        return None


def run_modelled_energy(
    source: str,
    samples: Sequence[TokenCounts],
    target_gpu: str,
    concurrency: int = 1,
    speculative: Mapping[str, Any] | None = None,
) -> dict[str, Any] | None:
    """``{"gpu", "total_j", "parts"}`` (+ ``"speculative"``) for a run's samples on ``target_gpu``, or None
    (see the module docstring). ``speculative`` is the run's record of its MTP assistant, if it had one."""
    requests = request_tokens(samples)
    terms = cost_terms_for(source)
    if requests is None or terms is None:
        return None
    spec = run_speculation(speculative)
    if speculative and speculative.get("assistant") and spec is None:
        return None
    return modelled_energy(requests, terms, gpu_spec(target_gpu), concurrency, speculative=spec).to_record()
