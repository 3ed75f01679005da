"""A small OpenAI-compatible HTTP server over a transformers model.

Why our own: the evaluation's OpenAI backend must be testable on a machine
without vLLM (this one has no GPU), and ``ecoquant serve`` needs a fallback
where vLLM is not installed. It serves exactly what the evaluation uses:

* ``POST /v1/chat/completions`` -- messages with text and ``image_url`` parts
  (``data:`` URLs only: the server never fetches a URL), ``max_tokens`` /
  ``max_completion_tokens``, ``temperature`` (0 means greedy; default 1.0 as
  in OpenAI's API), ``top_p``, ``top_k`` (vLLM's extension), ``seed``; the
  answer with ``usage`` token counts and ``finish_reason``. ``stream: true``
  answers with server-sent events in OpenAI's ``chat.completion.chunk``
  format (role first, then content, then ``finish_reason``, then
  ``data: [DONE]``), with a last ``usage`` chunk when
  ``stream_options: {"include_usage": true}``. Chat front-ends and many clients
  only stream. The answer is generated whole and then sent as one content
  event: the format clients need, not an earlier first token (this server
  generates one request at a time; for latency, serve with vLLM).
* ``GET /v1/models`` -- the one served model.
* ``GET /health`` -- 200 when ready.

It is a fallback, not a throughput server: requests are answered one at a
time, each alone (batch size 1), under a lock. That is also what makes its
greedy answers identical to the transformers backend run with
``batch_size=1`` (see :mod:`ecoquant.eval.backends.transformers_backend`).

Only the standard library's ``http.server`` is used. It binds 127.0.0.1
unless told otherwise.

Faults stay with the request that caused them. Every bad request (not JSON,
not UTF-8, a body shorter than its ``Content-Length``, an unknown model, an
``image_url`` that is not an image) is answered 4xx with an OpenAI-style body
``{"error": {"message", "type", "code"}}``; a client that stalls while sending
is dropped after :data:`DEFAULT_READ_TIMEOUT_S`; a client that hangs up before
its answer is written is one debug log line, not a traceback. The server keeps
serving the others in every case.
"""

from __future__ import annotations

import base64
import errno
import json
import logging
import sys
import threading
import time
import uuid
from collections.abc import Mapping
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from ecoquant.errors import EcoquantError
from ecoquant.eval.backends.base import (
    Backend,
    ChatRequest,
    GenerationSettings,
    ImagePart,
    Message,
    Part,
    TextPart,
    decode_image,
)

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
MAX_BODY_BYTES = 64 << 20
"""Largest request accepted (a few page images as base64 fit many times over)."""
DEFAULT_MAX_TOKENS = 1024
"""Token cap when a request names none."""
DEFAULT_READ_TIMEOUT_S = 30.0
"""How long a client may stall while sending its request before it is dropped (generation is not limited)."""
LISTEN_BACKLOG = 64
"""Connections the OS queues before ``accept``; the default 5 makes a burst of clients wait on SYN retries."""

_ROLES: Mapping[str, str] = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class RequestError(Exception):
    """A bad request: answered with HTTP 4xx and an OpenAI-style error body."""

    def __init__(self, message: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST) -> None:
        super().__init__(message)
        self.status = status


def _image_from_url(url: Any) -> ImagePart:
    if isinstance(url, Mapping):
        url = url.get("url")
    if not isinstance(url, str) or not url.startswith("data:"):
        raise RequestError("image_url must be a data: URL (data:image/png;base64,...); this server fetches nothing")
    header, _, payload = url.partition(",")
    mime = header.removeprefix("data:").partition(";")[0]
    if not mime.startswith("image/"):
        raise RequestError(f"image_url must hold an image (data:image/...;base64,...), not {mime or 'untyped data'!r}")
    if not header.endswith(";base64"):
        raise RequestError("image data URLs must be base64-encoded")
    try:
        data = base64.b64decode(payload, validate=True)
        decode_image(data)  # reject undecodable images here, as a 400, not deep inside generate
    except Exception as exc:  # noqa: BLE001 - PIL raises many types (OSError, SyntaxError, struct.error...) on hostile bytes
        raise RequestError(f"cannot decode image_url: {exc}") from None
    return ImagePart(data)


