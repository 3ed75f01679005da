"""What ``optimize`` keeps in its folder, keyed by what determines it, so a rerun redoes only unfinished work.

Layout of ``DIR``::

    source.json                 the base's file hashes, keyed by path, sizes and mtimes (hashing 16 GB takes a minute)
    checkpoints/NAME-KEY/       one quantized checkpoint per distinct quantization (written by api.quantize,
                                which builds it in a hidden sibling and renames it into place when complete)
    checkpoints/NAME-KEY+short/ a response-economy variant: hard links to the weights, its own chat template
    evals/LABEL-KEY.json        one finished evaluation: the model's runs over the whole suite
    servers/                    vLLM configs and logs (``--backend vllm``)
    results.json, report.md, pareto.png, choice.json, submission/

Keys are SHA-256 digests of canonical JSON: a quantization's key holds the
source's hash, the method, scheme, preset and (for GPTQ/AWQ) the
calibration; an evaluation's key holds the model's key, its chat template,
the suite spec and its content hash, the generation settings, the prompt
variant, the serving options, the backend and the meter. Change any of them
and the key changes, so a stale result is never reused.

Every file is written to a temporary name and renamed over its place, and
an entry counts as done only when its file parses and carries its own key:
a crash or Ctrl-C mid-write leaves at most a temporary file, which is
ignored and overwritten next time.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ecoquant.errors import EcoquantError

CHECKPOINTS = "checkpoints"
EVALS = "evals"
SERVERS = "servers"
SOURCE_FILE = "source.json"


def digest(material: Any) -> str:
    """SHA-256 of ``material`` as canonical JSON (sorted keys, no spaces)."""
    return hashlib.sha256(json.dumps(material, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def write_json_atomic(path: Path, data: Any) -> Path:
    """Write JSON to ``.NAME.tmp`` beside ``path``, fsync, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=1, ensure_ascii=False, default=str)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)
    return path


def read_json(path: Path) -> Any | None:
    """The parsed file, or None when it is missing or not valid JSON (a torn write is not a result)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def check_writable(out: Path) -> Path:
    """``out`` as a folder ecoquant can write into (created if needed), or one clear line saying why not."""
    out = out.expanduser()
    if out.exists() and not out.is_dir():
        raise EcoquantError(f"--out {out} is a file, not a folder; choose a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".ecoquant-write-test-{os.getpid()}-{os.urandom(4).hex()}"  # writers on other nodes probe too
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise EcoquantError(f"cannot write into {out} ({exc.strerror or exc}); choose a folder you can write to") from None
    return out


class Store:
    """The optimize folder: keyed checkpoints and evaluations (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = check_writable(root)

    # -- the source hash, cached by file identity

    def source_hash(self, path: Path) -> dict[str, Any]:
        """:func:`ecoquant.export.recipe.hash_model_files` of ``path``, reused while no file changed."""
        from ecoquant.export.recipe import hash_model_files

        identity = {
            "path": str(path.resolve()),
            "files": {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(path.iterdir()) if f.is_file()},
        }
        cached = read_json(self.root / SOURCE_FILE)
        if isinstance(cached, dict) and cached.get("identity") == identity and "hash" in cached:
            return dict(cached["hash"])
        hashed = hash_model_files(path)
        write_json_atomic(self.root / SOURCE_FILE, {"identity": identity, "hash": hashed})
        return hashed

    # -- checkpoints

    def checkpoint_dir(self, name: str, key: str) -> Path:
        return self.root / CHECKPOINTS / f"{name}-{key[:12]}"

    def checkpoint_done(self, folder: Path, key: str) -> bool:
        """A finished checkpoint: renamed into place by the exporter, and its key file says ``key``."""
        marker = read_json(folder / ".ecoquant-key.json")
        return (folder / "config.json").is_file() and isinstance(marker, dict) and marker.get("key") == key

    def mark_checkpoint(self, folder: Path, key: str, material: Mapping[str, Any]) -> None:
        write_json_atomic(folder / ".ecoquant-key.json", {"key": key, "material": material})

    def discard(self, folder: Path) -> None:
        """Remove a checkpoint folder of this store (never anything outside it)."""
        folder = folder.resolve()
        if (self.root / CHECKPOINTS).resolve() not in folder.parents:
            raise ValueError(f"{folder} is not a checkpoint of {self.root}")
        shutil.rmtree(folder, ignore_errors=True)

    # -- evaluations

    def eval_path(self, label: str, key: str) -> Path:
        return self.root / EVALS / f"{label}-{key[:12]}.json"

    def load_eval(self, label: str, key: str) -> dict[str, Any] | None:
        data = read_json(self.eval_path(label, key))
        if isinstance(data, dict) and data.get("key") == key and isinstance(data.get("runs"), list):
            return data
        return None

    def save_eval(self, label: str, key: str, material: Mapping[str, Any], payload: Mapping[str, Any]) -> Path:
        return write_json_atomic(self.eval_path(label, key), {"key": key, "material": material, **payload})


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link ``src`` to ``dst`` (no extra disk), or copy where links are not possible."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
