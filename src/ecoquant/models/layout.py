"""A checkpoint's tensor names against the module tree transformers builds: one mapping, read from transformers.

Why: transformers 5 renames tensors at load time through its checkpoint
conversion mapping (``transformers.conversion_mapping``). Its module tree says
``model.visual.*`` and ``model.language_model.*`` for Qwen2.5-VL, while the
checkpoints on the Hub, and what ``save_pretrained`` writes (it reverts the
mapping on save), keep ``visual.*`` and ``model.layers.*``; Gemma-3 and
Mistral-3 keep LLaVA's ``language_model.model.*`` / ``vision_tower.*``.
ecoquant selects modules by their names in the tree (built on the meta device)
and reads tensors by their names in the files, so everything that crosses
between the two goes through a :class:`Layout`.

The mapping is transformers' own, for the model class the config names
(``get_model_conversion_mapping``), applied name by name as ``from_pretrained``
applies it (``rename_source_key``); nothing here knows a family. Going back
(a tensor the source did not have, such as an untied head) uses the reversed
renamings, as ``save_pretrained`` does. A quantized checkpoint is written
with the names its source had, so vLLM's loader, with its own per-family
mapper, gets the names it expects for that family.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

from torch import nn

from ecoquant.errors import EcoquantError
from ecoquant.models.loading import TensorInfo, load_config, meta_model, tensor_infos


@dataclass(frozen=True)
class Layout:
    """How one checkpoint's tensor names relate to its model's module tree.

    Attributes:
        model_class: the transformers class the names were matched against.
        to_tree: stored name -> tree name, for the stored names that differ (empty: the names are the tree's).
        forward: transformers' renamings, for stored-layout names the checkpoint does not hold.
        reverse: transformers' reversed renamings, for tree names the checkpoint does not store.
    """

    model_class: str
    to_tree: Mapping[str, str]
    forward: tuple[Any, ...] = field(default=(), compare=False, repr=False)
    reverse: tuple[Any, ...] = field(default=(), compare=False, repr=False)

    @property
    def renamed(self) -> bool:
        """Whether the checkpoint stores any tensor under a name other than its tree name."""
        return bool(self.to_tree)

    def tree_name(self, stored: str) -> str:
        """The module-tree name of a tensor in this checkpoint's layout (stored or not, e.g. a packed module's ``weight``)."""
        found = self.to_tree.get(stored)
        if found is not None or not self.renamed:
            return found or stored
        from transformers.core_model_loading import apply_renamings

        return apply_renamings(stored, list(self.forward))

    def tree_module(self, stored_module: str) -> str:
        """A module's tree name from its name prefix in this checkpoint."""
        return self.tree_name(f"{stored_module}.weight").removesuffix(".weight")

    def stored_name(self, tree: str) -> str:
        """The name a tensor of the tree has (or would have) in this checkpoint's layout."""
        found = self._to_stored.get(tree)
        if found is not None:
            return found
        if not self.renamed:
            return tree
        from transformers.core_model_loading import apply_renamings

        return apply_renamings(tree, list(self.reverse))

    def stored_module(self, tree_module: str) -> str:
        """A module's name prefix in this checkpoint (through its ``weight``)."""
        return self.stored_name(f"{tree_module}.weight").removesuffix(".weight")

    @property
    def _to_stored(self) -> dict[str, str]:
        return {tree: stored for stored, tree in self.to_tree.items()}


IDENTITY = Layout(model_class="", to_tree={})


class _TreeNames:
    """The names a tensor may have in the tree: a parameter or buffer, or a tensor of a module that has a ``weight``
    (compressed-tensors' ``weight_packed``, ``weight_scale``, ... sit beside where ``weight`` was).

    Answers ``get`` as a state dict would, because transformers' ``rename_source_key`` asks it that way.
    """

    def __init__(self, model: nn.Module) -> None:
        self.keys = frozenset(model.state_dict().keys())

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        return name in self.keys or f"{name.rpartition('.')[0]}.weight" in self.keys

    def get(self, name: str, default: Any = None) -> Any:
        return True if name in self else default


def layout_for_names(model: nn.Module, stored: Iterable[str], where: str = "the checkpoint") -> Layout:
    """Match stored tensor names to ``model``'s tree through transformers' conversion mapping for its class.

    Raises:
        EcoquantError: some stored name matches no tensor of the tree either as it is or once renamed,
            or the class's mapping would merge or split tensors (ecoquant maps names one to one).
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import PrefixChange, WeightConverter, WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(model)  # what from_pretrained applies (legacy renamings included)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    tree = _TreeNames(model)
    prefix = getattr(model, "base_model_prefix", "") or None
    ignored = [re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())]
    to_tree: dict[str, str] = {}
    unmatched: list[str] = []
    for name in stored:
        renamed, converted = rename_source_key(name, renamings, converters, prefix, tree)  # type: ignore[arg-type]
        if renamed not in tree and name in tree:  # as from_pretrained: a name already in the tree stays
            renamed, converted = name, None
        if converted is not None:
            raise EcoquantError(
                f"{where}: {type(model).__name__} loads {name} through a tensor conversion ({converted}), "
                "not a renaming; ecoquant maps checkpoint names one to one and cannot quantize this layout"
            )
        if renamed not in tree:
            if not any(p.search(name) for p in ignored):
                unmatched.append(name)
            continue
        if renamed != name:
            to_tree[name] = renamed
    if unmatched:
        raise EcoquantError(
            f"{where}: {len(unmatched)} tensors match no module of {type(model).__name__}, neither as stored nor "
            f"through transformers' checkpoint conversion mapping (first: {unmatched[0]}); "
            "the weights do not belong to the model config.json names"
        )
    # Going back, as save_pretrained does for a model it did not load: reversed, in reverse order, no PrefixChange.
    saving = [t for t in get_model_conversion_mapping(model, add_legacy=False) if not isinstance(t, PrefixChange)]
    reverse = tuple(t.reverse_transform() for t in saving[::-1] if isinstance(t, WeightRenaming))
    return Layout(model_class=type(model).__name__, to_tree=to_tree, forward=tuple(renamings), reverse=reverse)


@lru_cache(maxsize=16)
def _cached_layout(path: str, _stamp: tuple[float, ...]) -> Layout:
    folder = Path(path)
    model = meta_model(load_config(folder))
    return layout_for_names(model, (t.name for t in tensor_infos(folder)), where=str(folder))


def checkpoint_layout(path: Path) -> Layout:
    """The layout of the checkpoint in folder ``path`` (cached while its config and weight files are unchanged)."""
    if not (path / "config.json").is_file():
        # Tensors with no model config (a table or a test's hand-made shard): no class to map through, so
        # the names are read as stored. A model folder always has one; its absence there is reported where
        # the config is read.
        return Layout(model_class="", to_tree={})
    files = [path / "config.json", *sorted(path.glob("*.safetensors"))]
    stamp = tuple(f.stat().st_mtime_ns for f in files if f.is_file())
    return _cached_layout(str(path.resolve()), stamp)


def tree_infos(infos: Iterable[TensorInfo], layout: Layout) -> Iterator[TensorInfo]:
    """``infos`` under their tree names; each keeps its stored name in ``stored_name``."""
    for info in infos:
        tree = layout.tree_name(info.name)
        yield info if tree == info.name else replace(info, name=tree, stored_name=info.name)


def model_tensor_infos(path: Path) -> Iterator[TensorInfo]:
    """Every tensor of a checkpoint under the name the model's module tree gives it."""
    yield from tree_infos(tensor_infos(path), checkpoint_layout(path))
