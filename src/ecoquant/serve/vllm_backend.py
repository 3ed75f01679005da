"""``ecoquant eval --backend vllm``: each model served by its own ``vllm serve --config``, as the organizers run it.

Why not the transformers backend's energy: it has no Marlin kernels, no CUDA
graphs and other batching, so its joules say little about what a checkpoint
costs when vLLM serves it. Here every model gets what a submission gets:

1. its ``vllm_config.yaml`` is written (``max_model_len`` measured on the
   suite, plus the candidate's serving options) beside the results, in
   ``LOGS/LABEL/``;
2. vLLM starts on a free loopback port in a process group of its own, with
   its log in ``LOGS/LABEL/server.log``; readiness (``GET /health``) is
   awaited for a bounded time;
3. the runner sends the warm-up requests, then the whole suite in one energy
   window, through the same OpenAI backend as ``--backend openai``;
4. ``close`` stops the whole group (vLLM's engine processes included) and
   waits until none of its processes is alive or holds a GPU (NVML), so the
   next model's window never contains this one's teardown.

A server that exits before it is ready, is not ready in time, or dies or
times out mid-suite raises :class:`~ecoquant.eval.runner.BackendFailure`
with the last lines of its log: the runner records a failed row and goes on.

This module sits above :mod:`ecoquant.eval` (it builds a backend for the
runner) and beside :mod:`ecoquant.serve.launch` (whose vLLM discovery and
command line it uses).
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from ecoquant.errors import EcoquantError
from ecoquant.eval.backends.base import Backend, ChatRequest, Completion, GenerationSettings
from ecoquant.eval.backends.openai_backend import OpenAIBackend
from ecoquant.eval.runner import BackendFailure, EvalConfig, ModelRef
from ecoquant.serve.config import CONFIG_FILE, ServeConfigOptions, build_serve_config
from ecoquant.serve.launch import (
    CPU_FLAGS,
    VllmInstall,
    cuda_visible,
    group_pids,
    health_ok,
    log_tail,
    process_state,
    require_vllm,
    stop_group,
    vllm_command,
)
from ecoquant.serve.ports import free_port

LOG_FILE = "server.log"


@dataclass(frozen=True)
class VllmServerOptions:
    """How each model's server is started and stopped.

    Attributes:
        log_dir: one folder per model under it: its ``vllm_config.yaml`` and ``server.log``.
        serve_config: how the config is built (suite measured for ``max_model_len``, sampling defaults).
        serving: per-label serving options (vLLM engine arguments) added to that model's config.
        vllm_python: the interpreter with vLLM (see :func:`ecoquant.serve.launch.find_vllm`).
        vllm_args: extra command-line arguments, appended last (they override the file).
        gpu: the one GPU this server may use (``CUDA_VISIBLE_DEVICES``); None leaves the environment as it is.
        ready_timeout_s: how long a server may take to answer ``/health``.
        release_timeout_s: how long to wait, after stopping, for its processes to exit and free the GPU.
    """

    log_dir: Path
    serve_config: ServeConfigOptions = field(default_factory=ServeConfigOptions)
    serving: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    vllm_python: Path | None = None
    vllm_args: tuple[str, ...] = ()
    gpu: int | None = None
    ready_timeout_s: float = 900.0
    release_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "vllm_args", tuple(self.vllm_args))
        object.__setattr__(self, "serving", MappingProxyType({k: dict(v) for k, v in dict(self.serving).items()}))
        if self.ready_timeout_s <= 0 or self.release_timeout_s < 0:
            raise EcoquantError("server timeouts must be positive")


def label_dir(log_dir: Path, label: str) -> Path:
    """``LOGS/<label>``, with characters that are not safe in a file name replaced."""
    return log_dir / re.sub(r"[^A-Za-z0-9._+-]", "_", label)


def gpu_pids() -> set[int] | None:
    """PIDs holding a compute context on any GPU (NVML), or None without NVML."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return None
    try:
        pids: set[int] = set()
        for i in range(int(pynvml.nvmlDeviceGetCount())):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            pids |= {int(p.pid) for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)}
        return pids
    except pynvml.NVMLError:
        return None
    finally:
        pynvml.nvmlShutdown()


def wait_released(pids: set[int], timeout_s: float, poll_s: float = 0.5) -> bool:
    """Wait until none of ``pids`` is alive or holds a GPU; False if that took longer than ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        alive = {p for p in pids if _alive(p)}
        on_gpu = gpu_pids()
        held = alive | (pids & on_gpu if on_gpu is not None else set())
        if not held:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(poll_s)


def _alive(pid: int) -> bool:
    """Running: it can be signalled and is not a zombie (a zombie has let go of everything; without ``/proc``, signalled is enough)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    state = process_state(pid)
    return state is None or state[0] != "Z"


