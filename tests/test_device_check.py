"""bench/device_check.sh --dry: the GPU device check's code runs on the CPU (so it cannot rot before a GPU is at hand),
its results file has every part, and bench/device_results_md.py turns it into the RESULTS.md section.

The dry run's "GPU" side is the CPU again, so the codes it compares must be identical, and no NVML measures anything.
Marked slow (minutes on 2 busy cores: four layer walks and two evaluations); .ci/run always runs it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dry_results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("device-check")
    env = {**os.environ, "OUT": str(tmp / "out"), "TMPDIR": str(tmp), "PYTHON": sys.executable,
           "ECOQUANT_DEVICE_CHECK_TIMEOUT": "1700"}
    done = subprocess.run(["bash", str(REPO / "bench" / "device_check.sh"), "--dry"], capture_output=True, text=True,
                          env=env, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (tmp / "out" / "device_check.log").is_file()
    return json.loads((tmp / "out" / "device_check.json").read_text())


def test_dry_run_calibrates_both_models_with_both_methods_and_compares(dry_results: dict) -> None:
    assert dry_results["dry"] and not dry_results["errors"]
    rows = dry_results["calibration"]
    assert {(r["model"], r["method"]) for r in rows} == {("tiny_vlm", "gptq"), ("e4b-layers", "awq-gptq")}
    compared = [r for r in rows if "against_cpu" in r]
    assert len(compared) == 2
    for r in compared:  # CPU against CPU: the same codes and scales exactly
        assert r["against_cpu"]["codes_equal"] == 1.0 and r["against_cpu"]["scale_rel_max"] == 0.0, r
        assert r["against_cpu"]["within_tolerance"] and r["against_cpu"]["modules"] > 0
        assert r["layers"] in (6, 4) and r["seconds_per_layer_mean"] > 0
        assert r["estimated_bytes"] > 0 and r["peak_cuda_bytes"] is None  # no CUDA here: nothing claimed


def test_dry_run_energy_part_says_not_measured_and_models(dry_results: dict) -> None:
    e = dry_results["energy"]
    assert not e["measured"] and "no NVML" in e["meter"]
    assert [m["label"] for m in e["models"]] == ["tiny_vlm", "tiny-vlm-w4a16"]
    for m in e["models"]:
        assert m["measured_j"] is None and m["measured_over_modelled"] is None
        assert m["modelled_j"] > 0


def test_the_results_become_a_markdown_section(dry_results: dict) -> None:
    sys.path.insert(0, str(REPO / "bench"))
    from device_results_md import render  # type: ignore[import-not-found]

    md = render(dry_results)
    assert md.startswith("## GPU: device check, dry run on the CPU")
    assert "`bash bench/device_check.sh --dry`" in md
    assert md.count("| tiny_vlm |") == 2 + 1 and md.count("| e4b-layers |") == 2  # calibration rows, and the energy row
    assert "| tiny-vlm-w4a16 |" in md and "measured / modelled" in md


def test_the_wheels_script_pins_uv_lock_versions_and_the_scripts_parse() -> None:
    for script in ("device_check.sh", "device_wheels.sh"):
        subprocess.run(["bash", "-n", str(REPO / "bench" / script)], check=True)
    text = (REPO / "bench" / "device_wheels.sh").read_text()
    assert "uv.lock" in text and "bench/device_wheels" in text
    assert "/bench/device_wheels/" in (REPO / ".gitignore").read_text()
