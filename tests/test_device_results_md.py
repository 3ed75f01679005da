"""bench/device_results_md.py on a GPU run's results (measured energy, CUDA memory): every number lands in its column."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from device_results_md import render  # type: ignore[import-not-found]  # noqa: E402

GIB = 1024**3
CALIB = {"model": "e4b-layers", "method": "gptq", "device": "cuda", "dtype": "float32", "tokens": 1024, "seconds": 12.5,
         "layers": 4, "seconds_per_layer_mean": 2.5, "seconds_per_layer_max": 3.25, "peak_cuda_bytes": 3 * GIB,
         "estimated_bytes": 4 * GIB, "estimate_parts": "...",
         "against_cpu": {"codes_equal": 0.99731, "scale_rel_max": 2.5e-3, "scale_rel_median": 1e-5, "modules": 28, "within_tolerance": True}}
RESULTS = {
    "command": "bash bench/device_check.sh", "dry": False, "started_utc": "2026-12-07 19:00:00", "seconds": 401.2,
    "machine": {"python": "3.12.3", "torch": "2.11.0+cu130", "cpu_threads": 16, "gpu": "NVIDIA H100 80GB HBM3",
                "gpu_memory_bytes": 80 * GIB},
    "tolerance": {"codes_equal_min": 0.99, "scale_rel_max": 1e-2, "scale_rel_median": 1e-3},
    "errors": {},
    "calibration": [CALIB],
    "energy": {"meter": "NVML total-energy counter, GPU 0", "measured": True, "target_gpu": "H100",
               "idle": {"seconds": 10.0, "measured_w": 71.25, "modelled_w": 70.0},
               "models": [{"label": "tiny_vlm", "requests": 72, "tokens_out": 300, "wall_time_s": 9.5, "measured_j": 812.5,
                           "measured_min_j": 800.0, "measured_max_j": 830.0, "measured_above_idle_j": 120.0, "repeats": 3,
                           "modelled_j": 50.0, "measured_over_modelled": 16.25, "suite_scores": {"doc": 1.0, "image": 0.75}}]},
}


def test_a_gpu_run_renders_its_numbers() -> None:
    md = render(RESULTS)
    assert md.startswith("## GPU: device check on NVIDIA H100 80GB HBM3")
    assert "`bash bench/device_check.sh`" in md and "80.0 GiB of GPU memory" in md
    assert "| e4b-layers | gptq | cuda | float32 | 1024 | 12.5 | 2.50 | 3.25 | 3.00 | 4.00 | 99.7310% | 2.50e-03 / 1.00e-05 | yes |" in md
    assert "Idle: measured 71.2 W over 10 s, modelled 70.0 W" in md
    assert "| tiny_vlm | 72 | 300 | 9.5 | 812.5 (800.0..830.0) | 120.0 | 50.000 | 16.2 | doc 1.00, image 0.75 |" in md


def test_a_failed_part_is_said() -> None:
    md = render({**RESULTS, "energy": None, "errors": {"energy": "RuntimeError: boom"}})
    assert "**energy failed:** `RuntimeError: boom`" in md
