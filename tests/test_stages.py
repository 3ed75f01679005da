"""The staged search (``ecoquant.optimize.stages``) on replayed results, and its levers as data.

The search logic is tested with an ``evaluate`` that replays a table of
results (recovery and joules per candidate, a little worse on the subset
than on the whole suite, as a small sample is noisier), so each case runs in
milliseconds: the staged search picks what evaluating the whole product
picks, it never spends more evaluations than its budget, and a run stopped
between stages resumes from the stored results without evaluating them
again. The end-to-end run on the trained tiny VLM (real quantization and
evaluation, every stage, the pick and a rerun that reuses everything) is
``tests/test_tiny_vlm.py::test_demo_is_the_decision_and_a_rerun_reuses_everything``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from ecoquant.errors import EcoquantError
from ecoquant.optimize.grid import Candidate, grid_from_mapping
from ecoquant.optimize.levers import FAMILY_LEVERS, FamilyLevers, ServingLevers, family_levers, image_budgets
from ecoquant.optimize.plan import SearchConfig
from ecoquant.optimize.stages import Outcome, plan_stages, search
from ecoquant.optimize.store import read_json, write_json_atomic

GATE = 0.8

#: Weights candidates: (recovery, joules) on the whole suite.
WEIGHTS: Mapping[str, tuple[float, float]] = {
    "rtn-auto": (0.70, 60.0),  # cheap but below the gate
    "gptq-auto": (0.97, 60.0),
    "awq-gptq-auto": (0.98, 61.0),
    "gptq-auto-headint4": (0.93, 50.0),  # the head is the biggest read per token: cheaper
    "gptq-gemma4-e-mlpo": (0.99, 75.0),  # q/k/v kept bf16: better, dearer
}
#: Each serving lever's effect: (recovery lost, share of energy saved), the same whatever the weights.
LEVERS: Mapping[str, tuple[float, float]] = {
    "+short": (0.03, 0.20),
    "+cap16": (0.00, 0.05),
    "+img140": (0.60, -0.40),  # more image tokens than the model was trained with: worse and dearer
}


def truth(name: str) -> tuple[float, float]:
    """A candidate's whole-suite result: its weights' result with its levers applied."""
    base = next(w for w in sorted(WEIGHTS, key=len, reverse=True) if name.startswith(w))
    rec, joules = WEIGHTS[base]
    for suffix, (lost, saved) in LEVERS.items():
        if suffix in name[len(base):]:
            rec, joules = rec - lost, joules * (1 - saved)
    return rec, joules


def weights() -> tuple[Candidate, ...]:
    specs = [
        {"method": "rtn"},
        {"method": "gptq"},
        {"method": "awq-gptq"},
        {"method": "gptq", "lm_head": "int4"},
        {"method": "gptq", "preset": "gemma4-e-mlpo"},
    ]
    return grid_from_mapping({"candidates": specs}).candidates


SERVING = ServingLevers(responses=("short",), answer_caps=(16,), image_budgets=(140,))


class Replay:
    """An ``evaluate`` that replays :func:`truth` (the subset reads 1 point lower) and keeps what it did in a folder,
    as the real one keeps results in the store: a stage already stored is read back, not evaluated again."""

    def __init__(self, folder: Path | None = None, stop_at: str | None = None) -> None:
        self.folder, self.stop_at = folder, stop_at
        self.calls: list[tuple[str, tuple[str, ...]]] = []
        self.evaluations = 0

    def __call__(self, stage: str, candidates: Sequence[Candidate], whole: bool) -> dict[str, Outcome]:
        names = tuple(c.name for c in candidates)
        path = None if self.folder is None else self.folder / f"{stage}-{'-'.join(names)}.json"
        if path is not None and (stored := read_json(path)) is not None:
            return {n: Outcome(**o) for n, o in stored.items()}
        if stage == self.stop_at:
            raise KeyboardInterrupt(stage)
        self.calls.append((stage, names))
        self.evaluations += len(names)
        out = {}
        for n in names:
            rec, joules = truth(n)
            out[n] = Outcome(n, rec - (0.0 if whole else 0.01), joules * (1.0 if whole else 0.5))
        if path is not None:
            write_json_atomic(path, {n: o.__dict__ for n, o in out.items()})
        return out


def product_pick() -> str:
    """The rule applied to every weights candidate alone and with each lever alone, all on the whole suite."""
    names = [c.name for w in weights() for c in (w, *SERVING.variants(w))]
    passing = [(truth(n)[1], -truth(n)[0], n) for n in names if truth(n)[0] >= GATE]
    return min(passing)[2]


def staged_pick(result: object) -> str:
    final = result.stages["final"]  # type: ignore[attr-defined]
    passing = [(o.cost, -o.mean_recovery, o.name) for o in final.values() if o.passes(GATE)]
    return min(passing)[2]


def test_staged_search_picks_what_the_product_picks() -> None:
    replay = Replay()
    result = search(weights(), SERVING, SearchConfig(), GATE, replay)
    assert product_pick() == "gptq-auto-headint4+short"
    assert staged_pick(result) == product_pick()
    # stage 2 tried the levers on the two best per joule that pass on the subset, not on RTN (below the gate)
    assert result.kept == ("gptq-auto-headint4", "gptq-auto")
    product = len(weights()) * (1 + SERVING.count())
    assert replay.evaluations < product  # 5 + 6 + 2 = 13 against the product's 20
    assert [stage for stage, _ in replay.calls] == ["weights", "serving", "final"]


@pytest.mark.parametrize("budget", [1, 2, 3, 5, 7, 9, 13, 40])
def test_budget_bounds_the_evaluations(budget: int) -> None:
    replay = Replay()
    result = search(weights(), SERVING, SearchConfig(budget=budget), GATE, replay)
    assert replay.evaluations <= budget
    assert result.plan.total <= budget
    assert len(result.stages["weights"]) >= 1  # something is always compared
    if budget >= 13:
        assert staged_pick(result) == product_pick()  # enough budget: the full staged search


def test_plan_stages_without_budget_and_with_a_tight_one() -> None:
    assert plan_stages(5, SERVING, SearchConfig()) == plan_stages(5, SERVING, SearchConfig(budget=13))
    tight = plan_stages(5, SERVING, SearchConfig(budget=4))
    assert (tight.weights, tight.serving, tight.final) == (2, 0, 2)


def test_a_search_stopped_between_stages_resumes_without_evaluating_again(tmp_path: Path) -> None:
    first = Replay(tmp_path, stop_at="serving")
    with pytest.raises(KeyboardInterrupt):
        search(weights(), SERVING, SearchConfig(), GATE, first)
    assert [stage for stage, _ in first.calls] == ["weights"]
    again = Replay(tmp_path)
    result = search(weights(), SERVING, SearchConfig(), GATE, again)
    assert [stage for stage, _ in again.calls] == ["serving", "final"]  # stage 1 came from the folder
    uninterrupted = search(weights(), SERVING, SearchConfig(), GATE, Replay())
    assert result == uninterrupted


def test_no_candidate_passing_still_ends_in_finalists() -> None:
    low = Replay()
    result = search(weights(), SERVING, SearchConfig(), 0.999, low)
    assert len(result.finalists) == 2 and not any(o.passes(0.999) for o in result.stages["final"].values())


# ------------------------------------------------------------------ levers as data


def test_every_family_lists_valid_weights_candidates() -> None:
    for family, levers in {**FAMILY_LEVERS, "other": family_levers("other")}.items():
        names = [c.name for c in levers.weights_candidates()]
        assert len(names) == len(set(names)) >= 3, family
    assert "gptq-gemma4-e-mlpo" in [c.name for c in family_levers("gemma4").weights_candidates()]
    assert "gptq-auto-headint4" in [c.name for c in family_levers("gemma3_text").weights_candidates()]


def test_image_budgets_are_the_processor_s_values_up_to_twice_the_checkpoint_s(tmp_path: Path) -> None:
    from ecoquant.fixtures.tiny_vlm import tiny_vlm_path

    assert image_budgets(tiny_vlm_path(), 2.0) == (140,)  # the tiny VLM's own budget is 70, the smallest
    model = tmp_path / "m"
    model.mkdir()
    (model / "processor_config.json").write_text(
        json.dumps({"image_processor": {"image_processor_type": "Gemma4ImageProcessor", "max_soft_tokens": 280}})
    )
    assert image_budgets(model, 2.0) == (70, 140, 560)
    assert image_budgets(model, 0) == ()


def test_serving_variants_apply_one_lever_each() -> None:
    gptq = Candidate("gptq-auto", method="gptq")
    levers = ServingLevers(responses=("short",), answer_caps=(16,), image_budgets=(70,), serving=({"kv_cache_dtype": "fp8"},))
    variants = levers.variants(gptq)
    assert [v.name for v in variants][:3] == ["gptq-auto+short", "gptq-auto+cap16", "gptq-auto+img70"]
    assert variants[3].serving == {"kv_cache_dtype": "fp8"} and variants[3].name.startswith("gptq-auto+s")
    assert all(v.quant_record() == gptq.quant_record() for v in variants)  # the weights are reused


@pytest.mark.parametrize(
    ("spec", "message"),
    [({"method": "rtn", "lm_head": "int3"}, "lm_head must be"), ({"method": "rtn", "answer_cap": 0}, "answer_cap must be")],
)
def test_bad_lever_values_are_one_line(spec: dict[str, object], message: str) -> None:
    with pytest.raises(EcoquantError, match=message):
        grid_from_mapping({"candidates": [spec]})


def test_search_config_refuses_a_budget_of_zero() -> None:
    with pytest.raises(EcoquantError, match="--budget"):
        SearchConfig(budget=0)
    assert FamilyLevers().image_budget_max_factor == 2.0
