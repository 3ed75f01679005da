"""Ranking candidates metered on different GPU models (``ecoquant.optimize.fleet``), and --cluster without Ray.

Pure functions over report rows, so these run without Ray: on one GPU model
the measured energy ranks as on one machine; on mixed models the choice is by
modelled energy calibrated per node, and the note says so; the Ray-cluster
end-to-end runs are in ``tests/test_cluster.py`` (``-m ray``).
"""

from __future__ import annotations

import builtins
from dataclasses import replace
from pathlib import Path

import pytest

from ecoquant.errors import EcoquantError
from ecoquant.optimize.fleet import Where, calibrated_rows, fleet_ranking
from ecoquant.optimize.select import choose
from ecoquant.report.table import ReportRow


def row(name: str, measured: float | None, modelled: float, recovery: float = 0.95, role: str = "variant") -> ReportRow:
    return ReportRow(
        model=name, role=role, prompt_variant="default", energy_j=measured, energy_delta=None, idle_corrected_j=None,
        scores={}, recoveries={}, mean_recovery=None if role == "base" else recovery, gate="pass" if role != "base" else "base",
        tokens_in=0, tokens_out=0, requests=1, wall_time_s=1.0, modelled_energy_j=modelled,
    )


ROWS = [
    row("base", 400.0, 100.0, role="base"),
    row("a", 90.0, 30.0),  # on the H100 node: measured 3x the L4 model's figure
    row("b", 50.0, 40.0),  # on the L4 node: cheapest measured, but only because an L4 draws less
    row("c", 66.0, 33.0),  # on the H100 node
]
SAME = {"base": Where("n1", "L4"), "a": Where("n1", "L4"), "b": Where("n2", "L4"), "c": Where("n1", "L4")}
MIXED = {"base": Where("h100", "H100"), "a": Where("h100", "H100"), "b": Where("l4", "L4"), "c": Where("h100", "H100")}


def test_one_gpu_model_ranks_by_measured_energy() -> None:
    from ecoquant.optimize.fleet import ranked

    fleet = fleet_ranking(ROWS, SAME, "L4")
    assert not fleet.mixed
    assert ranked(ROWS, SAME, "L4", True) == (ROWS, True, None)
    rows, measured, mixed = ranked(ROWS, MIXED, "L4", True)
    assert not measured and mixed is not None and rows == calibrated_rows(ROWS, MIXED, mixed)
    assert choose(ROWS, 0.8, True).pick == "b"


def test_mixed_gpu_models_rank_by_modelled_energy_calibrated_per_node_and_say_so() -> None:
    fleet = fleet_ranking(ROWS, MIXED, "L4")
    assert fleet.mixed and fleet.gpu_models == ("H100", "L4")
    # the H100 node's runs: measured / modelled 4.0, 3.0, 2.0 -> median 3.0; the L4 node's: 50 / 40
    assert fleet.ratios == {"h100": pytest.approx(3.0), "l4": pytest.approx(1.25)}
    rows = calibrated_rows(ROWS, MIXED, fleet)
    assert [r.modelled_energy_j for r in rows] == pytest.approx([300.0, 90.0, 50.0, 99.0])
    choice = choose(rows, 0.8, False, modelled_for="L4")
    assert choice.metric == "modelled_energy_j"
    assert choice.pick == "b"  # 50 J (40 modelled x 1.25) beats a's 90 and c's 99
    note = fleet.note()
    assert "different GPU models (H100, L4)" in note and "modelled for L4" in note
    assert "h100 x3.00" in note and "l4 x1.25" in note


def test_calibration_changes_the_pick_where_one_node_is_underestimated() -> None:
    """Uncalibrated, a (30 J modelled) beats b (40 J); the model underestimates a's node 3x: calibrated, b wins."""
    rows = [replace(r, energy_j=None) if r.model != "b" else r for r in ROWS]  # only the L4 node measured
    fleet = fleet_ranking(rows, MIXED, "L4")
    assert fleet.ratios["h100"] is None
    assert choose(calibrated_rows(rows, MIXED, fleet), 0.8, False).pick == "a"
    assert "not calibrated on h100" in fleet.note()
    fleet = fleet_ranking(ROWS, MIXED, "L4")
    assert choose(calibrated_rows(ROWS, MIXED, fleet), 0.8, False).pick == "b"


