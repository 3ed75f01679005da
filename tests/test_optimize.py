"""``ecoquant optimize`` end to end on the trained tiny VLM, offline, with the transformers backend.

What is checked from the recorded files, not from what the code says it did:
the pick is the cheapest candidate whose mean recovery (recomputed here from
``results.json``) clears the gate; a rerun recomputes nothing (file contents
and modification times unchanged); a run stopped by a signal mid-sweep and
rerun ends with the same results as one uninterrupted run; ``--keep pick``
deletes only the losers' checkpoints; the submission folder holds what an
upload needs and names no path of this machine.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from ecoquant.calibrate.data import CORPUS_SOURCE, CalibrationConfig
from ecoquant.cli import app
from ecoquant.errors import EcoquantError
from ecoquant.eval.backends.base import generation_settings
from ecoquant.eval.runner import EvalConfig, RunRecord
from ecoquant.fixtures.tiny_vlm import tiny_vlm_path
from ecoquant.optimize import Candidate, Grid, OptimizeConfig, optimize
from ecoquant.optimize.grid import default_grid, grid_from_mapping, load_grid
from ecoquant.optimize.store import Store, write_json_atomic
from ecoquant.report.table import mean_recovery, recovery
from gpu_fakes import METERS, WATTS, FakeGpuMeter, slow_backend

ECOQUANT = Path(sys.executable).parent / "ecoquant"
CALIBRATION = {"source": CORPUS_SOURCE, "num_samples": 8, "max_length": 128, "multimodal": True}
#: Three candidates: data-free, the shipped short-answer template on the same weights, and GPTQ.
GRID = {
    "calibration": CALIBRATION,
    "candidates": [{"method": "rtn"}, {"method": "rtn", "response": "short"}, {"method": "gptq", "group_size": 32}],
}
SUITE_ARGS = ["--suite", "builtin-basic", "--size", "2", "--max-new-tokens", "8", "--idle-seconds", "0"]


def config_for(out: Path, **kw: Any) -> OptimizeConfig:
    return OptimizeConfig(
        out=out,
        grid=grid_from_mapping(GRID),
        eval=EvalConfig(
            suite="builtin-basic", size=2, generation=generation_settings(max_new_tokens=8), idle_seconds=0.0
        ),
        **kw,
    )


def snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    """Every finished evaluation file: modification time and content."""
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted((folder / "evals").glob("*.json"))}


def answers(record: RunRecord) -> dict[str, Any]:
    """What must not depend on interruptions: each model's scores, predictions and token counts."""
    return {
        r.label: {
            "scores": r.task_scores,
            "samples": [(s.task, s.id, s.prediction, s.score, s.tokens_in, s.tokens_out) for s in r.samples],
        }
        for r in record.runs
    }


def cheapest_passing(record: RunRecord, gate: float) -> str | None:
    """The rule, recomputed from the record alone. No NVML here: the cost is the energy modelled for the target
    GPU when the runs carry it; without it the cost is unknown and the pick is the highest mean recovery
    among those with mean recovery >= gate. Wall time never decides."""
    base = next(r for r in record.runs if r.role == "base")
    best: tuple[float, str] | None = None
    for r in record.runs:
        if r.role == "base":
            continue
        mean = mean_recovery([recovery(r.suite_scores[h], base.suite_scores[h]) for h in base.suite_scores])
        key = r.modelled_energy["total_j"] if r.modelled_energy else -(mean or 0.0)
        if mean is not None and mean >= gate and (best is None or key < best[0]):
            best = (key, r.label)
    return None if best is None else best[1]


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("optimize") / "run"
    optimize(tiny_vlm_path(), config_for(out), show_progress=False)
    return out


# ------------------------------------------------------------------ end to end


def test_pick_is_the_cheapest_candidate_that_passes_the_gate(finished: Path) -> None:
    record = RunRecord.load(finished / "results.json")
    assert [r.label for r in record.runs] == ["tiny_vlm", "rtn-auto", "rtn-auto+short", "gptq-auto-g32"]
    assert record.energy.measured is False
    choice = json.loads((finished / "choice.json").read_text())
    assert choice["metric"] in ("modelled_energy_j", "none") and "energy not measured" in choice["metric_note"]
    assert "wall time" not in choice["summary"].split(";")[0]  # the pick's line states energy or recovery, never seconds
    assert all(set(r.recovery_interval or {}) == {"doc", "image", "mean"} for r in record.runs if r.role == "variant")
    assert record.intervals is not None and record.intervals["confidence"] == 0.9
    assert choice["pick"] == cheapest_passing(record, 0.8) is not None
    # a gate no candidate can pass leaves nothing to ship, by the same rule
    assert cheapest_passing(record, 1.0 + 1e-9) is None


