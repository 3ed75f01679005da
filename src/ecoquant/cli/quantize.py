"""``ecoquant quantize``, ``inspect``, ``verify`` and ``presets``."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from typing import TYPE_CHECKING

from ecoquant.cli.app import app, console, guarded
from ecoquant.models.presets import AUTO_PRESETS, DEFAULT_PRESET, PRESETS
from ecoquant.quantize.scheme import SCHEMES, QuantScheme, named_scheme

if TYPE_CHECKING:
    from ecoquant.export.inspect import Inspection

# torch and transformers are imported inside the commands, so ``--help`` stays fast.

out_console = Console(soft_wrap=True)  # one line per result, also when piped


def scheme_from_options(group_size: int | None, observer: str, asymmetric: bool, name: str = "w4a16") -> QuantScheme:
    """The named scheme with the CLI's overrides; ``--group-size -1`` means one scale per output channel,
    no ``--group-size`` the scheme's own (128 for w4a16, per channel for W8A8)."""
    base = named_scheme(name)
    group = base.group_size if group_size is None else (None if group_size == -1 else group_size)
    return replace(base, group_size=group, observer=observer, symmetric=not asymmetric)  # type: ignore[arg-type]


@app.command("quantize")
@guarded
def quantize_cmd(
    model: Annotated[str, typer.Argument(help="Model folder (with config.json and safetensors) or hub id.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Checkpoint folder to create.")],
    scheme: Annotated[str, typer.Option(help=f"What the decoder's Linears become: {', '.join(SCHEMES)}. w4a16: int4 weights, 16-bit activations (the default; decode-bound serving). w8a8-fp8: FP8 E4M3 weights per output channel, FP8 activations per token at run time (rtn only; vLLM on Ada/Hopper). w8a8-int8: int8 weights per output channel, int8 activations per token (rtn, gptq, smoothquant or smoothquant-gptq; vLLM on Turing+ and x86 CPUs). W8A8 runs prefill on 8-bit tensor cores.")] = "w4a16",
    vision_scheme: Annotated[str, typer.Option(help=f"The vision tower and its embedder: bf16 (default) or {', '.join(SCHEMES)}, in a config group of its own, by RTN (e.g. --scheme w4a16 --vision-scheme w8a8-int8: the tower's prefill on 8-bit tensor cores). Refused where vLLM would build the towers in bf16 (Gemma-4: vision hidden/intermediate sizes not multiples of 64).")] = "bf16",
    audio_scheme: Annotated[str, typer.Option(help=f"The audio tower and its embedder: bf16 (default) or {', '.join(SCHEMES)}, as --vision-scheme.")] = "bf16",
    method: Annotated[str, typer.Option(help="rtn (data-free unless --observer hessian), gptq, awq, awq-gptq (AWQ smoothing, then GPTQ), smoothquant or smoothquant-gptq (w8a8-int8: activation outliers moved into the weights, folded into the norms, then RTN or GPTQ); calibrated ones run layer by layer and resume a killed run when rerun.")] = "rtn",
    observer: Annotated[str | None, typer.Option(help="Scale choice: minmax, mse (per-group clipping search), hessian (that search weighted by each input's calibration energy: output error, not weight error; calibrates, also with rtn), or grid (keep weights already on a symmetric int4 grid, e.g. QAT q4_0 with --group-size 32; rtn only). Default: hessian for the GPTQ methods (closest to bf16 outside the calibration text's domain), minmax otherwise.")] = None,
    group_size: Annotated[int | None, typer.Option(help="Input channels per scale: 32, 64, 128, or -1 per channel. Default: the scheme's (128 for w4a16; W8A8 is per channel only).")] = None,
    asymmetric: Annotated[bool, typer.Option(help="Store a zero point per group (default: symmetric).")] = False,
    preset: Annotated[str, typer.Option(help="Module selection: auto, gemma4-e, gemma4-e-mlpo, gemma4-e-int4-head, gemma4-e-int4-tables, text-decoder (see `ecoquant presets`).")] = "auto",
    embeddings: Annotated[str | None, typer.Option(help="Token tables (embeddings; Gemma-4 E: also the Per-Layer-Embedding table): bf16, int4 or int8 (default: the preset's). Quantized tables untie lm_head.")] = None,
    lm_head: Annotated[str | None, typer.Option(help="Output head: bf16, int4 or int8, written untied when quantized (default: the preset's).")] = None,
    target: Annotated[list[str] | None, typer.Option(help="Replace the preset's targets (name, class or re:pattern); repeatable.")] = None,
    ignore: Annotated[list[str] | None, typer.Option(help="Also keep these in bf16 (name or re:pattern); repeatable.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace --out if it exists.")] = False,
    calib: Annotated[str, typer.Option(help="gptq/awq calibration data: a hub dataset id, a .json/.jsonl/.txt file, or 'corpus' (shipped, offline). The default falls back to 'corpus' when the hub is unreachable.")] = "garage-bAInd/Open-Platypus",
    calib_samples: Annotated[int, typer.Option(help="gptq/awq: number of calibration samples.")] = 256,
    calib_length: Annotated[int, typer.Option(help="gptq/awq: tokens per calibration sample at most.")] = 2048,
    calib_multimodal: Annotated[bool, typer.Option(help="gptq/awq: make half the samples image+question pairs through the processor.")] = False,
    act_order: Annotated[bool, typer.Option(help="gptq: process columns by Hessian diagonal (static groups: no g_idx, Marlin-friendly); --no-act-order for column order.")] = True,
    dampening: Annotated[float | None, typer.Option(help="GPTQ methods: dampening as a fraction of the mean Hessian diagonal. Default: 0.1 (closer to bf16 outside the calibration text's domain than the reference's 0.01).")] = None,
    refine_steps: Annotated[int, typer.Option(help="GPTQ methods: rounds of code and scale refinement against each Linear's output error after GPTQ (0: off; e.g. 4).")] = 0,
    scale_passes: Annotated[int | None, typer.Option(help="GPTQ methods with act-order: 2 re-chooses each group's scale from the weights GPTQ's first pass rounded and keeps the pass with the lower layer error (1: scales from the original weights). Default: 2 for GPTQ methods with act-order, else 1.")] = None,
    smoothing_strength: Annotated[float | None, typer.Option(help="smoothquant methods: how much of each activation channel's range moves into the weights, 0..1 (SmoothQuant's alpha). Default: 0.5.")] = None,
    device: Annotated[str, typer.Option(help="Calibrated methods: where layers run during calibration: auto (CUDA when one is visible and the largest layer's estimated calibration memory fits its free memory, else cpu, with a line saying why), cpu, cuda or cuda:N (refused before any work when it would not fit).")] = "auto",
    calib_dtype: Annotated[str, typer.Option(help="gptq/awq: dtype of the calibration forwards: auto (the checkpoint's on GPU, and bf16 on CPUs with AVX512-BF16/AMX: about 2x faster forwards; float32 on other CPUs), float32 (exact against the references), or bfloat16. Solves and Hessians stay float32.")] = "auto",
    seed: Annotated[int, typer.Option(help="gptq/awq: seed for sample selection.")] = 42,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    verbose: Annotated[bool, typer.Option("--verbose", help="Off a terminal too: a line per module exported and per sample evaluated, and the progress bars and load messages of transformers and compressed-tensors.")] = False,
    allow_nonfinite: Annotated[bool, typer.Option("--allow-nonfinite", help="Quantize source weights holding NaN or inf instead of refusing them (recorded in quant_recipe.json).")] = False,
) -> None:
    """Quantize a model's language stack (int4 W4A16 by default; W8A8 FP8 or INT8 with --scheme) into a compressed-tensors checkpoint."""
    from ecoquant.api import QuantizeConfig, default_dampening, default_observer, default_scale_passes, quantize
    from ecoquant.calibrate.data import CalibrationConfig
    from ecoquant.export.footprint import human_bytes
    from ecoquant.errors import EcoquantError
    from ecoquant.quantize.defaults import GPTQ_METHODS, SMOOTHQUANT_METHODS
    from ecoquant.quantize.gptq import GPTQConfig
    from ecoquant.quantize.smoothquant import SmoothQuantConfig

    if dampening is not None and method not in GPTQ_METHODS:
        # The config cannot tell (GPTQConfig always holds a dampening); only here is "given" known.
        raise EcoquantError(f"--dampening is GPTQ's; use it with a GPTQ method ({', '.join(GPTQ_METHODS)}), not {method}")
    if smoothing_strength is not None and method not in SMOOTHQUANT_METHODS:
        raise EcoquantError(f"--smoothing-strength is SmoothQuant's; use it with --method smoothquant or smoothquant-gptq, not {method}")
    config = QuantizeConfig(
        method=method,  # type: ignore[arg-type]
        # FP8 has one observer; its default keeps the refusal of a calibrated method about the method.
        scheme=scheme_from_options(group_size, observer or ("minmax" if named_scheme(scheme).type == "float" else default_observer(method)), asymmetric, scheme),
        preset=preset,
        targets=tuple(target or ()),
        ignore=tuple(ignore or ()),
        overwrite=overwrite,
        calibration=CalibrationConfig(
            source=calib, num_samples=calib_samples, max_length=calib_length, seed=seed, multimodal=calib_multimodal
        ),
        gptq=GPTQConfig(dampening_frac=default_dampening(method) if dampening is None else dampening, act_order=act_order, refine_steps=refine_steps,
                        scale_passes=default_scale_passes(method, act_order) if scale_passes is None else scale_passes),
        smoothquant=SmoothQuantConfig() if smoothing_strength is None else SmoothQuantConfig(alpha=smoothing_strength),
        device=device,
        compute_dtype=calib_dtype,  # type: ignore[arg-type]
        embeddings=embeddings,  # type: ignore[arg-type]
        lm_head=lm_head,  # type: ignore[arg-type]
        allow_nonfinite=allow_nonfinite,
        vision_scheme=None if vision_scheme == "bf16" else named_scheme(vision_scheme),
        audio_scheme=None if audio_scheme == "bf16" else named_scheme(audio_scheme),
    )
    from ecoquant.progress import verbose as verbose_logs

    with verbose_logs(verbose):
        result = quantize(model, out, config, show_progress=progress)
    console.print(
        f"[green]wrote[/] {result.out}: {result.modules} modules, "
        f"{human_bytes(result.source_bytes)} -> {human_bytes(result.output_bytes)} in {result.seconds:.1f} s"
        + ("" if result.device is None else f", calibrated on {result.device}"),
        highlight=False,
    )
    out_console.print(str(result.out), highlight=False)


