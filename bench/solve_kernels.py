"""Two CPU-speed questions behind GPTQ's defaults, measured side by side on this machine.

1. The hessian observer's search on row slices (``primitives._SEARCH_CHUNK``)
   against the same search on the whole weight, on E4B's and Gemma-3's shapes:
   seconds (best of 3) and whether the scales are identical.
2. The Hessian's ``x^T x`` in bf16 against float32 (the matmul's speed), and
   what bf16 products would do to a real Hessian: Gemma-3 270M's first layer
   calibrated with bf16 forwards and bf16 Gram products (monkeypatched in;
   ecoquant keeps float32), reporting the first Hessian GPTQ refuses and its
   smallest eigenvalue against the dampening that should have covered it.

    uv run python bench/solve_kernels.py
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import torch


def best_of(fn: Any, reps: int = 3) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def search_slices() -> None:
    import ecoquant.quantize.primitives as primitives
    from ecoquant.quantize.scheme import QuantScheme

    scheme = QuantScheme(observer="hessian")
    print("| weight | whole | row slices | same scales |\n|---|---:|---:|---|")
    for shape in [(640, 2048), (2048, 640), (2560, 10240), (10240, 2560)]:
        g = torch.Generator().manual_seed(0)
        w = torch.randn(*shape, generator=g).bfloat16()
        imp = torch.rand(shape[1], generator=g)
        sliced_s = best_of(lambda: primitives.mse_qparams(w, scheme, imp))
        sliced = primitives.mse_qparams(w, scheme, imp)[0]
        chunk = primitives._SEARCH_CHUNK
        primitives._SEARCH_CHUNK = 1 << 62  # one slice: the whole weight
        try:
            whole_s = best_of(lambda: primitives.mse_qparams(w, scheme, imp))
            whole = primitives.mse_qparams(w, scheme, imp)[0]
        finally:
            primitives._SEARCH_CHUNK = chunk
        print(f"| {list(shape)} | {whole_s:.3f} s | {sliced_s:.3f} s | {torch.equal(whole, sliced)} |")


def gram_speed() -> None:
    x = torch.randn(16384, 2048)
    print("\n| x^T x, 16384 x 2048 | seconds | GFLOPS |\n|---|---:|---:|")
    for dtype in (torch.float32, torch.bfloat16):
        a = x.to(dtype)
        secs = best_of(lambda: a.t() @ a)
        print(f"| {dtype} | {secs:.3f} | {2 * 16384 * 2048 * 2048 / secs / 1e9:.0f} |")


def bf16_hessians() -> None:
    import ecoquant.quantize.gptq as gptq
    from ecoquant.calibrate.data import CalibrationConfig, load_calibration
    from ecoquant.calibrate.run import calibrate
    from ecoquant.errors import EcoquantError
    from ecoquant.fixtures.gemma3_gguf import gemma3_270m_path
    from ecoquant.plan import plan_model
    from ecoquant.quantize.gptq import GPTQConfig
    from ecoquant.quantize.scheme import QuantScheme
    from transformers import AutoTokenizer

    def bf16_gram(H: torch.Tensor, x: torch.Tensor) -> None:
        # x arrives scaled by sqrt(2/n) in float32; its products in bf16, the sum rounded to bf16.
        H.add_(x.bfloat16().t() @ x.bfloat16())

    refused: list[torch.Tensor] = []
    inverse = gptq._upper_inverse_factor

    def watching(H: torch.Tensor, frac: float) -> torch.Tensor:
        before = H.clone()
        try:
            return inverse(H, frac)
        except EcoquantError:
            refused.append(before)
            raise

    gptq._add_gram = bf16_gram  # type: ignore[assignment]
    gptq._upper_inverse_factor = watching  # type: ignore[assignment]
    base = gemma3_270m_path()
    cal = load_calibration(base, CalibrationConfig(source="corpus", num_samples=32, max_length=512),
                           tokenizer=AutoTokenizer.from_pretrained(base))
    plan = plan_model(base, preset="text-decoder")
    print("\nGemma-3 270M, 32 x 512 calibration, bf16 forwards, bf16 Gram products (dampening 0.01):")
    with tempfile.TemporaryDirectory() as d:
        try:
            calibrate(base, method="gptq", selection=plan.selection, batches=cal.batches, work_dir=Path(d) / "w",
                      scheme=QuantScheme(observer="hessian"), gptq=GPTQConfig(scale_passes=2), dtype=torch.bfloat16)
            print("  every Hessian was accepted")
        except EcoquantError as exc:
            H = refused[-1].double()
            eig = torch.linalg.eigvalsh(H)
            damp = 0.01 * float(torch.diag(H).mean())
            print(f"  refused: {exc}")
            print(f"  that Hessian: {H.shape[0]} wide, eigenvalues {float(eig[0]):.3f} .. {float(eig[-1]):.1f}, "
                  f"dampening adds {damp:.3f}")


if __name__ == "__main__":
    search_slices()
    gram_speed()
    bf16_hessians()
