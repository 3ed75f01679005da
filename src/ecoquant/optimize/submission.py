"""``DIR/submission/``: the folder to upload, served by ``vllm serve --config vllm_config.yaml`` from inside it.

What goes in: the pick's weights, config, tokenizer and chat template (the
response-economy one if the pick carries it), its ``quant_recipe.json``, a
``vllm_config.yaml`` whose ``model`` is ``.`` (the folder itself) or the
``--repo-id`` it will be published under -- never a path of this machine --
with the pick's serving options, the evaluation's ``results.json``,
``report.md``, ``pareto.png`` and ``choice.json``, and a model card
(``README.md``) in the seeds' shape: what it is, what is quantized, the
measured table, how it was chosen (every candidate, the gate, the cost
measure, the hardware and vLLM version), usage, reproduction, license.

A pick that decodes with a drafting assistant (the MTP lever) carries it in
``assistant/`` (its files as given: ecoquant does not quantize assistants
yet; see docs/serving.md), and ``vllm_config.yaml`` gets a
``speculative_config`` naming ``./assistant``, so the folder serves the pair.

The card, ``choice.json`` and the config's header state the lowest vLLM
version the pick needs (:func:`ecoquant.serve.vllm_features.min_version_for`
over :func:`ecoquant.optimize.levers.candidate_features`).

The folder is built as ``DIR/.submission.partial`` and renamed into place,
so a half-written submission never sits where an upload would take it.

No file of it names a path of this machine: the records copied in
(``quant_recipe.json``, ``results.json``, ``report.md``, ``choice.json``) hold
the source model's and ``DIR``'s absolute paths, which mean nothing where the
folder is uploaded. :func:`public_paths` rewrites them: the source model to its
hub id or folder name, ``DIR`` to its folder name.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ecoquant.eval.backends.base import DEFAULT_NUM_SPECULATIVE_TOKENS
from ecoquant.optimize.grid import RESPONSES
from ecoquant.optimize.plan import Job, OptimizeConfig, Plan
from ecoquant.optimize.select import Choice, choice_record
from ecoquant.optimize.store import Store, link_or_copy, write_json_atomic
from ecoquant.report.table import gate_rule
from ecoquant.report import PARTS_FILE, PLOT_FILE, RESULTS_FILE, TABLE_FILE
from ecoquant.serve.config import CONFIG_FILE, ServeConfigOptions, build_serve_config
from ecoquant.serve.model_card import write_model_card
from ecoquant.serve.vllm_features import feature, min_version_for, unchecked

if TYPE_CHECKING:
    from ecoquant.eval.runner import RunRecord

SUBMISSION = "submission"
ASSISTANT_DIR = "assistant"
"""The assistant's folder inside the submission; ``speculative_config`` names it as ``./assistant``."""
SKIPPED = (CONFIG_FILE, "README.md")
"""Files of the candidate folder not copied: the submission gets its own."""
TEXT_SUFFIXES = (".json", ".md", ".yaml", ".yml", ".jinja", ".txt")
"""Files :func:`public_paths` rewrites (weights and images name no path)."""


def public_paths(folder: Path, names: Mapping[str, str]) -> None:
    """Replace each absolute path in ``names`` (path -> public name) in every text file of ``folder``.

    Longest paths first, so a path inside another is not half-replaced. Each file
    is written anew (never in place): files linked from a candidate's folder keep
    their original content there.
    """
    ordered = sorted(((p, n) for p, n in names.items() if p and p != "/"), key=lambda pn: -len(pn[0]))
    for f in sorted(folder.iterdir()):
        if not f.is_file() or f.suffix not in TEXT_SUFFIXES:
            continue
        text = original = f.read_text(encoding="utf-8")
        for path, name in ordered:
            text = text.replace(path, name)
        if text != original:
            tmp = f.with_name(f".{f.name}.public")
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, f)


