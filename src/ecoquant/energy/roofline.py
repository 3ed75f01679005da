"""Modelled energy of a suite on a target GPU: a roofline over each request's tokens.

A pure function of counts: each request's text tokens, image soft tokens,
images and output tokens (what an evaluation recorded), a checkpoint's cost
terms (:mod:`ecoquant.energy.costs`) and a GPU's datasheet figures
(:mod:`ecoquant.energy.gpus`). Nothing is measured here; every figure it
produces is *modelled for <GPU>* and must be shown labelled so.

Per request (times in seconds; ``c`` = concurrency, requests in flight at once)::

    prefill  = max(sum_p FLOPs_p / rate_p,  weight bytes / c / bandwidth)
               FLOPs: decoder Linears x prompt tokens + attention + one head row
    vision   = sum over images: vision FLOPs at (image tokens / images) soft tokens / rate
    decode   = sum over the (output - 1) steps of
               max((weight bytes / c + KV bytes(context)) / bandwidth,  FLOPs per token / rate)
    idle     = overhead_s / c        (host-side work while the GPU waits: an assumption)

    energy   = (prefill + vision + decode + draft) x board power  +  idle x idle power

With speculative decoding (a :class:`~ecoquant.energy.speculative.Speculation`:
an MTP assistant, ``k`` drafts per step, ``a`` accepted per step, ``L = 1 + a``)
the ``n - 1`` decode tokens take ``S = ceil((n - 1) / L)`` target steps; step
``i`` (from 0) sits at context ``prompt + 1 + i L``::

    decode   = sum over S steps of
               max((weight bytes / c + KV bytes(context)) / bandwidth,  (k + 1) x FLOPs per token / rate)
    draft    = sum over S steps of  k x
               max((assistant weight bytes / c + input row + assistant KV bytes(context)) / bandwidth,
                   assistant FLOPs(context) / rate)

``draft`` is 0 without an assistant; the parts always sum to the total.

Assumptions, each a simplification that errs in a known direction:

* **Busy means the board power limit.** A busy GPU is charged its full board
  power; real draw is lower when memory-bound (decode on an L4 draws well
  under 72 W), so decode joules are an upper bound.
* **Peak rates.** Matmuls run at the dense datasheet peak; real kernels reach
  50-80 % of it, so compute-bound times are lower bounds. Where the two errors
  meet they partly cancel; measured / modelled on a GPU is the check.
* **The first output token comes from prefill** (the last prompt position's
  logits), so a request of ``n`` output tokens has ``n - 1`` decode steps.
* **Prefill splits by tokens:** its time is shared between ``prefill_text``
  and ``prefill_image`` in proportion to text and image tokens.
* **The vision encoder is compute-bound** (its weights, ~0.3 GB on E4B, read
  in ~1 ms on an L4, far below its compute at any budget).
* **Concurrency shares weight reads**, not FLOPs: ``c`` requests decode in one
  batch that reads the weights once per step; each reads its own KV cache.
* **Drafting runs at the roofline too**: the assistant's forwards are small
  (about 25 MB on E4B) and at batch 1 also pay kernel-launch latency the
  model does not charge, so ``draft`` is a lower bound. Drafts of a batch share
  the assistant's weight reads as the target's steps share the target's.
* **Idle** is a fixed host-side overhead per request (tokenizing, image
  decoding, HTTP, scheduling) while the board idles: :data:`DEFAULT_OVERHEAD_S`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from ecoquant.energy.costs import CostTerms
from ecoquant.energy.gpus import GpuSpec, Precision
from ecoquant.energy.speculative import Speculation, speculation_label
from ecoquant.errors import EcoquantError

PARTS: tuple[str, ...] = ("prefill_text", "prefill_image", "vision_encoder", "decode", "draft", "idle")
"""Where the modelled joules go: ``decode`` is the target's decode (or verification) steps, ``draft`` the MTP
assistant's forwards (0 without one)."""

