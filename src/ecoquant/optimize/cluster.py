"""``optimize --cluster`` and ``--gpus``: the Ray cluster the search's jobs run on, and the checks made before any work.

ecoquant does not schedule across machines itself: Ray places each job (a
quantization or an evaluation, :mod:`ecoquant.optimize.jobs`) on a node with
a free GPU (or CPU), and says when a node is lost. What ecoquant adds is
checked here, once, before the first job:

* **Ray is there**: it is an optional extra; without it ``--cluster`` (or
  ``--gpus`` with more than one GPU) is one line saying how to install it.
* **``--out`` is shared**: every job writes its result into the keyed store
  (:mod:`ecoquant.optimize.store`), the only record of the search, so every
  node must see the same folder at the same path. A task pinned to each node
  reads a token the driver wrote into ``--out`` and writes one back; a node
  that cannot is named in one line before anything runs.
* **Each node's GPU model** (the NVML name, else the node's
  ``accelerator_type:`` label in Ray's resources) and its **idle power**
  (measured once per node, by a task pinned to it): energy is only compared
  between candidates metered on the same GPU model
  (:mod:`ecoquant.optimize.fleet`).

``--gpus 0,1,...`` on one machine is the same path on a Ray instance this
process starts (:func:`start_local`): bound to 127.0.0.1, no dashboard, and
only the listed GPUs, so ecoquant has one scheduler, Ray's.

Ray's ports and dashboard have no authentication: a cluster belongs on a
private network (docs/optimize.md).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from ecoquant.errors import EcoquantError

INSTALL_HINT = "install the extra: `uv run --extra ray ecoquant optimize ...` or `pip install 'ecoquant[ray]'`"
ACCELERATOR_PREFIX = "accelerator_type:"
"""Ray's resource label for a node's GPU model (Ray sets it from the driver's device name, e.g. ``accelerator_type:L4``)."""
PROBE_PREFIX = ".ecoquant-shared-"


def require_ray(option: str = "--cluster") -> ModuleType:
    """The ``ray`` module, or one line saying how to install it.

    Ray's ``uv run`` hook is turned off (unless the environment says otherwise): it would ship the current
    folder to every worker and rebuild the environment there; ecoquant's workers run the Python that started
    each node (``ray start`` from ecoquant's environment, docs/optimize.md).
    """
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    try:
        import ray
    except ImportError:
        raise EcoquantError(f"{option} needs Ray, which is not installed; {INSTALL_HINT}") from None
    return ray


LOOPBACK = "127.0.0.1"


@contextmanager
def _environ(values: Mapping[str, str]) -> Iterator[None]:
    """``values`` in ``os.environ`` while Ray starts (its raylet, and so every worker, inherits them), then as before."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def start_local(gpus: Sequence[int], log_to_driver: bool = False) -> ModuleType:
    """Start a Ray instance on this machine that owns ``gpus`` (NVML indices) and nothing else (``--gpus``).

    Ray hands each task one of the GPUs named in ``CUDA_VISIBLE_DEVICES`` when its node started, and sets the
    task's ``CUDA_VISIBLE_DEVICES`` to that entry (``ray.get_gpu_ids()`` returns it), so the node starts with the
    list and ``num_gpus`` its length. ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` (unless set) makes those CUDA indices NVML's,
    which is how :func:`ecoquant.energy.nvml.visible_gpus` reads them back to meter the task's GPU. Ray binds
    127.0.0.1 (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` is Ray's switch for that, read when ``ray`` is imported),
    with the dashboard off (and Ray's token authentication on, its default for a new local instance): nothing
    outside this machine can reach it. (A process that imported ``ray`` before without that switch binds where
    that import decided; ``ecoquant optimize`` imports it here.)
    """
    option = f"--gpus {','.join(map(str, gpus))}"
    env = {
        "CUDA_VISIBLE_DEVICES": ",".join(map(str, gpus)),
        "CUDA_DEVICE_ORDER": os.environ.get("CUDA_DEVICE_ORDER", "PCI_BUS_ID"),
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0"),
    }
    with _environ(env):
        ray = require_ray(option)
        if ray.is_initialized():
            raise EcoquantError(
                f"{option} starts its own Ray instance, but this process is already connected to one; "
                "pass that cluster's address as --cluster instead"
            )
        ray.init(  # "local": a new instance, even where `ray start` left one running on this machine
            address="local", num_gpus=len(gpus), include_dashboard=False, _node_ip_address=LOOPBACK, log_to_driver=log_to_driver,
            logging_level="WARNING", configure_logging=False,
        )
    return ray


@dataclass(frozen=True)
class NodeInfo:
    """One live node of the cluster as the search sees it."""

    node_id: str
    host: str
    cpus: float
    gpus: int
    gpu_model: str | None
    """NVML's name of the node's GPUs, else its ``accelerator_type:`` label; None without GPUs."""
    idle_gpu_power_w: Mapping[int, float] | None = None
    """Idle power per GPU (W), measured once on this node; None where NVML measures nothing."""
    meter: str = ""
    measured: bool = False
    """NVML meters this node's GPUs (its jobs' energy is measured, not only modelled)."""

    @property
    def short(self) -> str:
        """How progress lines name it: host and the start of its Ray node id."""
        return f"{self.host}/{self.node_id[:6]}"


def connect(address: str, log_to_driver: bool = False) -> ModuleType:
    """Join the running Ray cluster at ``address`` (``auto``: the one started on this machine by ``ray start``).

    ``log_to_driver`` (``--verbose``): the tasks' own progress lines come back here, prefixed by Ray with the task.
    """
    ray = require_ray()
    if ray.is_initialized():
        return ray
    _check_reachable(address)
    try:
        ray.init(address=address, log_to_driver=log_to_driver, logging_level="WARNING", configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EcoquantError(
            f"cannot join the Ray cluster at {address!r} ({first}); start one with `ray start --head` "
            "(docs/optimize.md) and pass its address, or `auto` on one of its nodes"
        ) from None
    return ray


REACH_TIMEOUT_S = 5.0
"""How long a HOST:PORT address may take to accept a TCP connection before ``--cluster`` gives up."""


def _check_reachable(address: str) -> None:
    """A HOST:PORT nobody listens on is one line at once: ``ray.init`` would retry for minutes, logging as it goes."""
    import socket

    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():  # ``auto`` and other forms Ray resolves itself
        return
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=REACH_TIMEOUT_S):
            pass
    except OSError as exc:
        raise EcoquantError(
            f"cannot join the Ray cluster at {address!r}: nothing answers there ({exc.strerror or exc}); start one "
            "with `ray start --head` (docs/optimize.md) and pass its address, or `auto` on one of its nodes"
        ) from None


def _label(resources: Mapping[str, float]) -> str | None:
    return next((k.removeprefix(ACCELERATOR_PREFIX) for k in sorted(resources) if k.startswith(ACCELERATOR_PREFIX)), None)


def _probe_node(out: str, token: str, node_id: str, idle_seconds: float) -> dict[str, Any]:
    """On one node: read the driver's token in ``out``, write this node's reply, name and meter its GPUs."""
    import socket

    from ecoquant.energy.meter import measure_idle
    from ecoquant.energy.nvml import open_meter

    result: dict[str, Any] = {"host": socket.gethostname(), "error": None}
    folder = Path(out)
    try:
        seen = (folder / f"{PROBE_PREFIX}{token}").read_text(encoding="utf-8")
        if seen != token:
            raise OSError(f"the driver's probe file reads {seen[:20]!r}, not the token it wrote")
        (folder / f"{PROBE_PREFIX}{token}-{node_id}").write_text(node_id, encoding="utf-8")
    except OSError as exc:
        result["error"] = f"{type(exc).__name__}: {exc.strerror or exc}"
    meter = open_meter(None, environ={})  # every GPU of the node, whatever this task was given
    result["meter"] = meter.description
    result["measured"] = bool(meter.available)
    result["gpu_names"] = list(getattr(meter, "gpu_names", ()))
    idle = measure_idle(meter, idle_seconds)
    result["idle"] = None if idle is None else {int(g): w for g, w in idle.gpu_power_w.items()}
    if hasattr(meter, "close"):
        meter.close()
    return result


def survey(ray: ModuleType, out: Path, idle_seconds: float) -> tuple[NodeInfo, ...]:
    """Every live node, after checking that each one reads and writes ``out`` (one line naming those that do not).

    One task pinned to each node (``NodeAffinitySchedulingStrategy``, not soft) does the check and meters the
    node's idle power over ``idle_seconds``; nothing else has been placed yet, so the GPUs are idle.
    """
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    token = secrets.token_hex(8)
    driver_probe = out / f"{PROBE_PREFIX}{token}"
    driver_probe.write_text(token, encoding="utf-8")
    alive = [n for n in ray.nodes() if n.get("Alive")]
    if not alive:
        raise EcoquantError("the Ray cluster has no live node; start one with `ray start --head`")
    probe = ray.remote(num_cpus=0, max_retries=0)(_probe_node)
    refs = {
        n["NodeID"]: probe.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
        ).remote(str(out), token, n["NodeID"], idle_seconds)
        for n in alive
    }
    nodes, refused = [], []
    try:
        for n in alive:
            node_id = n["NodeID"]
            try:
                got = ray.get(refs[node_id])
            except ray.exceptions.RayError as exc:
                # A node listed alive can be one already lost whose heartbeats have not timed out yet:
                # it leaves the cluster rather than stopping the search with Ray's traceback.
                if not _still_alive(ray, node_id):
                    continue
                refused.append(f"{n.get('NodeManagerAddress', '?')} (node {node_id[:6]}): its check failed ({type(exc).__name__})")
                continue
            reply = out / f"{PROBE_PREFIX}{token}-{node_id}"
            error = got["error"]
            if error is None and not (reply.is_file() and reply.read_text(encoding="utf-8") == node_id):
                error = "what it wrote is not in the driver's folder (not the same filesystem)"
            if error is not None:
                refused.append(f"{got['host']} ({n.get('NodeManagerAddress', '?')}, node {node_id[:6]}): {error}")
            resources = n.get("Resources", {})
            names = sorted(set(got["gpu_names"]))
            nodes.append(
                NodeInfo(
                    node_id,
                    str(got["host"]),
                    float(resources.get("CPU", 0.0)),
                    int(resources.get("GPU", 0)),
                    " + ".join(names) if names else _label(resources),
                    got["idle"],
                    str(got["meter"]),
                    bool(got["measured"]),
                )
            )
    finally:
        for f in out.glob(f"{PROBE_PREFIX}{token}*"):
            f.unlink(missing_ok=True)
    if refused:
        raise EcoquantError(
            f"--out {out} is not shared by every node of the cluster: {'; '.join(refused)}; put --out on a "
            "filesystem every node mounts at the same path, writable by the user Ray runs as (docs/optimize.md)"
        )
    return tuple(nodes)


def _still_alive(ray: ModuleType, node_id: str) -> bool:
    return any(n.get("NodeID") == node_id and n.get("Alive") for n in ray.nodes())


def describe(nodes: tuple[NodeInfo, ...]) -> str:
    """One line: the nodes, their GPUs and models."""
    parts = [
        f"{n.short} ({n.gpus} GPU{'s' if n.gpus != 1 else ''}{f' {n.gpu_model}' if n.gpu_model else ''}, {n.cpus:g} CPU)"
        for n in nodes
    ]
    return f"{len(nodes)} node{'s' if len(nodes) != 1 else ''}: " + ", ".join(parts)


def spread_estimate(ray: ModuleType, seconds: float | None) -> str:
    """The dry run's estimate divided across the cluster's GPUs (its CPUs where it has none)."""
    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
    slots, what = (gpus, "GPUs") if gpus else (max(cpus, 1), "CPUs (no GPU)")
    return spread_text(seconds, slots, what, "on the cluster")


def spread_text(seconds: float | None, slots: int, what: str, where: str) -> str:
    """``seconds`` of one-at-a-time work shared by ``slots`` (``--cluster``'s GPUs, or ``--gpus``'s).

    An assumption, said in the line: every stage has at least as many jobs as slots and they take
    about as long as each other; a stage with fewer jobs, or one long quantization, takes longer.
    """
    if seconds is None:
        return f"{where}: {slots} {what}; no estimate yet (no measured times in this folder)"
    return (
        f"{where}: {slots} {what}: about {seconds / slots / 60:.1f} min if every stage's jobs share them evenly "
        "(each stage waits for its slowest job, so a stage with fewer jobs than slots takes longer)"
    )
