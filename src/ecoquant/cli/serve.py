"""``ecoquant serve-config`` and ``ecoquant serve``.

Thin: options become a :class:`~ecoquant.serve.config.ServeConfigOptions` or
:class:`~ecoquant.serve.launch.ServeOptions`, then
:func:`~ecoquant.serve.write.write_serve_config` or
:func:`~ecoquant.serve.launch.serve` does the work.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from ecoquant.cli.app import app, console, guarded
from ecoquant.errors import EcoquantError
from ecoquant.eval.backends.base import GENERATION_PRESETS
from ecoquant.eval.builtin import DEFAULT_SIZE
from ecoquant.eval.economy import PROMPT_VARIANTS
from ecoquant.serve.config import MARGIN_FRACTION, ServeConfigOptions
from ecoquant.serve.launch import VLLM_PYTHON_ENV, ServeOptions, serve


def parse_options(items: list[str] | tuple[str, ...]) -> dict[str, object]:
    """``["max_num_seqs=8", "speculative_config={method: mtp}"]`` -> a dict, each value read as YAML."""
    import yaml

    out: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise EcoquantError(f"--option takes KEY=VALUE (e.g. max_num_seqs=8), not {item!r}")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise EcoquantError(f"--option {key}: {value!r} is not a YAML value") from None
    return out


@app.command("serve-config")
@guarded
def serve_config_cmd(
    model: Annotated[Path, typer.Argument(help="The checkpoint folder (W4A16 from ecoquant quantize, or a bf16 base with --nf4).")],
    nf4: Annotated[bool, typer.Option("--nf4", help="The NF4 runtime baseline: add quantization/load_format: bitsandbytes (MODEL is the bf16 base).")] = False,
    suite: Annotated[str, typer.Option(help="Suite whose longest request sets max_model_len: builtin, doc, image, or a .jsonl path.")] = "builtin",
    size: Annotated[int, typer.Option(help="Built-in suite: pages, documents and charts per kind.")] = DEFAULT_SIZE,
    limit: Annotated[int | None, typer.Option(help="At most this many samples per task are measured.")] = None,
    prompt_variant: Annotated[list[str] | None, typer.Option("--prompt-variant", help="Prompt variants to measure (repeatable; default: all of them).")] = None,
    sampling: Annotated[str, typer.Option(help=f"Generation defaults for requests that name none: {', '.join(GENERATION_PRESETS)}.")] = "greedy",
    max_model_len: Annotated[int | None, typer.Option(help="Set max_model_len by hand instead of measuring the suite.")] = None,
    max_images: Annotated[int, typer.Option(help="Images per request, with --max-model-len (otherwise taken from the suite).")] = 1,
    margin: Annotated[float, typer.Option(help="Head-room over the longest measured request, as a fraction.")] = MARGIN_FRACTION,
    model_id: Annotated[str | None, typer.Option("--model-id", help="Write this as `model` (e.g. the hub id you publish under) instead of the folder's path.")] = None,
    results: Annotated[Path | None, typer.Option(help="An `ecoquant eval` results.json whose table goes into the model card.")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Folder for vllm_config.yaml and README.md (default: MODEL itself).")] = None,
    card: Annotated[bool, typer.Option("--card/--no-card", help="Also write the model card README.md.")] = True,
    overwrite_card: Annotated[bool, typer.Option("--overwrite-card", help="Replace a README.md that ecoquant did not write.")] = False,
    cache_dir: Annotated[Path | None, typer.Option(help="Cache folder for the built-in suite's images.")] = None,
    max_soft_tokens: Annotated[int | None, typer.Option(help="Image-token budget per image, written as mm_processor_kwargs (Gemma-4: 70, 140, 280, 560, 1120); max_model_len is measured with it.")] = None,
    option: Annotated[list[str] | None, typer.Option("--option", help="A vLLM engine argument for the file, KEY=VALUE (VALUE read as YAML, e.g. max_num_seqs=8 or 'speculative_config={method: mtp}'); repeatable.")] = None,
) -> None:
    """Write vllm_config.yaml (max_model_len measured on a suite) and a model card for a checkpoint."""
    from ecoquant.serve.write import write_serve_config  # the card's footprint code pulls in torch: only when run

    options = ServeConfigOptions(
        suite=suite,
        size=size,
        limit=limit,
        prompt_variants=tuple(prompt_variant or PROMPT_VARIANTS),
        nf4=nf4,
        sampling=sampling,
        max_model_len=max_model_len,
        max_images=max_images,
        margin=margin,
        model=model_id,
        cache_dir=cache_dir,
        max_soft_tokens=max_soft_tokens,
        extra=parse_options(option or ()),
    )
    with console.status("measuring the suite's prompts with the checkpoint's processor"):
        result = write_serve_config(model, options, out=out, results=results, card=card, overwrite=overwrite_card)
    typer.echo(result.config_path.read_text(encoding="utf-8"))
    wrote = f"{result.config_path}" + (f", {result.card_path}" if result.card_path else " (no card: the folder is not quantized)")
    console.print(f"[green]wrote[/] {wrote}", highlight=False)


@app.command("serve")
@guarded
def serve_cmd(
    model: Annotated[str, typer.Argument(help="The checkpoint folder to serve (its vllm_config.yaml is used when present); also the served model name unless --served-model-name.")],
    backend: Annotated[str, typer.Option(help="auto (vLLM if installed, else transformers), vllm, or transformers.")] = "auto",
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    served_model_name: Annotated[str | None, typer.Option(help="Model name clients send (default: MODEL as given).")] = None,
    config: Annotated[Path | None, typer.Option(help="A vllm_config.yaml (default: MODEL's own, else one is built now).")] = None,
    nf4: Annotated[bool, typer.Option("--nf4", help="Without a config: serve the NF4 runtime baseline of a bf16 MODEL.")] = False,
    vllm_python: Annotated[Path | None, typer.Option(help=f"Python interpreter with vLLM installed (default: ${VLLM_PYTHON_ENV}, this one, or PATH).")] = None,
    vllm_arg: Annotated[list[str] | None, typer.Option("--vllm-arg", help="Extra argument passed to vLLM last (repeatable, e.g. --vllm-arg=--max-num-seqs=4).")] = None,
    device: Annotated[str, typer.Option(help="transformers fallback: auto, cpu, cuda, cuda:N.")] = "auto",
    max_soft_tokens: Annotated[int | None, typer.Option(help="transformers fallback: image-token budget per image (default: the config's mm_processor_kwargs, else the checkpoint's own).")] = None,
) -> None:
    """Serve a checkpoint over the OpenAI API: vLLM with its config if installed, else the transformers server."""
    options = ServeOptions(
        backend=backend,  # type: ignore[arg-type]
        host=host,
        port=port,
        served_name=served_model_name,
        config=config,
        nf4=nf4,
        vllm_python=vllm_python,
        vllm_args=tuple(vllm_arg or ()),
        device=device,
        max_soft_tokens=max_soft_tokens,
    )
    code = serve(model, options, log=sys.stderr)
    if code != 0:
        raise typer.Exit(code=code)
