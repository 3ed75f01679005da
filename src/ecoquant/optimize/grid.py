"""The candidates ``ecoquant optimize`` compares: how each is quantized, how it answers, how it is served.

A :class:`Candidate` is everything that decides what the organizers would
run: the quantization (method, module preset, group size, observer, GPTQ's
scale passes and dampening; the last three default to what ``ecoquant
quantize`` gives the method, so ``method: gptq`` is the checkpoint
``--method gptq`` writes), the
response policy it ships (``default``: the model's own chat template;
``short``: the response-economy template of
:mod:`ecoquant.serve.chat_template`), and vLLM serving options (any engine
argument: ``speculative_config`` for a drafter, ``mm_processor_kwargs`` for
the image-token budget, ``max_num_seqs``...). Prompt variants that only the
evaluation would send are not candidates: the organizers send their own
prompts, so only what the checkpoint carries can be shipped.

:func:`default_grid` is the issue's default: RTN, GPTQ and AWQ, on the
``auto`` preset and (for model families that have one) on the seed's MLP +
attention-output set, each with the model's own template and with the
short-answer one. :func:`load_grid` reads a YAML file of the same
vocabulary: a ``grid:`` of lists (their product) and/or ``candidates:``
written out one by one, plus the ``calibration:`` GPTQ and AWQ share.
Unknown keys are one clear error, never ignored.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from ecoquant.calibrate.data import CalibrationConfig
from ecoquant.errors import EcoquantError
from ecoquant.quantize.defaults import (
    GPTQ_METHODS,
    METHODS,
    default_dampening,
    default_observer,
    default_scale_passes,
    method_scheme_problem,
    methods_text,
)
from ecoquant.quantize.scheme import SCHEMES, QuantScheme, named_scheme

Method = Literal["rtn", "gptq", "awq", "awq-gptq", "smoothquant", "smoothquant-gptq"]
Response = Literal["default", "short"]

RESPONSES: Mapping[str, str] = MappingProxyType(
    {
        # The checkpoint answers through its own chat template: what the organizers' prompts get by default.
        "default": "the model's own chat template",
        # The seed's Round-2 lever, shipped: a system turn asking for one word or number when the request has none.
        "short": "ships a chat template that asks for the shortest answer when a request has no system turn",
    }
)

MLPO_PRESETS: Mapping[str, str] = MappingProxyType(
    {
        # The seed's conservative Round-2 artifact: MLP + attention-output projections only (q/k/v stay bf16).
        "gemma4": "gemma4-e-mlpo",
    }
)
"""``model_type`` -> the seed's MLP + attention-output preset, where the family has one."""


