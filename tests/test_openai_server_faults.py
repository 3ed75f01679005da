"""The built-in OpenAI server under faults and load, and a busy port on ``ecoquant serve``.

Every server here runs over :class:`EchoBackend`, a fake that answers with the
request's last text part in microseconds, so that faults and 200 requests take
seconds. After each fault the server must still answer a normal request.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import socket
import struct
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from typer.testing import CliRunner

from ecoquant.cli import app
from ecoquant.errors import EcoquantError
from ecoquant.eval.backends.base import ChatRequest, Completion, GenerationSettings, TextPart
from ecoquant.serve import launch
from ecoquant.serve.launch import ServeOptions, VllmInstall, serve
from ecoquant.serve.openai_server import ChatServer
from ecoquant.serve.ports import free_port, port_in_use

NAME = "echo-model"
READ_TIMEOUT_S = 1.0
"""The servers' read timeout here: short, so that a stalled client is dropped within the test."""
HANDLER_THREAD = "process_request_thread"
"""In the names of socketserver's per-connection threads (``Thread-N (process_request_thread)``)."""


class EchoBackend:
    """A fake backend: answers each request with its last text part; fails loudly if entered concurrently.

    ``gate`` makes :meth:`generate` signal ``entered`` and wait for ``release`` (a slow generation
    the test controls); ``delay_s`` widens the window in which an overlap would be seen.
    """

    kind = "fake"

    def __init__(self, delay_s: float = 0.0, gate: bool = False) -> None:
        self.delay_s = delay_s
        self.gate = gate
        self.entered = threading.Event()
        self.release = threading.Event()
        self.calls = 0
        self.overlaps = 0
        self.peak_handlers = 0
        self._inside = threading.Lock()

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind}

    def generate(
        self,
        requests: Sequence[ChatRequest],
        settings: GenerationSettings,
        on_done: Callable[[int], None] | None = None,
    ) -> list[Completion]:
        if not self._inside.acquire(blocking=False):
            self.overlaps += 1
            raise AssertionError("generate entered concurrently: the server's lock does not serialize")
        try:
            self.calls += 1
            self.peak_handlers = max(self.peak_handlers, _handler_threads())
            if self.gate:
                self.entered.set()
                assert self.release.wait(timeout=30), "the test never released the backend"
            time.sleep(self.delay_s)
            out = [self._answer(r) for r in requests]
        finally:
            self._inside.release()
        if on_done is not None:
            on_done(len(requests))
        return out

    @staticmethod
    def _answer(request: ChatRequest) -> Completion:
        text = [p.text for p in request.messages[-1].parts if isinstance(p, TextPart)][-1]
        if text == "boom":
            raise RuntimeError("the fake backend was told to fail")
        # tokens_out = the request's cap, so that a test can see its own settings came back.
        return Completion(text, len(text.split()), request.max_new_tokens, "length")

    def close(self) -> None:
        pass


def _handler_threads() -> int:
    return sum(1 for t in threading.enumerate() if HANDLER_THREAD in t.name)


def _wait_for_idle_handlers(timeout_s: float = 10.0) -> None:
    """Until every connection's thread has finished (its answer written or abandoned)."""
    deadline = time.monotonic() + timeout_s
    while _handler_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _handler_threads() == 0, "a connection's thread is still running"


@pytest.fixture
def backend() -> EchoBackend:
    return EchoBackend()


@pytest.fixture
def server(backend: EchoBackend) -> Iterator[ChatServer]:
    srv = ChatServer(backend, NAME, host="127.0.0.1", port=0, read_timeout_s=READ_TIMEOUT_S).start()
    yield srv
    srv.stop()


@pytest.fixture
def listening() -> Iterator[int]:
    """A loopback port some other socket is listening on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


# ------------------------------------------------------------------ clients


def chat_body(text: str, max_tokens: int = 4, model: str = NAME, image_url: str | None = None) -> dict[str, Any]:
    content: list[dict[str, Any]] = [{"type": "text", "text": text}]
    if image_url is not None:
        content.insert(0, {"type": "image_url", "image_url": {"url": image_url}})
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "temperature": 0}


def post(server: ChatServer, body: dict[str, Any], timeout_s: float = 30) -> tuple[int, dict[str, Any]]:
    """POST a chat completion with urllib; (status, parsed JSON body), 4xx/5xx included."""
    request = urllib.request.Request(
        server.url + "/v1/chat/completions",
        data=json.dumps(body).encode("utf-8"),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return int(response.status), json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), json.loads(exc.read())


def raw_exchange(server: ChatServer, data: bytes, shutdown_write: bool = False, timeout_s: float = 10) -> bytes:
    """Send ``data`` on a fresh connection and read until the server closes it."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout_s) as sock:
        sock.sendall(data)
        if shutdown_write:
            sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def parse_response(raw: bytes) -> tuple[int, dict[str, Any]]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body)


