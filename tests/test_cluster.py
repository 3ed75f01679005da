"""``optimize --cluster`` on a real local Ray cluster (``-m ray``; needs the ray extra, skipped without it).

The cluster is started here with ``ray.cluster_utils.Cluster``: nodes on
127.0.0.1, the dashboard off, one CPU each (the CI machine has two cores),
and one fake GPU each, labelled ``accelerator_type:L4`` or ``H100`` as Ray
labels a real one: the jobs only need the label (Ray sets
``CUDA_VISIBLE_DEVICES``, torch finds no CUDA and runs on the CPU, NVML
measures nothing, so energy is modelled for the L4).

The search is the staged search on the trained tiny VLM, cut to two RTN
weights candidates, one finalist and no serving lever, so a run is a few
minutes: the same pick as without Ray; a node killed while a job runs on it,
then the same command again, re-runs only the unfinished jobs and ends with
the same pick; a --out one node cannot write is refused before any work.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# Ray turns a loopback address into the machine's outward one before it connects; a cluster bound to
# 127.0.0.1 (as a test cluster must be) is only reachable with that off, and this is Ray's switch for it.
# It is read when ray is imported, by this process and by every node it starts.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_raylet_start_wait_time_s", "120")  # a loaded 2-core machine starts nodes slowly
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

ray = pytest.importorskip("ray")

from ray.cluster_utils import Cluster  # noqa: E402

from ecoquant.calibrate.data import CORPUS_SOURCE, CalibrationConfig  # noqa: E402
from ecoquant.errors import EcoquantError  # noqa: E402
from ecoquant.eval.backends.base import generation_settings  # noqa: E402
from ecoquant.eval.runner import EvalConfig  # noqa: E402
from ecoquant.fixtures.tiny_vlm import tiny_vlm_path  # noqa: E402
from ecoquant.optimize import OptimizeConfig, OptimizeResult, optimize  # noqa: E402
from ecoquant.optimize.jobs import RUNNING  # noqa: E402
from ecoquant.optimize.levers import FamilyLevers  # noqa: E402
from ecoquant.optimize.plan import SearchConfig  # noqa: E402
from ecoquant.optimize.store import read_json  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow]

#: Two data-free weights candidates (no calibration to wait for), no serving lever, one finalist:
#: stage 1 is the base and two candidates, stage 3 the base and one, on the whole (small) suite.
LEVERS = FamilyLevers(
    weights=({"method": "rtn"}, {"method": "rtn", "scheme": "w8a8-int8"}),
    responses=(),
    answer_caps=(),
    kv_cache_dtypes=(),
    image_budget_max_factor=0,
    note="tests: two RTN candidates",
)


def search_config(out: Path, cluster: str | None = None, retries: int = 1) -> OptimizeConfig:
    return OptimizeConfig(
        out=out,
        eval=EvalConfig(
            suite="builtin-basic", size=2, generation=generation_settings(max_new_tokens=8), idle_seconds=0.0, warmup_requests=1
        ),
        search=SearchConfig(
            levers=LEVERS, keep=1, finalists=1, subset=1,
            calibration=CalibrationConfig(source=CORPUS_SOURCE, num_samples=4, max_length=64),
        ),
        cluster=cluster,
        cluster_retries=retries,
    )


def node_args(label: str) -> dict[str, Any]:
    return {"num_cpus": 1, "num_gpus": 1, "node_ip_address": "127.0.0.1", "resources": {f"accelerator_type:{label}": 1}}


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """Two nodes on 127.0.0.1, dashboard off: an L4 (the head) and an H100 (labels only)."""
    c = Cluster(initialize_head=True, head_node_args={**node_args("L4"), "include_dashboard": False})
    c.add_node(**node_args("H100"))
    c.wait_for_nodes()
    yield c
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> OptimizeResult:
    """The same search without Ray: the reference pick."""
    return optimize(tiny_vlm_path(), search_config(tmp_path_factory.mktemp("local") / "opt"), show_progress=False)


def stage_recoveries(result: OptimizeResult) -> dict[str, Any]:
    choice = read_json(result.results.parent / "choice.json")
    return {s: {n: o["mean_recovery"] for n, o in outs.items()} for s, outs in choice["search"]["stages"].items()}


def placements(out: Path) -> dict[str, dict[str, Any]]:
    return {f.name: read_json(f)["placement"] for f in sorted((out / "evals").glob("*.json"))}


def test_the_staged_search_on_two_nodes_picks_what_it_picks_without_ray(
    cluster: Cluster, local: OptimizeResult, tmp_path: Path
) -> None:
    result = optimize(tiny_vlm_path(), search_config(tmp_path / "opt", cluster.address), show_progress=False)
    assert result.choice.pick is not None and result.choice.pick == local.choice.pick
    assert stage_recoveries(result) == stage_recoveries(local)  # the same scores, wherever each model ran
    where = placements(tmp_path / "opt")
    nodes = {n.node_id for n in [cluster.head_node, *cluster.worker_nodes]}
    assert {p["node_id"] for p in where.values()} == nodes  # both nodes evaluated something
    assert {p["gpu_model"] for p in where.values()} == {"L4", "H100"}
    # stage 3's two evaluations ran at once, one per node: mixed GPU models, so the note says how it ranked
    assert "different GPU models (H100, L4)" in result.choice.metric_note
    assert "modelled for L4" in result.choice.summary()
    assert "different GPU models" in (tmp_path / "opt" / "report.md").read_text(encoding="utf-8")
    assert not list((tmp_path / "opt" / RUNNING).glob("*.json"))


def test_a_node_lost_mid_search_then_a_rerun_runs_only_the_unfinished_jobs(
    cluster: Cluster, local: OptimizeResult, tmp_path: Path
) -> None:
    out = tmp_path / "opt"
    doomed = cluster.add_node(**node_args("L4"))
    cluster.wait_for_nodes()
    failure: list[BaseException] = []

    def first_pass() -> None:
        try:
            optimize(tiny_vlm_path(), search_config(out, cluster.address, retries=0), show_progress=False)
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            failure.append(exc)

    worker = threading.Thread(target=first_pass)
    worker.start()
    killed_on = None
    deadline = time.monotonic() + 600
    while killed_on is None and worker.is_alive() and time.monotonic() < deadline:
        for marker in (out / RUNNING).glob("evaluate-*.json"):
            data = read_json(marker)
            if isinstance(data, dict) and data.get("node") == doomed.node_id:
                killed_on = marker.name
                # The job's worker first: a worker outlives its raylet for a while and, on a loaded machine,
                # finished the evaluation and saved it after its node was gone (seen on CI).
                os.kill(int(data["pid"]), signal.SIGKILL)
                cluster.remove_node(doomed, allow_graceful=False)
                break
        time.sleep(0.05)
    worker.join(timeout=900)
    assert killed_on is not None, "no evaluation was placed on the third node"
    assert failure and isinstance(failure[0], EcoquantError), failure
    message = str(failure[0])
    assert "lost with their node" in message and "\n" not in message
    lost_label = killed_on.removeprefix("evaluate-").removesuffix(".json")
    assert lost_label in message
    before = {f.name: f.stat().st_mtime_ns for f in (out / "evals").glob("*.json")}
    assert not any(name.startswith(f"{lost_label}-") for name in before)  # the lost job left no result

    again = optimize(tiny_vlm_path(), search_config(out, cluster.address), show_progress=False)
    assert again.choice.pick == local.choice.pick
    assert stage_recoveries(again) == stage_recoveries(local)
    after = {f.name: f.stat().st_mtime_ns for f in (out / "evals").glob("*.json")}
    assert {n: after[n] for n in before} == before  # nothing finished was evaluated again
    rerun = set(after) - set(before)
    assert any(name.startswith(f"{lost_label}-") for name in rerun)
    # and the rerun did exactly what the uninterrupted search does, less what the first pass finished
    assert len(after) == len(list((local.results.parent / "evals").glob("*.json")))


#: A node started the way ``Cluster.add_node`` starts one, in a process of its own (so in a mount namespace of
#: its own); it stops, taking its raylet and workers with it, on SIGTERM.
NODE_SCRIPT = """
import signal, sys, time
import ray._private.node, ray._private.parameter
params = ray._private.parameter.RayParams(
    gcs_address=sys.argv[1], node_ip_address="127.0.0.1", num_cpus=1, num_gpus=0,
    object_store_memory=150 * 1024 * 1024, min_worker_port=0, max_worker_port=0,
    include_log_monitor=False, node_manager_port=0,
)
params.dashboard_agent_listen_port = None
node = ray._private.node.Node(params, head=False, shutdown_at_exit=True, spawn_reaper=True)
signal.signal(signal.SIGTERM, lambda *_: (node.kill_all_processes(check_alive=False, allow_graceful=True), sys.exit(0)))
while True:
    time.sleep(1)
