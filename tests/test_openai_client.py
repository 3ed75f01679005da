"""The official ``openai`` Python client against ``ecoquant serve``'s fallback server on the shipped tiny VLM.

What a user tried (issue 31): models, a chat with an image and a wrong model
name worked; ``stream=True`` was refused. Chat front-ends and many clients
only stream, so the fallback answers with OpenAI's server-sent events. The
client talks to 127.0.0.1 only.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator

import openai
import pytest
from PIL import Image

from ecoquant.eval.backends.transformers_backend import TransformersBackend, TransformersOptions
from ecoquant.fixtures.tiny_vlm import tiny_vlm_path
from ecoquant.serve.openai_server import ChatServer

NAME = "tiny-vlm"


@pytest.fixture(scope="module")
def client() -> Iterator[openai.OpenAI]:
    backend = TransformersBackend.load(tiny_vlm_path(), TransformersOptions(device="cpu", batch_size=1))
    server = ChatServer(backend, NAME, host="127.0.0.1", port=0).start()
    try:
        yield openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    finally:
        server.stop()
        backend.close()


def _image_message() -> list[dict]:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": "What colour is the image?"}]}]


def test_models_chat_and_wrong_model(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == [NAME]
    answer = client.chat.completions.create(model=NAME, messages=_image_message(), max_tokens=6, temperature=0)
    assert answer.object == "chat.completion" and answer.choices[0].message.role == "assistant"
    assert answer.usage is not None and answer.usage.completion_tokens <= 6
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.chat.completions.create(model="other", messages=_image_message(), max_tokens=2)


def test_streaming_sends_openai_chunks_with_the_same_answer(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model=NAME, messages=_image_message(), max_tokens=8, temperature=0)
    chunks = list(client.chat.completions.create(
        model=NAME, messages=_image_message(), max_tokens=8, temperature=0,
        stream=True, stream_options={"include_usage": True},
    ))
    assert all(c.object == "chat.completion.chunk" and c.model == NAME for c in chunks)
    assert len({c.id for c in chunks}) == 1
    with_choices = [c for c in chunks if c.choices]
    assert with_choices[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in with_choices) == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in with_choices]
    assert finishes[-1] == whole.choices[0].finish_reason and not any(finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(c.usage is None for c in chunks[:-1])


def test_streaming_without_usage_and_bad_stream_options(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(model=NAME, messages=_image_message(), max_tokens=3,
                                                 temperature=0, stream=True))
    assert chunks and all(c.choices and c.usage is None for c in chunks)
    with pytest.raises(openai.BadRequestError, match="only allowed with stream: true"):
        client.chat.completions.create(model=NAME, messages=_image_message(), max_tokens=2,
                                       stream_options={"include_usage": True})