DEFAULT_OVERHEAD_S = 0.010
"""Host-side seconds per request while the GPU idles: an ASSUMPTION (vLLM's per-request scheduling,
detokenization and image preprocessing at concurrency 1 are of this order on a server CPU)."""


@dataclass(frozen=True)
class RequestTokens:
    """One request's counts: prompt text tokens, image soft tokens, images, and generated tokens."""

    text_tokens: int
    image_tokens: int
    images: int
    output_tokens: int

    def __post_init__(self) -> None:
        if min(self.text_tokens, self.image_tokens, self.images, self.output_tokens) < 0:
            raise ValueError(f"token counts cannot be negative: {self}")
        if self.image_tokens and not self.images:
            raise ValueError(f"{self.image_tokens} image tokens need at least one image")

    @property
    def prompt_tokens(self) -> int:
        return self.text_tokens + self.image_tokens


@dataclass(frozen=True)
class ModelledEnergy:
    """Modelled joules of a suite on ``gpu``: the total and its :data:`PARTS` (which sum to it).

    ``speculative`` is :meth:`Speculation.to_record` of the lever the figure assumes (None without one): it says
    whether the acceptance behind the figure was measured or assumed.
    """

    gpu: str
    total_j: float
    parts: Mapping[str, float]
    speculative: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        # A record from before the draft part existed had no assistant: its draft joules are 0.
        object.__setattr__(self, "parts", MappingProxyType({"draft": 0.0, **self.parts}))
        if self.speculative is not None:
            object.__setattr__(self, "speculative", MappingProxyType(dict(self.speculative)))
        if set(self.parts) != set(PARTS):
            raise ValueError(f"modelled energy parts must be {PARTS}, got {tuple(self.parts)}")
        if not math.isclose(math.fsum(self.parts.values()), self.total_j, rel_tol=1e-9, abs_tol=1e-9):
            raise ValueError(f"parts sum to {math.fsum(self.parts.values())}, not the total {self.total_j}")

    def to_record(self) -> dict[str, Any]:
        """``{"gpu", "total_j", "parts": {...}}`` (+ ``"speculative"`` with an assistant): what ``results.json``
        carries per run."""
        record: dict[str, Any] = {"gpu": self.gpu, "total_j": self.total_j, "parts": dict(self.parts)}
        if self.speculative is not None:
            record["speculative"] = dict(self.speculative)
        return record

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> ModelledEnergy:
        spec = record.get("speculative")
        return cls(str(record["gpu"]), float(record["total_j"]), dict(record["parts"]), spec)

    def label(self) -> str:
        """``modelled for L4`` (``..., MTP k=4, 2.00 tokens per target step (assumed)`` with an assistant):
        how the figure is shown, everywhere."""
        return modelled_label(self.gpu, self.speculative)

    def shares(self) -> dict[str, float]:
        """Each part as a fraction of the total (zeros for an empty suite)."""
        return {k: (v / self.total_j if self.total_j else 0.0) for k, v in self.parts.items()}


def _compute_s(flops: Mapping[Precision, float], gpu: GpuSpec) -> float:
    return sum(f / gpu.tensor_flops(p) for p, f in flops.items())


def modelled_label(gpu: str, speculative: Mapping[str, Any] | None = None) -> str:
    """``modelled for L4``, and with an MTP assistant its k and acceptance, saying whether it was measured."""
    return f"modelled for {gpu}" + (f", {speculation_label(speculative)}" if speculative else "")


def _step_seconds(
    terms: CostTerms, gpu: GpuSpec, context: float, concurrency: int, positions: int, linear_s: float
) -> float:
    """One target decode (or verification) step of one request: weights shared by ``c``, its own KV,
    ``positions`` query positions of compute."""
    memory = (terms.decode.total / concurrency + terms.kv_bytes(context)) / gpu.bandwidth
    attention = sum(a.flops_per_token(context) for a in terms.attention) / gpu.tensor_flops("bf16")
    return max(memory, positions * (linear_s + attention))


