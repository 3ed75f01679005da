"""Compare two compressed-tensors checkpoints tensor by tensor: quantized tensors vs the rest.

Usage::

    uv run python bench/compare_checkpoints.py A B

Prints whether the packed integers, scales and shapes are identical, and which
other (unquantized) tensors differ and by how much.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors import safe_open

QUANTIZED_SUFFIXES = (".weight_packed", ".weight_scale", ".weight_shape", ".weight_zero_point")


def load(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys()})
    return out


def main() -> None:
    a, b = (load(Path(p)) for p in sys.argv[1:3])
    if set(a) != set(b):
        print(f"tensor names differ: {sorted(set(a) ^ set(b))[:10]}")
        return
    quant = [k for k in a if k.endswith(QUANTIZED_SUFFIXES)]
    q_diff = [k for k in quant if not torch.equal(a[k], b[k])]
    other_diff = [k for k in a if k not in quant and not torch.equal(a[k], b[k])]
    print(f"quantized tensors ({len(quant)}): {'identical' if not q_diff else f'{len(q_diff)} differ, e.g. {q_diff[0]}'}")
    if other_diff:
        worst = max(other_diff, key=lambda k: float((a[k].float() - b[k].float()).abs().max()))
        delta = float((a[worst].float() - b[worst].float()).abs().max())
        print(f"other tensors: {len(other_diff)} of {len(a) - len(quant)} differ; largest |diff| {delta:.4g} in {worst}")
    else:
        print(f"other tensors ({len(a) - len(quant)}): identical")


if __name__ == "__main__":
    main()
