"""``ecoquant eval``, ``ecoquant report`` and ``ecoquant prompt-variants``.

Thin: options become an :class:`~ecoquant.eval.runner.EvalConfig`, then
:func:`~ecoquant.eval.runner.run_eval` and
:func:`~ecoquant.report.render_report` do the work.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ecoquant.cli.app import app, console, folder_arg, guarded
from ecoquant.energy.gpus import DEFAULT_GPU, GPUS
from ecoquant.energy.nvml import NvmlMeter, open_meter
from ecoquant.energy.replay import save_readings
from ecoquant.errors import EcoquantError
from ecoquant.eval.backends.base import DEFAULT_NUM_SPECULATIVE_TOKENS, GENERATION_PRESETS, generation_settings
from ecoquant.eval.builtin import DEFAULT_SIZE
from ecoquant.eval.economy import PROMPT_VARIANTS
from ecoquant.eval.runner import EvalConfig, RunRecord, check_sources, model_refs, open_backend, run_eval
from ecoquant.eval.bootstrap import DEFAULT_CONFIDENCE, BootstrapSpec
from ecoquant.report import RESULTS_FILE, render_report
from ecoquant.report.table import check_confidence

READINGS_FILE = "energy_readings.json"
SERVERS_DIR = "servers"
"""Under ``--out``: one folder per model served by ``--backend vllm`` (its config and server log)."""


def parse_gpus(text: str | None) -> tuple[int, ...] | None:
    """``"0,1"`` -> ``(0, 1)``; None means the visible GPUs."""
    if text is None or not text.strip():
        return None
    try:
        return tuple(int(p) for p in text.split(","))
    except ValueError:
        raise EcoquantError(f"--gpus takes NVML indices like 0 or 0,1, not {text!r}") from None


@app.command("eval")
@guarded
def eval_cmd(
    base: Annotated[str, typer.Option("--base", help="Base model: folder or hub id (with --backend openai: its served name).")],
    variant: Annotated[list[str] | None, typer.Option("--variant", help="A variant to compare with the base: a checkpoint folder, nf4:MODEL (bitsandbytes NF4 at load time), or a served name; repeatable.")] = None,
    suite: Annotated[str, typer.Option(help="builtin (offline, generated; builtin-basic or builtin-realistic for one part), doc or image (Hugging Face), or a .jsonl path.")] = "builtin",
    out_text: Annotated[str, typer.Option("--out", "-o", help="Folder for results.json, report.md and pareto.png.")] = "ecoquant-eval",
    backend: Annotated[str, typer.Option(help="transformers (load models here), openai (an OpenAI-compatible server), or vllm (each model served in turn by its own `vllm serve --config`, as the challenge serves it).")] = "transformers",
    url: Annotated[list[str] | None, typer.Option("--url", help="Server URL for --backend openai: one for all models, or one per model (base first).")] = None,
    prompt_variant: Annotated[list[str] | None, typer.Option("--prompt-variant", help="How to ask (see `ecoquant prompt-variants`); repeatable, each model runs each.")] = None,
    sampling: Annotated[str, typer.Option(help=f"Decoding preset: {', '.join(GENERATION_PRESETS)} (gemma = temperature 1.0, top_p 0.95, top_k 64).")] = "greedy",
    seed: Annotated[int, typer.Option(help="Sampling seed (recorded; no effect on greedy decoding).")] = 0,
    max_new_tokens: Annotated[int | None, typer.Option(help="Lower every task's token cap to this (default: each task's own).")] = None,
    size: Annotated[int, typer.Option(help="Built-in suite: pages, documents and charts per kind.")] = DEFAULT_SIZE,
    limit: Annotated[int | None, typer.Option(help="At most this many samples per task.")] = None,
    device: Annotated[str, typer.Option(help="transformers backend: auto, cpu, cuda, cuda:N.")] = "auto",
    dtype: Annotated[str, typer.Option(help="transformers backend: bfloat16, float16 or float32.")] = "bfloat16",
    batch_size: Annotated[int, typer.Option(help="transformers backend: requests per generate call.")] = 8,
    concurrency: Annotated[int, typer.Option(help="openai backend: requests in flight at once.")] = 8,
    warmup: Annotated[int, typer.Option(help="Warm-up requests per model, sent before the energy window.")] = 2,
    idle_seconds: Annotated[float, typer.Option(help="Idle-power sampling before the suite (GPU only; 0 to skip).")] = 5.0,
    gpus: Annotated[str | None, typer.Option(help="NVML GPU indices to meter, e.g. 0,1 (default: the visible GPUs).")] = None,
    cache_dir: Annotated[Path | None, typer.Option(help="Cache folder for the built-in suite's images.")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    verbose: Annotated[bool, typer.Option("--verbose", help="Off a terminal too: a line per module exported and per sample evaluated, and the progress bars and load messages of transformers and compressed-tensors.")] = False,
    vllm_python: Annotated[Path | None, typer.Option(help="vllm backend: Python interpreter with vLLM (default: $ECOQUANT_VLLM_PYTHON, this one, or PATH).")] = None,
    vllm_arg: Annotated[list[str] | None, typer.Option("--vllm-arg", help="vllm backend: extra argument for every server, appended last (repeatable).")] = None,
    server_timeout: Annotated[float, typer.Option(help="vllm backend: seconds a server may take to become ready.")] = 900.0,
    max_soft_tokens: Annotated[int | None, typer.Option(help="Image-token budget per image (Gemma-4: 70, 140, 280, 560 or 1120; default: the checkpoint's own).")] = None,
    repeats: Annotated[int, typer.Option(help="Energy windows per model after warm-up (NVML only; the report shows their mean and min..max spread). Without NVML the suite runs once.")] = 3,
    gate_confidence: Annotated[float | None, typer.Option(help="Gate on the lower bound of this bootstrap interval on mean recovery, e.g. 0.9 (default: on the point estimate; intervals shown at 90%).")] = None,
    target_gpu: Annotated[str, typer.Option(help=f"GPU the modelled energy is for ({', '.join(GPUS)}); the challenge serves on an L4.")] = DEFAULT_GPU,
    target_concurrency: Annotated[int, typer.Option(help="Requests the target server runs at once, for the modelled energy (1: one at a time, the worst case).")] = 1,
    assistant: Annotated[str | None, typer.Option("--assistant", metavar="PATH|HUB-ID", help="A drafting assistant (Gemma-4 MTP, e.g. google/gemma-4-E4B-it-assistant) every model decodes with; results.json then records its measured acceptance. transformers backend; one request at a time.")] = None,
    num_speculative_tokens: Annotated[int, typer.Option("--num-speculative-tokens", metavar="K", help="With --assistant: tokens it drafts per target step.")] = DEFAULT_NUM_SPECULATIVE_TOKENS,
) -> None:
    """Evaluate a base model and its variants: scores, recovery with bootstrap intervals, tokens, wall time and energy, with a report."""
    out = folder_arg(out_text)
    check_confidence(gate_confidence)
    config = EvalConfig(
        suite=suite,
        size=size,
        limit=limit,
        cache_dir=cache_dir,
        backend=backend,  # type: ignore[arg-type]
        urls=tuple(url or ()),
        device=device,
        dtype=dtype,
        batch_size=batch_size,
        concurrency=concurrency,
        generation=generation_settings(sampling, seed=seed, max_new_tokens=max_new_tokens),
        prompt_variants=tuple(prompt_variant or ("default",)),
        warmup_requests=warmup,
        idle_seconds=idle_seconds,
        max_soft_tokens=max_soft_tokens,
        repeats=repeats,
        target_gpu=target_gpu,
        target_concurrency=target_concurrency,
        assistant=assistant,
        num_speculative_tokens=num_speculative_tokens,
    )
    check_sources(model_refs(base, tuple(variant or ())), config)  # a wrong path: one line, before anything is drawn
    factory = open_backend
    if backend == "vllm":
        from ecoquant.serve.config import ServeConfigOptions
        from ecoquant.serve.vllm_backend import VllmServerOptions, vllm_backend_factory

        serve_options = ServeConfigOptions(
            suite=suite,
            size=size,
            limit=limit,
            prompt_variants=config.prompt_variants,
            cache_dir=cache_dir,
            max_soft_tokens=max_soft_tokens,
        )
        factory = vllm_backend_factory(
            VllmServerOptions(
                log_dir=out / SERVERS_DIR,
                serve_config=serve_options,
                vllm_python=vllm_python,
                vllm_args=tuple(vllm_arg or ()),
                ready_timeout_s=server_timeout,
            )
        )
    meter = open_meter(parse_gpus(gpus))
    if not meter.available:
        console.print(
            f"[yellow]energy: not measured ({meter.description})[/]; reporting wall time and tokens; the suite runs"
            " once per model (--repeats needs a meter)",
            highlight=False,
        )
    spec = BootstrapSpec(gate_confidence or DEFAULT_CONFIDENCE)
    try:
        from ecoquant.progress import verbose as verbose_logs

        with verbose_logs(verbose):
            record = run_eval(
                base, tuple(variant or ()), config, meter=meter, backend_factory=factory, show_progress=progress, intervals=spec
            )
    finally:
        if isinstance(meter, NvmlMeter):
            meter.close()
    results = record.save(out / RESULTS_FILE)
    if isinstance(meter, NvmlMeter):
        save_readings(meter.readings, out / READINGS_FILE)
    files = render_report(record, out, confidence=gate_confidence)
    typer.echo(files.table.read_text(encoding="utf-8"))
    extra = "" if files.parts is None else f", {files.parts}"
    console.print(f"[green]wrote[/] {results}, {files.table}, {files.plot}{extra}", highlight=False)
    if record.failures:
        for failure in record.failures:
            console.print(f"[bold red]failed:[/] {failure.error}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=1)


@app.command("report")
@guarded
def report_cmd(
    results: Annotated[Path, typer.Argument(help="A results.json written by `ecoquant eval`.")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Folder for report.md and pareto.png (default: beside results.json).")] = None,
    gate_confidence: Annotated[float | None, typer.Option(help="Gate on the lower bound of this bootstrap interval on mean recovery, e.g. 0.9 (default: on the point estimate).")] = None,
) -> None:
    """Re-render the table and plot of an evaluation from its results.json."""
    check_confidence(gate_confidence)
    record = RunRecord.load(results)
    files = render_report(record, out if out is not None else results.expanduser().parent, confidence=gate_confidence)
    typer.echo(files.table.read_text(encoding="utf-8"))
    console.print(f"[green]wrote[/] {files.table}, {files.plot}", highlight=False)


@app.command("prompt-variants")
def prompt_variants_cmd() -> None:
    """List the prompt variants `ecoquant eval --prompt-variant` accepts."""
    table = Table(title="prompt variants (--prompt-variant NAME)")
    table.add_column("name", no_wrap=True)
    table.add_column("how the question is asked")
    for v in PROMPT_VARIANTS.values():
        table.add_row(v.name, v.description)
    console.print(table)
