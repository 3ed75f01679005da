"""The results table, shaped like the seed model card's: energy, Δ vs base, scores, recovery, gate.

Recovery is ``variant score / base score`` for each half of the suite (doc
analysis, image understanding), computed against the base model run with the
*same* prompt variant, so a prompt change is never mistaken for a
quantization effect. Mean recovery is the mean over the halves the suite has.
A zero base score makes a ratio meaningless: it is reported as ``n/a``, never
as ``inf``, and a mean that would need it is ``n/a`` too. The gate is the
challenge's rule that a variant counts only if it keeps at least 80% of the
base's quality (mean recovery >= 0.80).

Energy cells are ``—`` when there was no meter, and the table says why
(``energy: not measured (no NVML device)``); no number stands in for it.

Each variant's recovery carries a bootstrap interval (:mod:`ecoquant.eval.bootstrap`);
with a gate confidence ``P`` the gate is applied to the lower bound of the ``P``
interval on mean recovery instead of the point estimate, so "pass" means
"passes even if this suite was a lucky draw".
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

from ecoquant.errors import EcoquantError
from ecoquant.eval.bootstrap import DEFAULT_CONFIDENCE, BootstrapSpec
from ecoquant.eval.runner import ModelRun, RunRecord, run_recovery_interval
from ecoquant.eval.tasks import SUITE_KINDS

GATE_RECOVERY = 0.80
"""Minimum mean recovery for a variant to count (the challenge's 80% rule)."""

HALF_TITLES: Mapping[str, str] = MappingProxyType({"doc": "doc", "image": "image"})

Gate = Literal["pass", "fail", "n/a", "base"]


def recovery(score: float | None, base_score: float | None) -> float | None:
    """``score / base_score``; None when either is missing or the base scored 0 (no meaningful ratio).

    Worked example (seed card, image half): 0.56 / 0.68 = 0.8235.
    """
    if score is None or base_score is None or base_score == 0:
        return None
    return score / base_score


def mean_recovery(recoveries: Sequence[float | None]) -> float | None:
    """Mean over the suite's halves; None if there are none or any of them is n/a.

    Worked example (seed card): doc 0.7576 / 0.7608 = 0.9958, image 0.8235 -> 0.9097.
    """
    if not recoveries or any(r is None for r in recoveries):
        return None
    return math.fsum(r for r in recoveries if r is not None) / len(recoveries)


def gate(mean: float | None, role: str = "variant", threshold: float = GATE_RECOVERY) -> Gate:
    """``pass``/``fail`` against ``threshold`` (the challenge's 80%); ``n/a`` without a mean; ``base`` for the base."""
    if role == "base":
        return "base"
    if mean is None:
        return "n/a"
    return "pass" if mean >= threshold else "fail"


def gated_value(
    mean: float | None, interval: Mapping[str, tuple[float, float] | None] | None, confidence: float | None
) -> float | None:
    """What the gate compares with its threshold: the mean recovery, or with a gate confidence the lower
    bound of that interval on it (None when it is n/a)."""
    if confidence is None:
        return mean
    bounds = None if interval is None else interval.get("mean")
    return None if bounds is None else bounds[0]


def check_confidence(confidence: float | None) -> float | None:
    """A gate confidence is a probability in (0, 1), e.g. 0.9; None gates on the point estimate."""
    if confidence is not None and not (isinstance(confidence, (int, float)) and 0 < confidence < 1):
        raise EcoquantError(f"--gate-confidence is a probability in (0, 1), e.g. 0.9; got {confidence}")
    return None if confidence is None else float(confidence)


def interval_spec(record: RunRecord, confidence: float | None = None) -> BootstrapSpec:
    """The intervals to show: at ``confidence`` when given, else as recorded, else the 90% default."""
    stored = record.intervals or {}
    return BootstrapSpec(
        confidence=confidence if confidence is not None else float(stored.get("confidence", DEFAULT_CONFIDENCE)),
        **{k: int(stored[k]) for k in ("resamples", "seed") if k in stored},
    )


def check_threshold(threshold: float) -> float:
    """A gate must be a fraction of the base's quality in (0, 1]; anything else is one clear error."""
    if not (isinstance(threshold, (int, float)) and 0 < threshold <= 1):
        raise EcoquantError(f"the gate is a fraction of the base's mean recovery in (0, 1], e.g. 0.8; got {threshold}")
    return float(threshold)


def relative_change(value: float | None, base: float | None) -> float | None:
    """``value / base - 1`` (e.g. +0.137 for +13.7%); None when either is missing or base is 0."""
    if value is None or base is None or base == 0:
        return None
    return value / base - 1.0


@dataclass(frozen=True)
class ReportRow:
    """One line of the table: one model with one prompt variant."""

    model: str
    role: str
    prompt_variant: str
    energy_j: float | None
    energy_delta: float | None
    idle_corrected_j: float | None
    scores: Mapping[str, float | None]
    recoveries: Mapping[str, float | None]
    mean_recovery: float | None
    gate: Gate
    tokens_in: int
    tokens_out: int
    requests: int
    wall_time_s: float
    modelled_energy_j: float | None = None
    """The roofline's joules on the run's target GPU: MODELLED, never measured (None where not modellable)."""
    modelled_energy: Mapping[str, Any] | None = None
    """The whole record behind it: ``{"gpu", "total_j", "parts"}``."""
    recovery_interval: Mapping[str, tuple[float, float] | None] | None = None
    """Bootstrap interval per half and on the mean (``"mean"``); None for the base."""
    energy_spread_j: tuple[float, float] | None = None
    """Min and max measured suite energy over the repeated windows; None without repeats."""


def modelled_gpu(record: RunRecord) -> str | None:
    """The GPU the record's modelled energy is for (``ModelRun.modelled_energy["gpu"]``), if any run has one."""
    return next((str(r.modelled_energy["gpu"]) for r in record.runs if r.modelled_energy), None)


def row_interval(record: RunRecord, run: ModelRun, spec: BootstrapSpec) -> dict[str, tuple[float, float] | None] | None:
    """A run's intervals at ``spec``: the recorded ones when drawn the same way, else drawn now (same seed)."""
    stored = run.recovery_interval
    if stored is None or record.intervals != spec.to_record():
        stored = run_recovery_interval(record, run, spec)
    return None if stored is None else {k: None if v is None else (v[0], v[1]) for k, v in stored.items()}


def report_rows(
    record: RunRecord, threshold: float = GATE_RECOVERY, confidence: float | None = None
) -> list[ReportRow]:
    """The table's rows, in run order, each compared with its prompt variant's base run.

    ``confidence``: gate on the lower bound of this interval on mean recovery (None: on the mean itself).
    """
    halves = [k for k in SUITE_KINDS if any(t["suite"] == k for t in record.suite["tasks"])]
    several = len(record.prompt_variants) > 1
    spec = interval_spec(record, confidence)
    rows = []
    for run in record.runs:
        base = record.base_run(run.prompt_variant)
        scores = {k: run.suite_scores.get(k) for k in halves}
        recoveries = {k: recovery(scores[k], None if base is None else base.suite_scores.get(k)) for k in halves}
        mean = mean_recovery([recoveries[k] for k in halves])
        interval = row_interval(record, run, spec)
        rows.append(
            ReportRow(
                model=f"{run.label} · {run.prompt_variant}" if several else run.label,
                role=run.role,
                prompt_variant=run.prompt_variant,
                energy_j=run.energy_j,
                energy_delta=None if base is None else relative_change(run.energy_j, base.energy_j),
                idle_corrected_j=None if run.energy is None else run.energy.idle_corrected_j,
                scores=scores,
                recoveries=recoveries,
                mean_recovery=mean,
                gate=gate(gated_value(mean, interval, confidence), run.role, threshold),
                tokens_in=run.tokens_in,
                tokens_out=run.tokens_out,
                requests=run.requests,
                wall_time_s=run.wall_time_s,
                recovery_interval=interval,
                energy_spread_j=run.energy_spread_j,
                modelled_energy_j=None if run.modelled_energy is None else float(run.modelled_energy["total_j"]),
                modelled_energy=run.modelled_energy,
            )
        )
    return rows


def _num(value: float | None, digits: int) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _pct(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value * 100:+.1f}%" if signed else f"{value * 100:.2f}%"


def columns(threshold: float = GATE_RECOVERY) -> tuple[str, ...]:
    """The table's header; the gate column names its threshold."""
    return tuple(f"≥{threshold:.0%} gate" if c == "gate" else c for c in COLUMNS)


COLUMNS: tuple[str, ...] = (
    "model",
    "energy J",
    "Δ energy vs base",
    "doc score",
    "image score",
    "recovery doc",
    "recovery image",
    "mean recovery",
    "gate",
    "output tokens",
    "wall s",
)


def _cells(row: ReportRow) -> list[str]:
    delta = "—" if row.role == "base" else ("—" if row.energy_j is None else _pct(row.energy_delta, signed=True))

    def half(k: str, what: Mapping[str, float | None], fmt: str) -> str:
        if k not in what:
            return "—"  # the suite has no such half
        return _num(what[k], 4) if fmt == "score" else _pct(what[k])

    return [
        row.model + (" (base)" if row.role == "base" else ""),
        _num(row.energy_j, 2),
        delta,
        half("doc", row.scores, "score"),
        half("image", row.scores, "score"),
        half("doc", row.recoveries, "pct"),
        half("image", row.recoveries, "pct"),
        _pct(row.mean_recovery),
        "—" if row.gate == "base" else row.gate,
        str(row.tokens_out),
        _num(row.wall_time_s, 1),
    ]


def markdown_table(rows: Sequence[ReportRow], threshold: float = GATE_RECOVERY) -> str:
    """The table alone, as GitHub markdown."""
    lines = [
        "| " + " | ".join(columns(threshold)) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(COLUMNS) - 1)) + "|",
    ]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    return "\n".join(lines)


