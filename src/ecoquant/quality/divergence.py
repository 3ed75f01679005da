"""How far a variant's next-token distributions are from the base's, over tensors.

Perplexity only looks at the probability of the one true next token; two
models can have the same perplexity and disagree everywhere else. KL(base ‖
variant) weighs every token by how likely the *base* finds it, so it measures
what a compressed model changed where the base model is confident, and it is
exactly 0 only when the distributions are identical. Top-1 agreement is the
plain-language companion: how often greedy decoding would pick the same token.
"""

from __future__ import annotations

import torch


def kl_divergence(base_logits: torch.Tensor, variant_logits: torch.Tensor, chunk: int = 128) -> torch.Tensor:
    """KL(P_base ‖ P_variant) in nats for each position: ``(n,)`` float32 from ``(n, vocab)`` logits.

    Computed ``chunk`` rows at a time in float32: a row of Gemma's 262k-token
    vocabulary is 1 MiB in float32, so whole windows would need gigabytes of
    temporaries. Worked example: base probabilities (0.5, 0.5) against variant
    (0.9, 0.1) give 0.5·ln(0.5/0.9) + 0.5·ln(0.5/0.1) = 0.511 nats.
    """
    if base_logits.shape != variant_logits.shape:
        raise ValueError(f"logit shapes differ: {tuple(base_logits.shape)} vs {tuple(variant_logits.shape)}")
    out = torch.empty(base_logits.shape[0], dtype=torch.float32, device=base_logits.device)
    for s in range(0, base_logits.shape[0], chunk):
        log_p = torch.log_softmax(base_logits[s : s + chunk].float(), dim=-1)
        log_q = torch.log_softmax(variant_logits[s : s + chunk].float(), dim=-1)
        # xlogy-style: where p underflows to 0 the term is 0, never 0 * -inf.
        out[s : s + chunk] = (log_p.exp() * (log_p - log_q)).nan_to_num(0.0).sum(-1).clamp_min(0.0)
    return out


def top1_agreement(base_logits: torch.Tensor, variant_logits: torch.Tensor) -> torch.Tensor:
    """Whether the variant's most likely token is the base's, per position: ``(n,)`` bool."""
    if base_logits.shape != variant_logits.shape:
        raise ValueError(f"logit shapes differ: {tuple(base_logits.shape)} vs {tuple(variant_logits.shape)}")
    return base_logits.argmax(-1) == variant_logits.argmax(-1)
