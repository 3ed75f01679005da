"""The device check: ecoquant's CUDA paths on one NVIDIA GPU, against the CPU, in one short run.

No code path that touches CUDA had run before this script (calibration on
``cuda``, NVML windows, the transformers backend on ``cuda``). It runs them on
the machine ``bench/device_check.sh`` is started on and writes one JSON file;
``bench/device_results_md.py`` turns that into the "GPU" section of
bench/RESULTS.md.

1. Calibration (run second: its CPU side is what may run long), CPU against CUDA, float32 on both (the comparison) and CUDA in
   bf16 (what ``--device auto`` runs there), through :func:`ecoquant.calibrate.run.calibrate`:
   GPTQ and AWQ + GPTQ on the shipped tiny VLM (the shipped corpus, 32 x 256
   tokens, the tier optimize uses for it) and on an "E4B-layers" checkpoint:
   E4B's configuration with 4 decoder layers (sliding, full, and two
   KV-shared layers reading their K/V, as E4B's last 18 do), one layer in each
   tower, random weights, 2 x 512 random tokens. Per run: time per layer,
   peak CUDA memory beside ecoquant's own estimate of it
   (:mod:`ecoquant.calibrate.memory`), and against the CPU run the share of
   int4 codes that are identical and the relative difference of the scales.
   Tolerance (stated, float32 both sides): at least 99% identical codes and
   scales within 1% (median within 0.1%). The two devices sum in different
   orders, so the Hessians differ by float32 rounding, and GPTQ's error
   feedback can move a code at a rounding boundary and the columns after it:
   bit-equality is not expected.
2. NVML energy windows (run first) with ecoquant's meter: idle power, then the tiny VLM in
   bf16 and its W4A16 checkpoint (RTN) through the transformers backend on the
   GPU, ``builtin-basic`` suite, 3 repeats, each beside the energy ecoquant
   models for this GPU (measured / modelled).

``--dry`` runs the same code on the CPU at small sizes (the "GPU" side is the
CPU again, so codes must match exactly, and no NVML; GPTQ on the tiny VLM and
AWQ + GPTQ on the shrunk E4B layers only): the test suite runs it so that this
script cannot rot before a GPU is at hand.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = {"codes_equal_min": 0.99, "scale_rel_max": 1e-2, "scale_rel_median": 1e-3}
METHODS = ("gptq", "awq-gptq")


def e4b_layers_config(dry: bool) -> Any:
    """E4B's configuration cut to 4 decoder layers (two KV-shared) and one layer per tower; ``dry`` shrinks widths."""
    from transformers import Gemma4Config

    from ecoquant.fixtures.e4b_twin import e4b_config

    d = e4b_config().to_dict()
    text = d["text_config"]
    # transformers makes the last layer a full one; the last two share the K/V of the first two, as E4B's last 18 do
    text.update(num_hidden_layers=4, layer_types=["sliding_attention", "full_attention"] * 2, num_kv_shared_layers=2)
    text.pop("per_layer_config", None)
    d["vision_config"]["num_hidden_layers"] = 1
    d["audio_config"]["num_hidden_layers"] = 1
    if dry:  # the same structure at widths the CPU runs in seconds
        text.update(hidden_size=128, intermediate_size=256, num_attention_heads=2, head_dim=64, global_head_dim=128,
                    hidden_size_per_layer_input=16, vocab_size=4096, vocab_size_per_layer_input=4096)
    return Gemma4Config.from_dict(d)


def write_e4b_layers(out: Path, dry: bool) -> Path:
    """A random-weight checkpoint of :func:`e4b_layers_config` (transformers' own initialisation, bf16)."""
    from transformers import Gemma4ForConditionalGeneration

    if (out / "config.json").is_file():
        return out
    torch.manual_seed(0)
    model = Gemma4ForConditionalGeneration(e4b_layers_config(dry)).to(torch.bfloat16)
    model.save_pretrained(out)
    del model
    return out


def compare(a: Any, b: Any) -> dict[str, Any]:
    """Codes and scales of two calibration results over the same modules."""
    equal = total = 0
    rel: list[float] = []
    for name in a.quantized:
        qa, qb = a.quantized_weight(name), b.quantized_weight(name)
        equal += int((qa.q == qb.q).sum())
        total += qa.q.numel()
        sa, sb = qa.scale.double(), qb.scale.double()
        rel.append(float(((sa - sb).abs() / sa.abs().clamp_min(1e-30)).max()))
    codes = equal / total if total else 1.0
    result = {"codes_equal": codes, "scale_rel_max": max(rel, default=0.0),
              "scale_rel_median": statistics.median(rel) if rel else 0.0, "modules": len(rel)}
    result["within_tolerance"] = (codes >= TOLERANCE["codes_equal_min"] and result["scale_rel_max"] <= TOLERANCE["scale_rel_max"]
                                  and result["scale_rel_median"] <= TOLERANCE["scale_rel_median"])
    return result