def energy_lines(record: RunRecord, rows: Sequence[ReportRow]) -> list[str]:
    """How energy was (or was not) measured, the idle baseline, and energy above idle."""
    e = record.energy
    if not e.measured:
        return [f"energy: not measured ({e.meter}); the suite ran once per model (repeats need a meter)"]
    lines = [f"energy: {e.meter}; summed over the whole suite per row; {e.warmup_requests} warm-up requests excluded."]
    spread = [r for r in rows if r.energy_spread_j is not None]
    if spread:
        lines.append(
            "energy repeats: the suite's window was repeated after warm-up; the table shows the mean, spread"
            " (min..max): "
            + ", ".join(f"{r.model} {r.energy_spread_j[0]:.2f}..{r.energy_spread_j[1]:.2f} J" for r in spread)  # type: ignore[index]
            + "."
        )
    if e.idle_power_w is not None and e.idle_time_s is not None:
        above = ", ".join(f"{r.model} {_num(r.idle_corrected_j, 2)} J" for r in rows)
        lines.append(
            f"idle baseline: {e.idle_power_w:.1f} W over {e.idle_time_s:.1f} s, measured before the suite and"
            f" not subtracted above; energy above idle: {above}."
        )
    return lines


def model_check_lines(record: RunRecord, rows: Sequence[ReportRow]) -> list[str]:
    """Measured / modelled energy per row where both exist: the energy model checked wherever a GPU measured."""
    both = [r for r in rows if r.energy_j is not None and r.modelled_energy_j]
    if not record.energy.measured or not both:
        return []
    ratios = ", ".join(f"{r.model} {r.energy_j / r.modelled_energy_j:.2f}" for r in both)  # type: ignore[operator]
    return [f"measured / modelled energy (model for {modelled_gpu(record) or 'the target GPU'}): {ratios}."]


