"""How precisely a checkpoint's bf16 ``(1 + w)`` norms hold their factors, against the base model's.

Gemma-3 norms multiply by ``1 + w`` with ``w`` stored in bf16. Where ``w``
sits near -1 (a small factor), bf16's step is large relative to ``1 + w``.
For each norm kind this prints, over all layers' channels, half a bf16 step
at ``w`` divided by ``|1 + w|`` (the worst relative error of the stored
factor): median, 99th percentile, and the share of channels above 1%.

    uv run python bench/norm_precision.py /tmp/g3/awq /tmp/g3/before-fold-fix/awq
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

NORMS = ("input_layernorm", "pre_feedforward_layernorm")


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def relative_step(w: torch.Tensor) -> torch.Tensor:
    """Half of bf16's step at ``w``, relative to ``|1 + w|`` (inf where the factor is 0)."""
    w = w.float()
    exponent = torch.floor(torch.log2(w.abs().clamp(min=1e-30)))
    return 2.0 ** (exponent - 8) / (1 + w).abs()


def main() -> None:
    from ecoquant.fixtures.gemma3_gguf import gemma3_270m_path

    folders = [("base (bf16)", gemma3_270m_path())] + [(p, Path(p)) for p in sys.argv[1:]]
    loaded = {label: tensors(path) for label, path in folders}
    print("| norm | checkpoint | median | 99th percentile | channels above 1% |")
    print("|---|---|---:|---:|---:|")
    for norm in NORMS:
        for label, t in loaded.items():
            names = sorted(k for k in t if k.endswith(f"{norm}.weight"))
            r = torch.cat([relative_step(t[k]) for k in names])
            finite = r[torch.isfinite(r)]
            print(f"| {norm} | {label} | {finite.median():.2e} | {finite.quantile(0.99):.2e} | "
                  f"{(r > 0.01).float().mean():.1%} |")


if __name__ == "__main__":
    main()
