"""Where answers come from: a transformers model in this process, or an OpenAI-compatible server.

Both take the same :class:`~ecoquant.eval.backends.base.ChatRequest` s and
return :class:`~ecoquant.eval.backends.base.Completion` s; see
:mod:`ecoquant.eval.backends.base`. The concrete backends are imported from
their modules (``transformers_backend`` pulls in torch; ``openai_backend``
needs only the standard library).
"""

from ecoquant.eval.backends.base import (
    GENERATION_PRESETS,
    Backend,
    ChatRequest,
    Completion,
    GenerationSettings,
    ImagePart,
    Message,
    TextPart,
    generation_settings,
)

__all__ = [
    "GENERATION_PRESETS",
    "Backend",
    "ChatRequest",
    "Completion",
    "GenerationSettings",
    "ImagePart",
    "Message",
    "TextPart",
    "generation_settings",
]