"""


@pytest.mark.skipif(shutil.which("unshare") is None or os.geteuid() != 0, reason="needs unshare and root")
def test_an_out_one_node_cannot_write_is_refused_before_any_work(cluster: Cluster, tmp_path: Path) -> None:
    """A third node sees --out read-only (its own mount namespace, as a read-only NFS export would look)."""
    out = tmp_path / "opt"
    out.mkdir()
    ray.init(address=cluster.address, ignore_reinit_error=True, log_to_driver=False)
    # By id, not by count: the node the previous test removed can still be listed alive until its heartbeats
    # time out, and then leaves as the new one joins (seen on CI: 3 before, 3 after).
    before = {n["NodeID"] for n in ray.nodes()}

    def joined() -> bool:
        return any(n["Alive"] and n["NodeID"] not in before for n in ray.nodes())

    script = (
        f"mount --bind {out} {out} && mount -o remount,ro,bind {out} {out} && "
        f'exec {sys.executable} -c "$0" {cluster.address}'
    )
    node = subprocess.Popen(["unshare", "-m", "sh", "-c", script, NODE_SCRIPT], start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not joined() and time.monotonic() < deadline:
            assert node.poll() is None, "the read-only node exited"
            time.sleep(0.5)
        assert joined(), "the read-only node did not join"
        with pytest.raises(EcoquantError) as info:
            optimize(tiny_vlm_path(), search_config(out, cluster.address), show_progress=False)
        message = str(info.value)
        assert "\n" not in message and "is not shared by every node" in message and "Read-only" in message
        assert not (out / "checkpoints").exists() and not (out / "evals").exists()  # nothing ran
    finally:
        node.terminate()
        node.wait(timeout=60)