def _draft_seconds(spec: Speculation, gpu: GpuSpec, context: float, concurrency: int) -> float:
    """One drafted token of one request: the assistant's weights shared by ``c``, its input row and the
    target-cache bytes its attention reads; its FLOPs (all bf16: the draft is memory-bound at any batch here)."""
    a = spec.assistant
    memory = (a.weight_bytes / concurrency + a.input_bytes + a.kv_bytes(context)) / gpu.bandwidth
    return max(memory, a.flops(context) / gpu.tensor_flops("bf16"))


def request_seconds(
    request: RequestTokens,
    terms: CostTerms,
    gpu: GpuSpec,
    concurrency: int = 1,
    speculative: Speculation | None = None,
) -> dict[str, float]:
    """Busy seconds of one request by phase: ``prefill_text``, ``prefill_image``, ``vision_encoder``, ``decode``,
    ``draft`` (see the module docstring)."""
    weights = terms.decode.total
    prompt = request.prompt_tokens
    prefill = 0.0
    if prompt:
        compute = _compute_s(terms.prefill_flops(prompt), gpu)
        prefill = max(compute, weights / concurrency / gpu.bandwidth)
    vision = 0.0
    if request.images:
        if terms.vision is None:
            raise EcoquantError(f"a {terms.model_type} checkpoint has no vision encoder, but a request has images")
        soft_per_image = request.image_tokens / request.images
        vision = request.images * _compute_s(terms.vision.flops_at(soft_per_image), gpu)
    # Linears and the head per position, each precision at its rate (summed: the decoder and the head may share one)
    linear_s = sum(_compute_s(by_p, gpu) for by_p in (*terms.linear_flops.values(), terms.head_flops))
    decode = draft = 0.0
    if speculative is None:
        for step in range(1, request.output_tokens):
            decode += _step_seconds(terms, gpu, prompt + step, concurrency, 1, linear_s)
    else:
        k, per_step = speculative.num_speculative_tokens, speculative.tokens_per_step
        for i in range(speculative.target_steps(request.output_tokens)):
            context = prompt + 1 + i * per_step
            decode += _step_seconds(terms, gpu, context, concurrency, k + 1, linear_s)
            draft += k * _draft_seconds(speculative, gpu, context, concurrency)
    text_share = request.text_tokens / prompt if prompt else 0.0
    return {
        "prefill_text": prefill * text_share,
        "prefill_image": prefill * (1.0 - text_share) if prompt else 0.0,
        "vision_encoder": vision,
        "decode": decode,
        "draft": draft,
    }


def modelled_energy(
    requests: Sequence[RequestTokens],
    terms: CostTerms,
    gpu: GpuSpec,
    concurrency: int = 1,
    overhead_s: float = DEFAULT_OVERHEAD_S,
    speculative: Speculation | None = None,
) -> ModelledEnergy:
    """The suite's modelled energy on ``gpu`` (see the module docstring for the formula and assumptions);
    ``speculative``: decode with an MTP assistant."""
    if concurrency < 1:
        raise EcoquantError(f"--concurrency must be at least 1, got {concurrency}")
    if overhead_s < 0:
        raise EcoquantError(f"the per-request overhead cannot be negative, got {overhead_s}")
    busy = dict.fromkeys(PARTS[:-1], 0.0)
    for request in requests:
        for phase, seconds in request_seconds(request, terms, gpu, concurrency, speculative).items():
            busy[phase] += seconds
    parts = {phase: seconds * gpu.busy_w for phase, seconds in busy.items()}
    parts["idle"] = len(requests) * overhead_s / concurrency * gpu.idle_w
    record = None if speculative is None else speculative.to_record()
    return ModelledEnergy(gpu.name, math.fsum(parts.values()), parts, record)
