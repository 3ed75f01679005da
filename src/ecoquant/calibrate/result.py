"""What calibration leaves behind: quantized weights on disk, and how the exporter reads them.

GPTQ and AWQ quantize one decoder layer at a time, long before the exporter
streams the checkpoint. To keep memory bounded, each unit's integer codes and
scales go to their own safetensors file in a work folder as soon as the unit is
done; the exporter later asks for them one module at a time through
:meth:`CalibrationResult.quantize_fn`. Tensors that AWQ changed without
quantizing them (norm weights that absorbed a scale) are served through
:attr:`CalibrationResult.replace`, by tensor name.

``result.json`` in the work folder indexes both, with the statistics, so a
result can be reopened with :meth:`CalibrationResult.load` (e.g. to export
again without recalibrating).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ecoquant.calibrate.methods import Outcome
from ecoquant.errors import EcoquantError
from ecoquant.quantize.primitives import QuantizedWeight
from ecoquant.quantize.scheme import QuantScheme

RESULT_FILE = "result.json"


class ResultStore:
    """Writes each unit's outcome to ``work_dir``, keeps the index, and reads finished units back.

    A unit counts as finished once its marker ``units/KEY.json`` exists; the
    marker is written last and every file is written to a temporary name and
    renamed, so a run killed at any moment leaves either a whole unit or none.
    That is what lets a killed calibration resume from its last finished layer.
    """

    def __init__(self, work_dir: Path) -> None:
        self.work_dir = work_dir
        for sub in ("quantized", "replaced", "units"):
            (work_dir / sub).mkdir(parents=True, exist_ok=True)
        self.quantized: dict[str, str] = {}
        self.replaced: dict[str, str] = {}

    def _save(self, tensors: dict[str, torch.Tensor], rel: str) -> None:
        path = self.work_dir / rel
        tmp = path.with_name(f".{path.name}.partial")
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, path)

    def write(self, key: str, outcome: Outcome) -> None:
        """Save one unit's codes, scales and replaced tensors (on CPU, contiguous), then its marker."""
        marker: dict[str, Any] = {"quantized": sorted(outcome.quantized), "replaced": sorted(outcome.replaced),
                                  "stats": outcome.stats}
        if outcome.quantized:
            rel = f"quantized/{key}.safetensors"
            tensors: dict[str, torch.Tensor] = {}
            for name, qw in outcome.quantized.items():
                tensors[f"{name}.q"] = qw.q
                tensors[f"{name}.scale"] = qw.scale
                if qw.zero_point is not None:
                    tensors[f"{name}.zero_point"] = qw.zero_point
            self._save(tensors, rel)
            self.quantized.update({name: rel for name in outcome.quantized})
        if outcome.replaced:
            rel = f"replaced/{key}.safetensors"
            self._save(dict(outcome.replaced), rel)
            self.replaced.update({name: rel for name in outcome.replaced})
        path = self.work_dir / "units" / f"{key}.json"
        tmp = path.with_name(f".{path.name}.partial")
        tmp.write_text(json.dumps(marker, sort_keys=True))
        os.replace(tmp, path)

    def read(self, key: str) -> Outcome | None:
        """A finished unit's outcome as :meth:`write` saved it, or None when the unit did not finish."""
        path = self.work_dir / "units" / f"{key}.json"
        if not path.is_file():
            return None
        marker = json.loads(path.read_text())
        out = Outcome(stats=marker["stats"])
        if marker["quantized"]:
            rel = f"quantized/{key}.safetensors"
            with safe_open(str(self.work_dir / rel), framework="pt") as f:
                keys = set(f.keys())
                for name in marker["quantized"]:
                    zp = f.get_tensor(f"{name}.zero_point") if f"{name}.zero_point" in keys else None
                    out.quantized[name] = QuantizedWeight(f.get_tensor(f"{name}.q"), f.get_tensor(f"{name}.scale"), zp)
            self.quantized.update({name: rel for name in marker["quantized"]})
        if marker["replaced"]:
            rel = f"replaced/{key}.safetensors"
            with safe_open(str(self.work_dir / rel), framework="pt") as f:
                for name in marker["replaced"]:
                    out.replaced[name] = f.get_tensor(name)
            self.replaced.update({name: rel for name in marker["replaced"]})
        return out


