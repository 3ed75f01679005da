"""Write what serving needs into a checkpoint folder: ``vllm_config.yaml`` and the model card.

Above both :mod:`ecoquant.serve.config` (the config) and
:mod:`ecoquant.serve.model_card` (the card, which reads the config), so
neither imports the other's writer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ecoquant.errors import EcoquantError
from ecoquant.models.integrity import check_checkpoint
from ecoquant.serve.config import (
    CONFIG_FILE,
    ServeConfig,
    ServeConfigOptions,
    build_serve_config,
    checkpoint_config,
    quantization_format,
)
from ecoquant.serve.model_card import check_card_target, write_model_card


@dataclass(frozen=True)
class ServeConfigResult:
    """What ``serve-config`` wrote."""

    config_path: Path
    card_path: Path | None
    config: ServeConfig


def write_serve_config(
    path: str | Path,
    options: ServeConfigOptions = ServeConfigOptions(),
    *,
    out: str | Path | None = None,
    results: str | Path | None = None,
    card: bool = True,
    overwrite: bool = False,
) -> ServeConfigResult:
    """Write ``vllm_config.yaml`` (and the model card ``README.md``) for the checkpoint at ``path``.

    ``out`` defaults to ``path`` itself (the deliverable is the folder).
    ``results`` is an ``ecoquant eval`` ``results.json`` whose table goes into
    the card. A plain bf16 folder without ``nf4`` gets a config but no card
    (there is nothing compressed to describe). A README.md that ecoquant did
    not write is never replaced unless ``overwrite``.
    """
    model_path = Path(path).expanduser()
    if not (model_path / "config.json").is_file():
        raise EcoquantError(f"{model_path} is not a model folder (no config.json); pass a checkpoint folder")
    check_checkpoint(model_path)
    out_dir = Path(out).expanduser() if out is not None else model_path
    with_card = card and (options.nf4 or quantization_format(checkpoint_config(model_path)) is not None)
    if with_card:
        check_card_target(out_dir, overwrite)  # refuse before writing anything
    serve_config = build_serve_config(model_path, options)
    out_dir.mkdir(parents=True, exist_ok=True)
    config_path = out_dir / CONFIG_FILE
    config_path.write_text(serve_config.to_yaml(), encoding="utf-8")
    card_path = None
    if with_card:
        card_path = write_model_card(model_path, out_dir, serve_config, nf4=options.nf4, results=results, overwrite=overwrite)
    return ServeConfigResult(config_path, card_path, serve_config)
