"""The search's jobs as Ray tasks: each quantization and each evaluation asks Ray for one GPU (or one CPU).

:func:`ecoquant.optimize.run.run_grid` hands a stage's jobs here when
``--cluster`` is given, or ``--gpus`` with more than one GPU (a Ray instance
on this machine, :func:`open_local`): :class:`ClusterSession` stands in for
its in-process quantize and evaluate loops. Ray places each task on a node with the
resource free; the task runs the same code as a local run
(:func:`ecoquant.optimize.run._quantize_job`, :func:`ecoquant.eval.runner.evaluate_model`)
and writes its result into the keyed store on the shared ``--out`` before it
returns, so the store stays the only record: a task whose node is lost has
written nothing, and the next pass (the same command again) runs just that
job, wherever Ray puts it.

Why the quantizations of a stage all finish before its evaluations start: a
candidate's evaluation needs its checkpoint, and the driver writes the
response/answer-cap variants (hard links) between the two; the base's
evaluation waits too, which costs at most one job's time per stage.

Progress: one line per job when it is handed to Ray (what it asks for), and
one when it finishes (node, GPU, seconds, and how long it waited for a slot).
While a job runs, ``--out/.running/`` holds a small file naming its node, so
``ls`` on any node shows what runs where.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ecoquant.errors import EcoquantError
from ecoquant.optimize.cluster import NodeInfo, connect, describe, survey
from ecoquant.optimize.fleet import Where
from ecoquant.optimize.store import Store, read_json, write_json_atomic
from ecoquant.progress import is_verbose

if TYPE_CHECKING:
    from ecoquant.eval.runner import EnergyInfo, FailedRun, PreparedSuite
    from ecoquant.optimize.plan import Job, OptimizeConfig, Plan
    from ecoquant.optimize.run import Stages

RUNNING = ".running"
"""``--out/.running/KIND-LABEL.json`` while a job runs: its node, host, pid and start time (progress, not a record)."""


@dataclass(frozen=True)
class Placement:
    """Where a job ran, as its task reports it."""

    node_id: str
    host: str
    gpu_ids: tuple[int, ...]
    gpu_model: str | None
    started: float
    """Wall-clock time the task started (``time.time()``), to tell queueing from running."""
    seconds: float

    def where(self) -> str:
        gpu = "CPU" if not self.gpu_ids else f"GPU {','.join(map(str, self.gpu_ids))}" + (
            f" {self.gpu_model}" if self.gpu_model else ""
        )
        return f"{self.host}/{self.node_id[:6]}, {gpu}"


@dataclass(frozen=True)
class JobTime:
    """When one finished job was handed to Ray (``time.time()`` on the driver) and where and when it ran."""

    label: str
    kind: str
    handed: float
    placement: Placement

    @property
    def waited(self) -> float:
        """Seconds from hand-off to start on a node: Ray's dispatch and worker start, and queueing for a free slot."""
        return max(self.placement.started - self.handed, 0.0)


def _here(nodes: Mapping[str, NodeInfo]) -> tuple[str, str, tuple[int, ...], NodeInfo | None]:
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    gpu_ids = tuple(int(g) for g in ray.get_gpu_ids())
    return node_id, socket.gethostname(), gpu_ids, nodes.get(node_id)


def _mark_running(root: Path, name: str, node_id: str, host: str) -> Path:
    return write_json_atomic(
        root / RUNNING / f"{name}.json", {"node": node_id, "host": host, "pid": os.getpid(), "started": time.time()}
    )


def _quantize_task(
    job: Job, root: Path, plan: Plan, config: OptimizeConfig, nodes: Mapping[str, NodeInfo], verbose: bool
) -> dict[str, Any]:
    from ecoquant.optimize.run import Stages, _quantize_job
    from ecoquant.progress import verbose as verbose_logs

    node_id, host, gpu_ids, node = _here(nodes)
    started = time.time()
    store = Store(root)
    marker = _mark_running(store.root, f"quantize-{job.label}", node_id, host)
    try:
        with verbose_logs(verbose):  # a worker starts at the default level: --verbose is passed, not inherited
            _quantize_job(job, plan, store, config, Stages(enabled=verbose), verbose)
    finally:
        marker.unlink(missing_ok=True)
    placement = Placement(node_id, host, gpu_ids, None if node is None else node.gpu_model, started, time.time() - started)
    return {"placement": asdict(placement), "failed": None}