@dataclass(frozen=True)
class Candidate:
    """One variant to quantize, evaluate and maybe ship.

    Attributes:
        name: unique in the grid; the report's row label and the checkpoint folder's name.
        method: ``rtn``, ``gptq``, ``awq``, ``awq-gptq``, or (with ``w8a8-int8``) ``smoothquant`` or
            ``smoothquant-gptq`` (see ``ecoquant quantize --help``).
        preset: a module preset (``auto``, ``gemma4-e-mlpo``...; see ``ecoquant presets``).
        group_size, observer: the scheme's group size and scale choice; observer None is the method's
            default (:func:`~ecoquant.quantize.defaults.default_observer`: hessian for gptq and
            awq-gptq, min-max for rtn and awq; always min-max for FP8). W8A8 is per output channel
            only, so with a W8A8 ``scheme`` the default 128 means the scheme's own (per channel).
        scale_passes: GPTQ's scale passes (gptq and awq-gptq only); None is the method's default
            (:func:`~ecoquant.quantize.defaults.default_scale_passes`: 2, act-order being on).
        dampening: GPTQ's dampening fraction (gptq and awq-gptq only); None is the method's default
            (:func:`~ecoquant.quantize.defaults.default_dampening`).
        response: ``default`` or ``short`` (see :data:`RESPONSES`).
        max_soft_tokens: the image-token budget it is served with (:mod:`ecoquant.eval.image_budget`);
            both backends honour it; None for the checkpoint's default.
        serving: vLLM engine arguments added to its ``vllm_config.yaml`` (need ``--backend vllm``).
        lm_head: ``int4`` or ``int8`` writes the output head quantized (RTN, untied; see
            ``ecoquant quantize --lm-head``); None keeps the preset's (bf16).
        answer_cap: shipped as ``max_new_tokens`` in ``generation_config.json``, which vLLM applies to
            any request that sets no ``max_tokens``; the evaluation lowers each task's cap to it, which
            is what such a request gets. None ships no cap.
        scheme: what the decoder's Linears become, a name in :data:`~ecoquant.quantize.scheme.SCHEMES`
            (``w4a16``, ``w8a8-int8``, ``w8a8-fp8``; see ``ecoquant quantize --scheme``). W8A8 runs
            prefill on 8-bit tensor cores; FP8 is data-free (rtn only).
        assistant: a drafting assistant (folder or hub id; Gemma-4's MTP assistant) the candidate decodes
            with: fewer target steps per answer, the same greedy tokens. The evaluation measures its
            acceptance on this candidate's own target; the submission ships it in ``assistant/`` with a
            ``speculative_config``. None decodes plainly.
        num_speculative_tokens: tokens the assistant drafts per target step (k); set with ``assistant`` only.
    """

    name: str
    method: Method = "rtn"
    preset: str = "auto"
    group_size: int | None = 128
    observer: str | None = None
    scale_passes: int | None = None
    dampening: float | None = None
    response: Response = "default"
    max_soft_tokens: int | None = None
    serving: Mapping[str, Any] = field(default_factory=dict)
    lm_head: str | None = None
    answer_cap: int | None = None
    scheme: str = "w4a16"
    assistant: str | None = None
    num_speculative_tokens: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "serving", MappingProxyType(dict(self.serving)))
        if (self.assistant is None) != (self.num_speculative_tokens is None):
            raise EcoquantError(f"candidate {self.name}: assistant and num_speculative_tokens go together; set both or neither")
        if self.num_speculative_tokens is not None and (
            not isinstance(self.num_speculative_tokens, int) or isinstance(self.num_speculative_tokens, bool)
            or self.num_speculative_tokens < 1
        ):
            raise EcoquantError(f"candidate {self.name}: num_speculative_tokens must be 1 or more, not {self.num_speculative_tokens!r}")
        if self.assistant is not None and "speculative_config" in {str(k).replace("-", "_") for k in self.serving}:
            raise EcoquantError(f"candidate {self.name}: assistant writes the speculative_config; drop it from serving:")
        if not self.name or any(c in self.name for c in "/\\ \t\n") or self.name.startswith("."):
            raise EcoquantError(f"candidate name {self.name!r} must be a plain folder name (no spaces, slashes or leading dot)")
        if self.method not in METHODS:
            raise EcoquantError(f"candidate {self.name}: unknown method {self.method!r}; use {methods_text()}")
        if self.response not in RESPONSES:
            raise EcoquantError(f"candidate {self.name}: unknown response {self.response!r}; use {' or '.join(RESPONSES)}")
        if self.lm_head not in (None, "bf16", "int4", "int8"):
            raise EcoquantError(f"candidate {self.name}: lm_head must be bf16, int4 or int8, not {self.lm_head!r}")
        if self.answer_cap is not None and (
            not isinstance(self.answer_cap, int) or isinstance(self.answer_cap, bool) or self.answer_cap < 1
        ):
            raise EcoquantError(f"candidate {self.name}: answer_cap must be a positive number of tokens, not {self.answer_cap!r}")
        if self.scheme not in SCHEMES:
            raise EcoquantError(f"candidate {self.name}: unknown scheme {self.scheme!r}; use one of: {', '.join(SCHEMES)}")
        # A bad group size or observer fails here, before any work; then the rules ecoquant quantize applies.
        if problem := method_scheme_problem(self.method, self.quant_scheme, flags=False):
            raise EcoquantError(f"candidate {self.name}: {problem}")
        if self.scale_passes is not None:
            if not isinstance(self.scale_passes, int) or isinstance(self.scale_passes, bool) or self.scale_passes < 1:
                raise EcoquantError(f"candidate {self.name}: scale_passes must be 1 or more, not {self.scale_passes!r}")
            if self.scale_passes > 1 and self.method not in GPTQ_METHODS:
                raise EcoquantError(f"candidate {self.name}: scale_passes re-runs GPTQ; use it with a GPTQ method ({', '.join(GPTQ_METHODS)})")
        if self.dampening is not None:
            if self.method not in GPTQ_METHODS:
                raise EcoquantError(f"candidate {self.name}: dampening is GPTQ's; use it with a GPTQ method ({', '.join(GPTQ_METHODS)})")
            if not isinstance(self.dampening, (int, float)) or isinstance(self.dampening, bool) or not 0 < self.dampening < 1:
                raise EcoquantError(f"candidate {self.name}: dampening must be a fraction between 0 and 1, not {self.dampening!r}")

    @property
    def quant_scheme(self) -> QuantScheme:
        """The named scheme with this candidate's group size and observer (as ``ecoquant quantize --scheme`` resolves them)."""
        base = named_scheme(self.scheme)
        group = base.group_size if self.scheme != "w4a16" and self.group_size == 128 else self.group_size
        default = "minmax" if base.type == "float" else default_observer(self.method)
        observer = default if self.observer is None else self.observer
        try:
            return replace(base, group_size=group, observer=observer)  # type: ignore[arg-type]
        except (ValueError, EcoquantError) as exc:
            raise EcoquantError(f"candidate {self.name}: {exc}") from None

    @property
    def scheme_label(self) -> str:
        """``g128 minmax``, ``w8a8-int8 hessian``: the weights format in a few characters, for progress lines."""
        size = f"g{self.group_size}" if self.scheme == "w4a16" else self.scheme
        return f"{size} {self.quant_scheme.observer}"

    @property
    def passes(self) -> int:
        """GPTQ's scale passes, the method's default when not given (act-order is always on here)."""
        return default_scale_passes(self.method, act_order=True) if self.scale_passes is None else self.scale_passes

    @property
    def damp(self) -> float:
        """GPTQ's dampening fraction, the method's default when not given."""
        return default_dampening(self.method) if self.dampening is None else float(self.dampening)

    def quant_record(self) -> dict[str, Any]:
        """What decides the checkpoint (not the response or serving, which reuse it)."""
        record: dict[str, Any] = {"method": self.method, "preset": self.preset, "scheme": self.quant_scheme.to_dict()}
        if self.lm_head not in (None, "bf16"):  # absent when bf16, so older keys stay valid
            record["lm_head"] = self.lm_head
        if self.scheme != "w4a16":  # absent for the default, so older keys stay valid
            record["scheme_name"] = self.scheme
        if self.method in GPTQ_METHODS:
            record["scale_passes"] = self.passes
            record["dampening"] = self.damp
        return record

    def to_record(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)} | {"serving": dict(self.serving)}