def test_submission_folder_serves_from_inside_itself(finished: Path) -> None:
    sub = finished / "submission"
    choice = json.loads((finished / "choice.json").read_text())
    for name in ("model.safetensors", "config.json", "quant_recipe.json", "vllm_config.yaml", "README.md",
                 "results.json", "report.md", "pareto.png", "chat_template.jinja", "tokenizer.json"):
        assert (sub / name).is_file(), name
    config = yaml.safe_load((sub / "vllm_config.yaml").read_text())
    assert config["model"] == "."
    assert str(finished) not in (sub / "vllm_config.yaml").read_text()
    card = (sub / "README.md").read_text()
    assert "## How this was chosen" in card and f"| {choice['pick']} |" in card and "**pick**" in card
    assert choice["metric_note"] in card and "no GPU" in card and "interval" in card
    if choice["metric"] == "modelled_energy_j":  # the energy model's parts travel with the submission
        assert (sub / "energy_parts.png").is_file() and "modelled for L4" in choice["summary"]
    pick = next(s["candidate"] for s in choice["standings"] if s["name"] == choice["pick"])
    template = (sub / "chat_template.jinja").read_text()
    assert template.startswith("{#- ecoquant response economy") == (pick["response"] == "short")


def test_a_drafting_pick_ships_its_assistant_inside_the_submission(tmp_path: Path) -> None:
    """Issue 30: a candidate decoding with the shipped tiny assistant is evaluated with it (acceptance measured on
    its own RTN target); picked, its submission holds the assistant in assistant/ and a speculative_config naming
    it relatively, and the card and choice.json state the lowest vLLM the pick needs."""
    from ecoquant.fixtures.tiny_assistant import tiny_vlm_assistant_path

    grid = {"candidates": [{"method": "rtn", "assistant": str(tiny_vlm_assistant_path()), "num_speculative_tokens": 2}]}
    out = tmp_path / "mtp"
    config = OptimizeConfig(
        out=out,
        grid=grid_from_mapping(grid),
        gate=0.01,  # the decision is not the point here: the shipped pair is
        eval=EvalConfig(suite="builtin-basic", size=1, generation=generation_settings(max_new_tokens=8), idle_seconds=0.0),
    )
    result = optimize(tiny_vlm_path(), config, show_progress=False)
    (run,) = [r for r in result.record.runs if r.role == "variant"]
    assert run.speculative is not None and run.speculative["num_speculative_tokens"] == 2
    assert run.speculative["target_steps"] > 0
    sub = result.submission
    assert sub is not None and result.choice.pick == "rtn-auto+mtp2"
    text = (sub / "vllm_config.yaml").read_text()
    draft = json.loads(yaml.safe_load(text)["speculative_config"])
    assert draft == {"method": "mtp", "model": "./assistant", "num_speculative_tokens": 2}
    assert (sub / "assistant" / "config.json").is_file() and any((sub / "assistant").glob("*.safetensors"))
    assert str(tmp_path) not in text and str(tiny_vlm_assistant_path()) not in text  # no path of this machine
    needs = json.loads((sub / "choice.json").read_text())["vllm"]
    assert needs["min_version"] == "0.32.0" and needs["features"]["gemma4_mtp"] == "0.21.0"
    card = (sub / "README.md").read_text()
    assert "## Serving requirements" in card and "vLLM >= 0.32.0" in card and "`assistant/`" in card


def test_no_file_of_the_submission_names_a_path_of_this_machine(finished: Path) -> None:
    """Found in the demo: the card named the source by this machine's absolute path, and the recipe,
    results and report copied in held it too. Every byte of every file is scanned."""
    sub = finished / "submission"
    local = {str(finished.parent), str(finished.resolve().parent), str(tiny_vlm_path()), str(tiny_vlm_path().resolve()),
             str(Path(__file__).resolve().parents[1])}
    for f in sorted(sub.iterdir()):
        data = f.read_bytes()
        for path in local:
            assert path.encode() not in data, f"{f.name} names {path}"
    recipe = json.loads((sub / "quant_recipe.json").read_text())
    assert recipe["source"]["model"] == recipe["source"]["path"] == "tiny_vlm"
    assert "of `tiny_vlm`" in (sub / "README.md").read_text()
    # the candidate's own recipe (linked into the submission when it can be) keeps its real paths
    kept = sorted((finished / "checkpoints").glob("*/quant_recipe.json"))
    assert kept and all(str(tiny_vlm_path()) in f.read_text() for f in kept)


