"""Response economy that ships: a chat template that asks for the shortest answer when the request does not.

The organizers send their own prompts, so a prompt variant measured at eval
time saves nothing on their suite unless the checkpoint itself carries it.
The chat template is part of the checkpoint: vLLM and transformers both
render every request through it. :func:`short_answer_template` wraps a
model's own template so that

* a conversation that starts without a system turn gets one, holding
  :data:`~ecoquant.eval.economy.SHORT_ANSWER` (a request that brings its own
  system turn is left alone: the sender meant it);
* ``enable_thinking`` is false whatever the request asks, so Gemma-4 never
  spends tokens on a thinking block.

Everything else is the original template, unchanged, after the wrapper's
two statements, so a plain request through the wrapped template renders
exactly as the same request with that system turn through the original
(``tests/test_optimize.py`` checks the token ids, and the answers, through
transformers and through the vLLM CPU build).
"""

from __future__ import annotations

import json
from pathlib import Path

from ecoquant.errors import EcoquantError
from ecoquant.eval.economy import SHORT_ANSWER

TEMPLATE_FILE = "chat_template.jinja"
"""Where transformers (>= 4.50) and vLLM read a checkpoint's chat template from."""

JSON_HOLDERS: tuple[str, ...] = ("tokenizer_config.json", "processor_config.json", "chat_template.json")
"""Older places a template may also be stored (key ``chat_template``); a wrapped template replaces it there too,
so no reader finds the unwrapped one."""

MARKER = "{#- ecoquant response economy"


def short_answer_template(template: str, instruction: str = SHORT_ANSWER) -> str:
    """``template`` preceded by the response-economy statements (see the module docstring)."""
    if template.lstrip().startswith(MARKER):
        raise EcoquantError("this chat template already carries ecoquant's response-economy wrapper")
    literal = json.dumps(instruction)  # a double-quoted string, which Jinja reads as Python would
    head = (
        f"{MARKER}: requests without a system turn get one asking for the shortest answer;"
        " thinking stays off. The model's own template follows unchanged. -#}\n"
        "{%- set enable_thinking = false -%}\n"
        "{%- if messages and messages[0]['role'] != 'system' -%}\n"
        f"{{%- set messages = [{{'role': 'system', 'content': {literal}}}] + messages -%}}\n"
        "{%- endif -%}\n"
    )
    return head + template


def read_chat_template(folder: Path) -> str:
    """The checkpoint's chat template: ``chat_template.jinja``, else the ``chat_template`` key of its JSON files."""
    jinja = folder / TEMPLATE_FILE
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    for name in JSON_HOLDERS:
        path = folder / name
        if path.is_file():
            value = json.loads(path.read_text(encoding="utf-8")).get("chat_template")
            if isinstance(value, str):
                return value
    raise EcoquantError(f"{folder} has no chat template (no {TEMPLATE_FILE}); a response-economy template needs one to wrap")


def write_short_answer_template(folder: Path, instruction: str = SHORT_ANSWER) -> str:
    """Wrap ``folder``'s chat template in place, in every file that holds one; returns the new template.

    JSON files are rewritten (not edited through a hard link), so a folder
    whose files are links to another checkpoint's leaves that one unchanged.
    """
    wrapped = short_answer_template(read_chat_template(folder), instruction)
    _replace(folder / TEMPLATE_FILE, wrapped)
    for name in JSON_HOLDERS:
        path = folder / name
        if not path.is_file():
            continue
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data.get("chat_template"), str):
            data["chat_template"] = wrapped
            _replace(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    return wrapped


def _replace(path: Path, text: str) -> None:
    """Write ``text`` to a new file renamed over ``path`` (breaks a hard link instead of writing through it)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
