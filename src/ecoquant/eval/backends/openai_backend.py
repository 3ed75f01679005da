"""Answer chat requests through any OpenAI-compatible server (``vllm serve``, ``ecoquant serve``).

Requests go to ``POST {url}/v1/chat/completions`` with the images inline as
base64 data URLs (the server needs no access to our files), several at a time
so that a batching server like vLLM can batch them. Token counts are the
server's own ``usage`` numbers; a response without them is an error, because
a missing count must not become a zero in the report.

Sampling maps onto the request as vLLM reads it: greedy is ``temperature=0``;
sampling sends ``temperature``, ``top_p`` and vLLM's extra ``top_k``. Every
request carries the run's ``seed``.

Only the standard library is used (``urllib``), so evaluating a remote
server needs neither torch nor an HTTP client package.
"""

from __future__ import annotations

import contextlib
import json
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any

from ecoquant.errors import EcoquantError
from ecoquant.eval.backends.base import (
    ChatRequest,
    Completion,
    FinishReason,
    GenerationSettings,
    ImagePart,
    Message,
    TextPart,
)


def api_base(url: str) -> str:
    """``http://host:8000``, ``.../`` or ``.../v1`` -> ``http://host:8000/v1``."""
    base = url.strip().rstrip("/")
    if not base.startswith(("http://", "https://")):
        raise EcoquantError(f"server URL {url!r} must start with http:// or https://")
    return base if base.endswith("/v1") else base + "/v1"


def openai_messages(messages: Sequence[Message]) -> list[dict[str, Any]]:
    """Chat messages in OpenAI's format; a text-only message is sent as a plain string (widest support)."""
    out: list[dict[str, Any]] = []
    for message in messages:
        if all(isinstance(p, TextPart) for p in message.parts):
            out.append({"role": message.role, "content": "".join(p.text for p in message.parts)})  # type: ignore[union-attr]
            continue
        content: list[dict[str, Any]] = []
        for part in message.parts:
            if isinstance(part, TextPart):
                content.append({"type": "text", "text": part.text})
            elif isinstance(part, ImagePart):
                content.append({"type": "image_url", "image_url": {"url": part.data_url()}})
            else:
                raise TypeError(f"unknown message part {type(part).__name__}")
        out.append({"role": message.role, "content": content})
    return out


def request_body(model: str, request: ChatRequest, settings: GenerationSettings) -> dict[str, Any]:
    """The JSON body of one chat completion request."""
    body: dict[str, Any] = {
        "model": model,
        "messages": openai_messages(request.messages),
        "max_tokens": request.max_new_tokens,
        "seed": settings.seed,
        "n": 1,
        "stream": False,
    }
    if settings.do_sample:
        body["temperature"] = settings.temperature
        if settings.top_p is not None:
            body["top_p"] = settings.top_p
        if settings.top_k is not None:
            body["top_k"] = settings.top_k  # a vLLM extension; OpenAI itself has no top_k
    else:
        body["temperature"] = 0.0
    return body


def parse_completion(data: dict[str, Any]) -> Completion:
    """A chat completion response -> :class:`Completion`, insisting on ``usage``."""
    try:
        choice = data["choices"][0]
        text = choice["message"]["content"] or ""
        usage = data["usage"]
        tokens_in, tokens_out = int(usage["prompt_tokens"]), int(usage["completion_tokens"])
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise EcoquantError(
            f"the server's chat completion lacks {exc} (need choices[0].message.content and usage token counts)"
        ) from None
    finish: FinishReason = "length" if choice.get("finish_reason") == "length" else "stop"
    return Completion(text=text.strip(), tokens_in=tokens_in, tokens_out=tokens_out, finish_reason=finish)


class OpenAIBackend:
    """One model on one OpenAI-compatible server.

    Attributes:
        url: the API base (``.../v1``).
        model: the served model name sent in every request (``vllm serve PATH``
            serves it as ``PATH`` unless ``--served-model-name`` says otherwise).
    """

    kind = "openai"

    def __init__(
        self,
        url: str,
        model: str,
        *,
        concurrency: int = 8,
        timeout_s: float = 600.0,
        api_key: str | None = None,
        check_model: bool = True,
    ) -> None:
        if concurrency < 1:
            raise EcoquantError(f"concurrency must be at least 1, got {concurrency}")
        self.url = api_base(url)
        self.model = model
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self._api_key = api_key
        if check_model:
            served = self.served_models()
            if model not in served:
                raise EcoquantError(
                    f"the server at {self.url} serves {served}, not {model!r}; pass the served model name"
                )

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        data = None if body is None else json.dumps(body).encode("utf-8")
        req = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode("utf-8", "replace")
            # OpenAI-style servers explain in {"error": {"message": ...}}; otherwise show the raw body.
            with contextlib.suppress(ValueError, KeyError, TypeError):
                detail = json.loads(detail)["error"]["message"]
            raise EcoquantError(
                f"{method} {self.url}{path} failed with HTTP {exc.code}: {' '.join(str(detail).split())[:300]}"
            ) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise EcoquantError(
                f"cannot reach the OpenAI-compatible server at {self.url} ({reason}); start it"
                " (`vllm serve MODEL` or `ecoquant serve MODEL`) or fix --url"
            ) from None
        except json.JSONDecodeError:
            raise EcoquantError(
                f"{self.url}{path} did not answer with JSON; is --url an OpenAI-compatible server?"
            ) from None

    def served_models(self) -> list[str]:
        """The model ids ``GET /v1/models`` lists."""
        data = self._call("GET", "/models")
        try:
            return [str(m["id"]) for m in data["data"]]
        except (KeyError, TypeError):
            raise EcoquantError(f"{self.url}/models did not list models as the OpenAI API does") from None

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "url": self.url, "served_model": self.model, "concurrency": self.concurrency}

    def complete(self, request: ChatRequest, settings: GenerationSettings) -> Completion:
        """One request, synchronously."""
        return parse_completion(self._call("POST", "/chat/completions", request_body(self.model, request, settings)))

    def generate(
        self,
        requests: Sequence[ChatRequest],
        settings: GenerationSettings,
        on_done: Callable[[int], None] | None = None,
    ) -> list[Completion]:
        """Up to ``concurrency`` requests in flight; results in request order."""
        results: list[Completion | None] = [None] * len(requests)
        with ThreadPoolExecutor(max_workers=min(self.concurrency, max(len(requests), 1))) as pool:
            futures = {pool.submit(self.complete, r, settings): i for i, r in enumerate(requests)}
            try:
                for future in as_completed(futures):
                    results[futures[future]] = future.result()
                    if on_done is not None:
                        on_done(1)
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
        return [r for r in results if r is not None]

    def close(self) -> None:
        """Nothing to free: connections are per request."""
