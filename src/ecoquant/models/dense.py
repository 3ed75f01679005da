"""Load any ecoquant checkpoint in transformers, whatever mix of schemes its config groups hold.

transformers 5.23 with compressed-tensors 0.20 has two ways to load a
``pack-quantized`` checkpoint, and each misses a case ecoquant writes:

* the default keeps Linears packed and decompresses each with its own
  group's scheme, but cannot load a packed ``nn.Embedding`` (it tries to
  initialise the ``weight`` the module no longer has);
* ``dequantize=True`` loads packed embeddings, but decompresses *every*
  module with the first config group's scheme, so an int8 table or head next
  to int4 Linears would be read as int4: silently wrong; and it drops a W8A8
  group's activation quantization, so the model would run its activations in
  bf16, which vLLM never does.

W8A8 (``int-quantized`` / ``float-quantized`` groups with dynamic per-token
``input_activations``) loads right by default: compressed-tensors
decompresses the weights on the first forward and fake-quantizes every
targeted Linear's input per token (``set_forward_quantized``), as vLLM's
kernels quantize it. Where a dense copy is needed, the copy keeps those
groups' activation arguments (with no weights) so the same happens there.

:func:`loadable` picks: the checkpoint itself when the default path is right
(no packed tables) or when every group shares one scheme (then
``dequantize=True`` is right); otherwise a dense bf16 copy in a temporary
folder, each module decompressed here with its own group's scheme (the same
``unpack_from_int32`` compressed-tensors packs with, and
:func:`ecoquant.quantize.primitives.dequantize`). The copy is written one
tensor at a time and deleted once the model is loaded.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch

from ecoquant.errors import EcoquantError
from ecoquant.export.safetensors_stream import PlannedTensor, read_tensor, write_streaming
from ecoquant.models.layout import checkpoint_layout
from ecoquant.models.loading import SIDECAR_FILES, shard_files, shard_tensors
from ecoquant.models.quant_config import quantization_block
from ecoquant.quantize.primitives import dequantize
from ecoquant.quantize.scheme import QuantScheme
from ecoquant.scratch import owned_tempdir

PACKED_SUFFIXES = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point")


def scheme_of(group: Mapping[str, Any]) -> QuantScheme:
    """A config group (its ``weights`` and ``input_activations`` args) as the :class:`QuantScheme` that wrote it.

    A bare ``weights`` mapping is read as a weight-only group.
    """
    weights = group.get("weights", group)
    acts = group.get("input_activations") if "weights" in group else None
    size = weights.get("group_size") if weights.get("strategy") == "group" else None
    return QuantScheme(
        num_bits=int(weights["num_bits"]),
        group_size=size,
        symmetric=bool(weights.get("symmetric", True)),
        type=weights.get("type", "int"),
        act_bits=int(acts["num_bits"]) if acts else None,
    )


def activation_config(qc: Mapping[str, Any]) -> dict[str, Any] | None:
    """The ``quantization_config`` a dense copy keeps: only the groups that quantize activations, with no weights.

    Why: a W8A8 checkpoint's weights are decompressed into the copy, but its activations must still be
    quantized per token at run time, as vLLM will; without this the copy would silently run them in
    bf16. compressed-tensors' own forward (``set_forward_quantized``) does it when transformers loads a
    ``dense`` group that has ``input_activations`` and no ``weights``. None when no group quantizes activations.
    """
    groups = {
        name: {"targets": g["targets"], "input_activations": g["input_activations"], "format": "dense"}
        for name, g in (qc.get("config_groups") or {}).items()
        if g.get("input_activations")
    }
    if not groups:
        return None
    keep = ("quant_method", "version", "ignore", "kv_cache_scheme", "global_compression_ratio")
    return {**{k: qc[k] for k in keep if k in qc}, "config_groups": groups, "format": "dense", "quantization_status": "frozen"}


def quantizes_activations(qc: Mapping[str, Any] | None) -> bool:
    """Whether any config group quantizes activations (W8A8)."""
    return any(g.get("input_activations") for g in ((qc or {}).get("config_groups") or {}).values())


def group_for(module: str, groups: Mapping[str, Mapping[str, Any]]) -> Mapping[str, Any]:
    """The config group that quantized ``module``: an exact name, then a ``re:`` pattern, then a class target."""
    for kind in ("name", "regex", "class"):
        for group in groups.values():
            for target in group.get("targets", ()):
                if kind == "name" and target == module:
                    return group
                if kind == "regex" and target.startswith("re:") and re.match(target[3:], module):
                    return group
                if kind == "class" and not target.startswith("re:") and "." not in target:
                    return group
    raise ValueError(f"no config group quantizes {module}")


Route = Literal["as-is", "dequantize", "dense-copy"]


def load_route(path: Path, dense: bool = False) -> Route:
    """How transformers loads ``path`` right (see the module docstring).

    ``dense``: the caller needs plain ``weight`` tensors, which only the dequantize path (or a copy) gives.
    """
    try:
        qc = quantization_block(json.loads((path / "config.json").read_text(encoding="utf-8")))
    except (OSError, json.JSONDecodeError):
        return "as-is"
    if not qc or qc.get("quant_method", "compressed-tensors") != "compressed-tensors":
        return "as-is"
    groups = qc.get("config_groups") or {}
    if not (dense or any(name.startswith("embeddings") for name in groups)):
        return "as-is"  # W8A8 included: compressed-tensors decompresses and quantizes activations per token
    if quantizes_activations(qc):
        return "dense-copy"  # transformers' dequantize path would drop the activation quantization
    one_scheme = len({json.dumps(g.get("weights"), sort_keys=True) for g in groups.values()}) == 1
    return "dequantize" if one_scheme else "dense-copy"


def needs_dense_copy(path: Path, dense: bool = False) -> bool:
    """Whether neither of transformers' own paths loads ``path`` correctly."""
    return load_route(path, dense) == "dense-copy"