CANDIDATE_KEYS: tuple[str, ...] = tuple(f.name for f in fields(Candidate))
TOP_KEYS: tuple[str, ...] = ("grid", "candidates", "calibration")
CALIBRATION_KEYS: tuple[str, ...] = tuple(f.name for f in fields(CalibrationConfig))


@dataclass(frozen=True)
class Grid:
    """The candidates, and the calibration that GPTQ and AWQ candidates share."""

    candidates: tuple[Candidate, ...]
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    source: str = "default"
    """Where the grid came from: ``default`` or the YAML file's path."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "candidates", tuple(self.candidates))
        if not self.candidates:
            raise EcoquantError("the grid has no candidates; list some under candidates: or grid:")
        names = [c.name for c in self.candidates]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise EcoquantError(f"candidate names repeat: {', '.join(dupes)}; give each a unique name:")

    def needs_vllm(self) -> list[str]:
        """Candidates with serving options (only a vLLM server can honour them)."""
        return [c.name for c in self.candidates if c.serving]


def auto_name(
    method: str,
    preset: str,
    group_size: int | None,
    observer: str | None,
    response: str,
    serving: Mapping[str, Any],
    max_soft_tokens: int | None = None,
    scale_passes: int | None = None,
    dampening: float | None = None,
    *,
    lm_head: str | None = None,
    answer_cap: int | None = None,
    scheme: str = "w4a16",
    num_speculative_tokens: int | None = None,
) -> str:
    """``gptq-auto``, ``rtn-gemma4-e-mlpo-g64-mse+short``, ``gptq-auto-minmax-1pass``, ``awq-auto+img140``,
    ``awq-auto+s1a2b3c``, ``rtn-auto-w8a8-int8``, ``gptq-auto+mtp4`` (an assistant drafting 4): readable, unique per choice (a method's default observer,
    passes and dampening, and W8A8's own per-channel group size, add nothing)."""
    name = f"{method}-{preset}"
    if scheme != "w4a16":
        name += f"-{scheme}"
    if group_size != 128 and not (scheme != "w4a16" and group_size is None):
        name += f"-g{group_size}" if group_size else "-channel"
    if observer is not None and observer != default_observer(method):
        name += f"-{observer}"
    if scale_passes is not None and scale_passes != default_scale_passes(method, act_order=True):
        name += f"-{scale_passes}pass"
    if dampening is not None and dampening != default_dampening(method):
        name += f"-damp{dampening:g}"
    if lm_head not in (None, "bf16"):
        name += f"-head{lm_head}"
    if response != "default":
        name += f"+{response}"
    if answer_cap is not None:
        name += f"+cap{answer_cap}"
    if max_soft_tokens is not None:
        name += f"+img{max_soft_tokens}"
    if num_speculative_tokens is not None:
        name += f"+mtp{num_speculative_tokens}"
    if serving:
        import hashlib

        digest = hashlib.sha256(json.dumps(dict(serving), sort_keys=True).encode()).hexdigest()[:6]
        name += f"+s{digest}"
    return name


def default_grid(model_type: str | None, calibration: CalibrationConfig | None = None) -> Grid:
    """RTN, GPTQ, AWQ x (``auto``, the seed's MLP + o set where the family has one) x (default, short) responses."""
    presets = ["auto"] + ([MLPO_PRESETS[model_type]] if model_type in MLPO_PRESETS else [])
    candidates = [
        Candidate(auto_name(m, p, 128, None, r, {}), method=m, preset=p, response=r)  # type: ignore[arg-type]
        for m, p, r in itertools.product(("rtn", "gptq", "awq"), presets, RESPONSES)
    ]
    return Grid(tuple(candidates), calibration or CalibrationConfig())


def _unknown(keys: Sequence[str], known: Sequence[str], where: str) -> None:
    bad = [k for k in keys if k not in known]
    if bad:
        raise EcoquantError(f"unknown key {bad[0]!r} in {where}; known keys: {', '.join(known)}")


def _candidate(spec: Mapping[str, Any], where: str) -> Candidate:
    if not isinstance(spec, Mapping):
        raise EcoquantError(f"{where} must be a mapping of {', '.join(CANDIDATE_KEYS)}")
    _unknown(list(spec), CANDIDATE_KEYS, where)
    values = {k: v for k, v in spec.items() if k != "name"}
    serving = values.get("serving") or {}
    if not isinstance(serving, Mapping):
        raise EcoquantError(f"{where}: serving must be a mapping of vLLM engine arguments")
    values["serving"] = serving
    defaults = Candidate("x")
    name = spec.get("name") or auto_name(
        values.get("method", defaults.method),
        values.get("preset", defaults.preset),
        values.get("group_size", defaults.group_size),
        values.get("observer", defaults.observer),
        values.get("response", defaults.response),
        serving,
        values.get("max_soft_tokens"),
        values.get("scale_passes"),
        values.get("dampening"),
        lm_head=values.get("lm_head"),
        answer_cap=values.get("answer_cap"),
        scheme=str(values.get("scheme", defaults.scheme)),
        num_speculative_tokens=values.get("num_speculative_tokens"),
    )
    try:
        return Candidate(str(name), **values)
    except TypeError as exc:
        raise EcoquantError(f"{where}: {exc}") from None


def grid_from_mapping(data: Any, source: str = "grid") -> Grid:
    """A :class:`Grid` from parsed YAML (see the module docstring for the vocabulary)."""
    if not isinstance(data, Mapping):
        raise EcoquantError(f"{source} must be a YAML mapping with grid:, candidates: and/or calibration:")
    _unknown(list(data), TOP_KEYS, source)
    candidates: list[Candidate] = []
    product = data.get("grid")
    if product is not None:
        if not isinstance(product, Mapping):
            raise EcoquantError(f"{source}: grid: must map candidate keys to lists of values")
        _unknown([k for k in product if k != "name"], [k for k in CANDIDATE_KEYS if k != "name"], f"{source} grid:")
        axes = {k: (v if isinstance(v, list) else [v]) for k, v in product.items()}
        for combo in itertools.product(*axes.values()):
            candidates.append(_candidate(dict(zip(axes, combo, strict=True)), f"{source} grid:"))
    specs = data.get("candidates") or []
    if not isinstance(specs, list):
        raise EcoquantError(f"{source}: candidates: must be a list of candidate mappings")
    for i, spec in enumerate(specs):
        candidates.append(_candidate(spec, f"{source} candidates[{i}]"))
    calib = data.get("calibration") or {}
    if not isinstance(calib, Mapping):
        raise EcoquantError(f"{source}: calibration: must be a mapping of {', '.join(CALIBRATION_KEYS)}")
    _unknown(list(calib), CALIBRATION_KEYS, f"{source} calibration:")
    return Grid(tuple(candidates), CalibrationConfig(**calib), source)


def load_grid(path: Path | str) -> Grid:
    """Read a grid YAML file; a missing file or bad YAML is one clear line."""
    import yaml

    path = Path(path).expanduser()
    if not path.is_file():
        raise EcoquantError(f"no such grid file: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise EcoquantError(f"{path} is not valid YAML ({str(exc).splitlines()[0]})") from None
    return grid_from_mapping(data, str(path))
