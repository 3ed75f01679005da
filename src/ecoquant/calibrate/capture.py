"""Capture what the model feeds its decoder layers, by running the model's own forward.

No graph tracing: the model's ``forward`` runs as written, on real inputs,
with the decoder layers swapped out, so whatever it computes before and
between layers (embeddings, Gemma-4's per-layer PLE inputs, rotary position
embeddings per layer type, sliding and full attention masks, the
``shared_kv_states`` dict that KV-shared layers read) arrives exactly as it
would at inference. Two passes use this:

* :func:`run_until_first_layer` stops at layer 0 (a pre-forward hook raises a
  private exception). It is used to collect statistics for Linears that run
  before the layers, such as Gemma-4's ``per_layer_model_projection``.
* :func:`record_layer_calls` replaces every decoder layer by a stand-in that
  records its positional and keyword arguments and passes the hidden states
  through; the last one stops the forward. Each layer's real call signature is
  then known, per layer, per batch.

Memory: arguments that several layers share (position embeddings, masks,
``position_ids``, the ``shared_kv_states`` dict) are kept once per batch;
arguments that only one layer receives (PLE slices: 42 layers x 256 x tokens
on E4B, several times the hidden states) are written to a spool file per batch
and read back when that layer runs.
"""

from __future__ import annotations

from collections import UserDict
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ecoquant.errors import EcoquantError

Batch = Mapping[str, Any]


class _StopForward(Exception):
    """Raised inside the model's forward once the wanted inputs are captured."""


# --- Argument trees -----------------------------------------------------------------
# A layer's (args, kwargs) is a small tree: tuples/lists of tensors, plain values and
# opaque objects. Leaves that are tensors are replaced by placeholders so that the
# structure can be kept apart from the data.


@dataclass(frozen=True)
class _Hidden:
    """Placeholder for the hidden states (the value that flows from layer to layer)."""


@dataclass(frozen=True)
class _Pooled:
    """Placeholder for a tensor shared by several layers of a batch (kept in memory)."""

    key: int


@dataclass(frozen=True)
class _Spooled:
    """Placeholder for a tensor only one layer receives (stored in the batch's spool file)."""

    key: str


def _map_tree(tree: Any, fn: Callable[[Any], Any]) -> Any:
    """Apply ``fn`` to every leaf, rebuilding tuples and lists (other objects are leaves)."""
    if isinstance(tree, tuple) and not hasattr(tree, "_fields"):
        return tuple(_map_tree(x, fn) for x in tree)
    if isinstance(tree, list):
        return [_map_tree(x, fn) for x in tree]
    return fn(tree)


def _leaves(tree: Any) -> list[Any]:
    """Every leaf of a tree, in order."""
    out: list[Any] = []

    def keep(x: Any) -> Any:
        out.append(x)
        return x

    _map_tree(tree, keep)
    return out


class _Interner:
    """One stored copy of equal tensors across batches.

    Position embeddings and attention masks depend only on the sequence length,
    so every batch of the same length gets equal ones; E4B's sliding-window mask
    alone is 4 MB per 2048-token sample. Keeping one copy per distinct value
    leaves only the hidden states growing with the number of samples.
    """

    def __init__(self) -> None:
        self.seen: dict[tuple[Any, ...], list[torch.Tensor]] = {}

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        bucket = self.seen.setdefault((t.device, t.dtype, tuple(t.shape)), [])
        for known in bucket:
            if torch.equal(known, t):
                return known
        bucket.append(t)
        return t


# --- Shared mutable state (Gemma-4's shared_kv_states) --------------------------------


class KVTrace:
    """Who wrote and who read each key of a shared mutable argument, per layer.

    Gemma-4 passes every layer one ``shared_kv_states`` dict: the last
    non-shared layer of each attention type stores its K/V there, and the
    KV-shared layers read them. Replacing that dict by a tracing copy proves,
    on real runs, which donor each KV-shared layer read from.
    """

    def __init__(self) -> None:
        self.layer: int | None = None
        self.writes: dict[str, int] = {}
        self.reads: dict[int, dict[str, int | None]] = {}

    def on_set(self, key: Any) -> None:
        if self.layer is not None:
            self.writes[str(key)] = self.layer

    def on_get(self, key: Any) -> None:
        if self.layer is not None:
            self.reads.setdefault(self.layer, {})[str(key)] = self.writes.get(str(key))


def _traced_mapping(original: MutableMapping[Any, Any], trace: KVTrace) -> MutableMapping[Any, Any]:
    """A fresh mapping of the original's class (and contents) that reports reads and writes to ``trace``."""
    base = type(original)

    class Traced(base):  # type: ignore[valid-type, misc]
        def __getitem__(self, key: Any) -> Any:
            trace.on_get(key)
            return super().__getitem__(key)

        def __setitem__(self, key: Any, value: Any) -> None:
            trace.on_set(key)
            super().__setitem__(key, value)

    Traced.__name__ = f"Traced{base.__name__}"
    copy = Traced()
    # Fill without tracing: the contents predate the walk.
    store = copy.data if isinstance(copy, UserDict) else copy
    for k, v in original.items():
        dict.__setitem__(store, k, v)
    return copy


