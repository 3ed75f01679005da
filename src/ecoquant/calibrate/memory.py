"""How much device memory one layer's calibration needs, estimated before any work.

What the layer walk (:mod:`ecoquant.calibrate.sequential`) holds on its
device while it calibrates layer ``i``, and what this estimate counts:

- the layer's weights, in the compute dtype (one layer at a time: the walk
  materialises a layer, calibrates it and drops it);
- the layer input of every calibration batch (``BatchInputs.hidden``: tokens x
  hidden size in the compute dtype), kept for the whole walk because each
  layer's output is the next one's input, plus one batch's working set inside
  the layer (its MLP's intermediate activations, three of them, float32);
- on Gemma-4 E (KV sharing), the K and V that the two donor layers store for
  every batch (tokens x KV heads x head size, K and V, two donors);
- the method's statistics: GPTQ's float32 Hessian per selected Linear
  (in x in; q, k and v really share one, so this is an upper bound), AWQ's
  float32 activation cache per Linear (``awq_max_tokens`` x in);
- GPTQ's solve for the largest Linear: the weight, its codes and the error
  feedback in float32 (3 x out x in) and the inverse Hessian's factor (in x in).

The sum gets 20% and 0.5 GiB of headroom (the CUDA context and the
allocator's fragmentation; not measured, stated as an assumption). The
largest layer decides. What the estimate leaves out (the spooled per-layer
PLE inputs, one batch at a time; embedding rows before the layers) is small
beside the activations at any calibration size where the GPU matters.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

#: Headroom over the counted bytes: the CUDA context (about 0.5 GiB) and allocator slack (20%). An assumption.
HEADROOM_FACTOR = 1.2
HEADROOM_BYTES = 512 * 1024**2
F32 = 4


@dataclass(frozen=True)
class LayerShapes:
    """What the estimate needs to know of a model: its largest decoder layer and the activations' widths.

    Attributes:
        layer_params: parameters of the largest decoder layer.
        linears: (out, in) of each selected Linear in that layer.
        hidden_size: width of the layer input.
        intermediate_size: width of the MLP's inner activations.
        shared_kv_width: K (or V) values per token a donor layer stores for KV-shared layers (0: no sharing).
    """

    layer_params: int
    linears: tuple[tuple[int, int], ...]
    hidden_size: int
    intermediate_size: int
    shared_kv_width: int = 0


@dataclass(frozen=True)
class CalibrationMemory:
    """The estimate, by part, in bytes (see the module docstring)."""

    layer_weights: int
    activations: int
    shared_kv: int
    statistics: int
    solve: int

    @property
    def counted(self) -> int:
        return self.layer_weights + self.activations + self.shared_kv + self.statistics + self.solve

    @property
    def total(self) -> int:
        """What the device must have free: the counted bytes with headroom."""
        return int(self.counted * HEADROOM_FACTOR) + HEADROOM_BYTES

    def describe(self) -> str:
        gib = 1024**3
        return (
            f"layer weights {self.layer_weights / gib:.2f} + activations {self.activations / gib:.2f}"
            + (f" + shared K/V {self.shared_kv / gib:.2f}" if self.shared_kv else "")
            + f" + statistics {self.statistics / gib:.2f} + solve {self.solve / gib:.2f} GiB, with headroom"
        )


def estimate_calibration_memory(
    shapes: LayerShapes,
    *,
    tokens: int,
    batch_tokens: int,
    method: str,
    dtype_bytes: int,
    awq_max_tokens: int = 16384,
) -> CalibrationMemory:
    """Peak device bytes for calibrating the largest layer on ``tokens`` calibration tokens (pure arithmetic).

    Args:
        shapes: the model's largest layer (:func:`layer_shapes`).
        tokens: calibration tokens over all batches (samples x length at most).
        batch_tokens: tokens of one batch (one sample: the walk runs one at a time).
        method: the calibration method (``rtn``, ``gptq``, ``awq``, ``awq-gptq``, ``smoothquant``, ...).
        dtype_bytes: bytes per value of the compute dtype (2 for bf16, 4 for float32).
        awq_max_tokens: activations AWQ and SmoothQuant keep per input stream.
    """
    weights = shapes.layer_params * dtype_bytes
    activations = tokens * shapes.hidden_size * dtype_bytes + 3 * batch_tokens * shapes.intermediate_size * F32
    shared_kv = 2 * 2 * tokens * shapes.shared_kv_width * dtype_bytes
    gptq = "gptq" in method
    keeps_activations = method.startswith(("awq", "smoothquant"))
    statistics = 0
    for _, n_in in shapes.linears:
        if gptq:
            statistics += n_in * n_in * F32
        if keeps_activations:
            statistics += min(awq_max_tokens, tokens) * n_in * F32
        if not gptq and not keeps_activations:
            statistics += n_in * F32  # RTN with the hessian observer: the diagonal only
    solve = 0
    if gptq and shapes.linears:
        solve = max(3 * n_out * n_in * F32 + n_in * n_in * F32 for n_out, n_in in shapes.linears)
    return CalibrationMemory(weights, activations, shared_kv, statistics, solve)


def peak_calibration_memory(layers: Sequence[LayerShapes], **kwargs: Any) -> CalibrationMemory:
    """The largest of :func:`estimate_calibration_memory` over ``layers`` (the layer that decides whether a run fits)."""
    estimates = [estimate_calibration_memory(s, **kwargs) for s in layers] or [CalibrationMemory(0, 0, 0, 0, 0)]
    return max(estimates, key=lambda m: m.counted)


def layer_shapes(model: Any, layers: Sequence[Any], layers_path: str, selection: Sequence[str], text_config: Any) -> tuple[LayerShapes, ...]:
    """Each decoder layer of a (meta-device) model, with the widths the walk's activations have.

    ``layers`` is the decoder's ModuleList found at ``layers_path``; sizes are read from the modules' shapes,
    so nothing is loaded.
    """
    import torch.nn as nn

    def attr(name: str) -> int:
        try:  # transformers 5 refuses per-layer attributes of heterogeneous configs read globally
            return int(getattr(text_config, name, 0) or 0)
        except (AttributeError, ValueError, TypeError):
            return 0

    modules = dict(model.named_modules())
    hidden = attr("hidden_size")
    # Widths from the modules themselves: Gemma-4's head size and MLP width vary by layer.
    all_linears = [[(n, m) for n, m in layer.named_modules() if isinstance(m, nn.Linear)] for layer in layers]
    kv_width = max((m.out_features for ls in all_linears for n, m in ls if n.endswith("k_proj")), default=0)
    shared_kv = kv_width if attr("num_kv_shared_layers") else 0
    found = []
    for i, layer in enumerate(layers):
        prefix = f"{layers_path}.{i}."
        linears = tuple(
            (modules[n].out_features, modules[n].in_features)
            for n in selection
            if n.startswith(prefix) and isinstance(modules.get(n), nn.Linear)
        )
        params = sum(p.numel() for p in layer.parameters())
        inner = max((m.out_features for _, m in all_linears[i]), default=hidden)
        found.append(LayerShapes(params, linears, hidden, inner, shared_kv))
    return tuple(found)


def plan_calibration_device(
    plan: Any,
    *,
    asked: str,
    method: str,
    num_samples: int,
    max_length: int,
    compute_dtype: str = "auto",
    cuda: Sequence[Any] | None = None,
) -> Any:
    """Where a calibration of ``plan`` (an :class:`ecoquant.plan.ModelPlan`) runs, decided before any work.

    ``auto`` picks CUDA when one is visible and the estimated peak of the
    largest layer fits its free memory, else the CPU with a line saying why;
    an explicit ``cuda`` that would not fit is refused with the number needed
    (:func:`ecoquant.devices.choose_calibration_device`). ``cuda`` replays the
    probe (tests); None asks torch. Tokens are counted as ``num_samples x
    max_length``, the most the calibration can hold.
    """
    import torch

    from ecoquant.calibrate.run import default_dtype
    from ecoquant.devices import choose_calibration_device, cuda_devices, resolve_device
    from ecoquant.models.topology import decoder_layers, topology_for

    gpus = cuda_devices() if cuda is None else tuple(cuda)
    device = resolve_device(asked, gpus)
    if not device.startswith("cuda"):
        return choose_calibration_device(asked, None, gpus)
    dtype = default_dtype(plan.config, torch.device("cuda")) if compute_dtype == "auto" else getattr(torch, compute_dtype)
    layers_path, layers = decoder_layers(plan.model, topology_for(plan.config))
    text_config = plan.config.get_text_config() if hasattr(plan.config, "get_text_config") else plan.config
    memory = peak_calibration_memory(
        layer_shapes(plan.model, layers, layers_path, plan.selection.modules, text_config),
        tokens=num_samples * max_length,
        batch_tokens=max_length,
        method=method,
        dtype_bytes=torch.tensor([], dtype=dtype).element_size(),
    )
    return choose_calibration_device(asked, memory.total, gpus, memory.describe())
