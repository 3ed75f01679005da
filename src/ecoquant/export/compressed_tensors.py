"""Write a compressed-tensors checkpoint (``pack-quantized``, or W8A8's ``int-quantized`` /
``float-quantized``), shard by shard.

The output is what llmcompressor writes for W4A16 and what vLLM's
``CompressedTensorsWNA16`` loader (Marlin kernels) and transformers read with
no ``quantization=`` argument: for every quantized Linear ``X``,

* ``X.weight_packed`` int32 ``[out, in * bits / 32]`` (compressed-tensors' ``pack_to_int32``),
* ``X.weight_scale`` ``[out, groups]`` in the source dtype,
* ``X.weight_shape`` int64 ``[2]``,
* ``X.weight_zero_point`` packed int32, only when asymmetric,

and ``config.json`` gains a ``quantization_config`` built from compressed-tensors'
own ``QuantizationConfig`` with the unquantized Linears listed in ``ignore``
(as llmcompressor lists them).

W8A8 schemes (:data:`ecoquant.quantize.scheme.SCHEMES`) write ``X.weight`` as
int8 or FP8 E4M3 codes and ``X.weight_scale`` ``[out, 1]`` instead, with the
config group's ``input_activations`` (dynamic, per token) taken from
compressed-tensors' ``W8A8`` / ``FP8_DYNAMIC`` presets. Groups of different
formats (W8A8 Linears beside packed int4 tables) make the top-level format
``mixed-precision``, each group naming its own.

Token tables (:mod:`ecoquant.models.tables`) may be quantized too, in the
same packed layout along their width (what vLLM's
``CompressedTensorsEmbeddingWNA16Int`` gathers and dequantizes: symmetric int,
group or channel, ``weight_packed``/``weight_scale``/``weight_shape``, no zero
point), each kind in a config group of its own that names its modules. A
quantized embedding no longer has a ``weight`` a tied head could share, so
the head is then written untied (``lm_head.weight`` copied from the
embedding, or packed from it in its own group targeting ``re:.*lm_head$``)
and ``tie_word_embeddings`` is set false at both config levels.

Memory: source tensors are read one at a time and untouched ones are copied
with chunked reads, so peak memory is one weight plus its codes, whatever the
shard size. Safety: everything is written into a hidden sibling folder that
is renamed into place only when complete; on any error it is removed.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from ecoquant.errors import EcoquantError
from ecoquant.export.safetensors_stream import DTYPE_NAMES, PlannedTensor, read_tensor, write_streaming
from ecoquant.models.components import ComponentSpec, component_schemes
from ecoquant.models.layout import IDENTITY, Layout, checkpoint_layout, tree_infos
from ecoquant.models.loading import SIDECAR_FILES, TensorInfo, shard_files, shard_tensors
from ecoquant.models.selection import Selection
from ecoquant.quantize.primitives import QuantizedWeight, check_group_size
from ecoquant.quantize.scheme import QuantScheme
from ecoquant.scratch import disown, owned_tempdir

QuantizeFn = Callable[[str, torch.Tensor], QuantizedWeight]

HEAD_TARGET = "re:.*lm_head$"
"""Matches the head under transformers' name (``lm_head``) and vLLM's (``language_model.lm_head``)."""

TABLE_CHUNK_ROWS = 8192
"""Rows of a token table quantized at once: E4B's PLE table is 5.6 GB in bf16; its codes and
intermediates for all rows at once would need several times that."""


@dataclass(frozen=True)
class HeadSpec:
    """An untied output head written from a (tied) embedding weight.

    Attributes:
        module: the head's module name (``lm_head``).
        source: the embedding module whose ``weight`` it copies (``model.language_model.embed_tokens``).
        scheme: None for a bf16 copy; else how it is quantized (RTN, symmetric).
    """

    module: str
    source: str
    scheme: QuantScheme | None = None


def packed_entries(module: str, shape: tuple[int, int], dtype: str, scheme: QuantScheme) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Names, dtypes and shapes of the tensors that replace ``module.weight``.

    Weight-only schemes (``pack-quantized``): ``weight_packed`` int32 words, ``weight_scale``,
    ``weight_shape`` (and ``weight_zero_point`` when asymmetric). W8A8 (``int-quantized`` /
    ``float-quantized``): ``weight`` itself as int8 / FP8 E4M3 codes and ``weight_scale``
    ``[out, 1]``: what llmcompressor writes and vLLM's W8A8 loaders read.

    Shared by the writer (to plan headers) and the footprint arithmetic (to
    price a checkpoint that does not exist yet, such as the E4B shape twin).
    """
    out_f, in_f = shape
    groups = scheme.groups_for(in_f)
    if scheme.format != "pack-quantized":
        code = "F8_E4M3" if scheme.type == "float" else "I8"
        return {f"{module}.weight": (code, (out_f, in_f)), f"{module}.weight_scale": (dtype, (out_f, groups))}
    entries = {
        f"{module}.weight_packed": ("I32", (out_f, math.ceil(in_f * scheme.num_bits / 32))),
        f"{module}.weight_scale": (dtype, (out_f, groups)),
        f"{module}.weight_shape": ("I64", (2,)),
    }
    if not scheme.symmetric:
        entries[f"{module}.weight_zero_point"] = ("I32", (math.ceil(out_f * scheme.num_bits / 32), groups))
    return entries