def _evaluate_task(
    job: Job,
    index: int,
    root: Path,
    plan: Plan,
    prepared: PreparedSuite,
    config: OptimizeConfig,
    nodes: Mapping[str, NodeInfo],
    meter_factory: Callable[[Sequence[int] | None], Any],
    backend_factory: Any,
    verbose: bool,
) -> dict[str, Any]:
    """Evaluate one model on this node's GPU, metered on that GPU alone, and save it under its key."""
    from ecoquant.energy.meter import IdleBaseline
    from ecoquant.eval.runner import BackendFailure, FailedRun, energy_info, evaluate_model, ModelRef
    from ecoquant.optimize.run import backend_for, job_eval_config
    from ecoquant.progress import progress_bar
    from ecoquant.progress import verbose as verbose_logs

    node_id, host, gpu_ids, node = _here(nodes)
    started = time.time()
    store = Store(root)
    marker = _mark_running(store.root, f"evaluate-{job.label}", node_id, host)
    meter = meter_factory(None)  # Ray's CUDA_VISIBLE_DEVICES: this task's GPU only
    idle = None
    if node is not None and node.idle_gpu_power_w and getattr(meter, "available", False):
        power = {g: w for g, w in node.idle_gpu_power_w.items() if g in getattr(meter, "gpus", ())}
        idle = IdleBaseline(config.eval.idle_seconds, power) if power else None
    names = tuple(getattr(meter, "gpu_names", ()))
    gpu_model = " + ".join(sorted(set(names))) if names else (None if node is None else node.gpu_model)
    ref = ModelRef(job.label, str(job.folder), job.role)
    factory = backend_for(config, plan, store, None, backend_factory)  # Ray's CUDA_VISIBLE_DEVICES: its GPU
    failed: FailedRun | None = None
    try:
        # --verbose: a line per sample on this worker's stderr (the driver prints it where Ray sends it back)
        with verbose_logs(verbose), progress_bar(job.label, prepared.suite.n_samples, verbose) as advance:
            runs = evaluate_model(
                ref, index, prepared, job_eval_config(job, config), meter=meter, idle=idle, backend_factory=factory,
                advance=advance,
            )
    except BackendFailure as exc:
        failed = FailedRun.from_failure(ref, exc)
    except EcoquantError as exc:  # this model cannot be loaded here (e.g. a scheme mix transformers refuses)
        failed = FailedRun(job.label, str(job.folder), job.role, "load", str(exc))
    finally:
        if hasattr(meter, "close"):
            meter.close()
        marker.unlink(missing_ok=True)
    seconds = time.time() - started
    placement = Placement(node_id, host, gpu_ids, gpu_model, started, seconds)
    if failed is None:
        store.save_eval(
            job.label,
            job.eval_key,
            job.eval_material,
            {
                "seconds": seconds,
                "runs": [asdict(r) for r in runs],
                "gpu": list(gpu_ids),
                "meter": meter.description,
                "energy": asdict(energy_info(meter, idle, config.eval)),
                "placement": asdict(placement),
            },
        )
    return {"placement": asdict(placement), "failed": None if failed is None else asdict(failed)}


LOST_ERRORS = ("NodeDiedError", "WorkerCrashedError", "OwnerDiedError", "ObjectLostError", "ActorDiedError")
"""Ray's exceptions for a job that died with its node or worker: the next pass re-runs it."""