def test_rerun_recomputes_nothing(finished: Path) -> None:
    before = snapshot(finished)
    assert len(before) == 4
    result = optimize(tiny_vlm_path(), config_for(finished), show_progress=False)
    assert result.quantized == () and result.evaluated == ()
    assert snapshot(finished) == before
    assert answers(result.record) == answers(RunRecord.load(finished / "results.json"))


def test_keep_pick_deletes_only_the_losers_checkpoints(finished: Path, tmp_path: Path) -> None:
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(finished, out, symlinks=True)
    # the copy's source hash cache still names the same source, so everything is reused
    result = optimize(tiny_vlm_path(), config_for(out, keep="pick"), show_progress=False)
    assert result.evaluated == ()
    pick = next(j for j in result.plan.jobs if j.label == result.choice.pick)
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert pick.folder.name in kept
    assert all(name in {pick.folder.name, pick.quant_dir.name} for name in kept), kept
    again = optimize(tiny_vlm_path(), config_for(out, keep="pick"), show_progress=False)
    assert again.quantized == () and again.evaluated == ()  # deleted checkpoints are not needed: their results are kept


def test_a_torn_or_foreign_result_is_not_trusted(finished: Path, tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    path = store.eval_path("x", "k" * 64)
    path.parent.mkdir(parents=True)
    path.write_text('{"key": "' + "k" * 64 + '", "runs": [')  # cut off mid-write
    assert store.load_eval("x", "k" * 64) is None
    write_json_atomic(path, {"key": "other", "runs": []})
    assert store.load_eval("x", "k" * 64) is None
    write_json_atomic(path, {"key": "k" * 64, "runs": []})
    assert store.load_eval("x", "k" * 64) is not None
    assert not list(path.parent.glob(".*.tmp"))


# ------------------------------------------------------------------ interrupted by a signal


def test_interrupted_run_resumes_and_ends_like_an_uninterrupted_one(finished: Path, tmp_path: Path) -> None:
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump(GRID))
    out = tmp_path / "run"
    cmd = [str(ECOQUANT), "optimize", str(tiny_vlm_path()), "--out", str(out), "--grid", str(grid), *SUITE_ARGS]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.monotonic() + 600
    while len(list((out / "evals").glob("*.json"))) < 2:  # the base and one candidate are done
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        assert time.monotonic() < deadline
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, output  # the shell's convention for a signal
    assert "rerun the same command to resume" in output
    done = snapshot(out)
    assert 2 <= len(done) < 4, "the signal came after the sweep finished; nothing was interrupted"
    assert not (out / "submission").exists()

    rerun = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"{len(done)} evaluations" in rerun.stderr and "reused" in rerun.stderr
    after = snapshot(out)
    assert {k: after[k] for k in done} == done  # finished work was reused, not recomputed
    assert len(after) == 4
    assert answers(RunRecord.load(out / "results.json")) == answers(RunRecord.load(finished / "results.json"))
    assert json.loads((out / "choice.json").read_text())["pick"] == cheapest_passing(
        RunRecord.load(out / "results.json"), 0.8
    )


# ------------------------------------------------------------------ the grid and bad input


def test_default_grid_is_three_methods_two_presets_two_responses() -> None:
    gemma4 = default_grid("gemma4")
    assert len(gemma4.candidates) == 12
    assert {(c.method, c.preset, c.response) for c in gemma4.candidates} == {
        (m, p, r) for m in ("rtn", "gptq", "awq") for p in ("auto", "gemma4-e-mlpo") for r in ("default", "short")
    }
    assert len(default_grid("gemma3_text").candidates) == 6  # no MLP + o preset for that family