def test_labels_only_are_not_calibrated_and_say_so() -> None:
    rows = [replace(r, energy_j=None) for r in ROWS]
    fleet = fleet_ranking(rows, MIXED, "L4")
    assert calibrated_rows(rows, MIXED, fleet) == rows
    assert "not calibrated (no node measured energy)" in fleet.note()


def hide_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``import ray`` fail as it does where the extra is not installed."""
    real = builtins.__import__

    def no_ray(name: str, *args: object, **kwargs: object) -> object:
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray'")
        return real(name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(builtins, "__import__", no_ray)


def test_cluster_without_ray_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from ecoquant.cli import app
    from ecoquant.fixtures.tiny_vlm import tiny_vlm_path
    from ecoquant.optimize.cluster import require_ray

    hide_ray(monkeypatch)
    with pytest.raises(EcoquantError) as info:
        require_ray()
    message = str(info.value)
    assert "\n" not in message and "uv run --extra ray" in message and "ecoquant[ray]" in message
    result = CliRunner().invoke(app, ["optimize", str(tiny_vlm_path()), "--out", str(tmp_path / "o"), "--cluster", "auto"])
    assert result.exit_code == 2
    assert f"error: {message}" in " ".join(result.output.split())  # the brackets survive the console
    assert not (tmp_path / "o" / "evals").exists()


def test_cluster_and_gpus_together_are_refused(tmp_path: object) -> None:
    from ecoquant.optimize import OptimizeConfig

    with pytest.raises(EcoquantError, match="--cluster and --gpus"):
        OptimizeConfig(out=tmp_path, cluster="auto", gpus=(0, 1))  # type: ignore[arg-type]


class _Resources:
    """What ``spread_estimate`` reads of a connected ray module: the cluster's total resources."""

    def __init__(self, resources: dict[str, float]) -> None:
        self.resources = resources

    def cluster_resources(self) -> dict[str, float]:
        return self.resources


def test_the_dry_run_estimate_is_divided_across_the_cluster_s_gpus() -> None:
    from ecoquant.optimize.cluster import spread_estimate

    line = spread_estimate(_Resources({"GPU": 4.0, "CPU": 64.0}), 1200.0)  # type: ignore[arg-type]
    assert "4 GPUs: about 5.0 min" in line and "fewer jobs than slots" in line
    assert "2 CPUs (no GPU): about 10.0 min" in spread_estimate(_Resources({"CPU": 2.0}), 1200.0)  # type: ignore[arg-type]
    assert "no estimate yet" in spread_estimate(_Resources({"GPU": 2.0}), None)  # type: ignore[arg-type]


def test_jobs_checking_the_shared_out_at_once_do_not_trip_over_each_other(tmp_path: Path) -> None:
    """Every job opens the store (which probes --out); two nodes doing it at once once removed each other's probe."""
    from concurrent.futures import ThreadPoolExecutor

    from ecoquant.optimize.store import check_writable

    with ThreadPoolExecutor(max_workers=8) as pool:
        for future in [pool.submit(check_writable, tmp_path) for _ in range(400)]:
            assert future.result() == tmp_path
    assert list(tmp_path.iterdir()) == []


def test_a_cluster_address_nobody_answers_is_one_line_at_once() -> None:
    """ray.init retries an unreachable address for minutes, logging as it goes; the check says so in one line first."""
    import socket

    import pytest

    from ecoquant.errors import EcoquantError
    from ecoquant.optimize.cluster import _check_reachable

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(EcoquantError, match="nothing answers there"):
        _check_reachable(f"127.0.0.1:{port}")
    _check_reachable("auto")  # Ray resolves this itself: not checked here


def test_the_dry_run_with_several_gpus_divides_its_estimate_by_them(tmp_path: Path) -> None:
    """``--gpus 0,1 --dry-run`` says what the Ray path would share, without starting Ray."""
    from typer.testing import CliRunner

    from ecoquant.cli import app
    from ecoquant.fixtures.tiny_vlm import tiny_vlm_path
    from ecoquant.optimize.cluster import spread_text

    assert "on --gpus 0,1: 2 GPUs: about 10.0 min" in spread_text(1200.0, 2, "GPUs", "on --gpus 0,1")
    result = CliRunner().invoke(app, ["optimize", str(tiny_vlm_path()), "--out", str(tmp_path / "o"), "--gpus", "0,1", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "on --gpus 0,1: 2 GPUs" in result.output
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").rglob("*.safetensors"))