def render_inspection(info: Inspection) -> None:
    """Print an inspection as rich tables."""
    from ecoquant.export.footprint import human_bytes

    title = "quantized checkpoint" if info.quantized else f"plan with preset {info.preset}"
    table = Table(title=f"{info.path} ({title})")
    table.add_column("module kind")
    table.add_column("count", justify="right")
    for kind, count in info.module_kinds.items():
        table.add_row(kind, str(count))
    table.add_row("[bold]total", f"[bold]{info.module_count}")
    out_console.print(table)
    before = "unknown" if info.before_bytes is None else human_bytes(info.before_bytes)
    verb = "is" if info.quantized else "would be"
    out_console.print(f"weights: {before} before -> {human_bytes(info.after_bytes)} after ({verb})")
    if info.bytes_per_token:
        b = info.bytes_per_token
        out_console.print(
            f"bytes per decoded token (batch 1): {human_bytes(b['total_bytes'])} = decoder {human_bytes(b['decoder_bytes'])}"
            f" + head {human_bytes(b['head_bytes'])} + embedding rows {human_bytes(b['embedding_row_bytes'])};"
            f" {b['ratio_to_bf16']:.1%} of bf16's {human_bytes(b['bf16_total_bytes'])}",
            soft_wrap=True,
        )
    if info.cost_terms:
        render_cost_terms(info.cost_terms)
    if info.assistant:
        render_assistant_terms(info.assistant)
    if info.scheme:
        out_console.print(f"scheme: {json.dumps(info.scheme)}")
    if info.recipe:
        r = info.recipe
        out_console.print(
            f"recipe: method={r['method']} preset={r['preset']} source={r['source']['model']} "
            f"ecoquant={r['ecoquant']['version']} ({r['ecoquant']['git_sha'] or 'no git'}) "
            f"calibration={json.dumps(r['calibration'])}"
        )