@dataclass
class ClusterSession:
    """The cluster ``optimize --cluster`` runs on: its nodes (checked once) and how it asks for resources."""

    address: str
    nodes: tuple[NodeInfo, ...]
    retries: int
    meter_factory: Callable[[Sequence[int] | None], Any]
    backend_factory: Any
    timeline: list[JobTime] = field(default_factory=list)
    """Every finished job's hand-off to Ray and its placement, in the order they finished (bench/cluster_search.py)."""
    owns_ray: bool = False
    """``--gpus``: this session started its Ray instance (:func:`open_local`) and stops it in :meth:`close`."""

    def close(self) -> None:
        """Stop the Ray instance :func:`open_local` started (a joined ``--cluster`` keeps running)."""
        if self.owns_ray:
            import ray

            ray.shutdown()

    @property
    def gpus(self) -> int:
        return sum(n.gpus for n in self.nodes)

    @property
    def energy_measured(self) -> bool:
        """Every GPU node meters its GPUs (a CPU-only cluster measures nothing: energy is modelled)."""
        with_gpus = [n for n in self.nodes if n.gpus]
        return bool(with_gpus) and all(n.measured for n in with_gpus)

    def _ask(self, gpu: bool) -> dict[str, Any]:
        return {"num_gpus": 1, "num_cpus": 1} if gpu and self.gpus else {"num_cpus": 1}

    def _drain(self, pending: dict[Any, tuple[str, str, float]], stages: Stages) -> list[tuple[str, dict[str, Any]]]:
        """Wait for every job, print each as it finishes; raise one line at the end if some died with their node."""
        import ray

        done: list[tuple[str, dict[str, Any]]] = []
        lost: list[str] = []
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            ref = ready[0]
            label, kind, placed = pending.pop(ref)
            try:
                result = ray.get(ref)
            except ray.exceptions.RayTaskError as exc:  # the job's own error: as a local run would raise it
                cause = exc.cause if isinstance(exc.cause, BaseException) else exc
                if type(cause).__name__ in LOST_ERRORS:
                    lost.append(f"{kind} {label}")
                    stages.line(f"optimize: {label}: {kind} lost with its node or worker ({type(cause).__name__})")
                    continue
                self._wait_quietly(pending)
                raise cause from None
            except ray.exceptions.RayError as exc:
                lost.append(f"{kind} {label}")
                stages.line(f"optimize: {label}: {kind} lost with its node or worker ({type(exc).__name__})")
                continue
            where = Placement(**{k: tuple(v) if k == "gpu_ids" else v for k, v in result["placement"].items()})
            self.timeline.append(JobTime(label, kind, placed, where))
            waited = self.timeline[-1].waited
            state = "FAILED" if result.get("failed") else "done"
            stages.line(f"optimize: {label}: {kind} {state} on {where.where()} in {where.seconds:.1f} s (waited {waited:.1f} s for a slot)")
            done.append((label, result))
        if lost:
            raise EcoquantError(
                f"{len(lost)} job(s) lost with their node ({', '.join(lost)}); what finished is kept in --out: "
                "rerun the same command to run only these"
            )
        return done

    @staticmethod
    def _wait_quietly(pending: Mapping[Any, Any]) -> None:
        """Let the other jobs finish (their results land in the store) before an error ends the run."""
        import ray

        for ref in pending:
            try:
                ray.get(ref)
            except ray.exceptions.RayError:
                pass

    def quantize(self, plan: Plan, store: Store, config: OptimizeConfig, stages: Stages, show: bool) -> list[str]:
        """Every quantization ``plan`` still needs, in parallel on the cluster (GPU when ``--quant-device cuda``)."""
        import ray

        if not plan.quantize:
            return []
        task = ray.remote(max_retries=self.retries)(_quantize_task)
        # auto asks for a GPU too: in the task, GPTQ/AWQ calibrate on it when they fit (as they would here)
        ask = self._ask(config.quant_device != "cpu")
        shared = (ray.put(plan), ray.put(config), ray.put(_by_id(self.nodes)), is_verbose())
        pending = {}
        for job in plan.quantize:
            pending[task.options(**ask).remote(job, store.root, *shared)] = (job.label, "quantize", time.time())
            stages.line(f"optimize: {job.label}: quantize placed on the cluster (asks {_asked(ask)})")
        return [label for label, _ in self._drain(pending, stages)]

    def evaluate(
        self,
        jobs: Sequence[Job],
        plan: Plan,
        store: Store,
        prepared: PreparedSuite,
        config: OptimizeConfig,
        stages: Stages,
    ) -> tuple[list[str], dict[str, FailedRun], EnergyInfo | None]:
        """Evaluate ``jobs`` in parallel on the cluster, one GPU each; the same return as ``run._evaluate_here``."""
        import ray

        from ecoquant.eval.runner import FailedRun

        task = ray.remote(max_retries=self.retries)(_evaluate_task)
        ask = self._ask(True)
        index = {j.label: i for i, j in enumerate(plan.jobs)}
        shared = (
            ray.put(plan), ray.put(prepared), ray.put(config), ray.put(_by_id(self.nodes)),
            self.meter_factory, self.backend_factory, is_verbose(),
        )
        pending = {}
        for job in jobs:
            ref = task.options(**ask).remote(job, index[job.label], store.root, *shared)
            pending[ref] = (job.label, "evaluate", time.time())
            stages.line(
                f"optimize: {job.label}: evaluate placed on the cluster (asks {_asked(ask)}, "
                f"{prepared.suite.n_samples} samples)"
            )
        evaluated, failures = [], {}
        for label, result in self._drain(pending, stages):
            if result.get("failed"):
                failures[label] = FailedRun(**result["failed"])
                stages.line(f"optimize: {label}: FAILED: {failures[label].error.splitlines()[0]}")
            else:
                evaluated.append(label)
        return evaluated, failures, None


    @staticmethod
    def wheres(store: Store, jobs: Sequence[Job]) -> dict[str, Where]:
        return stored_wheres(store, jobs)


