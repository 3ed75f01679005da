"""``.ci/vllm-gpu-install.sh``: valid bash, pinned to the vLLM ecoquant tests, and its --dry-run shows the one step.

The CUDA install itself cannot run here (no GPU); the dry run checks what it would do without installing anything.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from ecoquant.serve.launch import DEFAULT_VLLM_GPU_ENV
from ecoquant.serve.vllm_features import TESTED_VLLM

SCRIPT = Path(__file__).resolve().parents[1] / ".ci" / "vllm-gpu-install.sh"


def test_the_script_parses() -> None:
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_the_pin_is_the_tested_version() -> None:
    pinned = re.search(r'^VERSION="([^"]+)"', SCRIPT.read_text(), re.M)
    assert pinned is not None and pinned.group(1) == TESTED_VLLM


def test_its_default_environment_is_on_ecoquants_search_path() -> None:
    assert 'ENV_DIR="${ECOQUANT_VLLM_GPU_ENV:-$HOME/.cache/ecoquant/vllm-env}"' in SCRIPT.read_text()
    assert str(DEFAULT_VLLM_GPU_ENV) == "~/.cache/ecoquant/vllm-env"


def test_dry_run_prints_the_commands_and_the_python_and_installs_nothing(tmp_path: Path) -> None:
    env = {**os.environ, "ECOQUANT_VLLM_GPU_ENV": str(tmp_path / "env")}
    done = subprocess.run(["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, env=env, check=True)
    assert done.stdout == f"{tmp_path / 'env'}/bin/python\n"  # stdout is the path alone, for VLLM_PY=$(...)
    assert f"uv venv --quiet --allow-existing {tmp_path / 'env'}" in done.stderr
    assert f"uv pip install --quiet --python {tmp_path / 'env'}/bin/python vllm=={TESTED_VLLM} --torch-backend=auto" in done.stderr
    assert not (tmp_path / "env").exists()


def test_an_unknown_option_is_refused() -> None:
    done = subprocess.run(["bash", str(SCRIPT), "--nope"], capture_output=True, text=True)
    assert done.returncode == 2 and "unknown option --nope" in done.stderr