def raw_post(body: bytes, headers: dict[str, str]) -> bytes:
    lines = ["POST /v1/chat/completions HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def assert_openai_error(status: int, payload: dict[str, Any], expected: int, fragment: str = "") -> None:
    assert status == expected, (status, payload)
    error = payload["error"]
    assert set(error) >= {"message", "type", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert error["type"] == ("invalid_request_error" if expected < 500 else "server_error"), error
    assert error["code"] == expected, error
    assert fragment in error["message"], error


def assert_still_serving(server: ChatServer) -> None:
    text = f"still there? {uuid.uuid4().hex}"
    status, payload = post(server, chat_body(text, max_tokens=3))
    assert status == 200, payload
    assert payload["choices"][0]["message"] == {"role": "assistant", "content": text}
    assert payload["usage"]["completion_tokens"] == 3


# ------------------------------------------------------------------ faults


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"{not json", "not JSON"),
        (b"", "not JSON"),
        (b'{"model": "echo-model", "messages": [', "not JSON"),
        (b"[1, 2]", "JSON object"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    ],
    ids=["garbage", "empty", "truncated", "not-an-object", "deep"],
)
def test_malformed_json_is_a_400_json_error(server: ChatServer, backend: EchoBackend, body: bytes, fragment: str) -> None:
    raw = raw_exchange(server, raw_post(body, {"Content-Length": str(len(body))}))
    assert_openai_error(*parse_response(raw), 400, fragment)
    assert backend.calls == 0
    assert_still_serving(server)


def test_unknown_model_is_a_404_json_error(server: ChatServer, backend: EchoBackend) -> None:
    status, payload = post(server, chat_body("hi", model="other-model"))
    assert_openai_error(status, payload, 404, "'other-model' is not served here")
    assert backend.calls == 0
    assert_still_serving(server)


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("data:text/plain;base64,aGVsbG8=", "must hold an image"),
        ("data:;base64,aGVsbG8=", "must hold an image"),
        ("data:image/png;base64," + base64.b64encode(b"hello, not a png").decode(), "cannot decode"),
        ("data:image/png;base64," + base64.b64encode(_png()[:40]).decode(), "cannot decode"),
        ("data:image/png;base64,not base64!", "cannot decode"),
        ("data:image/png," + base64.b64encode(_png()).decode(), "base64"),
        ("https://example.com/cat.png", "data: URL"),
    ],
    ids=["text-plain", "untyped", "png-not-image", "png-truncated", "bad-base64", "not-base64-encoded", "remote"],
)
def test_non_image_data_urls_are_400_json_errors(
    server: ChatServer, backend: EchoBackend, url: str, fragment: str
) -> None:
    status, payload = post(server, chat_body("what is this?", image_url=url))
    assert_openai_error(status, payload, 400, fragment)
    assert backend.calls == 0  # rejected while parsing, never handed to the model
    assert_still_serving(server)


def test_a_real_png_data_url_is_answered(server: ChatServer) -> None:
    # The control for the test above: the same request with a real image passes.
    url = "data:image/png;base64," + base64.b64encode(_png()).decode()
    status, payload = post(server, chat_body("what is this?", image_url=url))
    assert status == 200, payload
    assert payload["choices"][0]["message"]["content"] == "what is this?"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("hang_up", ["reset", "close"])
def test_client_gone_mid_answer_is_quiet_and_the_server_keeps_serving(
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str], hang_up: str
) -> None:
    caplog.set_level(logging.DEBUG, logger="ecoquant.serve.openai_server")
    slow = EchoBackend(gate=True)
    with ChatServer(slow, NAME, port=0, read_timeout_s=READ_TIMEOUT_S).start() as server:
        body = json.dumps(chat_body("a long answer")).encode()
        host, port = server.url.removeprefix("http://").split(":")
        sock = socket.create_connection((host, int(port)), timeout=10)
        sock.sendall(raw_post(body, {"Content-Length": str(len(body))}))
        assert slow.entered.wait(timeout=10), "the request never reached the backend"
        if hang_up == "reset":  # RST at once: the server's first write fails
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
        slow.gate = False
        slow.release.set()  # generation finishes; the answer goes to a closed socket
        _wait_for_idle_handlers()
        assert slow.calls == 1
        assert_still_serving(server)
        assert slow.calls == 2
    _wait_for_idle_handlers()
    assert "Traceback" not in capfd.readouterr().err
    worse_than_warning = [r for r in caplog.records if r.levelno > logging.WARNING]
    assert not worse_than_warning, [r.getMessage() for r in worse_than_warning]
    if hang_up == "reset":
        gone = [r for r in caplog.records if "went away" in r.getMessage()]
        assert gone and all(r.levelno == logging.DEBUG for r in gone), [r.getMessage() for r in caplog.records]