def _bounds(interval: tuple[float, float] | None) -> str:
    return "n/a" if interval is None else f"[{interval[0]:.1%}, {interval[1]:.1%}]"


def interval_lines(record: RunRecord, rows: Sequence[ReportRow], confidence: float | None = None) -> list[str]:
    """One line on how the recovery intervals were drawn and each variant's intervals."""
    spec = interval_spec(record, confidence)
    shown = [r for r in rows if r.recovery_interval is not None]
    if not shown:
        return []
    parts = [
        f"{r.model}: " + ", ".join(f"{k} {_bounds(v)}" for k, v in r.recovery_interval.items())  # type: ignore[union-attr]
        for r in shown
    ]
    return [
        f"recovery {spec.confidence:.0%} intervals (paired bootstrap: each resample scores base and variant on the"
        f" same samples; {spec.resamples} resamples, seed {spec.seed}): " + "; ".join(parts) + "."
    ]


def gate_rule(threshold: float, confidence: float | None = None) -> str:
    """The gate in words, as the report and the card state it."""
    if confidence is None:
        return f"gate = mean recovery ≥ {threshold:.0%}"
    return f"gate = lower bound of the {confidence:.0%} interval on mean recovery ≥ {threshold:.0%}"


MODELLED_PART_TITLES: Mapping[str, str] = MappingProxyType(
    {
        "prefill_text": "prefill text",
        "prefill_image": "prefill image",
        "vision_encoder": "vision",
        "decode": "decode",
        "draft": "draft",
        "idle": "idle",
    }
)