def test_grid_file_product_and_list(tmp_path: Path) -> None:
    path = tmp_path / "g.yaml"
    path.write_text(
        "grid:\n  method: [rtn, gptq]\n  group_size: [64, 128]\n"
        "candidates:\n  - {name: drafted, method: awq, serving: {speculative_config: {method: mtp, num_speculative_tokens: 2}}}\n"
        "calibration: {source: corpus, num_samples: 4}\n"
    )
    grid = load_grid(path)
    assert [c.name for c in grid.candidates] == ["rtn-auto-g64", "rtn-auto", "gptq-auto-g64", "gptq-auto", "drafted"]
    assert grid.calibration == CalibrationConfig(source="corpus", num_samples=4)
    assert grid.needs_vllm() == ["drafted"]
    with pytest.raises(EcoquantError, match="only a vLLM server honours"):
        optimize(tiny_vlm_path(), OptimizeConfig(out=tmp_path / "o", grid=grid), show_progress=False)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("candidates:\n  - {metod: rtn}\n", "unknown key 'metod'"),
        ("grdi:\n  method: [rtn]\n", "unknown key 'grdi'"),
        ("calibration: {samples: 4}\ncandidates: [{method: rtn}]\n", "unknown key 'samples'"),
        ("candidates:\n  - {method: fp8}\n", "unknown method 'fp8'"),
        ("candidates:\n  - {method: rtn}\n  - {method: rtn}\n", "names repeat"),
    ],
)
def test_bad_grid_is_one_line_on_the_cli(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "g.yaml"
    path.write_text(text)
    result = CliRunner().invoke(app, ["optimize", str(tiny_vlm_path()), "--out", str(tmp_path / "o"), "--grid", str(path)])
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) <= 2  # one line (rich may wrap it once)


@pytest.mark.parametrize("gate", ["0", "1.5", "-0.2"])
def test_gate_outside_zero_one_is_refused(tmp_path: Path, gate: str) -> None:
    result = CliRunner().invoke(app, ["optimize", str(tiny_vlm_path()), "--out", str(tmp_path / "o"), "--gate", gate])
    assert result.exit_code == 2 and "(0, 1]" in result.output and "Traceback" not in result.output


def test_unwritable_out_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = CliRunner().invoke(app, ["optimize", str(tiny_vlm_path()), "--out", str(blocker / "sub")])
    assert result.exit_code == 2 and "cannot write into" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(app, ["optimize", str(tiny_vlm_path()), "--out", str(blocker)])
    assert result.exit_code == 2 and "is a file, not a folder" in result.output


@pytest.mark.parametrize("command", ["optimize", "eval"])
def test_backend_vllm_without_vllm_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str) -> None:
    import ecoquant.serve.launch as launch

    monkeypatch.setattr(launch, "find_vllm", lambda python=None: None)
    model = str(tiny_vlm_path())
    args = [command, model, "--out", str(tmp_path / "o")] if command == "optimize" else [command, "--base", model, "--out", str(tmp_path / "o")]
    result = CliRunner().invoke(app, [*args, "--backend", "vllm"])
    assert result.exit_code == 2, result.output
    assert "needs vLLM, which is not installed here" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "o" / "checkpoints").exists()  # refused before any quantization


def test_dry_run_lists_candidates_cache_and_disk(finished: Path) -> None:
    grid = finished.parent / "grid-dry.yaml"
    grid.write_text(yaml.safe_dump({**GRID, "candidates": [*GRID["candidates"], {"method": "rtn", "group_size": 64}]}))
    result = CliRunner().invoke(
        app, ["optimize", str(tiny_vlm_path()), "--out", str(finished), "--grid", str(grid), *SUITE_ARGS, "--dry-run"]
    )
    assert result.exit_code == 0, result.output
    assert "rtn-auto-g64" in result.output and "to quantize" in result.output and "cached" in result.output
    assert "1 checkpoints to write" in result.output and "1 of 5 evaluations to run" in result.output
    assert "MiB of disk" in result.output
    assert not any("g64" in p.name for p in (finished / "checkpoints").iterdir())  # a dry run writes nothing


def test_gptq_candidates_are_quantized_as_ecoquant_quantize_would(finished: Path) -> None:
    record = RunRecord.load(finished / "results.json")
    recipe = next(r.recipe for r in record.runs if r.label == "gptq-auto-g32")
    assert recipe is not None
    assert recipe["scheme"]["observer"] == "hessian"
    assert recipe["method_config"]["settings"]["scale_passes"] == 2
    assert recipe["method_config"]["settings"]["dampening_frac"] == 0.1