def render_cost_terms(terms: dict[str, Any]) -> None:
    """The energy model's inputs (docs/energy.md): bytes per decode step, FLOPs per prompt token, vision per image."""
    from ecoquant.export.footprint import human_bytes

    d = terms["decode_bytes_per_token"]
    out_console.print(
        f"cost terms: decode reads {human_bytes(d['total_bytes'])} per step (decoder {human_bytes(d['decoder_bytes'])},"
        f" head {human_bytes(d['head_bytes'])}, embedding rows {human_bytes(d['embedding_row_bytes'])}) plus the KV cache",
        soft_wrap=True,
    )
    prefill = terms["prefill_flops_per_token"]
    precisions = terms["precisions"]
    linear = ", ".join(
        f"{c} {f / 1e9:.3f} ({'/'.join(precisions.get(c, {})) or 'bf16'})"
        for c, f in prefill.items()
        if c != "attention_per_context_token"
    )
    out_console.print(
        f"prefill GFLOPs per prompt token: {linear}; attention +{prefill['attention_per_context_token'] / 1e9:.6f}"
        f" per context token; head {terms['head_flops_per_position'] / 1e9:.3f} per scored position",
        soft_wrap=True,
    )
    if "vision_flops_per_image" in terms:
        per_image = ", ".join(f"{b}: {f / 1e9:,.1f}" for b, f in terms["vision_flops_per_image"].items())
        if "vision_reference_image" in terms:  # the family's own budget key; the image's size decides the work
            tokens = terms["vision_soft_tokens_per_image"]
            per_image = ", ".join(
                f"{b}: {f / 1e9:,.3f} ({tokens[b]} tokens)" for b, f in terms["vision_flops_per_image"].items()
            )
            where = f"a {terms['vision_reference_image']} image at each image budget"
        else:
            where = "image at each image budget (soft tokens)"
        out_console.print(f"vision GFLOPs per {where}: {per_image}", soft_wrap=True)


