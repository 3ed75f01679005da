"""Give meta-device modules real weights, one module at a time, straight from safetensors.

The calibration engine builds the whole model on the meta device (shapes and
names, no memory) and materialises only what it is about to run: the
embeddings for the capture pass, then one decoder layer at a time. Each
tensor is read with a plain file read (no memory map, so untouched pages of a
5 GB shard never count towards RSS) and dropped again by :func:`release`.

Embedding tables are the exception to "whole module": the capture pass only
looks rows up, and E4B's tables are 3.4 GB (``embed_tokens``) and 11.3 GB
(``embed_tokens_per_layer``) once cast to float32, which alone came to a
20 GB peak on a 24 GiB machine. :meth:`Materializer.before_call` serves them
from the rows the calls actually read (:class:`RowTable`): the same values,
so the same outputs bit for bit.

Two kinds of tensors are not in a checkpoint and need the model's own code:
non-persistent buffers (rotary ``inv_freq``, Gemma's ``embed_scale``) are
computed by the owning ``PreTrainedModel._init_weights``, exactly as
``from_pretrained`` does after loading; tied parameters (``lm_head`` sharing
the embedding) are read under the name the checkpoint stores.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ecoquant.errors import EcoquantError
from ecoquant.export.safetensors_stream import read_rows, read_tensor
from ecoquant.models.layout import model_tensor_infos
from ecoquant.models.loading import TensorInfo


class CheckpointReader:
    """The tensors of a checkpoint folder by their module-tree names (whatever its own layout), read one at a time.

    ``aliases`` maps a tensor name the checkpoint may lack to the name it is
    stored under (transformers' tied weights: ``{target: source}``).
    """

    def __init__(self, path: Path, aliases: dict[str, str] | None = None) -> None:
        self.path = path
        self.infos: dict[str, TensorInfo] = {t.name: t for t in model_tensor_infos(path)}
        self.aliases = dict(aliases or {})

    def info(self, name: str) -> TensorInfo | None:
        """Where ``name`` is stored (following a tied alias), or None."""
        found = self.infos.get(name)
        if found is None and name in self.aliases:
            found = self.infos.get(self.aliases[name])
        return found

    def read(self, name: str) -> torch.Tensor:
        """One tensor as stored (dtype and all).

        Raises:
            EcoquantError: the checkpoint has no tensor of that name.
        """
        info = self.info(name)
        if info is None:
            raise EcoquantError(
                f"{self.path} has no tensor {name!r}; the checkpoint's tensor names do not match "
                "the model class transformers builds from its config.json"
            )
        return read_tensor(info)


def _owners(model: nn.Module) -> dict[int, nn.Module]:
    """For every module (by id), the nearest ``PreTrainedModel`` at or above it.

    Composite models (a vision tower inside an image-text model) have their own
    ``_init_weights``; a module must be initialised by the one that owns it.
    """
    from transformers import PreTrainedModel

    owners: dict[int, nn.Module] = {}

    def walk(module: nn.Module, owner: nn.Module) -> None:
        if isinstance(module, PreTrainedModel):
            owner = module
        owners[id(module)] = owner
        for child in module.children():
            walk(child, owner)

    walk(model, model)
    return owners


class RowTable:
    """An ``nn.Embedding`` holding only the rows its calls have read so far.

    Its weight becomes those rows (sorted by token id) and each call's ids
    are mapped to their positions, in a forward pre-hook: the lookup returns
    exactly the rows the full table would. Rows ``0 .. padding_idx`` are
    always kept, in place, because some forwards read ``weight[pad_token_id]``
    directly (Gemma-4's image-text model does, for its per-layer inputs at
    image positions). ``padding_idx`` itself is dropped: no gradient flows
    here, and the compact table may be shorter than it.
    """

    def __init__(self, module: nn.Embedding, info: TensorInfo, cast: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.module = module
        self.info = info
        self.cast = cast
        keep = module.padding_idx if module.padding_idx is not None and module.padding_idx >= 0 else -1
        self.ids = torch.empty(0, dtype=torch.long)
        module.padding_idx = None
        self._add(torch.arange(keep + 1))

    def _add(self, wanted: torch.Tensor) -> None:
        missing = wanted[~torch.isin(wanted, self.ids)]
        if not missing.numel():
            return
        rows = self.cast(read_rows(self.info, missing))
        weight = self.module.weight
        old = weight if weight.device.type != "meta" else rows[:0]
        ids = torch.cat([self.ids, missing])
        order = torch.argsort(ids)
        self.ids = ids[order]
        self.module.weight = nn.Parameter(torch.cat([old, rows])[order.to(rows.device)], requires_grad=False)

    def remap(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``input_ids`` as positions in the compact table (reading rows it lacks first)."""
        self._add(torch.unique(input_ids.detach().flatten().cpu().long()))
        return torch.searchsorted(self.ids.to(input_ids.device), input_ids)

    @property
    def rows(self) -> int:
        """How many rows are held."""
        return int(self.ids.numel())


class Materializer:
    """Materialise and release parts of a meta-device model.

    Args:
        model: the whole model, built on the meta device.
        reader: where its tensors are.
        device: where materialised tensors go.
        dtype: floating-point tensors are cast to it (integer ones keep theirs).
    """

    def __init__(self, model: nn.Module, reader: CheckpointReader, device: torch.device, dtype: torch.dtype) -> None:
        self.model = model
        self.reader = reader
        self.device = device
        self.dtype = dtype
        self.names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
        self.owners = _owners(model)
        self.tables: dict[int, RowTable] = {}

    def before_call(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        """Ready ``module`` (not its children) for a call with positional ``args``; a forward pre-hook.

        An embedding table called with its ids is served by a :class:`RowTable`
        (its ids come back remapped); anything else is materialised whole.
        """
        table = self.tables.get(id(module))
        if table is None and isinstance(module, nn.Embedding) and module.weight.device.type == "meta":
            info = self.reader.info(f"{self.names[id(module)]}.weight")
            if info is not None and args and isinstance(args[0], torch.Tensor):
                self.materialize(module, recurse=False, params=False)  # buffers (Gemma's embed_scale)
                table = self.tables[id(module)] = RowTable(module, info, self._cast)
        if table is not None:
            return (table.remap(args[0]), *args[1:])
        self.materialize(module, recurse=False)
        return None

    def materialize(self, module: nn.Module, recurse: bool = True, params: bool = True) -> int:
        """Load ``module``'s meta tensors (and its descendants' when ``recurse``); return bytes loaded.

        ``params=False`` loads buffers only.
        """
        from transformers import initialization as init

        loaded = 0
        needs_init: list[nn.Module] = []
        for sub in self._modules(module, recurse):
            prefix = self.names[id(sub)]
            prefix = f"{prefix}." if prefix else ""
            for name, param in list(sub.named_parameters(recurse=False)) if params else ():
                if param.device.type != "meta":
                    continue
                value = self._cast(self.reader.read(prefix + name))
                self._check_shape(prefix + name, value, param)
                new = nn.Parameter(value, requires_grad=False)
                new._is_hf_initialized = True  # type: ignore[attr-defined]
                setattr(sub, name, new)
                loaded += value.numel() * value.element_size()
            for name, buf in list(sub.named_buffers(recurse=False)):
                if buf is None or buf.device.type != "meta":
                    continue
                full = prefix + name
                persistent = name not in sub._non_persistent_buffers_set
                if persistent and self.reader.info(full) is not None:
                    value = self._cast(self.reader.read(full))
                    self._check_shape(full, value, buf)
                    value._is_hf_initialized = True  # type: ignore[attr-defined]
                    loaded += value.numel() * value.element_size()
                else:
                    # Not stored: an empty tensor that the model's init fills below.
                    value = torch.empty_like(buf, device=self.device)
                    if sub not in needs_init:
                        needs_init.append(sub)
                sub._buffers[name] = value
        if needs_init:
            with torch.no_grad(), init.guard_torch_init_functions():
                for sub in needs_init:
                    self.owners[id(sub)]._init_weights(sub)  # type: ignore[operator]
        return loaded

    def release(self, module: nn.Module) -> None:
        """Send ``module``'s tensors back to the meta device, freeing their memory."""
        module.to("meta")
        for sub in module.modules():
            self.tables.pop(id(sub), None)
        trim_heap()

    def _modules(self, module: nn.Module, recurse: bool) -> Iterator[nn.Module]:
        return module.modules() if recurse else iter((module,))

    def _cast(self, value: torch.Tensor) -> torch.Tensor:
        if value.is_floating_point() and value.dtype != self.dtype:
            value = value.to(self.dtype)
        return value.to(self.device)

    @staticmethod
    def _check_shape(name: str, value: torch.Tensor, like: torch.Tensor) -> None:
        if tuple(value.shape) != tuple(like.shape):
            raise EcoquantError(
                f"{name} has shape {list(value.shape)} in the checkpoint but {list(like.shape)} in the model "
                "built from config.json; the config and weights do not belong together"
            )


@cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def trim_heap() -> None:
    """Hand freed memory back to the OS after a layer is dropped.

    glibc keeps freed medium-sized blocks in its arenas, so without this the
    resident size creeps up by a megabyte or two per layer (measured on a
    32-layer model) although nothing is held. Python's garbage collector runs
    first so that cycles holding tensors are gone. A no-op where there is no
    ``malloc_trim`` (macOS, musl).
    """
    gc.collect()
    libc = _libc()
    trim = getattr(libc, "malloc_trim", None) if libc is not None else None
    if trim is not None:
        trim(0)
