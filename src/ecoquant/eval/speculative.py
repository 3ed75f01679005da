"""Speculative decoding in the transformers backend: load a drafting assistant and count what it did.

Why measure it here: an MTP assistant (Gemma-4's ``-assistant`` checkpoints) drafts from the target's last
hidden state and reads the target's KV cache, and it was trained against the bf16 target. Whether a
quantized target still accepts its drafts decides whether the lever saves energy, so acceptance is
measured per candidate, not assumed.

transformers drives the pair itself (``generate(..., assistant_model=...)`` picks its
``SinglePositionMultiTokenCandidateGenerator`` for a Gemma-4 assistant, transformers 5.23). Nothing in
that loop is replaced; :class:`DraftCounter` only observes it with forward hooks:

- every forward of the target is one pass: the first is the prefill, each later one verifies a draft
  (it yields the accepted tokens plus one of its own, so ``tokens_out = 1 + steps + accepted``);
- every forward of the assistant drafts one token per position it returns.

Accepted tokens then follow from the tokens generated, the one number ``generate`` returns anyway.
The definitions are vLLM's (``target_steps``, ``drafted_tokens``, ``accepted_tokens``;
:func:`ecoquant.eval.record.speculative_summary`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ecoquant.errors import EcoquantError

#: Model types transformers drives as single-position MTP drafters, with the target families they draft for
#: (transformers 5.23 ``generation/utils.py::_get_candidate_generator``: a ``Gemma4Assistant*`` assistant needs
#: a Gemma-4 or Gemma-3n target, whose forward returns the shared KV states the assistant attends to).
ASSISTANT_MODEL_TYPES: dict[str, tuple[str, ...]] = {
    "gemma4_assistant": ("gemma4", "gemma3n"),
}


def assistant_folder(source: str, target_model_type: str | None = None) -> Path:
    """The assistant's local folder, checked to be a drafting assistant (for this target family, when given)
    before any model loads.

    Raises:
        EcoquantError: a missing folder or unreachable hub id, a model that is not an MTP assistant (one line
            naming what it is instead), or an assistant for another family.
    """
    from ecoquant.models.loading import load_config, resolve_model

    path = resolve_model(source)
    model_type = getattr(load_config(path), "model_type", None)
    if model_type not in ASSISTANT_MODEL_TYPES:
        raise EcoquantError(
            f"--assistant {source} is a {model_type!r} model, not a drafting assistant"
            f" ({', '.join(ASSISTANT_MODEL_TYPES)}); pass the target's -assistant checkpoint,"
            " e.g. google/gemma-4-E4B-it-assistant"
        )
    targets = ASSISTANT_MODEL_TYPES[model_type]
    if target_model_type is not None and target_model_type not in targets:
        raise EcoquantError(
            f"--assistant {source} ({model_type}) drafts for {', '.join(targets)} models, not {target_model_type!r}"
        )
    return path


def load_assistant(
    source: str, target_model_type: str, device: torch.device, dtype: torch.dtype, num_speculative_tokens: int
) -> Any:
    """The assistant on ``device`` in ``dtype``, set to draft ``num_speculative_tokens`` tokens per step.

    transformers' MTP candidate generator reads k from the assistant's own generation config
    (``num_assistant_tokens``), so that is where it is set.
    """
    from ecoquant.models.assistant_config import buildable
    from ecoquant.models.loading import load_config, model_class
    from ecoquant.quiet import quiet_loads

    path = assistant_folder(source, target_model_type)
    config = buildable(load_config(path))  # transformers 5.23 cannot build an all-KV-shared stack unaided
    with quiet_loads():  # transformers' "Loading weights" bar is one more line per evaluation off a terminal
        model = model_class(config).from_pretrained(path, config=config, dtype=dtype)  # type: ignore[attr-defined]
    model.generation_config.num_assistant_tokens = num_speculative_tokens
    return model.to(device).eval()


@dataclass(frozen=True)
class DraftCounts:
    """One request's speculative decoding, in vLLM's conventions (see the module docstring)."""

    target_steps: int
    drafted_tokens: int
    accepted_tokens: int


class DraftCounter:
    """Counts target and assistant forwards during one ``generate`` call, through forward hooks only."""

    def __init__(self) -> None:
        self.target_forwards = 0
        self.drafted_tokens = 0

    def _on_target(self, module: Any, args: Any, output: Any) -> None:
        self.target_forwards += 1

    def _on_assistant(self, module: Any, args: Any, output: Any) -> None:
        self.drafted_tokens += int(output.logits.shape[0] * output.logits.shape[1])

    @contextmanager
    def observing(self, target: torch.nn.Module, assistant: torch.nn.Module) -> Iterator[DraftCounter]:
        """Hooks on both models for the duration of the block; removed afterwards, whatever happens."""
        handles = [target.register_forward_hook(self._on_target), assistant.register_forward_hook(self._on_assistant)]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def counts(self, generated: int) -> DraftCounts:
        """The request's counts, given how many tokens ``generate`` appended after the prompt.

        Each verification pass appends its accepted drafts and one token of its own; the prefill appends one.
        """
        steps = max(self.target_forwards - 1, 0)
        accepted = generated - 1 - steps
        if accepted < 0 or accepted > self.drafted_tokens:  # the loop did something this accounting does not know
            raise RuntimeError(
                f"speculative counts do not add up: {generated} tokens from {self.target_forwards} target passes"
                f" and {self.drafted_tokens} drafted"
            )
        return DraftCounts(steps, self.drafted_tokens, accepted)