@app.command("inspect")
@guarded
def inspect_cmd(
    model: Annotated[str, typer.Argument(help="A quantized checkpoint, a model folder, or a config-only folder.")],
    preset: Annotated[str, typer.Option(help="For an unquantized model: the selection to price.")] = "auto",
    group_size: Annotated[int, typer.Option(help="For an unquantized model: group size to price (-1 per channel).")] = 128,
    embeddings: Annotated[str | None, typer.Option(help="For an unquantized model: token tables to price (bf16, int4, int8; default: the preset's).")] = None,
    lm_head: Annotated[str | None, typer.Option(help="For an unquantized model: head to price (bf16, int4, int8; default: the preset's).")] = None,
    assistant: Annotated[str | None, typer.Option("--assistant", help="A Gemma-4 MTP assistant folder (or hub id) to price beside MODEL: its cost per drafted token and what a drafted token reads next to one of MODEL's decode steps. MODEL may also be an assistant folder alone.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
) -> None:
    """Show what is (or would be) quantized, its weight footprint before and after, its recipe, and the energy model's cost terms.

    The cost terms are the bytes read per decode step, the FLOPs per prompt token and the vision FLOPs per
    image at each image budget. For a Gemma-4 MTP assistant (alone or with --assistant): its cost per
    drafted token (docs/energy.md).
    """
    from ecoquant.energy.speculative import is_assistant_folder
    from ecoquant.export.inspect import inspect_assistant, inspect_checkpoint
    from ecoquant.models.loading import resolve_model

    if assistant is None and is_assistant_folder(resolve_model(model)):
        record = inspect_assistant(model)
        if as_json:
            out_console.print_json(json.dumps({"path": record["path"], "assistant": record}))
        else:
            render_assistant_terms(record)
        return
    info = inspect_checkpoint(model, preset, scheme_from_options(group_size, "minmax", False), embeddings, lm_head)
    if assistant is not None:
        step = (info.cost_terms or {}).get("decode_bytes_per_token", {}).get("total_bytes")
        info = replace(info, assistant=inspect_assistant(assistant, step))
    if as_json:
        d = {k: v for k, v in info.__dict__.items() if k != "path"}
        out_console.print_json(json.dumps({"path": str(info.path), **d}))
    else:
        render_inspection(info)


@app.command("verify")
@guarded
def verify_cmd(
    checkpoint: Annotated[str, typer.Argument(help="Quantized checkpoint folder.")],
    base: Annotated[str, typer.Option("--base", help="The model it was made from (folder or hub id).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Load a checkpoint through transformers and compare it with its base: weight error and logits."""
    from ecoquant.export.verify import summary, verify

    v = verify(checkpoint, base)
    s = summary(v)
    if as_json:
        out_console.print_json(json.dumps({**s, "module_errors": v.module_errors}))
        return
    table = Table(title=f"{checkpoint} vs {base}")
    table.add_column("module")
    table.add_column("relative weight error", justify="right")
    for name, err in v.module_errors.items():
        table.add_row(name, f"{err:.4f}")
    out_console.print(table)
    out_console.print(
        f"modules: {s['modules']}, mean relative error {s['relative_error_mean']:.4f}, "
        f"max {s['relative_error_max']:.4f} ({s['worst_module']})\n"
        f"logits ({'image+text' if v.with_image else 'text'} prompt): max |diff| {s['logits_max_abs_diff']:.4f}, "
        f"mean |diff| {s['logits_mean_abs_diff']:.4f}, top-1 agreement {s['top1_agreement']:.3f}"
    )


@app.command("presets")
def presets_cmd() -> None:
    """List the module-selection presets."""
    table = Table(title="presets (auto picks by model type)")
    for col in ("name", "auto for", "targets", "ignore", "tables / head", "what"):
        table.add_column(col)
    for p in PRESETS.values():
        auto = [t for t, n in AUTO_PRESETS.items() if n == p.name] + (["any other"] if p.name == DEFAULT_PRESET else [])
        tables = f"{p.embeddings} / {p.lm_head}"
        table.add_row(p.name, ", ".join(auto), "\n".join(p.targets), "\n".join(p.ignore), tables, p.description)
    out_console.print(table)


def render_assistant_terms(record: dict[str, Any]) -> None:
    """An MTP assistant's cost per drafted token (docs/energy.md, "Speculative decoding")."""
    from ecoquant.export.footprint import human_bytes

    flops, nbytes = record["flops_per_drafted_token"], record["bytes_per_drafted_token"]
    head = (
        f"{record['head_candidates']:,} of {record['vocab']:,} vocabulary rows scored, centroid-masked"
        if record["head_candidates"] < record["vocab"]
        else f"all {record['vocab']:,} vocabulary rows scored"
    )
    layers = ", ".join(
        f"q {x['query_width']} over kv {x['kv_width']} ({'window ' + str(x['window']) if x['window'] else 'full'})"
        for x in record["layers"]
    )
    out_console.print(
        f"assistant {record['path']}: per drafted token, Linears {flops['linears'] / 1e6:.2f} MFLOP reading"
        f" {human_bytes(nbytes['linears'])}; head {flops['head'] / 1e6:.2f} MFLOP reading {human_bytes(nbytes['head'])}"
        f" ({head}); the target's embedding row {human_bytes(nbytes['input_embedding_row'])}",
        soft_wrap=True,
    )
    out_console.print(
        f"assistant attention reads the target's KV cache (no cache of its own): {len(record['layers'])} layers, {layers};"
        f" +{human_bytes(nbytes['kv_per_context_token'])} and +{flops['attention_per_context_token'] / 1e3:.1f} kFLOP"
        " per context token",
        soft_wrap=True,
    )
    if "bytes_vs_target_step" in record:
        out_console.print(
            f"a drafted token reads {record['bytes_vs_target_step']:.2%} of the weight bytes of one target decode step"
            " (batch 1, KV cache aside)",
            soft_wrap=True,
        )