_SHORT = b'{"model": "echo'
_NOT_UTF8 = b'{"model": "\xff\xfe"}'
_BIG_HEADER = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n"


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("request_bytes", "shutdown_write", "expected", "fragment"),
    [
        (raw_post(_SHORT, {"Content-Length": "100"}), True, 400, f"ended after {len(_SHORT)} of its 100 bytes"),
        (raw_post(_SHORT, {"Content-Length": "100"}), False, 408, "did not arrive within 1 s"),
        (raw_post(b'{"messages": []}', {}), False, 411, "Content-Length is required"),
        (raw_post(b"{}", {"Content-Length": "-5"}), False, 400, "must be a byte count"),
        (raw_post(b"{}", {"Content-Length": "two"}), False, 400, "must be a byte count"),
        (raw_post(b"", {"Content-Length": str(1 << 40)}), False, 413, "request body over"),
        (raw_post(_NOT_UTF8, {"Content-Length": str(len(_NOT_UTF8))}), False, 400, "not UTF-8"),
        (_BIG_HEADER, False, 431, "Line too long"),
        (b"PUT /v1/chat/completions HTTP/1.1\r\nHost: x\r\n\r\n", False, 501, "Unsupported method"),
        (b"POST /v1/nowhere HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", False, 404, "no route"),
    ],
    ids=["short-then-eof", "short-then-stall", "no-length", "negative-length", "word-length", "huge-length",
         "invalid-utf8", "header-too-long", "unknown-method", "unknown-route"],
)
def test_broken_bodies_get_a_json_error_in_bounded_time(
    server: ChatServer,
    backend: EchoBackend,
    request_bytes: bytes,
    shutdown_write: bool,
    expected: int,
    fragment: str,
) -> None:
    start = time.monotonic()
    raw = raw_exchange(server, request_bytes, shutdown_write=shutdown_write)
    assert time.monotonic() - start < READ_TIMEOUT_S + 3  # never waits on the client for long
    assert_openai_error(*parse_response(raw), expected, fragment)
    assert backend.calls == 0
    assert_still_serving(server)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "partial",
    [b"", b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le"],
    ids=["silent", "half-headers"],
)
def test_a_stalled_client_is_dropped_and_blocks_no_one(server: ChatServer, partial: bytes) -> None:
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(partial)
        start = time.monotonic()
        assert_still_serving(server)  # while the stalled connection is open
        assert sock.recv(65536) == b""  # then the server hangs up on it: a clean close
        waited = time.monotonic() - start
    assert waited < READ_TIMEOUT_S + 3, waited
    assert_still_serving(server)


def test_a_backend_failure_is_a_500_json_error(server: ChatServer, backend: EchoBackend) -> None:
    status, payload = post(server, chat_body("boom"))
    assert_openai_error(status, payload, 500, "RuntimeError: the fake backend was told to fail")
    assert_still_serving(server)


@pytest.mark.timeout(30)
def test_stop_without_start_returns_and_frees_the_port(backend: EchoBackend) -> None:
    srv = ChatServer(backend, NAME, port=0)
    port = int(srv.url.rsplit(":", 1)[1])
    stopper = threading.Thread(target=srv.stop, daemon=True)
    stopper.start()
    stopper.join(timeout=5)
    assert not stopper.is_alive(), "stop() hung on a server that never served"
    assert not port_in_use("127.0.0.1", port)


# ------------------------------------------------------------------ load