def parse_messages(raw: Any) -> tuple[Message, ...]:
    """OpenAI chat messages -> :class:`Message` s (the inverse of the OpenAI backend's encoding)."""
    if not isinstance(raw, list) or not raw:
        raise RequestError("messages must be a non-empty list")
    out = []
    for m in raw:
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or m["role"] not in _ROLES:
            raise RequestError(f"each message needs a role among {sorted(_ROLES)}")
        content = m.get("content")
        parts: list[Part] = []
        if isinstance(content, str):
            parts.append(TextPart(content))
        elif isinstance(content, list):
            for p in content:
                kind = p.get("type") if isinstance(p, Mapping) else None
                if kind == "text" and isinstance(p.get("text"), str):
                    parts.append(TextPart(p["text"]))
                elif kind == "image_url":
                    parts.append(_image_from_url(p.get("image_url")))
                else:
                    raise RequestError(f"unsupported content part {kind!r}; use text or image_url")
        else:
            raise RequestError("message content must be a string or a list of parts")
        if not parts:
            raise RequestError("a message has empty content")
        out.append(Message(_ROLES[m["role"]], tuple(parts)))  # type: ignore[arg-type]
    return tuple(out)


def parse_stream(body: Mapping[str, Any]) -> tuple[bool, bool]:
    """Whether to answer as server-sent events, and whether to end them with a usage chunk.

    The rules are OpenAI's: ``stream`` is a boolean, and ``stream_options`` goes only with
    ``stream: true``.
    """
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise RequestError("stream must be true or false")
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not stream:
        raise RequestError("stream_options is only allowed with stream: true")
    if not isinstance(options, Mapping) or not isinstance(options.get("include_usage", False), bool):
        raise RequestError('stream_options must be an object like {"include_usage": true}')
    return stream, bool(options.get("include_usage", False))


def stream_chunks(answer: Mapping[str, Any], include_usage: bool) -> list[dict[str, Any]]:
    """A finished ``chat.completion`` as the ``chat.completion.chunk`` events OpenAI streams.

    Role first (empty content), then the content, then an empty delta with
    ``finish_reason``; with ``include_usage`` every chunk carries
    ``usage: null`` and a last chunk with no choices carries the counts.
    """
    (choice,) = answer["choices"]
    head = {"id": answer["id"], "object": "chat.completion.chunk", "created": answer["created"], "model": answer["model"]}
    deltas = [
        ({"role": "assistant", "content": ""}, None),
        ({"content": choice["message"]["content"]}, None),
        ({}, choice["finish_reason"]),
    ]
    chunks = [
        {**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]} | ({"usage": None} if include_usage else {})
        for delta, finish in deltas
    ]
    if include_usage:
        chunks.append({**head, "choices": [], "usage": answer["usage"]})
    return chunks


def parse_settings(body: Mapping[str, Any]) -> tuple[GenerationSettings, int]:
    """Sampling settings and the token cap of a request (temperature 0 means greedy)."""
    if body.get("n", 1) != 1:
        raise RequestError("only n=1 is supported")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens", DEFAULT_MAX_TOKENS))
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise RequestError("max_tokens must be a positive integer")
    seed = body.get("seed", 0)
    if not isinstance(seed, int):
        raise RequestError("seed must be an integer")
    temperature = body.get("temperature", 1.0)
    try:
        if float(temperature) == 0.0:
            return GenerationSettings(seed=seed), max_tokens
        top_k = body.get("top_k")
        return (
            GenerationSettings(
                do_sample=True,
                temperature=float(temperature),
                top_p=body.get("top_p"),
                # vLLM spells "no top-k" as -1 (or 0).
                top_k=None if top_k is None or top_k <= 0 else int(top_k),
                seed=seed,
            ),
            max_tokens,
        )
    except (TypeError, ValueError) as exc:
        raise RequestError(f"bad sampling settings: {exc}") from None


def bind_error_message(host: str, port: int, exc: OSError) -> str:
    """One line for a failed bind, worded as :func:`ecoquant.serve.ports.require_free_port` words a busy port."""
    if exc.errno == errno.EADDRINUSE:
        return f"port {port} on {host} is in use (another server is listening there); stop it or choose another --port"
    return f"cannot listen on {host}:{port} ({exc.strerror or exc}); choose another --host or --port"


