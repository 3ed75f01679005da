#!/usr/bin/env bash
# ecoquant's CUDA paths on one NVIDIA GPU, against the CPU, in one run (bench/device_check.py says what).
#
# On a GPU machine with PyTorch but no network and no vLLM (the device tool's nvidia-h100-x1 / nvidia-h200),
# as ONE command, after `bash bench/device_wheels.sh` here:
#
#   run(command="bash bench/device_check.sh", carry=["bench/device_wheels"], timeout_s=540)
#
# It installs the carried wheels into /tmp (nothing is downloaded there), runs the check under a 450 s
# limit (the whole run stays under 8 minutes), and writes $OUT/device_check.json and its log
# ($OUT/device_check.log). Then, here:
#
#   uv run python bench/device_results_md.py /work/.device/.../device_check.json >> bench/RESULTS.md
#
# --dry runs the same code on the CPU at small sizes with this environment's Python (the test suite does).
set -euo pipefail
cd "$(dirname "$0")/.."
DRY=""
if [ "${1:-}" = "--dry" ]; then
    DRY="--dry"
fi
OUT_DIR="${OUT:-${TMPDIR:-/tmp}/ecoquant-device-check-out}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-python3}"
if [ -z "$DRY" ]; then
    if ls bench/device_wheels/*.whl >/dev/null 2>&1; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/ecoquant-site bench/device_wheels/*.whl
        export PYTHONPATH="/tmp/ecoquant-site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "bench/device_wheels/ is empty: run bash bench/device_wheels.sh here and carry it" >&2
        export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
    fi
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2 || true
fi
set -o pipefail
PYTHONUNBUFFERED=1 timeout "${ECOQUANT_DEVICE_CHECK_TIMEOUT:-450}" "$PY" bench/device_check.py $DRY \
    --out "$OUT_DIR/device_check.json" --work "${TMPDIR:-/tmp}/ecoquant-device-check" 2>&1 | tee "$OUT_DIR/device_check.log"