# --- Recorded inputs -------------------------------------------------------------------


@dataclass
class BatchInputs:
    """Everything the decoder layers receive for one calibration batch.

    ``hidden`` is replaced by each layer's output as the walk advances.
    ``calls[i]`` is layer ``i``'s (args, kwargs) with placeholders for tensors.
    """

    hidden: torch.Tensor
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]]
    pool: dict[int, torch.Tensor]
    spool: Path | None
    shared_state: list[MutableMapping[Any, Any]] = field(default_factory=list)

    def layer_call(self, i: int, device: torch.device) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Layer ``i``'s real arguments, tensors on ``device``."""
        spooled: dict[str, torch.Tensor] = {}
        args, kwargs = self.calls[i]
        wanted = [x.key for x in _leaves((args, list(kwargs.values()))) if isinstance(x, _Spooled)]
        if wanted:
            assert self.spool is not None
            with safe_open(str(self.spool), framework="pt", device=str(device)) as f:
                spooled = {k: f.get_tensor(k) for k in wanted}

        def fill(x: Any) -> Any:
            if isinstance(x, _Hidden):
                return self.hidden
            if isinstance(x, _Pooled):
                return self.pool[x.key]
            if isinstance(x, _Spooled):
                return spooled[x.key]
            return x

        return _map_tree(args, fill), {k: _map_tree(v, fill) for k, v in kwargs.items()}


@dataclass
class LayerInputs:
    """The recorded inputs of every decoder layer, for every batch."""

    batches: list[BatchInputs]
    traces: list[KVTrace]

    def set_layer(self, i: int | None) -> None:
        """Tell the shared-state traces which layer runs now."""
        for t in self.traces:
            t.layer = i

    def kv_sharing(self) -> dict[int, dict[str, int | None]]:
        """For each layer that read shared state: key -> the layer that wrote it (the donor)."""
        return self.traces[0].reads if self.traces else {}


# --- The two capture passes ------------------------------------------------------------