class _HTTPServer(ThreadingHTTPServer):
    """One thread per connection; a client gone mid-answer is a debug line, not http.server's traceback."""

    daemon_threads = True
    request_queue_size = LISTEN_BACKLOG

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, ConnectionError | TimeoutError):
            # The client hung up or stalled: nothing to answer, nothing wrong with the server.
            log.debug("client %s went away: %s", client_address[0], exc)
        else:
            log.error("unexpected error answering %s", client_address[0], exc_info=exc)


class ChatServer:
    """An HTTP server answering chat completions with one backend, one request at a time.

    Use as a context manager (``with ChatServer(...).start() as server:``) or
    call :meth:`serve_forever` in the foreground. A port that cannot be bound
    is an :class:`~ecoquant.errors.EcoquantError` (one line), raised here.
    ``read_timeout_s`` bounds how long a client may stall while sending.
    """

    def __init__(
        self,
        backend: Backend,
        served_name: str,
        host: str = DEFAULT_HOST,
        port: int = 0,
        read_timeout_s: float = DEFAULT_READ_TIMEOUT_S,
    ) -> None:
        self.backend = backend
        self.served_name = served_name
        self.created = int(time.time())
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._started = False
        try:
            self._httpd = _HTTPServer((host, port), _handler_for(self, read_timeout_s))
        except OSError as exc:
            raise EcoquantError(bind_error_message(host, port, exc)) from None

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        name = host.decode() if isinstance(host, bytes) else host
        return f"http://{name}:{port}"

    def start(self) -> ChatServer:
        """Serve in a background thread; returns self."""
        self._started = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="ecoquant-openai-server", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self._started = True
        self._httpd.serve_forever()

    def stop(self) -> None:
        """Stop serving and release the port (the backend stays loaded; close it yourself)."""
        if self._started:  # shutdown() waits for a serve loop that never ran forever
            self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def __enter__(self) -> ChatServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def models(self) -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": self.served_name, "object": "model", "created": self.created, "owned_by": "ecoquant"}],
        }

    def chat_completion(self, body: Any) -> dict[str, Any]:
        """Answer one parsed request body (raises :class:`RequestError` for a bad one)."""
        if not isinstance(body, Mapping):
            raise RequestError("the request body must be a JSON object")
        if body.get("model") not in (None, self.served_name):
            raise RequestError(
                f"model {body.get('model')!r} is not served here; this server serves {self.served_name!r}",
                HTTPStatus.NOT_FOUND,
            )
        messages = parse_messages(body.get("messages"))
        settings, max_tokens = parse_settings(body)
        request = ChatRequest(id="http", messages=messages, max_new_tokens=max_tokens)
        with self._lock:
            (completion,) = self.backend.generate([request], settings)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.served_name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": completion.text},
                    "finish_reason": completion.finish_reason,
                }
            ],
            "usage": {
                "prompt_tokens": completion.tokens_in,
                "completion_tokens": completion.tokens_out,
                "total_tokens": completion.tokens_in + completion.tokens_out,
            },
        }