class _LazyTensors(Mapping[str, torch.Tensor]):
    """Tensors by name, each read from its file only when asked for."""

    def __init__(self, work_dir: Path, index: Mapping[str, str]) -> None:
        self._dir = work_dir
        self._index = dict(index)

    def __getitem__(self, name: str) -> torch.Tensor:
        with safe_open(str(self._dir / self._index[name]), framework="pt") as f:
            return f.get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)


@dataclass(frozen=True)
class CalibrationResult:
    """Calibrated quantization of a model, ready for ``export_checkpoint``.

    Use as ``export_checkpoint(..., quantize_fn=result.quantize_fn, replace=result.replace)``
    and put :attr:`stats` into the recipe.

    Attributes:
        work_dir: the folder holding the per-unit files and ``result.json``.
        scheme: the format the codes are in.
        quantized: module name -> file (relative to ``work_dir``) with its codes.
        replaced: tensor name -> file with its new value (AWQ-folded norms).
        stats: per-module losses or search results, timings, KV sharing, memory.
    """

    work_dir: Path
    scheme: QuantScheme
    quantized: Mapping[str, str]
    replaced: Mapping[str, str]
    stats: dict[str, Any] = field(default_factory=dict)

    def quantized_weight(self, name: str) -> QuantizedWeight:
        """The codes and scales calibration produced for module ``name``."""
        rel = self.quantized.get(name)
        if rel is None:
            raise EcoquantError(
                f"{name} was not quantized by calibration (in {self.work_dir}); the export selection "
                "differs from the calibration selection"
            )
        with safe_open(str(self.work_dir / rel), framework="pt") as f:
            keys = set(f.keys())
            zp = f.get_tensor(f"{name}.zero_point") if f"{name}.zero_point" in keys else None
            return QuantizedWeight(q=f.get_tensor(f"{name}.q"), scale=f.get_tensor(f"{name}.scale"), zero_point=zp)

    def quantize_fn(self, name: str, weight: torch.Tensor) -> QuantizedWeight:
        """``export_checkpoint``'s callback: the stored result for ``name``.

        ``weight`` (the source checkpoint's tensor) is only checked for shape:
        AWQ's codes stand for the *smoothed* weight, not for this one.
        """
        qw = self.quantized_weight(name)
        if tuple(qw.q.shape) != tuple(weight.shape):
            raise EcoquantError(
                f"{name}: calibration produced shape {list(qw.q.shape)} but the checkpoint has "
                f"{list(weight.shape)}; recalibrate for this model"
            )
        return qw

    @property
    def replace(self) -> Mapping[str, torch.Tensor]:
        """Tensors to write instead of the source's, read lazily by name."""
        return _LazyTensors(self.work_dir, self.replaced)

    def save(self) -> Path:
        """Write ``result.json`` (index, scheme and stats) into the work folder."""
        path = self.work_dir / RESULT_FILE
        doc = {
            "scheme": self.scheme.to_dict(),
            "quantized": dict(sorted(self.quantized.items())),
            "replaced": dict(sorted(self.replaced.items())),
            "stats": self.stats,
        }
        path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, work_dir: Path) -> CalibrationResult:
        """Reopen a finished calibration."""
        path = Path(work_dir) / RESULT_FILE
        if not path.is_file():
            raise EcoquantError(f"{work_dir} holds no finished calibration ({RESULT_FILE} is missing)")
        doc = json.loads(path.read_text())
        return cls(
            work_dir=Path(work_dir),
            scheme=QuantScheme(**doc["scheme"]),
            quantized=doc["quantized"],
            replaced=doc["replaced"],
            stats=doc["stats"],
        )