def test_candidates_default_to_the_method_s_observer_and_scale_passes() -> None:
    gptq, rtn, awq = Candidate("a", method="gptq"), Candidate("b"), Candidate("c", method="awq")
    assert (gptq.quant_scheme.observer, gptq.passes) == ("hessian", 2)
    assert (rtn.quant_scheme.observer, rtn.passes) == ("minmax", 1) and (awq.quant_scheme.observer, awq.passes) == ("minmax", 1)
    # The checkpoint's key holds the resolved choice, so a default that changes re-quantizes it.
    assert gptq.quant_record()["scale_passes"] == 2 and gptq.quant_record()["scheme"]["observer"] == "hessian"
    assert gptq.quant_record()["dampening"] == 0.1 == gptq.damp
    assert "scale_passes" not in rtn.quant_record()
    explicit = Candidate("d", method="gptq", observer="minmax", scale_passes=1)
    assert (explicit.quant_scheme.observer, explicit.passes) == ("minmax", 1) and explicit.quant_record() != gptq.quant_record()
    grid = grid_from_mapping({"candidates": [{"method": "gptq"}, {"method": "gptq", "observer": "minmax", "scale_passes": 1},
                                             {"method": "rtn", "observer": "hessian"}, {"method": "gptq", "dampening": 0.01}]})
    assert [c.name for c in grid.candidates] == ["gptq-auto", "gptq-auto-minmax-1pass", "rtn-auto-hessian", "gptq-auto-damp0.01"]
    with pytest.raises(EcoquantError, match="candidate x: dampening is GPTQ's"):
        Candidate("x", method="rtn", dampening=0.1)
    with pytest.raises(EcoquantError, match="candidate x: dampening must be a fraction"):
        Candidate("x", method="gptq", dampening=1.5)
    with pytest.raises(EcoquantError, match="candidate x: scale_passes re-runs GPTQ"):
        Candidate("x", method="awq", scale_passes=2)
    with pytest.raises(EcoquantError, match="candidate x: scale_passes must be 1 or more"):
        Candidate("x", method="gptq", scale_passes=0)


def test_candidate_validation() -> None:
    with pytest.raises(EcoquantError, match="plain folder name"):
        Candidate("a/b")
    with pytest.raises(EcoquantError, match="unknown response"):
        Candidate("x", response="terse")  # type: ignore[arg-type]
    with pytest.raises(EcoquantError, match="candidate x: unknown observer"):
        Candidate("x", observer="percentile")
    with pytest.raises(EcoquantError, match="no candidates"):
        Grid(())


# ------------------------------------------------------------------ --gpus (several GPUs: Ray, tests/test_local_gpus.py)


def test_one_gpu_evaluates_here_without_ray_metered_on_that_gpu(tmp_path: Path) -> None:
    METERS.clear()
    grid = grid_from_mapping({"candidates": [{"method": "rtn", "group_size": 64}]})
    config = OptimizeConfig(
        out=tmp_path / "o",
        grid=grid,
        gpus=(1,),
        eval=EvalConfig(suite="builtin-basic", size=1, limit=1, idle_seconds=0.05, warmup_requests=0),
    )
    result = optimize(tiny_vlm_path(), config, show_progress=False, meter_factory=FakeGpuMeter, backend_factory=slow_backend)
    ray = sys.modules.get("ray")
    assert ray is None or not ray.is_initialized()  # one GPU needs no scheduler: no Ray started
    assert {m.gpus for m in METERS} == {(1,)}
    for run in result.record.runs:
        assert run.energy is not None and list(run.energy.gpu_energy_j) == ["1"]
    assert result.record.energy.meter == "fake NVML, GPU 1"
    assert result.record.energy.idle_gpu_power_w == {"1": pytest.approx(WATTS)}
    assert result.choice.metric == "energy_j"


def test_gpus_without_ray_is_one_line_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # as without the extra: `import ray` fails
    grid = grid_from_mapping({"candidates": [{"method": "rtn", "group_size": 64}]})
    config = OptimizeConfig(out=tmp_path / "o", grid=grid, gpus=(0, 1), eval=EvalConfig(suite="builtin-basic", size=1, limit=1))
    with pytest.raises(EcoquantError) as info:
        optimize(tiny_vlm_path(), config, show_progress=False, meter_factory=FakeGpuMeter, backend_factory=slow_backend)
    message = str(info.value)
    assert "\n" not in message and message.startswith("--gpus 0,1 needs Ray, which is not installed")
    assert "uv run --extra ray" in message and "pip install 'ecoquant[ray]'" in message
    assert not (tmp_path / "o" / "checkpoints").exists()