def calibrate_once(model: Path, method: str, batches: list[dict[str, torch.Tensor]], device: str, dtype: torch.dtype,
                   work: Path) -> tuple[Any, dict[str, Any]]:
    """One calibration; its result and a row: time per layer, peak CUDA memory and ecoquant's estimate of it."""
    from ecoquant.calibrate.memory import layer_shapes, peak_calibration_memory
    from ecoquant.calibrate.run import calibrate
    from ecoquant.models.topology import decoder_layers, topology_for
    from ecoquant.plan import plan_model

    plan = plan_model(model)
    shutil.rmtree(work, ignore_errors=True)
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    result = calibrate(model, method=method, selection=plan.selection, batches=batches, work_dir=work, device=device, dtype=dtype)  # type: ignore[arg-type]
    seconds = time.perf_counter() - t
    layers = [v for k, v in result.stats["timings_s"].items() if k.startswith("layer ")]
    path, mods = decoder_layers(plan.model, topology_for(plan.config))
    tokens = sum(int(b["input_ids"].numel()) for b in batches)
    estimate = peak_calibration_memory(
        layer_shapes(plan.model, mods, path, plan.selection.modules, plan.config.get_text_config()),
        tokens=tokens, batch_tokens=max(int(b["input_ids"].shape[-1]) for b in batches), method=method,
        dtype_bytes=torch.tensor([], dtype=dtype).element_size(),
    )
    row = {
        "model": model.name, "method": method, "device": device, "dtype": str(dtype).removeprefix("torch."),
        "tokens": tokens, "seconds": round(seconds, 3), "layers": len(layers),
        "seconds_per_layer_mean": round(statistics.fmean(layers), 3) if layers else None,
        "seconds_per_layer_max": round(max(layers), 3) if layers else None,
        "peak_cuda_bytes": result.stats.get("peak_cuda_bytes"),
        "estimated_bytes": estimate.total, "estimate_parts": estimate.describe(),
    }
    return result, row


