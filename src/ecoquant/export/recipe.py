"""``quant_recipe.json``: how a checkpoint was made, so that it can be audited and reproduced.

Written beside the weights. It records the ecoquant version and git SHA, the
source model (as given, and a SHA-256 of every file that defines it), the full
scheme, the module patterns and how many modules they resolved to, the
calibration data (``null`` for RTN), timings, and the weight footprint.
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path
from typing import Any

import ecoquant

_HASHED_SUFFIXES = (".safetensors", ".json", ".jinja", ".model")


def git_sha() -> str | None:
    """The commit of the ecoquant source tree in use, or None when installed from a wheel."""
    here = Path(ecoquant.__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def hash_model_files(path: Path, chunk: int = 16 << 20) -> dict[str, Any]:
    """SHA-256 of each weight/config/tokenizer file and of their sorted list (the model's identity)."""
    files: dict[str, str] = {}
    for f in sorted(p for p in path.iterdir() if p.is_file() and p.suffix in _HASHED_SUFFIXES):
        h = hashlib.sha256()
        with f.open("rb") as fh:
            while block := fh.read(chunk):
                h.update(block)
        files[f.name] = h.hexdigest()
    combined = hashlib.sha256("".join(f"{n}:{d}\n" for n, d in files.items()).encode()).hexdigest()
    return {"sha256": combined, "files": files}


def build_recipe(
    *,
    source_id: str,
    source_path: Path,
    source_hash: dict[str, Any],
    method: str,
    method_config: dict[str, Any] | None,
    scheme: dict[str, Any],
    preset: str,
    targets: list[str],
    ignore: list[str],
    modules: list[str],
    calibration: dict[str, Any] | None,
    timings_s: dict[str, float],
    footprint: dict[str, int],
    format: str = "pack-quantized",
) -> dict[str, Any]:
    """The recipe as a JSON-ready dict (one place defines its shape)."""
    return {
        "ecoquant": {"version": ecoquant.__version__, "git_sha": git_sha()},
        "source": {"model": source_id, "path": str(source_path), **source_hash},
        "method": method,
        "method_config": method_config,
        "scheme": scheme,
        "format": format,  # the decoder's (W8A8: int-quantized / float-quantized)
        "preset": preset,
        "targets": targets,
        "ignore": ignore,
        "resolved_module_count": len(modules),
        "modules": modules,
        "calibration": calibration,
        "timings_s": {k: round(v, 3) for k, v in timings_s.items()},
        "footprint": {
            "weights_before_bytes": footprint["source_bytes"],
            "weights_after_bytes": footprint["output_bytes"],
        },
    }
