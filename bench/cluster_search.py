"""The staged search on the tiny VLM without Ray, and with ``--cluster`` on one and on two local Ray nodes (CPU only).

Each node is started by ``ray.cluster_utils.Cluster`` on 127.0.0.1 with the
dashboard off, one CPU and no GPU, so every job asks for one CPU and a node
runs one job at a time. The search: two RTN weights candidates (W4A16, W8A8
INT8), the ``short`` response on the best, two finalists, on the basic pages
(2 per kind; 1 per task in stages 1-2). Each run starts from an empty
``--out``.

What it prints per run: wall time of the search (cluster start not
included), jobs run, and per job the mean wait between handing it to Ray and
its start on a node (queueing for the single slot included). The scheduling
overhead per job is (one-node wall - local wall) / jobs: one node with one
CPU runs the jobs one after the other as the local run does, so the
difference is what Ray adds (task dispatch, worker start and imports, moving
the plan and suite to the worker).

    uv run --extra ray python bench/cluster_search.py --runs local 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # a 127.0.0.1 cluster (see tests/test_cluster.py)
os.environ.setdefault("RAY_raylet_start_wait_time_s", "120")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

from ecoquant.calibrate.data import CORPUS_SOURCE, CalibrationConfig  # noqa: E402
from ecoquant.eval.backends.base import generation_settings  # noqa: E402
from ecoquant.eval.runner import EvalConfig  # noqa: E402
from ecoquant.fixtures.tiny_vlm import tiny_vlm_path  # noqa: E402
from ecoquant.optimize import OptimizeConfig, optimize  # noqa: E402
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

    nodes = int(kind)
    args = {"num_cpus": 1, "num_gpus": 0, "node_ip_address": "127.0.0.1"}
    t0 = time.perf_counter()
    cluster = Cluster(initialize_head=True, head_node_args={**args, "include_dashboard": False})
    for _ in range(nodes - 1):
        cluster.add_node(**args)
    cluster.wait_for_nodes()
    started = time.perf_counter() - t0
    try:
        from ecoquant.optimize.run import open_runner

        cfg = config(out, cluster.address)
        t0 = time.perf_counter()
        runner = open_runner(cfg, show_progress=False)
        from ecoquant.optimize.stages import staged_optimize

        result = staged_optimize(tiny_vlm_path(), cfg, runner)
        wall = time.perf_counter() - t0
        waits = runner.cluster.overheads
        return {
            "run": f"--cluster, {nodes} node(s) x 1 CPU",
            "cluster_start_s": started,
            "wall_s": wall,
            "pick": result.choice.pick,
            "jobs": len(waits),
            "mean_wait_s": statistics.mean(waits) if waits else None,
            "max_wait_s": max(waits) if waits else None,
        }
    finally:
        ray.shutdown()
        cluster.shutdown()


def _jobs(out: Path) -> int:
    evals = len(list((out / "evals").glob("*.json")))
    quants = len(list((out / "checkpoints").glob("*/.ecoquant-key.json")))
    return evals + quants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", default=["local", "1", "2"], help="local, 1, 2 (nodes)")
    parser.add_argument("--root", type=Path, default=None)
    args = parser.parse_args()
    root = args.root or Path(tempfile.mkdtemp(prefix="ecoquant-cluster-bench-"))
    rows = []
    for kind in args.runs:
        rows.append(run(kind, root))
        print(json.dumps(rows[-1]), flush=True)
    local = next((r for r in rows if r["run"].startswith("local")), None)
    one = next((r for r in rows if "1 node" in str(r["run"])), None)
    if local and one and one.get("jobs"):
        overhead = (float(one["wall_s"]) - float(local["wall_s"])) / int(one["jobs"])  # type: ignore[arg-type]
        print(json.dumps({"scheduling_overhead_per_job_s": overhead}))


if __name__ == "__main__":
    main()