def calibration_part(work: Path, dry: bool, gpu: str, log: Any, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    from ecoquant.calibrate.data import CalibrationConfig, load_calibration

    tiny = REPO / "src" / "ecoquant" / "fixtures" / "tiny_vlm"
    e4b = write_e4b_layers(work / "e4b-layers", dry)
    samples, length = (2, 32) if dry else (32, 256)
    tiny_batches = list(load_calibration(tiny, CalibrationConfig(source="corpus", num_samples=samples, max_length=length)).batches)
    g = torch.Generator().manual_seed(0)
    n, seq = (2, 32) if dry else (2, 512)
    e4b_batches = [{"input_ids": torch.randint(3, 4000, (1, seq), generator=g)} for _ in range(n)]
    # The dry run keeps one method per model (both methods and both models still run) to stay fast on 2 cores.
    plan = ((tiny, tiny_batches, ("gptq",)), (e4b, e4b_batches, ("awq-gptq",))) if dry else (
        (tiny, tiny_batches, METHODS), (e4b, e4b_batches, METHODS))
    runs = [(model, batches, method) for model, batches, methods in plan for method in methods]
    # The GPU runs first (the numbers only a GPU gives: time per layer, peak memory, bf16), then each CPU
    # reference, compared as it finishes: a run stopped by its time limit keeps every GPU row.
    on_gpu = {}
    for model, batches, method in runs:
        key = f"{model.name}-{method}"
        on_gpu[key], row = calibrate_once(model, method, batches, gpu, torch.float32, work / f"w-{key}-{gpu}")
        rows.append(row)
        log(row)
        if not dry:  # what --device auto runs on a GPU: the checkpoint's bf16 (timing and memory; no comparison)
            _, fast = calibrate_once(model, method, batches, gpu, torch.bfloat16, work / "w-bf16")
            rows.append(fast)
            log(fast)
    for model, batches, method in runs:
        key = f"{model.name}-{method}"
        cpu, cpu_row = calibrate_once(model, method, batches, "cpu", torch.float32, work / f"w-{key}-cpu-reference")
        cpu_row["reference_for"] = gpu
        compared = next(r for r in rows if (r["model"], r["method"], r["device"], r["dtype"]) == (model.name, method, gpu, "float32")
                        and "reference_for" not in r)
        compared["against_cpu"] = compare(cpu, on_gpu[key])
        rows.append(cpu_row)
        log(cpu_row)
    return rows


def energy_part(work: Path, dry: bool, gpu: str, log: Any, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Idle power, then bf16 against W4A16 on the transformers backend, each measured beside modelled."""
    from ecoquant.api import QuantizeConfig, quantize
    from ecoquant.energy.gpus import GPUS, DEFAULT_GPU
    from ecoquant.eval.runner import EvalConfig, run_eval

    tiny = REPO / "src" / "ecoquant" / "fixtures" / "tiny_vlm"
    w4 = work / "tiny-vlm-w4a16"
    if not w4.is_dir():
        quantize(tiny, w4, QuantizeConfig(method="rtn"), show_progress=False)
    name = torch.cuda.get_device_name(0) if gpu.startswith("cuda") else ""
    # the GPU table's row for this card (longest name first: "L40S" before "L4"); the L4 where none matches
    target = next((k for k in sorted(GPUS, key=len, reverse=True) if k.lower() in name.lower()), DEFAULT_GPU)
    config = EvalConfig(suite="builtin-basic", backend="transformers", device=gpu, repeats=3,
                        idle_seconds=2.0 if dry else 10.0, limit=1 if dry else None, target_gpu=target)
    record = run_eval(str(tiny), [str(w4)], config, show_progress=False)
    idle_model = GPUS[target].idle_power_w.value
    out: dict[str, Any] = {
        "meter": record.energy.meter, "measured": record.energy.measured, "target_gpu": target,
        "idle": {"seconds": record.energy.idle_time_s, "measured_w": record.energy.idle_power_w, "modelled_w": idle_model},
        "models": [],
    }
    for run in record.runs:
        modelled = (run.modelled_energy or {}).get("total_j")
        spread = run.energy_spread_j
        row = {
            "label": run.label, "requests": run.requests, "tokens_out": run.tokens_out, "wall_time_s": run.wall_time_s,
            "measured_j": run.energy_j, "measured_min_j": spread[0] if spread else None,
            "measured_max_j": spread[1] if spread else None,
            "measured_above_idle_j": None if run.energy is None else run.energy.idle_corrected_j,
            "repeats": len(run.energy_repeats), "modelled_j": modelled,
            "measured_over_modelled": None if run.energy_j is None or not modelled else run.energy_j / modelled,
            "suite_scores": run.suite_scores,
        }
        out["models"].append(row)
        log(row)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="the results file to write (JSON)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/ecoquant-device-check"), help="scratch folder")
    parser.add_argument("--dry", action="store_true", help="CPU only, small sizes (the test suite's run)")
    args = parser.parse_args()
    if not args.dry and not torch.cuda.is_available():
        print("device check: no CUDA device visible; use --dry on a CPU machine", file=sys.stderr)
        return 2
    gpu = "cpu" if args.dry else "cuda"
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results: dict[str, Any] = {
        "command": "bash bench/device_check.sh" + (" --dry" if args.dry else ""),
        "dry": args.dry, "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpu_threads": torch.get_num_threads(),
                    "gpu": torch.cuda.get_device_name(0) if gpu != "cpu" else None,
                    "gpu_memory_bytes": torch.cuda.get_device_properties(0).total_memory if gpu != "cpu" else None},
        "tolerance": TOLERANCE, "errors": {},
    }

    def save() -> None:  # after every row: a run stopped by its time limit keeps what finished
        results["seconds"] = round(time.perf_counter() - t0, 1)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1, default=str))

    def log(row: dict[str, Any]) -> None:
        print(f"[{time.perf_counter() - t0:6.1f} s] " + json.dumps(row, default=str), flush=True)
        save()

    # Energy first: it is short, and the calibration's CPU side is what may run long.
    for part, run in (("energy", energy_part), ("calibration", calibration_part)):
        rows: list[dict[str, Any]] = []
        if part == "calibration":
            results[part] = rows
        try:  # one part failing still leaves the other's numbers
            results[part] = run(args.work, args.dry, gpu, log, rows)
        except Exception as exc:  # noqa: BLE001 - recorded in the results and the exit code
            import traceback

            traceback.print_exc()
            results["errors"][part] = f"{type(exc).__name__}: {exc}"
        save()
    print(f"device check: {results['seconds']} s, results in {args.out}" + (f"; errors: {results['errors']}" if results["errors"] else ""))
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