def _handler_for(server: ChatServer, read_timeout_s: float) -> type[BaseHTTPRequestHandler]:
    """A request-handler class bound to one :class:`ChatServer` (http.server wants a class)."""

    class Handler(BaseHTTPRequestHandler):
        server_version = "ecoquant-openai/1"
        # StreamRequestHandler puts this on the socket: a client that stalls while
        # sending is dropped instead of holding its thread forever.
        timeout = read_timeout_s

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
            log.debug("%s " + format, self.address_string(), *args)

        def _send(self, status: HTTPStatus, payload: Mapping[str, Any]) -> None:
            data = json.dumps(payload).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)

        def _send_events(self, events: list[dict[str, Any]]) -> None:
            """Server-sent events, each ``data: <json>`` and a blank line, then ``data: [DONE]``; the close ends the body."""
            self.close_connection = True
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            for event in events:
                self.wfile.write(b"data: " + json.dumps(event).encode("utf-8") + b"\n\n")
                self.wfile.flush()
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()

        def _error(self, status: HTTPStatus, message: str) -> None:
            # After an error the rest of the connection (an unread body, say) cannot be trusted.
            self.close_connection = True
            kind = "invalid_request_error" if status < 500 else "server_error"
            self._send(status, {"error": {"message": message, "type": kind, "code": int(status)}})

        def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
            """http.server's own errors (bad request line, unknown method...) as JSON too, not HTML."""
            status = HTTPStatus(code)
            self.log_error("code %d, message %s", code, message)
            self._error(status, message or status.phrase)

        def _read_json(self) -> Any:
            """The request body as JSON; each way it can be wrong is a :class:`RequestError`, never a hang."""
            raw = self.headers.get("Content-Length")
            if raw is None:
                raise RequestError("Content-Length is required", HTTPStatus.LENGTH_REQUIRED)
            if not (raw.strip().isascii() and raw.strip().isdigit()):
                raise RequestError(f"Content-Length must be a byte count, not {raw!r}")
            length = int(raw)
            if length > MAX_BODY_BYTES:
                raise RequestError(f"request body over {MAX_BODY_BYTES} bytes", HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
            try:
                data = self.rfile.read(length)
            except TimeoutError:
                raise RequestError(
                    f"the request body did not arrive within {read_timeout_s:g} s", HTTPStatus.REQUEST_TIMEOUT
                ) from None
            if len(data) < length:
                raise RequestError(f"the request body ended after {len(data)} of its {length} bytes (Content-Length)")
            try:
                return json.loads(data.decode("utf-8"))
            except UnicodeDecodeError as exc:
                raise RequestError(f"the request body is not UTF-8 (byte {exc.start})") from None
            except json.JSONDecodeError as exc:
                raise RequestError(f"the request body is not JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
            except RecursionError:
                raise RequestError("the request body is nested too deeply") from None

        def do_GET(self) -> None:  # noqa: N802 - http.server's names
            path = self.path.split("?", 1)[0].rstrip("/")
            if path == "/health":
                self._send(HTTPStatus.OK, {"status": "ok"})
            elif path == "/v1/models":
                self._send(HTTPStatus.OK, server.models())
            else:
                self._error(HTTPStatus.NOT_FOUND, f"no route {self.path}")

        def do_POST(self) -> None:  # noqa: N802
            if self.path.split("?", 1)[0].rstrip("/") != "/v1/chat/completions":
                self._error(HTTPStatus.NOT_FOUND, f"no route {self.path}")
                return
            # Reading and writing the socket stay outside the catch-all below: a client
            # that hung up has no one to answer, and _HTTPServer.handle_error logs it.
            try:
                body = self._read_json()
            except RequestError as exc:
                self._error(exc.status, str(exc))
                return
            try:
                stream, include_usage = parse_stream(body) if isinstance(body, Mapping) else (False, False)
                answer = server.chat_completion(body)
            except RequestError as exc:
                self._error(exc.status, str(exc))
                return
            except Exception as exc:  # a generation failure must answer 500, not drop the connection
                log.exception("chat completion failed")
                self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"{type(exc).__name__}: {exc}")
                return
            if stream:
                self._send_events(stream_chunks(answer, include_usage))
            else:
                self._send(HTTPStatus.OK, answer)

    return Handler


def serve_model(
    model: str | Path,
    *,
    host: str = DEFAULT_HOST,
    port: int = 8000,
    served_name: str | None = None,
    device: str = "auto",
    dtype: str = "bfloat16",
    max_soft_tokens: int | None = None,
) -> ChatServer:
    """Load ``model`` with transformers and return a (not yet started) server for it.

    ``served_name`` defaults to ``model`` as given, as ``vllm serve`` does;
    ``max_soft_tokens`` is the image-token budget every request's images get.
    """
    from ecoquant.eval.backends.transformers_backend import TransformersBackend, TransformersOptions
    from ecoquant.serve.ports import require_free_port

    require_free_port(host, port)  # before the load: a busy port should not cost a model load first
    options = TransformersOptions(device=device, dtype=dtype, batch_size=1, max_soft_tokens=max_soft_tokens)
    backend = TransformersBackend.load(model, options)
    try:
        return ChatServer(backend, served_name or str(model), host=host, port=port)
    except EcoquantError:
        backend.close()  # the port was taken between the check and the bind
        raise