def quantized_load_kwargs(path: Path, dense: bool = False) -> dict[str, Any]:
    """``from_pretrained`` arguments for transformers' own paths; one clear line where neither is right."""
    route = load_route(path, dense)
    if route == "as-is":
        return {}
    if route == "dense-copy":
        raise EcoquantError(
            f"{path} mixes weight schemes across config groups; transformers can only load it by decompressing "
            "every group with the first one's scheme, which would be wrong here: load it through "
            "ecoquant.models.dense.loadable"
        )
    from transformers import CompressedTensorsConfig

    return {"quantization_config": CompressedTensorsConfig(dequantize=True)}


def write_dense_copy(path: Path, out: Path) -> Path:
    """``path`` with every packed module decompressed to its source dtype, and no ``quantization_config``."""
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    groups = (quantization_block(config) or {}).get("config_groups") or {}
    out.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    layout = checkpoint_layout(path)  # groups name modules as the tree does; the files may not
    for shard in shard_files(path):
        infos = {t.name: t for t in shard_tensors(shard)}
        planned: list[PlannedTensor] = []
        for name, info in infos.items():
            module, _, suffix = name.rpartition(".")
            if suffix in PACKED_SUFFIXES:
                if suffix == "weight_packed":
                    planned.append(_dense(module, infos, group_for(layout.tree_module(module), groups)))
                continue
            if suffix == "weight" and f"{module}.weight_scale" in infos:  # W8A8: one int8 / FP8 code per weight
                planned.append(_dense(module, infos, group_for(layout.tree_module(module), groups)))
                continue
            planned.append(PlannedTensor(name, info.dtype, info.shape, source=info))
        write_streaming(out / shard.name, planned, {"format": "pt"})
        weight_map.update({t.name: shard.name for t in planned})
    if (path / "model.safetensors.index.json").is_file():
        (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    activations = activation_config(quantization_block(config) or {})
    config.pop("quantization_config", None)
    if isinstance(config.get("text_config"), dict):
        config["text_config"].pop("quantization_config", None)
    if activations is not None:
        config["quantization_config"] = activations
    (out / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    for name in SIDECAR_FILES:
        if (path / name).is_file():
            shutil.copy2(path / name, out / name)
    return out


def _dense(module: str, infos: Mapping[str, Any], group: Mapping[str, Any]) -> PlannedTensor:
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    scheme = scheme_of(group)
    scale_info = infos[f"{module}.weight_scale"]
    if scheme.format != "pack-quantized":
        codes = infos[f"{module}.weight"]
        return PlannedTensor(
            f"{module}.weight", scale_info.dtype, codes.shape,
            produce=lambda: dequantize(read_tensor(codes), read_tensor(scale_info), None, scheme),
        )
    shape = tuple(int(v) for v in read_tensor(infos[f"{module}.weight_shape"]).tolist())

    def produce() -> torch.Tensor:
        q = unpack_from_int32(read_tensor(infos[f"{module}.weight_packed"]), scheme.num_bits, torch.Size(shape))
        zp_info = infos.get(f"{module}.weight_zero_point")
        scale = read_tensor(scale_info)
        zp = None
        if zp_info is not None:
            zp = unpack_from_int32(read_tensor(zp_info), scheme.num_bits, torch.Size(scale.shape), packed_dim=0)
        return dequantize(q.to(torch.int8), scale, zp, scheme)

    return PlannedTensor(f"{module}.weight", scale_info.dtype, shape, produce=produce)


@contextmanager
def loadable(path: Path, dense: bool = False) -> Iterator[tuple[Path, dict[str, Any]]]:
    """``(folder, from_pretrained kwargs)`` that load ``path`` right in transformers (see the module docstring).

    The load inside is quiet (:func:`ecoquant.quiet.quiet_loads`): no third-party progress bars or
    known-harmless warnings unless ``--verbose``.
    """
    from ecoquant.quiet import quiet_loads

    if not needs_dense_copy(path, dense):
        with quiet_loads():
            yield path, quantized_load_kwargs(path, dense)
        return
    tmp = owned_tempdir(path.parent, ".ecoquant-dense-")
    try:
        with quiet_loads():
            yield write_dense_copy(path, tmp / path.name), {}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def decompress_now(model: Any) -> Any:
    """Decompress a compressed-tensors model at once instead of on its first ``forward``; returns it.

    Why: transformers leaves int-/float-quantized (W8A8) Linears compressed and decompresses them
    in a pre-hook on the top-level ``forward``. ``generate`` runs the vision tower before that
    forward, so a W8A8 tower met its int8 weight undecompressed ("expected m1 and m2 to have the
    same dtype"). Activation quantization is unaffected: it lives in each Linear's forward.
    """
    compressor = getattr(getattr(model, "hf_quantizer", None), "compressor", None)
    if compressor is not None and getattr(model, "ct_decompress_hook", None) is not None:
        compressor.decompress_model(model)
    return model