class VllmServerBackend:
    """One model served by a ``vllm serve --config`` of its own, for the length of its evaluation."""

    kind = "vllm"

    def __init__(
        self,
        ref: ModelRef,
        install: VllmInstall,
        options: VllmServerOptions,
        *,
        concurrency: int = 8,
        timeout_s: float = 600.0,
        max_soft_tokens: int | None = None,
    ) -> None:
        self.ref = ref
        self.install = install
        self.options = options
        path = Path(ref.source).expanduser()
        if not (path / "config.json").is_file():
            raise EcoquantError(f"--backend vllm serves local checkpoint folders; {ref.source} is not one (no config.json)")
        self.dir = label_dir(options.log_dir, ref.label)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.dir / LOG_FILE
        serving = dict(options.serving.get(ref.label, {}))
        self.config_path = self.dir / CONFIG_FILE
        budget = max_soft_tokens if max_soft_tokens is not None else options.serve_config.max_soft_tokens
        config = build_serve_config(
            path,
            replace(
                options.serve_config,
                model=str(path.resolve()),
                max_soft_tokens=budget,
                extra={**options.serve_config.extra, **serving},
            ),
        )
        self.config_path.write_text(config.to_yaml(), encoding="utf-8")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        flags: dict[str, Any] = {"host": "127.0.0.1", "port": self.port, "served-model-name": ref.source}
        if not cuda_visible():
            flags.update(CPU_FLAGS)
        self.command = vllm_command(install, self.config_path, flags) + list(options.vllm_args)
        env = dict(os.environ)
        if options.gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(options.gpu)
        self._pids: set[int] = set()
        self._released: bool | None = None
        self._log = self.log_path.open("w", encoding="utf-8")
        self._log.write("command: " + " ".join(self.command) + "\n")
        self._log.flush()
        self._proc = subprocess.Popen(
            self.command, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True, env=env
        )
        self.start_s = self._wait_ready(options.ready_timeout_s)
        self._inner = OpenAIBackend(self.url, ref.source, concurrency=concurrency, timeout_s=timeout_s)

    def _wait_ready(self, timeout_s: float) -> float:
        t0 = time.monotonic()
        while not health_ok(self.url):
            self._pids |= group_pids(self._proc.pid)
            if self._proc.poll() is not None:
                self._fail("start", f"vLLM exited with code {self._proc.returncode} before it was ready")
            if time.monotonic() - t0 > timeout_s:
                self._fail("start", f"vLLM was not ready after {timeout_s:.0f} s")
            time.sleep(1.0)
        self._pids |= group_pids(self._proc.pid)
        return time.monotonic() - t0

    def _fail(self, stage: str, message: str) -> None:
        self._stop()
        raise BackendFailure(
            f"{self.ref.label}: {message} (log: {self.log_path})",
            stage=stage,
            log_tail=log_tail(self.log_path),
            log_path=self.log_path,
        )

    def describe(self) -> dict[str, Any]:
        return {
            **self._inner.describe(),
            "kind": self.kind,
            "vllm": self.install.version,
            "distribution": self.install.distribution,
            "config": str(self.config_path),
            "log": str(self.log_path),
            "command": self.command,
            "gpu": self.options.gpu,
            "startup_s": round(self.start_s, 1),
        }

    def generate(
        self,
        requests: list[ChatRequest] | tuple[ChatRequest, ...],
        settings: GenerationSettings,
        on_done: Callable[[int], None] | None = None,
    ) -> list[Completion]:
        try:
            return self._inner.generate(requests, settings, on_done)
        except EcoquantError as exc:
            died = self._proc.poll() is not None
            why = f"vLLM exited with code {self._proc.returncode} mid-suite" if died else f"a request failed: {exc}"
            self._fail("generate", why)
            raise  # unreachable: _fail raises

    def _stop(self) -> None:
        if self._released is not None:
            return
        self._pids |= group_pids(self._proc.pid)
        stop_group(self._proc)
        self._released = wait_released(self._pids, self.options.release_timeout_s)
        self._log.close()

    def close(self) -> None:
        """Stop the server's whole process group and wait until it has let go of the GPU."""
        self._stop()
        if not self._released:
            with self.log_path.open("a", encoding="utf-8") as log:
                log.write(f"ecoquant: processes {sorted(self._pids)} still held after {self.options.release_timeout_s:.0f} s\n")

    @property
    def released(self) -> bool | None:
        """After close: whether every server process exited and freed the GPU in time."""
        return self._released


def vllm_backend_factory(
    options: VllmServerOptions, install: VllmInstall | None = None
) -> Callable[[ModelRef, int, EvalConfig], Backend]:
    """The runner's ``backend_factory`` for ``--backend vllm`` (vLLM looked up once, up front)."""
    found = install or require_vllm(options.vllm_python)

    def open_server(ref: ModelRef, index: int, config: EvalConfig) -> Backend:
        return VllmServerBackend(
            ref,
            found,
            options,
            concurrency=config.concurrency,
            timeout_s=config.timeout_s,
            max_soft_tokens=config.max_soft_tokens,
        )

    return open_server