def pack(qw: QuantizedWeight, scheme: QuantScheme, scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A module's quantized tensors: packed with compressed-tensors' own ``pack_to_int32``, or for
    W8A8 the one-byte codes as they are (the ``naive`` compressors' layout)."""
    if scheme.format != "pack-quantized":
        return {"weight": qw.q, "weight_scale": qw.scale.to(scale_dtype)}
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    tensors = {
        "weight_packed": pack_to_int32(qw.q, scheme.num_bits),
        "weight_scale": qw.scale.to(scale_dtype),
        "weight_shape": torch.tensor(qw.q.shape, dtype=torch.int64),
    }
    if not scheme.symmetric:
        assert qw.zero_point is not None, "asymmetric quantization needs zero points"
        tensors["weight_zero_point"] = pack_to_int32(qw.zero_point, scheme.num_bits, packed_dim=0)
    return tensors


def quantization_config(
    scheme: QuantScheme,
    ignore: list[str],
    tables: Mapping[str, QuantScheme] | None = None,
    head: HeadSpec | None = None,
    components: tuple[ComponentSpec, ...] = (),
) -> dict[str, Any]:
    """The ``quantization_config`` block of ``config.json``, built by compressed-tensors.

    ``group_0`` targets every Linear (minus ``ignore``); quantized token tables get one group per
    scheme naming their modules; a quantized head gets its own group; so does each component
    quantized with its own scheme (``vision``, ``audio``), naming its modules (which then leave ``ignore``).
    """
    import compressed_tensors
    from compressed_tensors.quantization import QuantizationConfig

    groups = {"group_0": scheme.to_quantization_scheme(["Linear"])}
    by_scheme: dict[QuantScheme, list[str]] = {}
    for module, table_scheme in (tables or {}).items():
        by_scheme.setdefault(table_scheme, []).append(module)
    for i, (table_scheme, modules) in enumerate(by_scheme.items()):
        groups[f"embeddings_{i}"] = table_scheme.to_quantization_scheme(sorted(modules))
    if head is not None and head.scheme is not None:
        groups["lm_head"] = head.scheme.to_quantization_scheme([HEAD_TARGET])
        ignore = [n for n in ignore if n != head.module]
    for component in components:
        groups[component.name] = component.scheme.to_quantization_scheme(sorted(component.modules))
    in_component = set(component_schemes(components))
    ignore = [n for n in ignore if n not in in_component]
    formats = {g.format for g in groups.values()}
    config = QuantizationConfig(
        config_groups=groups,
        # One format for all: that one (what llmcompressor writes); several: each group names its own.
        format=formats.pop() if len(formats) == 1 else "mixed-precision",
        quantization_status="compressed",
        ignore=ignore,
    )
    # ``version`` is what compressed-tensors' own writer adds: the library that defines the format.
    return {**config.model_dump(exclude_none=False, mode="json"), "version": compressed_tensors.__version__}


def _both_spellings(ignore: Sequence[str], layout: Layout) -> list[str]:
    """``ignore`` under the tree's names, each followed by its stored name where the layout renames it."""
    out: list[str] = []
    for module in ignore:
        out.append(module)
        stored = layout.stored_module(module)
        if stored != module:
            out.append(stored)
    return out


def table_quantize(weight: torch.Tensor, scheme: QuantScheme) -> QuantizedWeight:
    """RTN over a ``[vocab, width]`` table, :data:`TABLE_CHUNK_ROWS` rows at a time (rows are independent)."""
    from ecoquant.quantize.rtn import rtn_quantize

    parts = [rtn_quantize(weight[i : i + TABLE_CHUNK_ROWS], scheme) for i in range(0, weight.shape[0], TABLE_CHUNK_ROWS)]
    return QuantizedWeight(
        q=torch.cat([p.q for p in parts]), scale=torch.cat([p.scale for p in parts]), zero_point=None
    )


@dataclass(frozen=True)
class TensorFate:
    """What becomes of one source tensor in the checkpoint.

    ``kind``: ``linear`` (packed with the main scheme by the method's quantize function), ``table``
    or ``head`` (packed by RTN with ``scheme``; a ``head`` with no scheme is a bf16 copy under the
    head's name), or ``copy`` (written as it is, or as its replacement).
    """

    kind: Literal["linear", "table", "head", "copy"]
    module: str
    scheme: QuantScheme | None = None


def tensor_fates(
    name: str,
    selection: Selection,
    scheme: QuantScheme,
    tables: Mapping[str, QuantScheme],
    head: HeadSpec | None,
    components: Mapping[str, QuantScheme] | None = None,
) -> list[TensorFate]:
    """Where one source tensor goes: shared by the writer and the footprint arithmetic, so the two cannot drift.

    The embedding an untied head is written from yields the head as well as itself; a head that
    is already untied in the source (``head.source == head.module``) is replaced by its packed form.
    """
    fates: list[TensorFate] = []
    module = name.removesuffix(".weight")
    if head is not None and name == f"{head.source}.weight":
        fates.append(TensorFate("head", head.module, head.scheme))
        if head.source == head.module:
            return fates
    if name.endswith(".weight") and module in tables:
        fates.append(TensorFate("table", module, tables[module]))
    elif name.endswith(".weight") and module in selection:
        fates.append(TensorFate("linear", module, scheme))
    elif name.endswith(".weight") and components and module in components:  # a tower Linear, with its component's scheme
        fates.append(TensorFate("linear", module, components[module]))
    else:
        fates.append(TensorFate("copy", name))
    return fates


def plan_shard(
    infos: list[TensorInfo],
    selection: Selection,
    scheme: QuantScheme,
    quantize_fn: QuantizeFn,
    replace: Mapping[str, torch.Tensor],
    tables: Mapping[str, QuantScheme] | None = None,
    head: HeadSpec | None = None,
    components: Mapping[str, QuantScheme] | None = None,
    layout: Layout = IDENTITY,
) -> list[PlannedTensor]:
    """What one output shard holds: packed tensors for selected modules and tables, the rest copied or replaced;
    plus the untied head beside the embedding it is written from.

    ``infos`` carry module-tree names (what selection, tables and ``replace`` use); every tensor is
    written under its name in the source's ``layout`` (:mod:`ecoquant.models.layout`).
    """
    planned: list[PlannedTensor] = []
    for info in infos:
        for fate in tensor_fates(info.name, selection, scheme, tables or {}, head, components):
            if fate.kind == "copy":
                value = replace.get(info.name)
                if value is None:
                    planned.append(PlannedTensor(info.file_name, info.dtype, info.shape, source=info))
                else:
                    planned.append(
                        PlannedTensor(info.file_name, DTYPE_NAMES[value.dtype], tuple(value.shape), produce=lambda v=value: v)
                    )
            elif fate.scheme is None:  # an untied bf16 head: the embedding's bytes under the head's name
                planned.append(PlannedTensor(layout.stored_name(f"{fate.module}.weight"), info.dtype, info.shape, source=info))
            else:
                if len(info.shape) != 2:
                    raise EcoquantError(f"{fate.module} is selected but its weight has shape {list(info.shape)}, not [out, in]")
                check_group_size(fate.module, info.shape[1], fate.scheme)
                fn = quantize_fn if fate.kind == "linear" else (lambda _m, w, s=fate.scheme: table_quantize(w, s))
                planned.extend(_planned_packed(info, fate.module, fate.scheme, fn, layout.stored_module(fate.module)))
    return planned


def _planned_packed(
    info: TensorInfo, module: str, scheme: QuantScheme, quantize_fn: QuantizeFn, stored_module: str
) -> list[PlannedTensor]:
    """Planned entries for one module whose tensors are computed together, once, when first written.

    ``module`` is the tree name ``quantize_fn`` knows; the entries are named under ``stored_module``.
    """
    cache: dict[str, torch.Tensor] = {}
    entries = packed_entries(stored_module, (info.shape[0], info.shape[1]), info.dtype, scheme)

    def produce(suffix: str) -> torch.Tensor:
        if not cache:
            weight = read_tensor(info)
            cache.update(pack(quantize_fn(module, weight), scheme, weight.dtype))
        # Tensors are written in name order, so a module's entries are consecutive:
        # free each one as soon as it is written.
        return cache.pop(suffix)

    return [
        PlannedTensor(name, dtype, shape, produce=lambda s=name.rsplit(".", 1)[1]: produce(s))
        for name, (dtype, shape) in entries.items()
    ]


def untie(config: dict[str, Any]) -> None:
    """Set ``tie_word_embeddings`` false where transformers (top level) and vLLM (the text config) read it."""
    config["tie_word_embeddings"] = False
    if isinstance(config.get("text_config"), dict):
        config["text_config"]["tie_word_embeddings"] = False


@contextmanager
def atomic_output_dir(out: Path, overwrite: bool) -> Iterator[Path]:
    """A temporary sibling folder that becomes ``out`` only if the block completes."""
    out = out.expanduser().resolve()
    if out.exists() and not overwrite:
        raise EcoquantError(f"{out} already exists; choose another --out or pass --overwrite")
    tmp = owned_tempdir(out.parent, f".{out.name}.partial-")  # clears those a killed run left
    try:
        yield tmp
        disown(tmp)
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, trash / "old")
            os.replace(tmp, out)
            shutil.rmtree(trash)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def export_checkpoint(
    source: Path,
    out: Path,
    *,
    selection: Selection,
    scheme: QuantScheme,
    quantize_fn: QuantizeFn,
    ignore_linears: list[str],
    replace: Mapping[str, torch.Tensor] | None = None,
    recipe: Callable[[dict[str, int]], dict[str, Any]] | None = None,
    overwrite: bool = False,
    on_module: Callable[[str], None] | None = None,
    tables: Mapping[str, QuantScheme] | None = None,
    head: HeadSpec | None = None,
    components: tuple[ComponentSpec, ...] = (),
) -> dict[str, int]:
    """Stream ``source`` into a compressed-tensors checkpoint at ``out``; return byte counts.

    Args:
        source: model folder with config.json and safetensors weights.
        out: the checkpoint folder to create (atomically).
        selection: modules to quantize.
        scheme: how.
        quantize_fn: ``(module_name, weight) -> QuantizedWeight``; RTN computes on the
            spot, GPTQ/AWQ look up what calibration produced.
        ignore_linears: Linear modules left in bf16, listed in ``quantization_config.ignore``.
        replace: tensors to write instead of the source's (AWQ-folded norms).
        recipe: called with the byte counts; its result is written as ``quant_recipe.json``.
        overwrite: replace an existing ``out``.
        on_module: progress callback, called after each quantized module is written.
        tables: token tables to quantize (RTN), module -> scheme (see the module docstring).
        head: an untied head to write from its embedding (needed when an embedding it is tied to is quantized).
        components: towers quantized with their own schemes; ``quantize_fn`` is called for their modules too.

    Module names (``selection``, ``ignore_linears``, ``tables``, ``head``, ``components``, ``replace``)
    are the module tree's; tensors are read and written under the source's own names (its
    :class:`~ecoquant.models.layout.Layout`), and ``quantization_config`` names modules as the tree
    does, as llmcompressor writes them under transformers 5 (transformers matches ``ignore``
    against its tree), with each ignored module's stored name beside it where the two differ: vLLM maps
    ``ignore`` through its per-family mapper, which knows the stored names but not every transformers 5
    renaming (vLLM 0.32's Gemma-3 maps ``model.vision_tower.`` to ``vision_tower.``, while its modules sit
    under ``vision_tower.vision_model.``, the stored name; the tree one would leave the tower quantized).

    Returns:
        ``{"source_bytes": ..., "output_bytes": ..., "quantized_modules": ...}``.
    """
    replace = dict(replace or {})
    shards = shard_files(source)
    layout = checkpoint_layout(source)
    seen: set[str] = set()
    with atomic_output_dir(out, overwrite) as tmp:
        weight_map: dict[str, str] = {}
        source_bytes = output_bytes = 0
        for shard in shards:
            infos = list(tree_infos(shard_tensors(shard), layout))
            source_bytes += sum(i.nbytes for i in infos)
            planned = plan_shard(
                infos, selection, scheme, quantize_fn, replace, tables, head, component_schemes(components), layout
            )

            def written(t: PlannedTensor) -> None:
                if t.name.endswith(".weight_scale"):  # every format writes one scale tensor per module
                    module = layout.tree_name(t.name.removesuffix("_scale")).removesuffix(".weight")
                    seen.add(module)
                    if on_module is not None:
                        on_module(module)

            output_bytes += write_streaming(tmp / shard.name, planned, {"format": "pt"}, on_tensor=written)
            weight_map.update({t.name: shard.name for t in planned})
        expected = [
            *selection.modules, *(tables or {}), *([head.module] if head is not None and head.scheme else []),
            *component_schemes(components),
        ]
        missing = [m for m in expected if m not in seen]
        if missing:
            raise EcoquantError(
                f"{len(missing)} selected modules have no weight in {source} (first: {missing[0]}); "
                "the checkpoint's tensor names do not match the model's module names"
            )
        if len(shards) > 1 or (source / "model.safetensors.index.json").exists():
            index = {"metadata": {"total_size": output_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        config = json.loads((source / "config.json").read_text())
        config["quantization_config"] = quantization_config(scheme, _both_spellings(ignore_linears, layout), tables, head, components)
        if head is not None:
            untie(config)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for name in SIDECAR_FILES:
            if (source / name).is_file():
                shutil.copy2(source / name, tmp / name)
        tables_written = sum(1 for m in (tables or {}) if m in seen)
        towers_written = sum(1 for m in component_schemes(components) if m in seen)
        sizes = {
            "source_bytes": source_bytes,
            "output_bytes": output_bytes,
            "quantized_modules": len(seen) - tables_written - (1 if head is not None and head.scheme else 0) - towers_written,
            "quantized_tables": tables_written,
            **({"quantized_tower_modules": towers_written} if components else {}),
        }
        if recipe is not None:
            (tmp / "quant_recipe.json").write_text(json.dumps(recipe(sizes), indent=2) + "\n")
    return sizes
