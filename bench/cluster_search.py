"""The staged search on the tiny VLM without Ray, and with ``--cluster`` on one and on two local Ray nodes (CPU only).

    uv run --locked --extra ray python bench/cluster_search.py            # local, 1 node, 2 nodes: about 4 min on 2 cores

Each node is started by ``ray.cluster_utils.Cluster`` on 127.0.0.1 with the
dashboard off, one CPU and no GPU, so every job asks for one CPU and a node
runs one job at a time. The search: two RTN weights candidates (W4A16, W8A8
INT8), the ``short`` response on the best, two finalists, on the basic pages
(2 per kind; 1 per task in stages 1-2). Each run starts from an empty
``--out``; the local run (no Ray) is the reference pick and wall time.

What it prints, one JSON line per run and a markdown table at the end: the
wall time of the search (the cluster's start not included, shown apart),
the jobs run, and two figures per job from the times Ray's tasks report
(:class:`ecoquant.optimize.jobs.JobTime`):

* **wait**: from handing the job to Ray to its start on a node. It includes
  queueing behind the stage's other jobs for a free slot.
* **scheduling overhead**: from the moment the job *could* have started (handed
  to Ray, and the one slot of the node it ran on free, i.e. the node's previous
  job returned) to its start: Ray's dispatch, a worker's start and imports, and
  moving the plan and the suite to it. This assumes one job at a time per node
  (true here: one CPU per node, one CPU per job), and a job Ray kept waiting for
  a node it then did not use is counted from that node's slot only (an
  underestimate in that case).

Subtracting the local wall time from the one-node wall time does not measure
the overhead: Ray runs a one-CPU task with ``OMP_NUM_THREADS=1``, which on an
oversubscribed machine can be faster than the local run's torch threads.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # a 127.0.0.1 cluster (see tests/test_cluster.py)
os.environ.setdefault("RAY_raylet_start_wait_time_s", "120")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

from ecoquant.calibrate.data import CORPUS_SOURCE, CalibrationConfig  # noqa: E402
from ecoquant.eval.backends.base import generation_settings  # noqa: E402
from ecoquant.eval.runner import EvalConfig  # noqa: E402
from ecoquant.fixtures.tiny_vlm import tiny_vlm_path  # noqa: E402
from ecoquant.optimize import OptimizeConfig, optimize  # noqa: E402
from ecoquant.optimize.jobs import JobTime  # noqa: E402
from ecoquant.optimize.levers import FamilyLevers  # noqa: E402
from ecoquant.optimize.plan import SearchConfig  # noqa: E402

LEVERS = FamilyLevers(
    weights=({"method": "rtn"}, {"method": "rtn", "scheme": "w8a8-int8"}),
    responses=("short",),
    answer_caps=(),
    kv_cache_dtypes=(),
    image_budget_max_factor=0,
    note="bench: two RTN candidates and the short response",
)


def config(out: Path, cluster: str | None) -> OptimizeConfig:
    return OptimizeConfig(
        out=out,
        eval=EvalConfig(suite="builtin-basic", size=2, generation=generation_settings(max_new_tokens=8), idle_seconds=0.0),
        search=SearchConfig(
            levers=LEVERS, keep=1, finalists=2, subset=1,
            calibration=CalibrationConfig(source=CORPUS_SOURCE, num_samples=4, max_length=64),
        ),
        cluster=cluster,
    )


def run(kind: str, root: Path) -> dict[str, object]:
    out = root / f"opt-{kind}"
    shutil.rmtree(out, ignore_errors=True)
    if kind == "local":
        t0 = time.perf_counter()
        result = optimize(tiny_vlm_path(), config(out, None), show_progress=False)
        wall = time.perf_counter() - t0
        return {"run": "local (no Ray)", "wall_s": wall, "pick": result.choice.pick, "jobs": _jobs(out)}
    import ray
    from ray.cluster_utils import Cluster

    from ecoquant.optimize.run import open_runner
    from ecoquant.optimize.stages import staged_optimize

    nodes = int(kind)
    args = {"num_cpus": 1, "num_gpus": 0, "node_ip_address": "127.0.0.1"}
    t0 = time.perf_counter()
    cluster = Cluster(initialize_head=True, head_node_args={**args, "include_dashboard": False})
    for _ in range(nodes - 1):
        cluster.add_node(**args)
    cluster.wait_for_nodes()
    started = time.perf_counter() - t0
    try:
        cfg = config(out, cluster.address)
        t0 = time.perf_counter()
        runner = open_runner(cfg, show_progress=False)
        try:
            result = staged_optimize(tiny_vlm_path(), cfg, runner)
        finally:
            runner.close()
        wall = time.perf_counter() - t0
        timeline = runner.cluster.timeline
        waits = [t.waited for t in timeline]
        overheads = scheduling_overheads(timeline)
        return {
            "run": f"--cluster, {nodes} node{'s' if nodes > 1 else ''} x 1 CPU",
            "cluster_start_s": started,
            "wall_s": wall,
            "pick": result.choice.pick,
            "jobs": len(timeline),
            "wait_mean_s": statistics.mean(waits),
            "wait_max_s": max(waits),
            "overhead_mean_s": statistics.mean(overheads),
            "overhead_max_s": max(overheads),
        }
    finally:
        ray.shutdown()
        cluster.shutdown()


def scheduling_overheads(timeline: Sequence[JobTime]) -> list[float]:
    """Per job: seconds from when it could have started (handed to Ray, its node's one slot free) to its start."""
    by_node: dict[str, list[JobTime]] = defaultdict(list)
    for t in timeline:
        by_node[t.placement.node_id].append(t)
    out = []
    for jobs in by_node.values():
        free = 0.0
        for t in sorted(jobs, key=lambda t: t.placement.started):
            out.append(max(t.placement.started - max(t.handed, free), 0.0))
            free = t.placement.started + t.placement.seconds
    return out


def _jobs(out: Path) -> int:
    """Evaluations and quantizations in ``out`` (a response variant's hard-linked folder is not a job)."""
    evals = len(list((out / "evals").glob("*.json")))
    markers = [json.loads(f.read_text()) for f in (out / "checkpoints").glob("*/.ecoquant-key.json")]
    return evals + sum(1 for m in markers if "candidate" in m["material"])


def table(rows: Sequence[dict[str, object]]) -> str:
    """The runs as a markdown table, for bench/RESULTS.md."""

    def s(row: dict[str, object], key: str) -> str:
        value = row.get(key)
        return "" if value is None else f"{float(value):.1f} s"  # type: ignore[arg-type]

    def ms(row: dict[str, object], key: str) -> str:
        return f"{float(row[key]) * 1000:.0f} ms"  # type: ignore[arg-type]

    lines = [
        "| run | cluster start | search wall time | jobs | pick | wait, mean / max | scheduling overhead, mean / max |",
        "|---|---:|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        wait = f"{s(r, 'wait_mean_s')} / {s(r, 'wait_max_s')}" if "wait_mean_s" in r else ""
        over = f"{ms(r, 'overhead_mean_s')} / {ms(r, 'overhead_max_s')}" if "overhead_mean_s" in r else ""
        lines.append(f"| {r['run']} | {s(r, 'cluster_start_s')} | {s(r, 'wall_s')} | {r['jobs']} | {r['pick']} | {wait} | {over} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", default=["local", "1", "2"], help="local, 1, 2 (nodes)")
    parser.add_argument("--root", type=Path, default=None, help="where each run's --out goes (default: a new temporary folder)")
    args = parser.parse_args()
    root = args.root or Path(tempfile.mkdtemp(prefix="ecoquant-cluster-bench-"))
    rows = []
    for kind in args.runs:
        rows.append(run(kind, root))
        print(json.dumps(rows[-1]), flush=True)
    print(table(rows))


if __name__ == "__main__":
    main()
