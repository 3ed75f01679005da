"""Issue 30's shipping side: the MTP lever in the staged search, ``--target-vllm``, the assistant in the
submission's ``vllm_config.yaml``, and ``ecoquant serve`` refusing a vLLM without a feature the config uses.

The search is replayed (as in ``tests/test_stages.py``): a candidate drafting k tokens saves a share of
its weights' energy that grows with the acceptance the replay reports, so the test checks which k the
search tries after its probe, not a hard-coded answer. The end-to-end run with a real assistant is the
demo's (``tests/test_tiny_vlm.py``) and ``tests/test_optimize.py``'s assistant grid.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from ecoquant.cli import app
from ecoquant.errors import EcoquantError
from ecoquant.optimize.grid import Candidate, Grid, grid_from_mapping
from ecoquant.optimize.levers import (
    MtpLever,
    ServingLevers,
    candidate_features,
    family_levers,
    find_assistant,
    fit_vllm,
    per_draft_acceptance,
    serving_levers,
)
from ecoquant.optimize.plan import SearchConfig
from ecoquant.optimize.stages import Outcome, search
from ecoquant.serve.config import ServeConfigOptions, build_serve_config
from ecoquant.serve.launch import VllmInstall, require_features
from ecoquant.serve.vllm_features import FEATURES, TESTED_VLLM, config_features

GATE = 0.8
BELOW_MTP = "0.20.1"  # issue #42005: Gemma-4 with its assistant fails there; 0.21.0 serves it


def assistant_dir(root: Path, name: str = "m-assistant") -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "gemma4_assistant"}))
    return folder


# ------------------------------------------------------------------ the k rule


@pytest.mark.parametrize("alpha", [0.0, 0.2, 0.5, 0.74, 0.9, 1.0])
@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_per_draft_acceptance_inverts_the_expected_accepted_drafts(alpha: float, k: int) -> None:
    mean = sum(alpha**i for i in range(1, k + 1))
    assert per_draft_acceptance(mean, k) == pytest.approx(alpha, abs=1e-6)


def test_k_after_the_probe_follows_the_measured_acceptance() -> None:
    lever = MtpLever(probe_k=4, keep_share=0.5)
    # alpha ~0.74: the 2nd draft is kept 55% of the time, the 3rd 41%: k 2 and its half
    assert lever.ks_after(2.0) == (2, 1)
    # nearly every draft kept: the probe (4) already is the best k; only its half is new
    assert lever.ks_after(3.9) == (2,)
    # almost nothing accepted: one draft per step is all that can pay
    assert lever.ks_after(0.1) == (1,)
    assert set(lever.ks_after(1.0)) <= {1, 2, 3} and len(lever.ks_after(1.0)) <= lever.count() - 1


# ------------------------------------------------------------------ the search


def truth(name: str) -> tuple[float, float, float | None]:
    """(recovery, joules, accepted per step): drafting keeps recovery (greedy answers are the target's) and
    saves energy by the target steps it avoids, less a draft cost per drafted token."""
    base = name.split("+")[0]
    rec, joules = {"rtn-auto": (0.95, 60.0), "gptq-auto": (0.97, 62.0)}[base]
    if "+mtp" not in name:
        return rec, joules, None
    k = int(name.split("+mtp")[1])
    alpha = 0.74  # the same per-draft acceptance at every k: accepted per step follows from it
    accepted = sum(alpha**i for i in range(1, k + 1))
    decode_share, draft_cost = 0.6, 0.03
    return rec, joules * (1 - decode_share + decode_share / (1 + accepted) + draft_cost * k), accepted


class Replay:
    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[str, ...]]] = []

    def __call__(self, stage: str, candidates: Sequence[Candidate], whole: bool) -> dict[str, Outcome]:
        self.calls.append((stage, tuple(c.name for c in candidates)))
        out = {}
        for c in candidates:
            rec, joules, accepted = truth(c.name)
            out[c.name] = Outcome(c.name, rec, joules, None, accepted)
        return out


def test_stage_two_probes_mtp_then_tries_the_k_its_acceptance_chooses() -> None:
    weights = grid_from_mapping({"candidates": [{"method": "rtn"}, {"method": "gptq"}]}).candidates
    levers = ServingLevers(mtp=MtpLever(), assistant="./a")
    replay = Replay()
    result = search(weights, levers, SearchConfig(keep=1, finalists=2), GATE, replay)
    serving = [names for stage, names in replay.calls if stage == "serving"]
    assert serving[0] == ("rtn-auto+mtp4",)  # the probe, on the best weights by recovery per joule
    assert serving[1] == tuple(f"rtn-auto+mtp{k}" for k in MtpLever().ks_after(truth("rtn-auto+mtp4")[2] or 0.0))
    best = min(result.stages["serving"].values(), key=lambda o: o.cost or 0.0)
    assert result.finalists[0].name == best.name and result.finalists[0].num_speculative_tokens is not None
    assert result.finalists[0].assistant == "./a"


def test_without_an_assistant_there_is_no_mtp_lever(tmp_path: Path) -> None:
    from ecoquant.fixtures.tiny_vlm import tiny_vlm_path

    off = serving_levers(tiny_vlm_path(), family_levers("gemma4"), "transformers", TESTED_VLLM, None)
    assert off.mtp is None and off.count() == ServingLevers(
        responses=off.responses, answer_caps=off.answer_caps, image_budgets=off.image_budgets
    ).count()
    assert any("MTP" in why and "--assistant" in why for why in off.left_out)
    on = serving_levers(tiny_vlm_path(), family_levers("gemma4"), "transformers", TESTED_VLLM, "./a")
    assert on.mtp is not None and on.count() == off.count() + MtpLever().count()
    assert serving_levers(tiny_vlm_path(), family_levers("gemma3_text"), "transformers", TESTED_VLLM, "./a").mtp is None


# ------------------------------------------------------------------ --target-vllm


def test_target_vllm_below_the_mtp_version_leaves_the_lever_out() -> None:
    from ecoquant.fixtures.tiny_vlm import tiny_vlm_path

    assert FEATURES["gemma4_mtp"].verified and FEATURES["gemma4_mtp"].min_version == "0.21.0"
    old = serving_levers(tiny_vlm_path(), family_levers("gemma4"), "transformers", BELOW_MTP, "./a")
    assert old.mtp is None and old.assistant is None
    assert any("MTP" in why and "gemma4_mtp" in why and "0.21.0" in why for why in old.left_out)
    assert serving_levers(tiny_vlm_path(), family_levers("gemma4"), "transformers", "0.21.0", "./a").mtp is not None

    drafted = Candidate("rtn-auto+mtp4", assistant="./a", num_speculative_tokens=4)
    plain = Candidate("rtn-auto")
    fit = fit_vllm([plain, drafted], "gemma4", BELOW_MTP)
    assert [c.name for c in fit.kept] == ["rtn-auto"]
    assert fit.left_out[0][0] == "rtn-auto+mtp4" and "gemma4_mtp" in fit.left_out[0][1]
    # features first known from ecoquant's own vLLM group only are not known missing: kept, said unchecked
    assert {f.name for f in fit.unchecked} == {"gemma4", "wna16"}
    assert fit_vllm([plain, drafted], "gemma4", TESTED_VLLM).left_out == ()


def test_every_lever_names_known_features() -> None:
    for spec, needs in [
        ({"method": "rtn"}, {"gemma4", "wna16"}),
        ({"method": "rtn", "scheme": "w8a8-int8"}, {"gemma4", "w8a8_int8"}),
        ({"method": "rtn", "scheme": "w8a8-fp8"}, {"gemma4", "w8a8_fp8"}),
        ({"method": "rtn", "preset": "gemma4-e-int4-tables"}, {"gemma4", "wna16", "quantized_tables"}),
        ({"method": "rtn", "serving": {"kv_cache_dtype": "fp8"}}, {"gemma4", "wna16", "fp8_kv_cache"}),
        ({"method": "rtn", "assistant": "./a", "num_speculative_tokens": 2}, {"gemma4", "wna16", "gemma4_mtp"}),
    ]:
        (c,) = grid_from_mapping({"candidates": [spec]}).candidates
        assert set(candidate_features(c, "gemma4")) == needs, spec
    for c in family_levers("gemma4").weights_candidates():
        assert set(candidate_features(c, "gemma4")) <= set(FEATURES)


def test_dry_run_says_what_target_vllm_left_out(tmp_path: Path) -> None:
    from ecoquant.fixtures.tiny_vlm import tiny_vlm_path

    helper = assistant_dir(tmp_path)
    args = ["optimize", str(tiny_vlm_path()), "--out", str(tmp_path / "o"), "--dry-run", "--suite", "builtin-basic",
            "--size", "1", "--assistant", str(helper)]
    new = CliRunner().invoke(app, args)
    assert new.exit_code == 0, new.output
    assert "MTP with" in new.output and str(helper) in new.output.replace("\n", "")
    old = CliRunner().invoke(app, [*args, "--target-vllm", BELOW_MTP])
    assert old.exit_code == 0, old.output
    text = " ".join(old.output.split())
    assert "MTP with" not in text and f"left out: MTP: vLLM {BELOW_MTP} lacks gemma4_mtp (first in 0.21.0" in text
    bad = CliRunner().invoke(app, [*args, "--target-vllm", "latest"])
    assert bad.exit_code == 2 and "--target-vllm" in bad.output


# ------------------------------------------------------------------ discovery


def test_the_assistant_is_found_beside_a_local_model_or_named_beside_a_hub_id(tmp_path: Path) -> None:
    gemma4 = family_levers("gemma4")
    model = tmp_path / "gemma-4-E4B-it"
    model.mkdir()
    assert find_assistant(str(model), gemma4) is None  # no sibling yet
    helper = assistant_dir(tmp_path, "gemma-4-E4B-it-assistant")
    assert find_assistant(str(model), gemma4) == str(helper.resolve())
    assert find_assistant("google/gemma-4-E4B-it", gemma4) == "google/gemma-4-E4B-it-assistant"  # named, never fetched
    assert find_assistant("google/gemma-4-E4B-it", family_levers("gemma3_text")) is None


def test_a_given_assistant_folder_without_config_is_one_line(tmp_path: Path) -> None:
    from ecoquant.fixtures.tiny_vlm import tiny_vlm_path

    result = CliRunner().invoke(app, ["optimize", str(tiny_vlm_path()), "--out", str(tmp_path / "o"), "--dry-run",
                                      "--assistant", str(tmp_path)])
    assert result.exit_code == 2 and "no config.json" in result.output


# ------------------------------------------------------------------ the served pair


def test_speculative_config_names_the_assistant_inside_the_folder() -> None:
    from ecoquant.fixtures.tiny_vlm import tiny_vlm_path

    config = build_serve_config(
        tiny_vlm_path(),
        ServeConfigOptions(max_model_len=512, model=".", assistant="./assistant", num_speculative_tokens=3, min_vllm="0.32.0"),
    )
    data = yaml.safe_load(config.to_yaml())
    draft = json.loads(data["speculative_config"])
    assert draft == {"method": "mtp", "model": "./assistant", "num_speculative_tokens": 3}
    assert not Path(draft["model"]).is_absolute() and data["model"] == "."
    assert "Needs vLLM >= 0.32.0" in config.to_yaml()
    assert "gemma4_mtp" in config_features(data, {"model_type": "gemma4"})


def test_quantized_token_tables_never_get_a_drafter(tmp_path: Path) -> None:
    from ecoquant.serve.config import speculative_entry

    config = {"model_type": "gemma4", "quantization_config": {"config_groups": {"group_0": {}, "embeddings_0": {}}}}
    with pytest.raises(EcoquantError, match="quantized token tables"):
        speculative_entry(config, "./assistant", 4)
    drafted = Candidate("t+mtp4", preset="gemma4-e-int4-tables", assistant="./a", num_speculative_tokens=4)
    assert "quantized_tables" in candidate_features(drafted, "gemma4")


def test_serve_stops_when_the_vllm_found_lacks_a_feature_the_config_uses(tmp_path: Path) -> None:
    engine = {"model": ".", "speculative_config": json.dumps({"method": "mtp", "model": "./assistant", "num_speculative_tokens": 4})}
    checkpoint = {"model_type": "gemma4"}
    old = VllmInstall(Path("/x/python"), "vllm", BELOW_MTP)
    with pytest.raises(EcoquantError, match=r"needs a newer vLLM: vLLM 0\.20\.1 lacks gemma4_mtp") as err:
        require_features(old, engine, checkpoint, tmp_path / "vllm_config.yaml")
    assert "\n" not in str(err.value)
    require_features(VllmInstall(Path("/x/python"), "vllm", "0.21.0"), engine, checkpoint, tmp_path / "c.yaml")
    require_features(old, {"model": "."}, checkpoint, tmp_path / "c.yaml")  # no drafter: nothing known missing


def test_serve_cli_refuses_an_old_vllm_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ecoquant.serve.launch as launch
    from ecoquant.fixtures.tiny_vlm import tiny_vlm_path

    folder = tmp_path / "sub"
    folder.mkdir()
    for f in tiny_vlm_path().iterdir():
        if f.is_file():
            (folder / f.name).symlink_to(f)
    config = build_serve_config(folder, ServeConfigOptions(max_model_len=512, model=".", assistant="./assistant"))
    (folder / "vllm_config.yaml").write_text(config.to_yaml())
    monkeypatch.setattr(launch, "find_vllm", lambda python=None: VllmInstall(Path("/x/python"), "vllm", BELOW_MTP))
    result = CliRunner().invoke(app, ["serve", str(folder), "--port", "8765"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[0].startswith("error:") and "gemma4_mtp" in result.output


def test_candidates_with_an_assistant_are_grid_vocabulary() -> None:
    grid = grid_from_mapping({"candidates": [{"method": "rtn", "assistant": "./a", "num_speculative_tokens": 2}]})
    assert [c.name for c in grid.candidates] == ["rtn-auto+mtp2"]
    with pytest.raises(EcoquantError, match="go together"):
        grid_from_mapping({"candidates": [{"method": "rtn", "assistant": "./a"}]})
    with pytest.raises(EcoquantError, match="num_speculative_tokens must be"):
        grid_from_mapping({"candidates": [{"method": "rtn", "assistant": "./a", "num_speculative_tokens": 0}]})
    assert isinstance(grid, Grid)


def test_candidates_vllm_cannot_draft_for_are_never_built(tmp_path: Path) -> None:
    from ecoquant.eval.runner import EvalConfig
    from ecoquant.fixtures.tiny_vlm import tiny_vlm_path
    from ecoquant.optimize.plan import OptimizeConfig, plan_optimize

    tables = Candidate("rtn-gemma4-e-int4-tables", preset="gemma4-e-int4-tables")
    levers = ServingLevers(mtp=MtpLever(), assistant="./a", model_type="gemma4")
    assert levers.mtp_probes(tables) == ()
    assert [c.name for c in levers.mtp_probes(Candidate("rtn-auto"))] == ["rtn-auto+mtp4"]
    grid = grid_from_mapping(
        {"candidates": [{"method": "rtn", "preset": "gemma4-e-int4-tables", "assistant": "./a", "num_speculative_tokens": 2}]}
    )
    config = OptimizeConfig(out=tmp_path / "o", grid=grid, eval=EvalConfig(suite="builtin-basic", size=1))
    with pytest.raises(EcoquantError, match="token tables"):
        plan_optimize(tiny_vlm_path(), config)
