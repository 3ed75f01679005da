"""Backends: settings, prompt variants, the transformers backend on the tiny Gemma-4, and the
OpenAI-compatible backend against the project's own server on 127.0.0.1 (same greedy answers)."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from ecoquant.errors import EcoquantError
from ecoquant.eval.backends.base import (
    ChatRequest,
    Completion,
    GenerationSettings,
    ImagePart,
    Message,
    TextPart,
    generation_settings,
)
from ecoquant.eval.backends.openai_backend import OpenAIBackend, api_base, parse_completion, request_body
from ecoquant.eval.backends.transformers_backend import (
    TransformersBackend,
    TransformersOptions,
    batches,
    hf_messages,
    trim_generated,
)
from ecoquant.eval.builtin import builtin_suite
from ecoquant.eval.economy import PROMPT_VARIANTS, SHORT_ANSWER, build_request, prompt_variant, suite_requests
from ecoquant.eval.runner import limit_suite
from ecoquant.eval.tasks import Suite, score
from ecoquant.serve.openai_server import ChatServer, RequestError, parse_messages, parse_settings, parse_stream

MAX_NEW = 4  # tokens per answer: enough to see real decoding, cheap on two busy cores


# ------------------------------------------------------------------ pure parts


def test_generation_settings_greedy_default_and_gemma_preset() -> None:
    greedy = generation_settings()
    assert greedy == GenerationSettings() and not greedy.do_sample
    gemma = generation_settings("gemma", seed=7)
    assert (gemma.do_sample, gemma.temperature, gemma.top_p, gemma.top_k, gemma.seed) == (True, 1.0, 0.95, 64, 7)
    assert gemma.to_record()["top_k"] == 64
    assert GenerationSettings(max_new_tokens=8).cap(32) == 8
    assert GenerationSettings(max_new_tokens=64).cap(32) == 32  # a cap, never a raise
    assert GenerationSettings().cap(32) == 32
    with pytest.raises(ValueError, match="greedy"):
        GenerationSettings(temperature=0.7)
    with pytest.raises(ValueError, match="top_p"):
        GenerationSettings(do_sample=True, temperature=1.0, top_p=1.5)
    with pytest.raises(EcoquantError, match="unknown sampling preset"):
        generation_settings("nucleus")


@pytest.fixture(scope="module")
def suite() -> Suite:
    """One sample of each built-in task: a document (ANLS), a chart (relaxed), a chart choice (MC)."""
    return limit_suite(builtin_suite(size=1), 1)


def test_prompt_variants_change_only_the_wrapping(suite: Suite) -> None:
    task = suite.tasks[0]
    sample = task.samples[0]
    settings = GenerationSettings()
    default = build_request(task, sample, prompt_variant("default"), settings)
    assert [m.role for m in default.messages] == ["user"]
    parts = default.messages[0].parts
    assert all(isinstance(p, ImagePart) for p in parts[:-1]) and len(parts) == len(sample.images) + 1
    assert parts[-1] == TextPart(task.prompt(sample))
    assert default.max_new_tokens == task.max_new_tokens and default.id == f"{task.name}/{sample.id}"

    system = build_request(task, sample, prompt_variant("short-system"), settings)
    assert system.messages[0] == Message("system", (TextPart(SHORT_ANSWER),))
    assert system.messages[1] == default.messages[0]

    user = build_request(task, sample, prompt_variant("short-user"), settings)
    assert user.messages[0].parts[-1] == TextPart(SHORT_ANSWER + "\n" + task.prompt(sample))

    bare = build_request(task, sample, prompt_variant("bare"), settings)
    assert bare.messages[0].parts[-1] == TextPart(sample.question)
    assert not task.prompt(sample) == sample.question  # the task does have a suffix to drop

    capped = build_request(task, sample, prompt_variant("default"), GenerationSettings(max_new_tokens=3))
    assert capped.max_new_tokens == 3
    assert set(PROMPT_VARIANTS) >= {"default", "short-system", "short-user", "short-only", "bare"}
    with pytest.raises(EcoquantError, match="unknown prompt variant"):
        prompt_variant("concise")


def test_batches_keep_order_and_split_on_token_cap() -> None:
    msg = (Message("user", (TextPart("q"),)),)
    reqs = [ChatRequest(str(i), msg, cap) for i, cap in enumerate([8, 8, 8, 4, 4, 8])]
    assert [[r.id for r in b] for b in batches(reqs, 2)] == [["0", "1"], ["2"], ["3", "4"], ["5"]]


def test_trim_generated_counts_through_the_first_stop_token() -> None:
    assert trim_generated([5, 6, 1, 0, 0], frozenset({1})) == (3, "stop")
    assert trim_generated([5, 6, 7], frozenset({1})) == (3, "length")
    assert trim_generated([1, 1, 1], frozenset({1})) == (1, "stop")  # pad == eos after the stop


def test_openai_request_encoding(suite: Suite) -> None:
    task = suite.tasks[0]
    req = build_request(task, task.samples[0], prompt_variant("short-system"), GenerationSettings(max_new_tokens=5))
    body = request_body("m", req, GenerationSettings(seed=3))
    assert body["temperature"] == 0.0 and "top_k" not in body and body["seed"] == 3 and body["max_tokens"] == 5
    assert body["messages"][0] == {"role": "system", "content": SHORT_ANSWER}
    image, text = body["messages"][1]["content"]
    assert image["image_url"]["url"].startswith("data:image/png;base64,")
    assert text == {"type": "text", "text": task.prompt(task.samples[0])}
    sampled = request_body("m", req, generation_settings("gemma"))
    assert (sampled["temperature"], sampled["top_p"], sampled["top_k"]) == (1.0, 0.95, 64)
    # The server decodes exactly what the client encoded.
    assert parse_messages(body["messages"]) == tuple(
        Message(m.role, tuple(ImagePart(p.encoded()) if isinstance(p, ImagePart) else p for p in m.parts))
        for m in req.messages
    )
    assert parse_settings(body) == (GenerationSettings(seed=3), 5)
    assert parse_settings(sampled)[0] == generation_settings("gemma")
    assert api_base("http://127.0.0.1:8000/") == "http://127.0.0.1:8000/v1"
    assert api_base("http://h:1/v1") == "http://h:1/v1"


def test_openai_response_without_usage_is_an_error() -> None:
    good = {
        "choices": [{"message": {"content": " 42 "}, "finish_reason": "length"}],
        "usage": {"prompt_tokens": 9, "completion_tokens": 2},
    }
    assert parse_completion(good) == Completion("42", 9, 2, "length")
    with pytest.raises(EcoquantError, match="usage"):
        parse_completion({"choices": [{"message": {"content": "42"}}]})


def test_server_rejects_what_it_cannot_answer_safely() -> None:
    with pytest.raises(RequestError, match="data: URL"):
        parse_messages(
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}]}]
        )
    with pytest.raises(RequestError, match="decode"):
        parse_messages(
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]
        )
    with pytest.raises(RequestError, match="stream must be true or false"):
        parse_stream({"stream": "yes"})
    with pytest.raises(RequestError, match="only allowed with stream: true"):
        parse_stream({"stream_options": {"include_usage": True}})
    assert parse_stream({"stream": True, "stream_options": {"include_usage": True}}) == (True, True)
    assert parse_stream({}) == (False, False)
    with pytest.raises(RequestError, match="role"):
        parse_messages([{"role": "tool", "content": "x"}])


# ------------------------------------------------------------------ on the tiny model


@pytest.fixture(scope="module")
def requests(suite: Suite) -> list[ChatRequest]:
    settings = GenerationSettings(max_new_tokens=MAX_NEW)
    return [r for _, _, r in suite_requests(suite, prompt_variant("short-system"), settings)]


@pytest.fixture(scope="module")
def direct(tiny_gemma4: Path) -> Iterator[TransformersBackend]:
    backend = TransformersBackend.load(tiny_gemma4, TransformersOptions(device="cpu", batch_size=1))
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def direct_completions(direct: TransformersBackend, requests: list[ChatRequest]) -> list[Completion]:
    done: list[int] = []
    out = direct.generate(requests, GenerationSettings(), on_done=done.append)
    assert done == [1] * len(requests)
    return out


def test_transformers_backend_counts_tokens_with_the_models_tokenizer(
    direct: TransformersBackend, requests: list[ChatRequest], direct_completions: list[Completion]
) -> None:
    for request, completion in zip(requests, direct_completions, strict=True):
        alone = direct.processor.apply_chat_template(
            hf_messages(request), add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        )
        assert completion.tokens_in == alone["input_ids"].shape[1]  # image soft tokens included
        assert 1 <= completion.tokens_out <= MAX_NEW
        assert (completion.finish_reason == "length") == (completion.tokens_out == MAX_NEW)
        assert completion.text == completion.text.strip()
    # Greedy is deterministic.
    assert direct.generate(requests[:1], GenerationSettings()) == direct_completions[:1]


def test_batched_generation_excludes_padding_from_token_counts(
    tiny_gemma4: Path, requests: list[ChatRequest], direct_completions: list[Completion]
) -> None:
    same_cap = [r for r in requests if r.max_new_tokens == requests[0].max_new_tokens]
    assert len(same_cap) == len(requests)  # all capped at MAX_NEW: one batch
    batched = TransformersBackend.load(tiny_gemma4, TransformersOptions(device="cpu", batch_size=len(requests)))
    try:
        out = batched.generate(requests, GenerationSettings())
    finally:
        batched.close()
    assert len({c.tokens_in for c in direct_completions}) > 1  # prompts of different lengths were padded
    assert [c.tokens_in for c in out] == [c.tokens_in for c in direct_completions]


@pytest.fixture(scope="module")
def server(tiny_gemma4: Path) -> Iterator[ChatServer]:
    """Our OpenAI-compatible server over a second, independent load of the tiny model, on 127.0.0.1."""
    backend = TransformersBackend.load(tiny_gemma4, TransformersOptions(device="cpu", batch_size=1))
    srv = ChatServer(backend, "tiny-gemma4", host="127.0.0.1", port=0).start()
    yield srv
    srv.stop()
    backend.close()


def test_openai_backend_matches_transformers_backend_for_greedy(
    server: ChatServer, suite: Suite, requests: list[ChatRequest], direct_completions: list[Completion]
) -> None:
    assert server.url.startswith("http://127.0.0.1:")
    client = OpenAIBackend(server.url, "tiny-gemma4", concurrency=2, timeout_s=120)
    done: list[int] = []
    via_http = client.generate(requests, GenerationSettings(), on_done=done.append)
    assert sum(done) == len(requests)
    # text, tokens in/out (from usage) and finish reason; a server reports no image-token count
    assert via_http == [replace(c, image_tokens=None) for c in direct_completions]
    assert all(c.image_tokens is not None and 0 < c.image_tokens < c.tokens_in for c in direct_completions)
    # Same outputs, same scores.
    for i, task in enumerate(suite.tasks):
        assert score(task, [via_http[i].text]) == score(task, [direct_completions[i].text])


def test_server_endpoints_and_errors(server: ChatServer) -> None:
    with urllib.request.urlopen(server.url + "/health", timeout=10) as r:
        assert json.loads(r.read()) == {"status": "ok"}
    with urllib.request.urlopen(server.url + "/v1/models", timeout=10) as r:
        assert [m["id"] for m in json.loads(r.read())["data"]] == ["tiny-gemma4"]
    with pytest.raises(EcoquantError, match="serves \\['tiny-gemma4'\\], not 'other'"):
        OpenAIBackend(server.url, "other")
    client = OpenAIBackend(server.url, "tiny-gemma4", check_model=False)
    bad = ChatRequest("x", (Message("user", (TextPart("hi"),)),), 1)
    bad_client = OpenAIBackend(server.url, "nope", check_model=False)
    with pytest.raises(EcoquantError, match="HTTP 404"):
        bad_client.complete(bad, GenerationSettings())
    text_only = client.complete(
        ChatRequest("t", (Message("user", (TextPart("Describe the image."),)),), 2), GenerationSettings()
    )
    assert text_only.tokens_out <= 2 and text_only.tokens_in > 0


def test_unreachable_server_is_one_clear_error() -> None:
    with pytest.raises(EcoquantError, match="cannot reach"):
        OpenAIBackend("http://127.0.0.1:9", "m", timeout_s=5)