@pytest.mark.timeout(180)
def test_200_requests_16_in_flight_all_answered_in_order_of_their_own() -> None:
    # A short sleep inside generate() widens the window in which unserialized calls would overlap.
    _wait_for_idle_handlers()  # earlier tests' connections would inflate peak_handlers
    backend = EchoBackend(delay_s=0.002)
    n, in_flight = 200, 16
    texts = [f"request {i} {uuid.uuid4().hex}" for i in range(n)]
    caps = [1 + i % 7 for i in range(n)]
    with ChatServer(backend, NAME, port=0).start() as server, ThreadPoolExecutor(max_workers=in_flight) as pool:
        results = list(pool.map(lambda i: post(server, chat_body(texts[i], max_tokens=caps[i])), range(n)))
    for text, cap, (status, payload) in zip(texts, caps, results, strict=True):
        assert status == 200, payload
        assert payload["model"] == NAME
        assert payload["choices"][0]["message"]["content"] == text  # its own answer: no cross-talk
        assert payload["usage"]["completion_tokens"] == cap
        assert payload["usage"]["prompt_tokens"] == len(text.split())
        assert payload["choices"][0]["finish_reason"] == "length"
    assert len({payload["id"] for _, payload in results}) == n
    assert backend.calls == n
    assert backend.overlaps == 0  # the lock serialized generation...
    assert backend.peak_handlers > 1  # ...while several requests were in the server at once


# ------------------------------------------------------------------ busy port


def test_chat_server_on_a_busy_port_is_one_line(backend: EchoBackend, listening: int) -> None:
    with pytest.raises(EcoquantError) as info:
        ChatServer(backend, NAME, host="127.0.0.1", port=listening)
    message = str(info.value)
    assert f"port {listening} on 127.0.0.1 is in use" in message and "--port" in message
    assert "\n" not in message


def test_chat_server_on_a_foreign_address_is_one_line(backend: EchoBackend) -> None:
    # 192.0.2.1 (TEST-NET-1) is no address of this machine: the bind fails at once, without DNS.
    with pytest.raises(EcoquantError, match="cannot listen on 192.0.2.1:0") as info:
        ChatServer(backend, NAME, host="192.0.2.1", port=0)
    assert "\n" not in str(info.value)


@pytest.fixture(scope="module")
def tiny_vlm() -> Path:
    from ecoquant.fixtures.tiny_vlm import tiny_vlm_path

    return tiny_vlm_path()


def _fail(what: str) -> Callable[..., Any]:
    def fail(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"{what} ran although the port is busy")

    return fail


@pytest.mark.parametrize("backend_name", ["transformers", "vllm"])
def test_cli_serve_on_a_busy_port_is_one_line_before_anything_starts(
    monkeypatch: pytest.MonkeyPatch, tiny_vlm: Path, listening: int, backend_name: str
) -> None:
    monkeypatch.setattr(launch, "plan_serve", _fail("planning (vLLM lookup, config build)"))
    monkeypatch.setattr(launch, "find_vllm", _fail("the vLLM lookup"))
    monkeypatch.setattr(launch, "transformers_server", _fail("the model load"))
    monkeypatch.setattr(launch.subprocess, "Popen", _fail("starting vLLM"))
    result = CliRunner().invoke(app, ["serve", str(tiny_vlm), "--port", str(listening), "--backend", backend_name])
    assert result.exit_code == 2, result.output
    text = result.output.strip()
    assert "Traceback" not in text and text.startswith("error:"), text
    assert len(text.splitlines()) == 1, text
    assert f"port {listening} on 127.0.0.1 is in use" in text


class _FakeProc:
    def wait(self) -> int:
        return 0


def test_serve_with_vllm_checks_the_port_before_popen(
    monkeypatch: pytest.MonkeyPatch, tiny_vlm: Path, tmp_path: Path, listening: int
) -> None:
    config = tmp_path / "vllm_config.yaml"
    config.write_text(f"model: {tiny_vlm}\n", encoding="utf-8")
    install = VllmInstall(Path("/nonexistent/python"), "vllm", "0.32.0")
    monkeypatch.setattr(launch, "find_vllm", lambda python=None: install)
    started: list[list[str]] = []
    where: list[object] = []

    def fake_popen(command: list[str], cwd: object = None) -> _FakeProc:
        started.append(list(command))
        where.append(cwd)
        return _FakeProc()

    monkeypatch.setattr(launch.subprocess, "Popen", fake_popen)

    with pytest.raises(EcoquantError, match=f"port {listening} on 127.0.0.1 is in use"):
        serve(tiny_vlm, ServeOptions(backend="vllm", port=listening, config=config))
    assert started == []

    # The control: on a free port the same call gets as far as starting vLLM (faked).
    port = free_port()
    assert serve(tiny_vlm, ServeOptions(backend="vllm", port=port, config=config)) == 0
    assert len(started) == 1 and started[0][:2] == ["/nonexistent/python", "-m"]
    assert started[0][started[0].index("--port") + 1] == str(port)
    assert where == [tiny_vlm]  # vLLM starts inside the model folder, as the challenge runs a submission
