"""``ecoquant optimize``: thin over :func:`ecoquant.optimize.optimize`.

Options become an :class:`~ecoquant.optimize.OptimizeConfig`; ``--dry-run``
prints :func:`~ecoquant.optimize.plan_optimize`'s plan and stops. SIGTERM and
SIGHUP stop it as Ctrl-C does (:func:`~ecoquant.cli.app.guarded`), so a killed
run leaves only finished results behind (and a rerun reuses them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from ecoquant.cli.app import app, console, folder_arg, guarded
from ecoquant.cli.eval import parse_gpus
from ecoquant.energy.gpus import DEFAULT_GPU, GPUS
from ecoquant.eval.backends.base import GENERATION_PRESETS, generation_settings
from ecoquant.eval.builtin import DEFAULT_SIZE
from ecoquant.eval.runner import EvalConfig
from ecoquant.report.table import GATE_RECOVERY
from ecoquant.serve.vllm_features import TESTED_VLLM
from ecoquant.signals import exit_code


@app.command("optimize")
@guarded
def optimize_cmd(
    model: Annotated[str, typer.Argument(help="The bf16 base model: a folder or hub id.")],
    out_text: Annotated[str, typer.Option("--out", "-o", help="Working folder: checkpoints, evaluations, results, and submission/ (rerun to resume).")] = "ecoquant-optimize",
    grid: Annotated[Path | None, typer.Option(help="A grid YAML (grid: lists, candidates: one by one, calibration:): evaluate exactly that product on the whole suite. Default: the staged search over the model family's levers.")] = None,
    budget: Annotated[int | None, typer.Option(help="Staged search: at most this many candidate evaluations over all three stages (the base's are extra).")] = None,
    subset: Annotated[int, typer.Option(help="Staged search: samples per task in stages 1 and 2 (the first of each task, in the suite's seeded order).")] = 2,
    keep_weights: Annotated[int, typer.Option(help="Staged search: weights candidates whose serving levers stage 2 tries (the best by mean recovery per joule).")] = 2,
    finalists: Annotated[int, typer.Option(help="Staged search: candidates stage 3 runs on the whole suite.")] = 2,
    calib_samples: Annotated[int | None, typer.Option(help="Staged search: GPTQ/AWQ calibration windows (default: sized to the model, see docs/optimize.md).")] = None,
    calib_length: Annotated[int | None, typer.Option(help="Staged search: tokens per calibration window (default: sized to the model).")] = None,
    gate: Annotated[float, typer.Option(help="Minimum mean recovery in (0, 1] a candidate must keep.")] = GATE_RECOVERY,
    verbose: Annotated[bool, typer.Option("--verbose", help="Off a terminal too: a line per module exported and per sample evaluated, and the progress bars and load messages of transformers and compressed-tensors.")] = False,
    gate_confidence: Annotated[float | None, typer.Option(help="Gate on the lower bound of this bootstrap interval on mean recovery, e.g. 0.9 (default: on the point estimate; intervals shown at 90%).")] = None,
    repeats: Annotated[int, typer.Option(help="Energy windows per model after warm-up (NVML only): mean and min..max spread; a candidate within the cheapest one's spread ties with it and ties go to the higher mean recovery. Without NVML the suite runs once.")] = 3,
    backend: Annotated[str, typer.Option(help="transformers (load models here) or vllm (each model served by its own `vllm serve --config`).")] = "transformers",
    suite: Annotated[str, typer.Option(help="builtin, builtin-basic, builtin-realistic, doc, image, or a .jsonl path.")] = "builtin",
    size: Annotated[int, typer.Option(help="Built-in suite: pages, documents and charts per kind.")] = DEFAULT_SIZE,
    limit: Annotated[int | None, typer.Option(help="At most this many samples per task.")] = None,
    sampling: Annotated[str, typer.Option(help=f"Decoding preset: {', '.join(GENERATION_PRESETS)}.")] = "greedy",
    max_new_tokens: Annotated[int | None, typer.Option(help="Lower every task's token cap to this.")] = None,
    keep: Annotated[str, typer.Option(help="pick: delete the losers' checkpoints after the decision; all: keep them.")] = "all",
    gpus: Annotated[str | None, typer.Option(help="NVML GPU indices, e.g. 0,1: with more than one, a Ray instance on this machine (127.0.0.1, the ray extra) runs the quantizations and evaluations in parallel, one GPU each, each metered on its own GPU; one GPU runs here without Ray.")] = None,
    cluster: Annotated[str | None, typer.Option(help="Run every quantization and evaluation as a Ray task (one GPU, or one CPU, each) on the Ray cluster at this address, or `auto` for the one started on this machine by `ray start`; needs the ray extra and an --out every node shares (docs/optimize.md).")] = None,
    cluster_retries: Annotated[int, typer.Option(help="--cluster: times Ray re-places a job whose node or worker died; after that the run stops and a rerun runs only what did not finish.")] = 1,
    repo_id: Annotated[str | None, typer.Option(help="Write this as the submission's `model` (the hub id you publish under) instead of `.`.")] = None,
    device: Annotated[str, typer.Option(help="transformers backend: auto, cpu, cuda, cuda:N.")] = "auto",
    quant_device: Annotated[str, typer.Option(help="Where GPTQ/AWQ calibrate: auto (CUDA when one is visible and the calibration fits its free memory, else cpu, with a line saying why), cpu, cuda or cuda:N.")] = "auto",
    batch_size: Annotated[int, typer.Option(help="transformers backend: requests per generate call.")] = 8,
    concurrency: Annotated[int, typer.Option(help="vllm backend: requests in flight at once.")] = 8,
    warmup: Annotated[int, typer.Option(help="Warm-up requests per model, before its energy window.")] = 2,
    idle_seconds: Annotated[float, typer.Option(help="Idle-power sampling per GPU before the first model (0 to skip).")] = 5.0,
    vllm_python: Annotated[Path | None, typer.Option(help="vllm backend: Python interpreter with vLLM.")] = None,
    vllm_arg: Annotated[list[str] | None, typer.Option("--vllm-arg", help="vllm backend: extra argument for every server (repeatable).")] = None,
    server_timeout: Annotated[float, typer.Option(help="vllm backend: seconds a server may take to become ready.")] = 900.0,
    cache_dir: Annotated[Path | None, typer.Option(help="Cache folder for the built-in suite's images.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan (candidates, what is cached, disk needed) and stop.")] = False,
    target_gpu: Annotated[str, typer.Option(help=f"GPU the modelled energy is for ({', '.join(GPUS)}); the challenge serves on an L4.")] = DEFAULT_GPU,
    target_concurrency: Annotated[int, typer.Option(help="Requests the target server runs at once, for the modelled energy (1: one at a time, the worst case).")] = 1,
    allow_nonfinite: Annotated[bool, typer.Option("--allow-nonfinite", help="Quantize source weights holding NaN or inf instead of refusing them (recorded in each quant_recipe.json).")] = False,
    target_vllm: Annotated[str, typer.Option(help="The vLLM version the submission will be served with: levers needing a feature it is known to lack (e.g. Gemma-4 MTP before 0.21.0) are left out; the submission states the lowest version its pick needs.")] = TESTED_VLLM,
    assistant: Annotated[str | None, typer.Option(help="Staged search: the drafting assistant (folder or hub id) for the MTP lever (Gemma-4). Default: a `<model>-assistant` folder beside a local model, or the published `<hub-id>-assistant`.")] = None,
    no_assistant: Annotated[bool, typer.Option("--no-assistant", help="Staged search: no MTP lever, even when an assistant is found beside the model.")] = False,
) -> None:
    """Search the levers that move suite energy (weights, then serving, then finalists on the whole suite), pick the cheapest candidate that keeps the gate, write DIR/submission."""
    out = folder_arg(out_text)
    from ecoquant.export.footprint import human_bytes  # these pull in torch: only when the command runs
    from ecoquant.optimize import OptimizeConfig, load_grid, optimize, plan_optimize
    from ecoquant.optimize.plan import SearchConfig, calibration_device_note

    config = OptimizeConfig(
        out=out,
        grid=load_grid(grid) if grid is not None else None,
        gate=gate,
        gate_confidence=gate_confidence,
        backend=backend,  # type: ignore[arg-type]
        eval=EvalConfig(
            suite=suite,
            size=size,
            limit=limit,
            cache_dir=cache_dir,
            device=device,
            batch_size=batch_size,
            concurrency=concurrency,
            generation=generation_settings(sampling, max_new_tokens=max_new_tokens),
            warmup_requests=warmup,
            idle_seconds=idle_seconds,
            repeats=repeats,
            target_gpu=target_gpu,
            target_concurrency=target_concurrency,
        ),
        quant_device=quant_device,
        keep=keep,  # type: ignore[arg-type]
        gpus=parse_gpus(gpus) or (),
        cluster=cluster,
        cluster_retries=cluster_retries,
        repo_id=repo_id,
        vllm_python=vllm_python,
        vllm_args=tuple(vllm_arg or ()),
        server_timeout_s=server_timeout,
        allow_nonfinite=allow_nonfinite,
        search=SearchConfig(
            budget=budget,
            subset=subset,
            keep=keep_weights,
            finalists=finalists,
            calib_samples=calib_samples,
            calib_length=calib_length,
            assistant=assistant,
            discover_assistant=not no_assistant,
        ),
        target_vllm=target_vllm,
    )
    if dry_run and grid is None:
        _print_preview(model, config)
        return
    if dry_run:
        plan, store, _, _ = plan_optimize(model, config)
        table = Table(title=f"optimize plan for {plan.model.name} ({plan.grid.source} grid) in {store.root}")
        rows = plan.rows()
        for column in rows[0]:
            table.add_column(column)
        for row in rows:
            table.add_row(*(str(v) for v in row.values()))
        # a plan is read in logs too: never truncate a candidate's name to the terminal's width
        Console(stderr=True, width=max(console.width, 200)).print(table)
        note = calibration_device_note(plan.model, [j.candidate for j in plan.quantize if j.candidate is not None],
                                       plan.grid.calibration, config.quant_device)
        if note:
            console.print(note, highlight=False, soft_wrap=True)
        for note in plan.vllm_notes:
            console.print(note, highlight=False, soft_wrap=True)
        to_run = sum(1 for j in plan.jobs if j.eval_key not in plan.cached_evals)
        console.print(
            f"{len(plan.quantize)} checkpoints to write (about {human_bytes(plan.disk_needed_bytes)} of disk), "
            f"{to_run} of {len(plan.jobs)} evaluations to run; "
            + (
                "energy measured by NVML."
                if plan.energy_measured
                else "energy not measured (no NVML device): ranked by modelled energy where the record has it, never by wall time."
            ),
            highlight=False,
            soft_wrap=True,
        )
        return
    try:
        from ecoquant.progress import verbose as verbose_logs

        with verbose_logs(verbose):
            result = optimize(model, config, console=console)
    except KeyboardInterrupt as exc:
        console.print(f"[yellow]stopped[/] ({exc or 'Ctrl-C'}): finished work is kept in {out}; rerun the same command to resume", highlight=False, soft_wrap=True)
        raise typer.Exit(code=exit_code(exc)) from None
    typer.echo((result.results.parent / "report.md").read_text(encoding="utf-8"))
    console.print(result.choice.summary(), highlight=False, soft_wrap=True)
    if result.submission is None:
        raise typer.Exit(code=1)
    console.print(f"[green]submission:[/] {result.submission} (vllm serve --config vllm_config.yaml, from inside it)", highlight=False, soft_wrap=True)


def _print_preview(model: str, config: object) -> None:
    """The staged search's dry run: its stages, their evaluations and the time estimate."""
    from ecoquant.optimize.stages import preview

    p = preview(model, config)  # type: ignore[arg-type]
    table = Table(title=f"optimize: staged search for {model} in {config.out}")  # type: ignore[attr-defined]
    for column in ("stage", "evaluations", "samples each", "checkpoints to write", "cached", "what"):
        table.add_column(column)
    for s in p.stages:
        table.add_row(s.name, str(s.evaluations), str(s.samples), str(s.quantizations), str(s.cached), s.what)
    Console(stderr=True, width=max(console.width, 200)).print(table)
    for note in p.notes:
        console.print(note, highlight=False, soft_wrap=True)
    c = p.calibration
    estimate = "no estimate" if p.seconds is None else f"about {p.seconds / 60:.1f} min"
    console.print(
        f"{p.evaluations} candidate evaluations at most (+ the base once per suite setting); {estimate} ({p.basis}); "
        f"calibration {c.num_samples} x {c.max_length} tokens ({c.source}); levers: {p.levers_note}.",
        highlight=False,
        soft_wrap=True,
    )
    if p.device_note:
        console.print(p.device_note, highlight=False, soft_wrap=True)
    address = config.cluster  # type: ignore[attr-defined]
    if address is not None:
        from ecoquant.optimize.cluster import connect, spread_estimate

        console.print(spread_estimate(connect(address), p.seconds), highlight=False, soft_wrap=True)
    elif len(config.gpus) > 1:  # type: ignore[attr-defined]
        from ecoquant.optimize.cluster import spread_text

        gpus = config.gpus  # type: ignore[attr-defined]
        console.print(spread_text(p.seconds, len(gpus), "GPUs", f"on --gpus {','.join(map(str, gpus))}"),
                      highlight=False, soft_wrap=True)