def test_gpus_without_nvml_is_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["optimize", str(tiny_vlm_path()), "--out", str(tmp_path / "o"), "--gpus", "0,1"])
    assert result.exit_code == 2 and "needs NVIDIA GPUs with NVML" in result.output


def test_choose_is_the_cheapest_passing_with_ties_to_higher_recovery() -> None:
    from ecoquant.optimize.select import choose
    from ecoquant.report.table import ReportRow

    def row(name: str, role: str, energy: float | None, mean: float | None) -> ReportRow:
        return ReportRow(name, role, "default", energy, None, None, {}, {}, mean, "n/a", 0, 0, 1, 10.0)

    rows = [
        row("base", "base", 100.0, 1.0),
        row("cheap-but-bad", "variant", 10.0, 0.79),
        row("tie-low", "variant", 40.0, 0.85),
        row("tie-high", "variant", 40.0, 0.95),
        row("dear", "variant", 60.0, 1.0),
        row("na", "variant", 5.0, None),
    ]
    choice = choose(rows, 0.8, energy_measured=True)
    assert choice.pick == "tie-high" and choice.metric == "energy_j" and choice.base_cost == 100.0
    assert [s.name for s in choice.standings] == ["tie-high", "tie-low", "dear", "na", "cheap-but-bad"]
    assert choice.standing("cheap-but-bad").why == "mean recovery 79.00% < 80%"
    assert choose(rows, 0.8, energy_measured=False).metric_note.startswith("energy not measured")
    assert choose(rows[:2], 0.8, energy_measured=True).pick is None
    assert "nothing to ship" in choose(rows[:2], 0.8, energy_measured=True).summary()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["/nope"], "no such folder"),
        ([""], "MODEL is empty"),
        (["TINY", "--suite", "nope"], "unknown suite 'nope'"),
        (["TINY", "--out", ""], "--out is empty"),
    ],
)
def test_bad_input_leaves_no_folder_and_prints_only_the_error(tmp_path: Path, args: list[str], needle: str) -> None:
    args = [str(tiny_vlm_path()) if a == "TINY" else a for a in args]
    out = tmp_path / "o"
    full = ["optimize", *args] + ([] if "--out" in args else ["--out", str(out)])
    result = CliRunner().invoke(app, full)
    assert result.exit_code == 2 and needle in result.output, result.output
    assert result.output.strip().startswith("error:") and "optimize:" not in result.output
    assert not out.exists()


def test_eval_checks_the_image_budget_before_any_work(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["eval", "--base", str(tiny_vlm_path()), "--max-soft-tokens", "99", "--out", str(tmp_path / "e")])
    assert result.exit_code == 2 and result.output.strip().startswith("error: --max-soft-tokens 99")
    assert not (tmp_path / "e").exists()


def test_public_paths_rewrites_text_files_anew_and_leaves_linked_originals(tmp_path: Path) -> None:
    """The rewrite behind the submission's "no path of this machine": longest path first, weights untouched,
    and a record hard-linked from a candidate's folder keeps its real paths there."""
    from ecoquant.optimize.submission import public_paths

    candidate, sub = tmp_path / "run" / "checkpoints" / "c", tmp_path / "run" / "submission"
    candidate.mkdir(parents=True)
    sub.mkdir()
    model = "/data/models/tiny_vlm"
    (candidate / "quant_recipe.json").write_text(json.dumps({"source": {"model": model, "path": model + "/"}}))
    os.link(candidate / "quant_recipe.json", sub / "quant_recipe.json")
    (sub / "report.md").write_text(f"results in {tmp_path / 'run'}/results.json; base {model}")
    (sub / "model.safetensors").write_bytes(model.encode())
    public_paths(sub, {model: "tiny_vlm", str(tmp_path / "run"): "run", str(tmp_path): "never-used-shorter-prefix"})
    assert json.loads((sub / "quant_recipe.json").read_text())["source"] == {"model": "tiny_vlm", "path": "tiny_vlm/"}
    assert (sub / "report.md").read_text() == "results in run/results.json; base tiny_vlm"
    assert (sub / "model.safetensors").read_bytes() == model.encode()  # weights are not text records
    assert model in (candidate / "quant_recipe.json").read_text()