def _by_id(nodes: Sequence[NodeInfo]) -> dict[str, NodeInfo]:
    return {n.node_id: n for n in nodes}


def _asked(ask: Mapping[str, Any]) -> str:
    return "1 GPU" if ask.get("num_gpus") else "1 CPU"


def open_cluster(
    config: OptimizeConfig, stages: Stages, meter_factory: Callable[[Sequence[int] | None], Any], backend_factory: Any
) -> ClusterSession:
    """Join ``config.cluster``, check ``--out`` from every node and meter each node's idle power, before any work."""
    from ecoquant.optimize.store import check_writable

    assert config.cluster is not None
    ray = connect(config.cluster, log_to_driver=is_verbose())
    out = check_writable(config.out)
    nodes = survey(ray, out.resolve(), config.eval.idle_seconds)
    stages.line(f"optimize: cluster {config.cluster}: {describe(nodes)}; --out {out} is shared by all of them")
    return ClusterSession(config.cluster, nodes, config.cluster_retries, meter_factory, backend_factory)


def open_local(
    config: OptimizeConfig, stages: Stages, meter_factory: Callable[[Sequence[int] | None], Any], backend_factory: Any
) -> ClusterSession:
    """``--gpus 0,1,...``: a Ray instance on this machine with those GPUs, its node described and metered here.

    No ``--out`` check (one machine, one filesystem) and no survey task: the driver meters the listed GPUs'
    idle power itself, before any job, with the meter the evaluations use (``meter_factory``).
    """
    from ecoquant.energy.meter import measure_idle
    from ecoquant.optimize.cluster import start_local

    ray = start_local(config.gpus, log_to_driver=is_verbose())
    try:
        meter = meter_factory(list(config.gpus))
        idle = measure_idle(meter, config.eval.idle_seconds)
        names = sorted(set(getattr(meter, "gpu_names", ())))
        node = NodeInfo(
            ray.get_runtime_context().get_node_id(),
            socket.gethostname(),
            float(ray.cluster_resources().get("CPU", 0.0)),
            len(config.gpus),
            " + ".join(names) if names else None,
            None if idle is None else {int(g): w for g, w in idle.gpu_power_w.items()},
            str(meter.description),
            bool(meter.available),
        )
        if hasattr(meter, "close"):
            meter.close()
    except BaseException:
        ray.shutdown()
        raise
    stages.line(
        f"optimize: --gpus {','.join(map(str, config.gpus))}: a local Ray instance (127.0.0.1, no dashboard) "
        f"places the jobs, one GPU each; {describe((node,))}"
    )
    return ClusterSession("local", (node,), config.cluster_retries, meter_factory, backend_factory, owns_ray=True)


def stored_wheres(store: Store, jobs: Sequence[Job]) -> dict[str, Where]:
    """Node and GPU model of each stored evaluation of ``jobs`` (evaluations made without ``--cluster`` have none)."""
    out = {}
    for job in jobs:
        data = read_json(store.eval_path(job.label, job.eval_key))
        p = data.get("placement") if isinstance(data, dict) else None
        if isinstance(p, dict):
            out[job.label] = Where(f"{p['host']}/{str(p['node_id'])[:6]}", p.get("gpu_model"))
    return out