def hardware(record: RunRecord) -> dict[str, Any]:
    """Where the evaluation ran: CPU, GPUs (NVML names), torch, and the vLLM that served, if one did."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpus: list[str] = []
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            gpus = [str(pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(i))) for i in range(pynvml.nvmlDeviceGetCount())]
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no driver, no library: no GPU to name  # noqa: BLE001
        gpus = []
    import torch

    vllm = sorted({str(r.backend.get("vllm")) for r in record.runs if r.backend.get("vllm")})
    return {"cpu": cpu, "cores": os.cpu_count(), "gpus": gpus, "torch": torch.__version__, "vllm": vllm or None}


def choice_section(choice: Choice, plan: Plan, record: RunRecord, config: OptimizeConfig, hw: Mapping[str, Any]) -> str:
    """The card's "How this was chosen" section: the rule, every candidate's standing, where it was measured."""
    by_name = {c.name: c for c in plan.grid.candidates}
    backend = "vLLM " + ", ".join(hw["vllm"]) + " (`vllm serve --config`, one server per model)" if hw.get("vllm") else config.backend
    where = ", ".join(hw["gpus"]) if hw["gpus"] else f"{hw['cpu']} ({hw['cores']} cores), no GPU"
    lines = [
        "## How this was chosen",
        "",
        f"`ecoquant optimize` compared {len(plan.grid.candidates)} candidates with the bf16 base on suite "
        f"`{record.suite['spec']}` ({record.suite['n_samples']} samples): the pick is the cheapest candidate "
        f"that keeps the gate ({gate_rule(choice.threshold, choice.confidence).removeprefix('gate = ')}); "
        f"{choice.metric_note}. Served by {backend}, on {where}, torch {hw['torch']}.",
        "",
        f"{choice.summary()}",
        "",
        f"| candidate | method | preset | response | image budget | serving | cost ({choice.cost_label}) | mean recovery "
        f"| {choice.interval_confidence:.0%} interval | decision |",
        "|---|---|---|---|---:|---|---:|---:|---:|---|",
    ]
    for s in choice.standings:
        c = by_name.get(s.name)
        serving = json.dumps(dict(c.serving)) if c is not None and c.serving else "—"
        cost = "—" if s.cost is None else f"{s.cost:.2f}"
        if s.spread is not None:
            cost += f" ({s.spread[0]:.2f}..{s.spread[1]:.2f})"
        rec = "n/a" if s.mean_recovery is None else f"{s.mean_recovery:.2%}"
        bounds = None if s.interval is None else s.interval.get("mean")
        interval = "n/a" if bounds is None else f"{bounds[0]:.2%}–{bounds[1]:.2%}"
        if s.name == choice.pick:
            decision = "**pick**" + (f" ({s.tie_rule})" if s.tie_rule else "")
        elif s.passed:
            decision = (
                f"passes, {s.tie_rule}"
                if s.tie_rule
                else ("passes, lower mean recovery" if choice.metric == "none" else "passes, costs more")
            )
        else:
            decision = s.why
        budget = "default" if c is None or c.max_soft_tokens is None else str(c.max_soft_tokens)
        lines.append(
            f"| {s.name} | {c.method if c else '?'} | {c.preset if c else '?'} | {c.response if c else '?'} | {budget} "
            f"| {serving} | {cost} | {rec} | {interval} | {decision} |"
        )
    checked = [s for s in choice.standings if s.measured_over_modelled is not None]
    if checked:
        lines += [
            "",
            f"Measured / modelled energy ({choice.modelled_for or 'target GPU'} model): "
            + ", ".join(f"{s.name} {s.measured_over_modelled:.2f}" for s in checked)
            + ".",
        ]
    for f in record.failures:
        lines.append(f"| {f.label} | | | | | | — | — | failed at {f.stage}: {f.error.splitlines()[0][:120]} |")
    pick = by_name.get(choice.pick or "")
    if pick is not None and pick.response != "default":
        lines += ["", f"Response policy: {RESPONSES[pick.response]} (`chat_template.jinja`); Gemma-4's thinking stays off."]
    if choice.base_cost is not None:
        lines += ["", f"The bf16 base cost {choice.base_cost:.2f} J ({choice.cost_label.removeprefix('J, ')}) on the same suite."]
    return "\n".join(lines)


def vllm_requirements(pick: Job, plan: Plan, config: OptimizeConfig) -> dict[str, Any]:
    """``choice.json``'s ``vllm`` block: the features the pick needs, the lowest version with all, the target."""
    from ecoquant.optimize.levers import FAMILY_FEATURES, candidate_features

    names = (
        FAMILY_FEATURES.get(plan.model_type or "", ())
        if pick.candidate is None
        else candidate_features(pick.candidate, plan.model_type)
    )
    return {
        "min_version": min_version_for(names),
        "features": {n: feature(n).min_version for n in names},
        "traced": [n for n in names if feature(n).verified],
        "target": config.target_vllm,
        "unchecked_on_target": [f.name for f in unchecked(config.target_vllm, names)],
    }