def _to_device(batch: Batch, device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _call_model(model: nn.Module, batch: Batch, device: torch.device) -> None:
    """Run the model's forward on one batch until a stand-in stops it."""
    try:
        model(**_to_device(batch, device), use_cache=False)
    except _StopForward:
        return
    except (RuntimeError, NotImplementedError) as exc:
        if "meta" in str(exc):
            raise EcoquantError(
                f"{type(model).__name__}'s forward used a weight before calling its module, so it was never "
                f"loaded ({str(exc).splitlines()[0][:120]}); this model needs an explicit materialisation rule"
            ) from exc
        raise
    raise EcoquantError(
        f"{type(model).__name__}'s forward finished without reaching its decoder layers; "
        "the layer path in ecoquant.models.topology is wrong for this model"
    )


@contextmanager
def lazy_outside(
    model: nn.Module, skip: nn.Module, before_call: Callable[[nn.Module, tuple[Any, ...]], tuple[Any, ...] | None]
) -> Any:
    """While active, every call of a module outside ``skip`` goes through ``before_call`` first.

    ``before_call(module, args)`` gives the module its weights (on its first
    call, or rows it lacks on any call) and may return replaced arguments, as
    a forward pre-hook does. Only what the forward actually calls is loaded: a
    text-only capture never touches the vision or audio tower, and ``lm_head``
    is never reached.
    """
    inside = {id(m) for m in skip.modules()}
    handles = [m.register_forward_pre_hook(before_call) for m in model.modules() if id(m) not in inside]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def run_until_first_layer(
    model: nn.Module, layers: nn.ModuleList, batches: Iterable[Batch], device: torch.device,
    on_batch: Callable[[int], None] | None = None,
) -> None:
    """Run the model's forward on every batch, stopping when layer 0 is about to run.

    Hooks the caller placed on modules that run before the layers (statistics
    for ``per_layer_model_projection``) see every batch.
    """

    def stop(module: nn.Module, args: Any, kwargs: Any) -> None:
        raise _StopForward

    handle = layers[0].register_forward_pre_hook(stop, with_kwargs=True)
    try:
        for b, batch in enumerate(batches):
            _call_model(model, batch, device)
            if on_batch is not None:
                on_batch(b)
    finally:
        handle.remove()


class _StandIn(nn.Module):
    """Takes a decoder layer's place: records its arguments, returns the hidden states unchanged."""

    def __init__(self, index: int, last: bool, sink: list[tuple[tuple[Any, ...], dict[str, Any]]]) -> None:
        super().__init__()
        self.index = index
        self.last = last
        self.sink = sink

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self.sink.append((args, kwargs))
        if self.last:
            raise _StopForward
        return args[0] if args else kwargs["hidden_states"]


def _hidden_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _layout(t: torch.Tensor) -> tuple[Any, ...]:
    """What makes two tensor objects the same values: same memory, read the same way.

    The model may hand later layers fresh views of the same tensors (Gemma-4
    re-slices ``[:, 0:]`` everything before its KV-shared layers); those are
    still one tensor for our purposes.
    """
    return (t.device, t.dtype, t.data_ptr(), tuple(t.shape), t.stride())


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when ``a`` is ``b`` or a view of the same memory with the same layout (``h[:, 0:]``)."""
    return a is b or _layout(a) == _layout(b)


def record_layer_calls(
    model: nn.Module,
    layers: nn.ModuleList,
    batches: Iterable[Batch],
    device: torch.device,
    spool_dir: Path,
    on_batch: Callable[[int], None] | None = None,
) -> LayerInputs:
    """Each decoder layer's real arguments for every batch (see the module docstring).

    Raises:
        EcoquantError: the model changes the hidden states between two layers
            (the engine feeds each layer its predecessor's output, so it needs
            the model to do the same).
    """
    spool_dir.mkdir(parents=True, exist_ok=True)
    originals = list(layers)
    n = len(originals)
    recorded: list[BatchInputs] = []
    traces: list[KVTrace] = []
    intern = _Interner()
    try:
        for b, batch in enumerate(batches):
            sink: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
            for i in range(n):
                layers[i] = _StandIn(i, i == n - 1, sink)
            _call_model(model, batch, device)
            if len(sink) != n:
                raise EcoquantError(f"the model called {len(sink)} of its {n} decoder layers; cannot calibrate it")
            trace = KVTrace()
            recorded.append(_freeze_batch(sink, spool_dir / f"batch_{b:05d}.safetensors", trace, intern))
            traces.append(trace)
            if on_batch is not None:
                on_batch(b)
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
    return LayerInputs(recorded, traces)


def _freeze_batch(
    sink: list[tuple[tuple[Any, ...], dict[str, Any]]], spool: Path, trace: KVTrace, intern: _Interner
) -> BatchInputs:
    """Turn one batch's recorded calls into placeholders, a shared pool and a spool file."""
    hidden = _hidden_of(*sink[0])
    uses: dict[tuple[Any, ...], set[int]] = {}
    for i, (args, kwargs) in enumerate(sink):
        h = _hidden_of(args, kwargs)
        if not _same_values(h, hidden):
            raise EcoquantError(
                f"the model changes the hidden states between decoder layers 0 and {i} "
                f"(shape {list(hidden.shape)} -> {list(h.shape)}); layer-by-layer calibration cannot reproduce it"
            )
        for leaf in _leaves((args[1:] if args else (), list(kwargs.values()))):
            if isinstance(leaf, torch.Tensor):
                uses.setdefault(_layout(leaf), set()).add(i)

    pool: dict[int, torch.Tensor] = {}
    pool_keys: dict[tuple[Any, ...], int] = {}
    to_spool: dict[str, torch.Tensor] = {}
    shared: dict[int, MutableMapping[Any, Any]] = {}
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
    for i, (args, kwargs) in enumerate(sink):

        def place(x: Any, i: int = i) -> Any:
            if isinstance(x, torch.Tensor):
                layout = _layout(x)
                if len(uses[layout]) > 1:
                    key = pool_keys.setdefault(layout, len(pool_keys))
                    if key not in pool:
                        pool[key] = intern(x)
                    return _Pooled(key)
                name = f"L{i}.{sum(k.startswith(f'L{i}.') for k in to_spool)}"
                # A contiguous copy of its own: safetensors refuses tensors sharing memory.
                to_spool[name] = x.detach().to(memory_format=torch.contiguous_format, copy=True)
                return _Spooled(name)
            if isinstance(x, MutableMapping):
                if id(x) not in shared:
                    shared[id(x)] = _traced_mapping(x, trace)
                return shared[id(x)]
            return x

        rest = args[1:] if args else ()
        new_kwargs = {k: (_Hidden() if k == "hidden_states" else _map_tree(v, place)) for k, v in kwargs.items()}
        new_args = ((_Hidden(), *_map_tree(rest, place)) if args else ())
        calls.append((new_args, new_kwargs))
    if to_spool:
        save_file({k: v.cpu() for k, v in to_spool.items()}, str(spool))
    return BatchInputs(
        hidden=hidden.detach(),
        calls=calls,
        pool=pool,
        spool=spool if to_spool else None,
        shared_state=list(shared.values()),
    )
