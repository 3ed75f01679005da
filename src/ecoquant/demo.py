"""The embedded default: the decision ecoquant exists to make, on the trained tiny Gemma-4 model, offline.

``ecoquant demo`` runs :func:`ecoquant.optimize.optimize`'s staged search on
the project's trained tiny Gemma-4 vision-language model (vision and audio
towers, PLE, KV-sharing; trained from scratch to read the built-in basic
pages, see :mod:`ecoquant.fixtures.tiny_vlm`):

1. every weights candidate of the family's levers (:mod:`ecoquant.optimize.levers`:
   W4A16 by RTN, GPTQ and AWQ + GPTQ, the untied int4 head, the seed's module
   set, W8A8 INT8 and FP8 by RTN) on a seeded subset of the pages;
2. the serving levers (image budget, short response, answer cap) on the best
   few by recovery per joule, and the MTP lever: the same weights decoding
   with the shipped tiny drafting assistant
   (:func:`ecoquant.fixtures.tiny_assistant.tiny_vlm_assistant_path`), its
   acceptance measured on each candidate's own quantized target;
3. the finalists on every page;

then applies the 80% gate to each candidate's mean recovery (with its
bootstrap interval), ranks those that pass by energy (modelled for the L4
when no NVML device measures it: never by CPU wall time), and writes the
submission folder. The levers are chosen so that recovery really differs:
the tiny model reads its pages at its own image budget (70 soft tokens) and
loses most of its accuracy at another, so at least one candidate falls
below the gate while others keep 100%.

Beside the search, :func:`target_acceptance` measures the assistant's
acceptance on the bf16 target and on a W4A16 and a W8A8 target (the stage-1
checkpoints, reused), at the lever's probe k: how much quantizing the target
costs the drafter, which the search then weighs against the energy it saves.

Everything is kept in ``out`` under keys of what determines it (the
optimize store), so a rerun reuses every checkpoint and evaluation. GPTQ
calibrates out of domain: on the shipped text corpus and on the realistic
charts and documents, never on the basic pages it is scored on.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from ecoquant.calibrate.data import CORPUS_SOURCE, CalibrationConfig
from ecoquant.eval.backends.base import generation_settings
from ecoquant.eval.runner import EvalConfig
from ecoquant.fixtures.tiny_assistant import tiny_vlm_assistant_path
from ecoquant.fixtures.tiny_vlm import tiny_vlm_path
from ecoquant.optimize import Grid, OptimizeConfig, OptimizeResult, optimize
from ecoquant.optimize.levers import family_levers
from ecoquant.optimize.plan import SearchConfig

#: Calibration for the demo's GPTQ: 32 samples of 256 tokens (the size rule's tier for this model,
#: :mod:`ecoquant.calibrate.sizing`), half text, half images, out of domain and offline.
DEMO_CALIBRATION = CalibrationConfig(source=CORPUS_SOURCE, num_samples=32, max_length=256, multimodal=True)

#: Evaluation pages per basic task (six tasks, one question each: 24 samples in the final stage).
DEMO_PAGES = 4

#: The demo's evaluation: the basic pages the model never trained on, short answers, greedy.
DEMO_EVAL = EvalConfig(
    suite="builtin-basic", size=DEMO_PAGES, generation=generation_settings(max_new_tokens=8), idle_seconds=0.0
)


#: The stage-1 weights whose targets the acceptance table compares with the bf16 one: W4A16 and W8A8.
ACCEPTANCE_TARGETS: tuple[str, ...] = ("gptq-auto", "rtn-auto-w8a8-int8")


def demo_config(out: Path) -> OptimizeConfig:
    """The demo's settings: optimize's defaults (gate 0.8, modelled L4 energy, staged search) on the basic
    pages, with the shipped tiny assistant for the MTP lever."""
    search = SearchConfig(calibration=DEMO_CALIBRATION, assistant=str(tiny_vlm_assistant_path()))
    return OptimizeConfig(out=out, eval=DEMO_EVAL, search=search)


def run_demo(out: Path, show_progress: bool = True) -> OptimizeResult:
    """Run the staged search on the shipped tiny VLM into ``out`` (resumable: a rerun reuses everything)."""
    return optimize(tiny_vlm_path(), demo_config(out), show_progress=show_progress)


@dataclass(frozen=True)
class Acceptance:
    """The assistant's measured acceptance on one target (vLLM's conventions, see eval/record.py)."""

    target: str
    role: str
    """``bf16 base`` or the target's weights format."""
    num_speculative_tokens: int
    mean_accepted_per_step: float
    acceptance_rate: float
    target_steps: int

    @property
    def tokens_per_step(self) -> float:
        """Tokens each target pass yields: the accepted drafts and the target's own token."""
        return 1.0 + self.mean_accepted_per_step


def target_acceptance(out: Path, show_progress: bool = True) -> tuple[Acceptance, ...]:
    """The assistant's acceptance on the bf16 target and the :data:`ACCEPTANCE_TARGETS`, at the MTP lever's probe k,
    on the search's subset (the stage-1 checkpoints are reused; a rerun reuses the evaluations too)."""
    from ecoquant.optimize.run import open_runner, run_grid
    from ecoquant.optimize.stages import stage_config

    config = demo_config(out)
    levers = family_levers("gemma4")
    k = levers.mtp.probe_k if levers.mtp is not None else 4
    by_name = {c.name: c for c in levers.weights_candidates()}
    grid = Grid(tuple(by_name[n] for n in ACCEPTANCE_TARGETS), DEMO_CALIBRATION, "demo: acceptance by target")
    drafted = replace(config, eval=replace(config.eval, assistant=config.search.assistant, num_speculative_tokens=k))
    runner = open_runner(drafted, show_progress=show_progress)
    run = run_grid(tiny_vlm_path(), stage_config(drafted, grid, False), runner)
    rows = []
    for r in run.record.runs:
        spec = r.speculative or {}
        if not spec:
            continue
        what = "bf16 base" if r.role == "base" else by_name[r.label].scheme.upper()
        rows.append(
            Acceptance(
                r.label, what, int(spec["num_speculative_tokens"]), float(spec["mean_accepted_per_step"]),
                float(spec["acceptance_rate"]), int(spec["target_steps"]),
            )
        )
    return tuple(rows)
