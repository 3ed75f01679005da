"""Does vLLM accept a checkpoint? Load it with vLLM's own loader and report what each layer became.

``vllm serve`` answering 200 proves little about a quantized checkpoint: the
question is whether vLLM's compressed-tensors loader mapped every packed
weight into a ``CompressedTensorsWNA16`` layer (and left the ignore list
unquantized), which kernel it bound, and whether the int4 matmul then runs
and computes the same function as transformers does. This module answers
that from inside vLLM:

1. ``LLM(model=DIR)`` builds the model through vLLM's loader (the same code
   path as ``vllm serve``).
2. ``LLM.apply_model`` walks the loaded modules in the engine process and
   records, per Linear layer, its quantization scheme and kernel class.
3. One greedy request with ``prompt_logprobs`` runs the model; its per-token
   prompt log-probabilities can be compared with transformers' on the same
   token ids (``tests/test_vllm_cpu.py`` does). An execution failure (for
   instance no W4A16 CPU kernel in vLLM's AVX2 build) is reported, not raised:
   vLLM 0.32's AVX2 build builds the WNA16 layers, then fails at the first
   forward pass with ``'_OpNamespace' '_C' object has no attribute 'cpu_gemm_wna16'``.

vLLM lives in its own environment (it pins other torch/transformers versions),
so this file is also a script that runs there: it imports only the standard
library at the top, and its ``__main__`` guard is required because vLLM starts
its engine with ``multiprocessing`` spawn, which re-imports the main module.
:func:`check_with_vllm` runs it with the vLLM interpreter and parses its
JSON answer.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RESULT_PREFIX = "ECOQUANT_VLLM_CHECK "
"""Marks the one stdout line holding the JSON result (vLLM prints its own logs around it)."""


@dataclass(frozen=True)
class VllmCheck:
    """What vLLM made of a checkpoint.

    Attributes:
        layers: Linear layer name (vLLM's names: fused ``qkv_proj``/``gate_up_proj``) ->
            ``"SchemeClass/KernelClass"`` for quantized layers, or the quant method class for the rest.
        executed: whether the test request ran.
        error: the execution error (type and first line) when it did not.
        prompt_token_ids: the tokens of the test prompt.
        prompt_logprobs: log-probability vLLM gave each prompt token after the first (None for the first).
        text: the greedy answer.
        cpu_isa: what vLLM's CPU build would dispatch to here (``avx512_bf16``, ``avx512``, ``avx2``) or None on GPU.
    """

    layers: dict[str, str]
    executed: bool
    error: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[float | None]
    text: str
    cpu_isa: str | None

    def quantized(self, scheme: str = "CompressedTensorsWNA16") -> dict[str, str]:
        """The layers that vLLM bound to ``scheme``."""
        return {k: v for k, v in self.layers.items() if v.startswith(scheme + "/")}


def check_with_vllm(
    model: str | Path, python: str | Path, *, prompt: str = "The total amount due is", max_model_len: int = 256,
    timeout_s: float = 900.0, log_path: Path | None = None, force_avx2: bool = False, towers: bool = False,
) -> VllmCheck:
    """Run this file with the vLLM interpreter ``python`` on ``model``; see the module docstring.

    ``force_avx2`` makes vLLM's CPU platform load its AVX2 build even on an AVX-512 CPU (by
    answering "no" to the one check it dispatches on), to see what an AVX2-only machine does.
    ``towers`` lets one image per prompt in, so vLLM builds the vision and audio towers and their
    layers are listed too (by default multimodal inputs are off and the towers are never built).
    """
    from ecoquant.errors import EcoquantError

    cmd = [str(python), str(Path(__file__).resolve()), str(Path(model).resolve()), prompt, str(max_model_len)]
    if force_avx2:
        cmd.append("avx2")
    if towers:
        cmd.append("towers")
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        raise EcoquantError(f"vLLM did not finish loading {model} within {timeout_s:.0f} s") from None
    if log_path is not None:
        log_path.write_text(out.stdout + "\n--- stderr ---\n" + out.stderr, encoding="utf-8")
    for line in out.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return VllmCheck(**json.loads(line[len(RESULT_PREFIX) :]))
    tail = "\n".join((out.stderr or out.stdout).splitlines()[-25:])
    raise EcoquantError(f"vLLM could not load {model} (exit {out.returncode}):\n{tail}")


# ------------------------------------------------------------------ runs inside the vLLM environment


def _describe_layers(model: Any) -> dict[str, str]:
    """Per Linear layer, token table and head: scheme and kernel for compressed-tensors layers, else the method class."""
    from vllm.model_executor.layers.linear import LinearBase
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    out: dict[str, str] = {}
    for name, module in model.named_modules():
        if not isinstance(module, (LinearBase, VocabParallelEmbedding)):
            continue
        scheme = getattr(module, "scheme", None)
        if scheme is not None:
            kernel = getattr(scheme, "kernel", None)
            out[name] = f"{type(scheme).__name__}/{type(kernel).__name__ if kernel is not None else '-'}"
        else:
            out[name] = type(module.quant_method).__name__
    return out


def _cpu_isa() -> str | None:
    import torch

    if torch.cuda.is_available():
        return None
    if torch.cpu._is_avx512_supported():  # the check vLLM's CPU platform uses to pick its kernels
        return "avx512_bf16" if torch.cpu._is_avx512_bf16_supported() else "avx512"
    return "avx2"


def main(argv: list[str]) -> None:
    """``python vllm_check.py MODEL PROMPT MAX_MODEL_LEN [avx2] [towers]``: print one ``RESULT_PREFIX`` JSON line."""
    model, prompt, max_model_len = argv[0], argv[1], int(argv[2])
    if "avx2" in argv[3:]:
        import torch

        # vLLM's CpuPlatform.import_kernels loads _C_AVX2 when this says no (see check_with_vllm).
        torch.cpu._is_avx512_supported = lambda: False
    # Engine and worker in this process: apply_model then calls _describe_layers on the
    # loaded model directly instead of pickling it to other processes (which vLLM refuses
    # for functions defined in __main__).
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    import torch
    from vllm import LLM, SamplingParams

    on_cpu = not torch.cuda.is_available()
    llm = LLM(
        model=model,
        max_model_len=max_model_len,
        # The CPU backend sizes its KV cache from system RAM; the default 0.9 would take nearly all of it.
        gpu_memory_utilization=0.3 if on_cpu else 0.5,
        enforce_eager=True,
        distributed_executor_backend="uni",
        limit_mm_per_prompt={"image": 1 if "towers" in argv[3:] else 0, "audio": 0, "video": 0},
        seed=0,
    )
    layers = llm.apply_model(_describe_layers)[0]
    result: dict[str, Any] = {
        "layers": layers,
        "executed": False,
        "error": None,
        "prompt_token_ids": [],
        "prompt_logprobs": [],
        "text": "",
        "cpu_isa": _cpu_isa(),
    }
    try:
        (output,) = llm.generate([prompt], SamplingParams(max_tokens=4, temperature=0.0, prompt_logprobs=0))
        ids = list(output.prompt_token_ids)
        logprobs: list[float | None] = []
        for token, entry in zip(ids, output.prompt_logprobs or [], strict=False):
            logprobs.append(None if entry is None else float(entry[token].logprob))
        result.update(executed=True, prompt_token_ids=ids, prompt_logprobs=logprobs, text=output.outputs[0].text)
    except Exception as exc:  # the point is to report *why* execution fails (e.g. no kernel on this CPU)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        result["error"] = f"{type(exc).__name__}: {first}"
    print(RESULT_PREFIX + json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
