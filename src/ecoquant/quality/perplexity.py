"""Next-token negative log-likelihood and perplexity, over tensors.

Convention used throughout :mod:`ecoquant.quality`: ``labels[t]`` is the token
the model should predict *at* position ``t`` (that is, the input token at
``t + 1``), or :data:`IGNORE` where nothing is scored. Logits and labels then
line up position by position and no function here shifts anything.
"""

from __future__ import annotations

import math

import torch

#: Label value of a position that is not scored (the same value transformers' losses ignore).
IGNORE = -100


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood, in nats, of each scored label: shape ``(n_scored,)``, float32.

    ``logits``: ``(..., vocab)``; ``labels``: the same leading shape. The
    softmax runs in float32 whatever the model's dtype, so bf16 models are
    scored with bf16 logits but not with a bf16 softmax.
    """
    scored = labels != IGNORE
    picked = logits[scored].float()
    targets = labels[scored]
    return -(torch.log_softmax(picked, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1))


def perplexity(total_nll: float, n_tokens: int) -> float:
    """exp(mean NLL): the effective number of choices per token (lower is better)."""
    if n_tokens <= 0:
        raise ValueError("perplexity of zero tokens is undefined")
    return math.exp(total_nll / n_tokens)


def window_starts(n_tokens: int, window: int, max_windows: int | None) -> list[int]:
    """Start offsets of the whole, non-overlapping windows of ``window`` tokens (a short tail is dropped).

    Every window has the same length, so every window costs the same and the
    perplexity does not depend on where the text happens to end.
    """
    if window < 2:
        raise ValueError(f"window must be at least 2 tokens, got {window}")
    starts = list(range(0, n_tokens - window + 1, window))
    return starts if max_windows is None else starts[:max_windows]


def window_inputs(text_ids: torch.Tensor, start: int, window: int, bos_id: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, labels)`` of one window, each of shape ``(1, window)``.

    With a BOS token the input is ``<bos>`` plus the first ``window - 1`` text
    tokens, and all ``window`` text tokens are scored: every token of the text
    is predicted exactly once over all windows, and no window sees the previous
    one (each starts like a fresh document, as Gemma was trained). Without a
    BOS token the first text token is context only.
    """
    chunk = text_ids[start : start + window]
    seq = chunk if bos_id is None else torch.cat([chunk.new_tensor([bos_id]), chunk])
    return seq[:-1].unsqueeze(0), seq[1:].unsqueeze(0)