def modelled_lines(rows: Sequence[ReportRow]) -> list[str]:
    """One line per GPU: each row's modelled joules and the share of each part, labelled *modelled for <GPU>*."""
    by_gpu: dict[str, list[str]] = {}
    for r in rows:
        if r.modelled_energy is None:
            continue
        parts: Mapping[str, float] = r.modelled_energy["parts"]
        total = float(r.modelled_energy["total_j"])
        spec = r.modelled_energy.get("speculative")
        shares = " · ".join(
            f"{title} {(parts.get(k, 0.0) / total if total else 0.0):.0%}"
            for k, title in MODELLED_PART_TITLES.items()
            if k != "draft" or spec  # the draft part only where an assistant drafted
        )
        lever = ""
        if spec:  # imported here: energy.speculative reads checkpoints (torch), which `ecoquant --help` must not load
            from ecoquant.energy.speculative import speculation_label

            lever = f"; {speculation_label(spec)}"
        by_gpu.setdefault(str(r.modelled_energy["gpu"]), []).append(f"{r.model} {total:.2f} J ({shares}{lever})")
    return [
        f"energy modelled for {gpu} (a roofline of the recorded tokens over datasheet figures, see docs/energy.md;"
        f" not measured): " + "; ".join(items) + "."
        for gpu, items in by_gpu.items()
    ]


def failure_lines(record: RunRecord) -> list[str]:
    """One line per model that produced no scores: stage, error, where its log is."""
    lines = []
    for f in record.failures:
        first = str(f.error).splitlines()[0] if f.error else "no error recorded"
        where = f"; log: {f.log_path}" if f.log_path else ""
        lines.append(f"FAILED {f.label} ({f.role}, at {f.stage}): {first}{where}")
    return lines


def markdown_report(record: RunRecord, threshold: float = GATE_RECOVERY, confidence: float | None = None) -> str:
    """The whole ``report.md``: title, table, failed models, energy notes, intervals, what was run."""
    rows = report_rows(record, threshold, confidence)
    suite = record.suite
    gen = record.generation
    sampling = (
        "greedy"
        if not gen["do_sample"]
        else f"sampling (temperature {gen['temperature']}, top_p {gen['top_p']}, top_k {gen['top_k']})"
    )
    cap = "" if gen.get("max_new_tokens") is None else f", max_new_tokens capped at {gen['max_new_tokens']}"
    tasks = ", ".join(f"{t['name']} ({t['suite']}, {t['metric']}, {t['n_samples']})" for t in suite["tasks"])
    variants = "; ".join(f"{p['name']}: {p['description']}" for p in record.prompt_variants)
    total_requests = sum(r.requests for r in rows)
    lines = [
        f"# ecoquant eval: {suite['name']}",
        "",
        markdown_table(rows, threshold),
        "",
        *(f"- {line}" for line in failure_lines(record)),
        *(f"- {line}" for line in energy_lines(record, rows)),
        *(f"- {line}" for line in model_check_lines(record, rows)),
        *(f"- {line}" for line in modelled_lines(rows)),
        f"- requests: {total_requests} in all; tokens in/out per row: "
        + ", ".join(f"{r.model} {r.tokens_in}/{r.tokens_out}" for r in rows)
        + ".",
        f"- recovery = score / base score per half with the same prompt variant; mean recovery = mean over halves;"
        f" {gate_rule(threshold, confidence)}; n/a where the base scored 0.",
        *(f"- {line}" for line in interval_lines(record, rows, confidence)),
        f"- suite: {suite['spec']} ({suite['n_samples']} samples: {tasks}).",
        f"- generation: {sampling}, seed {gen['seed']}{cap}. prompt variants: {variants}.",
        f"- ecoquant {record.ecoquant.get('version')} ({record.ecoquant.get('git_sha') or 'no git'}), {record.created_utc}.",
    ]
    return "\n".join(lines) + "\n"