def vllm_section(req: Mapping[str, Any], speculative: Mapping[str, Any] | None) -> str:
    """The card's "Serving requirements" section: the lowest vLLM version, feature by feature, and the drafter."""
    lines = ["## Serving requirements", ""]
    if req["min_version"] is None:
        lines.append("No vLLM feature beyond a plain bf16 model.")
    else:
        lines.append(
            f"Needs **vLLM >= {req['min_version']}**: "
            + ", ".join(
                f"`{n}` from {v}" + ("" if n in req["traced"] else " (ecoquant's vLLM tests; older releases not checked)")
                for n, v in req["features"].items()
            )
            + f". Chosen for vLLM {req['target']} (`--target-vllm`)."
        )
    if speculative:
        lines += [
            "",
            f"Decodes with the drafting assistant in `{ASSISTANT_DIR}/` (`speculative_config` in `{CONFIG_FILE}`: "
            f"method `mtp`, {speculative['num_speculative_tokens']} draft tokens per step). Greedy answers are the "
            f"target's own. Measured on this target: {speculative['mean_accepted_per_step']:.2f} drafts accepted per "
            f"step ({speculative['acceptance_rate']:.0%} of drafts), so {1 + speculative['mean_accepted_per_step']:.2f} "
            "tokens per target pass.",
        ]
    return "\n".join(lines)


def copy_assistant(assistant: str, into: Path) -> None:
    """The assistant's files into ``into`` (hard links where possible): a local folder, or a hub id resolved here."""
    from ecoquant.models.loading import resolve_model

    source = resolve_model(assistant)
    into.mkdir(parents=True)
    for f in sorted(source.iterdir()):
        if f.is_file() and not f.name.startswith("."):
            link_or_copy(f, into / f.name)


def write_submission(store: Store, pick: Job, plan: Plan, record: RunRecord, choice: Choice, config: OptimizeConfig) -> Path:
    """Build ``DIR/submission`` for ``pick`` (see the module docstring); returns its path."""
    final = store.root / SUBMISSION
    tmp = store.root / f".{SUBMISSION}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in sorted(pick.folder.iterdir()):
        if f.is_file() and not f.name.startswith(".") and f.name not in SKIPPED:
            link_or_copy(f, tmp / f.name)
    e = config.eval
    c = pick.candidate
    serving = {} if c is None else dict(c.serving)
    drafted = c is not None and c.assistant is not None
    if drafted:
        assert c is not None and c.assistant is not None
        copy_assistant(c.assistant, tmp / ASSISTANT_DIR)
    req = vllm_requirements(pick, plan, config)
    serve_config = build_serve_config(
        pick.folder,
        ServeConfigOptions(
            suite=e.suite,
            size=e.size,
            limit=e.limit,
            prompt_variants=("default",),
            model=config.repo_id or ".",
            cache_dir=e.cache_dir,
            max_soft_tokens=None if c is None else c.max_soft_tokens,
            extra=serving,
            assistant=f"./{ASSISTANT_DIR}" if drafted else None,
            num_speculative_tokens=(c.num_speculative_tokens or DEFAULT_NUM_SPECULATIVE_TOKENS) if c else DEFAULT_NUM_SPECULATIVE_TOKENS,
            min_vllm=req["min_version"],
        ),
    )
    (tmp / CONFIG_FILE).write_text(serve_config.to_yaml(), encoding="utf-8")
    for name in (RESULTS_FILE, TABLE_FILE, PLOT_FILE, PARTS_FILE):
        if (store.root / name).is_file():
            shutil.copy2(store.root / name, tmp / name)
    hw = hardware(record)
    write_json_atomic(
        tmp / "choice.json", choice_record(choice, plan.grid, record.failures) | {"hardware": hw, "vllm": req}
    )
    run = next((r for r in record.runs if r.label == pick.label), None)
    speculative = None if run is None else run.speculative
    write_model_card(
        tmp,
        tmp,
        serve_config,
        results=tmp / RESULTS_FILE,
        overwrite=True,
        this_row=pick.label,
        title=config.repo_id or f"{plan.model.name}-{pick.label}",
        extra_sections=(choice_section(choice, plan, record, config, hw), vllm_section(req, speculative if drafted else None)),
    )
    public_paths(tmp, machine_paths(store, plan, pick))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def machine_paths(store: Store, plan: Plan, pick: Job) -> dict[str, str]:
    """This machine's paths a submission's records hold, each with the name to show instead."""
    from ecoquant.serve.checkpoint_facts import public_source

    recipe_file = pick.folder / "quant_recipe.json"
    source = json.loads(recipe_file.read_text(encoding="utf-8")).get("source") if recipe_file.is_file() else None
    source = source if isinstance(source, Mapping) else {"model": str(plan.model)}
    shown = public_source(source)
    names = {str(store.root.resolve()): store.root.resolve().name, str(store.root): store.root.name}
    for path in (plan.model, source.get("path"), source.get("model")):
        if path and Path(str(path)).expanduser().is_absolute():
            names[str(path)] = shown
            names[str(Path(str(path)).expanduser().resolve())] = shown
    return names
