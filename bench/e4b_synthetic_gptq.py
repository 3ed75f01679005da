"""GPTQ / AWQ on the full-size synthetic Gemma-4 E4B checkpoint: wall time, peak RSS, time per layer, projection.

The source is the random-weight E4B checkpoint ``bench/e4b_synthetic_rtn.py``
writes (E4B's real tensor names and shapes, ~15 GiB of bf16), with the
Gemma-3 270M tokenizer copied in (same 262,144-token vocabulary) so that the
shipped corpus can calibrate it. ``ecoquant quantize --method gptq`` (or awq)
runs in a child process; its wall time and peak RSS are the child's, and the
recipe's per-layer timings give the time per layer, split into the part that
grows with calibration tokens (layer forwards, Hessian accumulation) and the
part that does not (the per-Linear solve). From those:

    projected = sum over layers of (token part * tokens_target / tokens_run + solve part)

which is linear in tokens (attention's quadratic part at 2048-token samples is
not modelled: a lower bound for long samples).

A run may be stopped (``--stop-after-s``: SIGKILL after that long, as a crash
would) and is resumed by running the same command again: the calibration
resumes from its last finished layer. The printed rows then say how many
layers each invocation calibrated.

Usage::

    uv run python bench/e4b_synthetic_gptq.py --work /tmp/e4b-bench --method gptq --samples 16 --seq-len 512
    uv run python bench/e4b_synthetic_gptq.py --work /tmp/e4b-bench --llmcompressor   # its GPTQ, same source

Needs ~26 GB of free disk in --work (the source is kept for reruns).
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

LLMC = ["--with", "llmcompressor==0.14.0.1", "--with", "torch==2.13.0"]


def source(work: Path) -> Path:
    """The synthetic checkpoint, written once, with a tokenizer."""
    from e4b_synthetic_rtn import write_synthetic  # type: ignore[import-not-found]

    from ecoquant.fixtures.gemma3_gguf import gemma3_270m_path

    src = work / "e4b-synthetic-bf16"
    if not (src / "config.json").is_file():
        print(f"writing synthetic E4B checkpoint to {src}", flush=True)
        t = time.perf_counter()
        write_synthetic(src)
        print(f"  done in {time.perf_counter() - t:.0f} s", flush=True)
    tok = gemma3_270m_path()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tok / name).is_file() and not (src / name).is_file():
            shutil.copy(tok / name, src / name)
    return src


PEAK: dict[str, float] = {"RssAnon": 0.0, "RssFile": 0.0}


def _sample(pid: int, stop: threading.Event) -> None:
    """Peak anonymous and file-backed resident memory of ``pid`` (GiB), from /proc once a second.

    ru_maxrss counts the pages of memory-mapped safetensors the child has read,
    which the kernel may drop at any time; the anonymous part is what the run
    really holds.
    """
    while not stop.wait(1.0):
        try:
            text = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return
        for key, peak in PEAK.items():
            m = re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE)
            if m:
                PEAK[key] = max(peak, int(m.group(1)) / 2**20)


def run_child(cmd: list[str], stop_after_s: float | None, log: Path) -> tuple[int, float, float]:
    """(return code, wall seconds, peak RSS GiB) of a child, killed with SIGKILL after ``stop_after_s``.

    Its stderr (ecoquant's progress lines: one per finished layer, with the elapsed time) goes to ``log``.
    The peak anonymous / file-backed split is left in :data:`PEAK`.
    """
    print("$ " + " ".join(cmd), flush=True)
    t = time.perf_counter()
    with log.open("a") as err:
        proc = subprocess.Popen(cmd, stderr=err)
        stop = threading.Event()
        sampler = threading.Thread(target=_sample, args=(proc.pid, stop), daemon=True)
        sampler.start()
        try:
            rc = proc.wait(timeout=stop_after_s)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            rc = proc.wait()
        stop.set()
    wall = time.perf_counter() - t
    print(f"peak resident memory sampled from /proc: anonymous {PEAK['RssAnon']:.2f} GiB, "
          f"file-backed (mapped checkpoint pages) {PEAK['RssFile']:.2f} GiB", flush=True)
    return rc, wall, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20


def layer_times(log: Path) -> list[float]:
    """Seconds per layer of the last invocation, from its ``calibrating: k/N layer i (T s)`` lines."""
    runs: list[list[float]] = []
    for line in log.read_text().splitlines():
        m = re.match(r"calibrating: (\d+)/\d+ (.+) \(([0-9.]+) s\)$", line)
        if m is None:
            continue
        if int(m.group(1)) == 1:
            runs.append([])
        runs[-1].append(float(m.group(3)))
    if not runs:
        return []
    stamps = runs[-1]
    return [b - a for a, b in zip(stamps, stamps[1:], strict=False)]  # stamp 0 is the capture


def report(out: Path, samples: int, seq_len: int, wall: float, rss: float, target_tokens: int) -> None:
    recipe = json.loads((out / "quant_recipe.json").read_text())
    stats = recipe["method_config"]["stats"]
    timings, solve = stats["timings_s"], stats.get("quantize_s", {})
    resumed = set(stats.get("resumed_units", []))
    layers = sorted((k for k in timings if k.startswith("layer ")), key=lambda k: int(k.split()[1]))
    fresh = [k for k in layers if k not in resumed]
    tokens = stats["calibration"]["tokens"]
    per_layer = [timings[k] for k in fresh]
    token_part = sum(timings[k] - solve.get(k, 0.0) for k in fresh)
    solve_part = sum(solve.get(k, 0.0) for k in fresh)
    scale = len(layers) / max(len(fresh), 1)  # resumed layers were timed in the earlier invocation
    projected = scale * (token_part * target_tokens / tokens + solve_part)
    print(f"\nE4B synthetic, {recipe['method']}, {samples} x {seq_len} calibration ({tokens} tokens)")
    print(f"layers calibrated in this invocation: {len(fresh)} of {len(layers)} (resumed: {len(resumed)})")
    print("| wall (this invocation) | peak RSS (anonymous / file-backed) | time per layer (mean / max) | "
          f"solve part per layer | projected for {target_tokens} tokens |")
    print("|---|---|---|---|---|")
    mean = sum(per_layer) / max(len(per_layer), 1)
    print(f"| {wall:.0f} s | {rss:.2f} GiB ({PEAK['RssAnon']:.2f} / {PEAK['RssFile']:.2f}) | "
          f"{mean:.1f} s / {max(per_layer, default=0):.1f} s | "
          f"{solve_part / max(len(fresh), 1):.1f} s | {projected / 3600:.1f} h |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--method", default="gptq", choices=["gptq", "awq", "awq-gptq"])
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--stop-after-s", type=float, default=None, help="SIGKILL the run after this long (resume by rerunning)")
    p.add_argument("--llmcompressor", action="store_true", help="run llmcompressor's GPTQ on the same source instead")
    p.add_argument("--target-tokens", type=int, default=256 * 2048)
    p.add_argument("--quantize-args", default="",
                   help="more ecoquant quantize options, e.g. '--observer minmax --scale-passes 1 --calib-dtype float32' "
                        "(the defaults before issue 14's last change); none: the CLI's defaults")
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    src = source(args.work)
    if args.llmcompressor:
        from gemma3_methods import calib_json, uv_isolated  # type: ignore[import-not-found]

        out = args.work / "e4b-llmc-gptq"
        cj = calib_json(src, args.work, args.samples, args.seq_len)
        cmd = uv_isolated(LLMC, str(REPO / "bench/external/llmcompressor_oneshot.py"), str(src), str(out),
                          "--ignore", "lm_head", "--method", "gptq", "--pipeline", "sequential",
                          "--calib-json", str(cj), "--max-length", str(args.seq_len))
        # A cap, so a tool that loads the whole model cannot take the machine down with it.
        limit = "import resource,os,sys;resource.setrlimit(resource.RLIMIT_AS,(22<<30,22<<30));os.execvp(sys.argv[1],sys.argv[1:])"
        rc, wall, rss = run_child([sys.executable, "-c", limit, *cmd], args.stop_after_s, args.work / f"{out.name}.log")
        print(f"\nllmcompressor GPTQ on E4B synthetic: exit {rc}, {wall:.0f} s, peak RSS {rss:.2f} GiB")
        return
    out = args.work / f"e4b-synthetic-{args.method}"
    cmd = ["ecoquant", "quantize", str(src), "--out", str(out), "--method", args.method, "--calib", "corpus",
           "--calib-samples", str(args.samples), "--calib-length", str(args.seq_len), "--overwrite",
           *shlex.split(args.quantize_args)]
    log = args.work / f"{out.name}.log"
    rc, wall, rss = run_child(cmd, args.stop_after_s, log)
    if rc != 0:
        units = args.work / f".{out.name}.calib" / "units"
        done = len(list(units.glob("*.json"))) if units.is_dir() else 0
        times = layer_times(log)
        print(f"\nstopped (exit {rc}) after {wall:.0f} s, peak RSS {rss:.2f} GiB; {done} units finished "
              "and kept: rerun the same command to resume")
        if times:
            print(f"layers finished in this invocation: {len(times)}; seconds per layer: "
                  + ", ".join(f"{t:.0f}" for t in times))
        return
    report(out, args.samples, args.seq_len, wall, rss, args.target_tokens)


if __name__ == "__main__":
    main()
