#!/usr/bin/env bash
# Install vLLM's CUDA build (PyPI: vllm), the version ecoquant tests, into its own environment,
# and print its Python's path. One step on a GPU machine:
#
#   VLLM_PY=$(bash .ci/vllm-gpu-install.sh) && uv run ecoquant doctor --vllm-python "$VLLM_PY"
#
# Why its own environment: vLLM pins its own torch, transformers and compressed-tensors, which
# differ from ecoquant's; `ecoquant serve`, `eval --backend vllm` and `optimize --backend vllm`
# run vLLM as a separate process, so the two never share one environment. ecoquant finds this
# environment by itself (~/.cache/ecoquant/vllm-env is on its search path, `ecoquant doctor`
# says where it looked); $ECOQUANT_VLLM_PYTHON or --vllm-python name another.
#
# Why --torch-backend=auto: uv picks the PyTorch wheel index that matches this machine's CUDA
# driver, so the torch vLLM pins is one that runs here (vLLM's own installation guide).
#
# Options: --dry-run prints the commands instead of running them (and the path it would print).
# Environment: ECOQUANT_VLLM_GPU_ENV (where; default ~/.cache/ecoquant/vllm-env, outside the
# clone so later runs reuse it), ECOQUANT_VLLM_INSTALL_TIMEOUT (seconds for the install step,
# default 1800). Progress goes to stderr; stdout is the path.
set -euo pipefail

VERSION="0.32.0"  # ecoquant.serve.vllm_features.TESTED_VLLM (tests/test_vllm_gpu_install.py keeps them equal)
PYTHON_VERSION="3.12"
ENV_DIR="${ECOQUANT_VLLM_GPU_ENV:-$HOME/.cache/ecoquant/vllm-env}"
BUDGET="${ECOQUANT_VLLM_INSTALL_TIMEOUT:-1800}"
PY="$ENV_DIR/bin/python"
DRY_RUN=0
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY_RUN=1 ;;
        -h|--help) sed -n '2,20p' "$0" >&2; exit 0 ;;
        *) echo "unknown option $arg (use --dry-run)" >&2; exit 2 ;;
    esac
done

# Each step is shown, and run unless --dry-run.
step() {
    echo "+ $*" >&2
    if [ "$DRY_RUN" = "0" ]; then
        "$@"
    fi
}

installed() {
    [ -x "$PY" ] && "$PY" -c "import importlib.metadata as m, sys; sys.exit(m.version('vllm') != '$VERSION')" 2>/dev/null
}

start=$(date +%s)
if ! command -v uv >/dev/null 2>&1; then
    step python3 -m pip install --quiet uv
fi
if [ "$DRY_RUN" = "0" ] && installed; then
    echo "vllm $VERSION already in $ENV_DIR" >&2
else
    step uv venv --quiet --allow-existing "$ENV_DIR" --python "$PYTHON_VERSION"
    step timeout "$BUDGET" uv pip install --quiet --python "$PY" "vllm==$VERSION" --torch-backend=auto
fi
# Fails here (not halfway through an optimize run) if the build cannot see the GPU.
step "$PY" -c "import torch, vllm; print('vllm', vllm.__version__, 'torch', torch.__version__, 'CUDA', torch.cuda.is_available())"
if [ "$DRY_RUN" = "0" ]; then
    echo "vllm ready in $(( $(date +%s) - start )) s" >&2
fi
echo "$PY"
