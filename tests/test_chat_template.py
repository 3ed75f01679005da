"""The response-economy chat template a checkpoint ships: a plain request gets the short-answer system turn.

Through transformers (the vLLM CPU build: tests/test_vllm_cpu.py): the
suite's plain requests rendered by the wrapped template are token for token
the same requests with the short-answer system turn rendered by the
original, so the model answers them identically; a request that brings its
own system turn is left alone; ``enable_thinking=True`` from a client is
overridden; the source checkpoint sharing the weights by hard link is not
modified.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from transformers import AutoProcessor

from ecoquant.errors import EcoquantError
from ecoquant.eval.backends.base import ChatRequest, GenerationSettings, Message, TextPart
from ecoquant.eval.backends.transformers_backend import TransformersBackend, TransformersOptions, hf_messages
from ecoquant.eval.economy import SHORT_ANSWER, prompt_variant, suite_requests
from ecoquant.eval.loaders import load_suite
from ecoquant.eval.runner import limit_suite
from ecoquant.fixtures.tiny_vlm import tiny_vlm_path
from ecoquant.optimize.store import link_or_copy
from ecoquant.serve.chat_template import MARKER, short_answer_template, write_short_answer_template


@pytest.fixture(scope="module")
def short_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny VLM's files hard-linked into a new folder whose template is then wrapped."""
    folder = tmp_path_factory.mktemp("short") / "tiny_vlm+short"
    folder.mkdir()
    for f in tiny_vlm_path().iterdir():
        if f.is_file():
            link_or_copy(f, folder / f.name)
    write_short_answer_template(folder)
    return folder


def ids(processor: object, request: ChatRequest, **kw: object) -> list[int]:
    out = processor.apply_chat_template(  # type: ignore[attr-defined]
        [hf_messages(request)], add_generation_prompt=True, tokenize=True, return_dict=True, **kw
    )
    return list(out["input_ids"][0])


def test_the_source_is_untouched(short_folder: Path) -> None:
    source = tiny_vlm_path() / "chat_template.jinja"
    assert not source.read_text().startswith(MARKER)
    assert (short_folder / "chat_template.jinja").read_text().startswith(MARKER)
    assert os.path.samefile(tiny_vlm_path() / "model.safetensors", short_folder / "model.safetensors")  # weights shared
    assert not os.path.samefile(source, short_folder / "chat_template.jinja")
    with pytest.raises(EcoquantError, match="already carries"):
        short_answer_template((short_folder / "chat_template.jinja").read_text())


def test_plain_requests_render_as_the_short_system_variant(short_folder: Path) -> None:
    original = AutoProcessor.from_pretrained(tiny_vlm_path())
    wrapped = AutoProcessor.from_pretrained(short_folder)
    suite = limit_suite(load_suite("builtin-basic", size=1), 1)
    plain = suite_requests(suite, prompt_variant("default"), GenerationSettings())
    system = suite_requests(suite, prompt_variant("short-system"), GenerationSettings())
    for (_, _, p), (_, _, s) in zip(plain, system, strict=True):
        assert ids(wrapped, p) == ids(original, s)
        assert ids(wrapped, p) != ids(original, p)
        assert ids(wrapped, s) == ids(original, s)  # a request with its own system turn is left alone
    own = ChatRequest("x", (Message("system", (TextPart("Be verbose."),)), Message("user", (TextPart("Hi"),))), 8)
    assert ids(wrapped, own) == ids(original, own)
    assert SHORT_ANSWER not in wrapped.decode(ids(wrapped, own))


def test_thinking_stays_off_whatever_the_request_asks(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    shutil.copytree(tiny_vlm_path(), folder)
    # a template that, like Gemma-4's, opens a thinking block when enable_thinking is true
    (folder / "chat_template.jinja").write_text(
        "{%- if enable_thinking is defined and enable_thinking -%}<|think|>{%- endif -%}"
        + (tiny_vlm_path() / "chat_template.jinja").read_text()
    )
    original = AutoProcessor.from_pretrained(folder)
    write_short_answer_template(folder)
    wrapped = AutoProcessor.from_pretrained(folder)
    request = ChatRequest("x", (Message("user", (TextPart("Hi"),)),), 8)
    assert "<|think|>" in original.decode(ids(original, request, enable_thinking=True))
    assert "<|think|>" not in wrapped.decode(ids(wrapped, request, enable_thinking=True))


def test_the_model_answers_plain_requests_through_it_as_with_the_instruction(short_folder: Path) -> None:
    suite = limit_suite(load_suite("builtin-basic", size=1), 1)
    settings = GenerationSettings(max_new_tokens=8)
    plain = [r for _, _, r in suite_requests(suite, prompt_variant("default"), settings)]
    system = [r for _, _, r in suite_requests(suite, prompt_variant("short-system"), settings)]
    options = TransformersOptions(device="cpu", batch_size=1)
    base = TransformersBackend.load(tiny_vlm_path(), options)
    try:
        expected = base.generate(system, settings)
        unchanged = base.generate(plain, settings)
    finally:
        base.close()
    shipped = TransformersBackend.load(short_folder, options)
    try:
        got = shipped.generate(plain, settings)
    finally:
        shipped.close()
    assert [(c.text, c.tokens_in, c.tokens_out) for c in got] == [(c.text, c.tokens_in, c.tokens_out) for c in expected]
    assert all(g.tokens_in > u.tokens_in for g, u in zip(got, unchanged, strict=True))  # the instruction is in the prompt
