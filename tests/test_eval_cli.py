"""``ecoquant eval`` / ``ecoquant report`` end to end on CPU: the tiny Gemma-4 and its RTN variant on the
built-in suite, the OpenAI backend through the CLI, and energy wired from a replayed meter into the report."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from ecoquant.cli import app
from ecoquant.energy.meter import Reading
from ecoquant.energy.nvml import NvmlMeter, open_meter
from ecoquant.energy.replay import ReplayNvml
from ecoquant.eval.backends.base import GenerationSettings
from ecoquant.eval.runner import EvalConfig, RunRecord, run_eval
from ecoquant.report.table import markdown_report

runner = CliRunner()

# Small on purpose: one sample per task (3 requests per model), 3 new tokens each.
SMALL = ["--suite", "builtin", "--size", "1", "--limit", "1", "--max-new-tokens", "3", "--warmup", "1"]


@pytest.fixture(scope="module")
def rtn_variant(tiny_gemma4: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ecoquant.api import QuantizeConfig, quantize

    out = tmp_path_factory.mktemp("variants") / "tiny-rtn"
    quantize(tiny_gemma4, out, QuantizeConfig(), show_progress=False)
    return out


@pytest.fixture(scope="module")
def eval_out(tiny_gemma4: Path, rtn_variant: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("eval")
    args = [
        "eval",
        "--base",
        str(tiny_gemma4),
        "--variant",
        str(rtn_variant),
        *SMALL,
        "--batch-size",
        "1",
        "--out",
        str(out),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return out, result.output


def test_eval_writes_the_run_record(eval_out: tuple[Path, str], tiny_gemma4: Path, rtn_variant: Path) -> None:
    out, _ = eval_out
    record = RunRecord.load(out / "results.json")
    data = json.loads((out / "results.json").read_text())
    assert data["schema"] == "ecoquant.eval/1"
    assert [(r.label, r.role) for r in record.runs] == [(tiny_gemma4.name, "base"), ("tiny-rtn", "variant")]
    # One sample per task: six basic-page tasks and three realistic ones.
    assert record.suite["spec"] == "builtin" and record.suite["n_samples"] == 9
    assert record.generation == GenerationSettings(max_new_tokens=3).to_record()
    assert [p["name"] for p in record.prompt_variants] == ["default"]
    base, variant = record.runs
    assert base.recipe is None
    assert variant.recipe is not None and variant.recipe["method"] == "rtn"
    assert record.energy.measured is False and record.energy.meter == "no NVML device"
    for run in record.runs:
        assert run.energy is None and run.energy_j is None  # not measured, and not zero
        assert run.requests == len(run.samples) == 9
        assert run.tokens_in == sum(s.tokens_in for s in run.samples) > 9 * 64  # image soft tokens counted
        assert run.tokens_out == sum(s.tokens_out for s in run.samples)
        assert all(1 <= s.tokens_out <= 3 for s in run.samples)
        assert run.wall_time_s > 0
        assert set(run.suite_scores) == {"doc", "image"}
        assert run.backend["kind"] == "transformers" and run.backend["device"] == "cpu"
        assert {s.task for s in run.samples} == set(run.task_scores)
    # The variant really is a different model: its answers or their lengths differ somewhere.
    assert [s.prediction for s in base.samples] != [
        s.prediction for s in variant.samples
    ] or base.tokens_out != variant.tokens_out


def test_eval_writes_table_and_plot(eval_out: tuple[Path, str], tiny_gemma4: Path) -> None:
    out, output = eval_out
    assert "energy: not measured (no NVML device)" in output
    table = (out / "report.md").read_text()
    assert table in output  # the table is printed too
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| model")]
    assert [r.split("|")[1].strip() for r in rows] == [f"{tiny_gemma4.name} (base)", "tiny-rtn"]
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] == "—"  # energy: no number without a meter
        assert float(cells[-1]) >= 0 and int(cells[-2]) <= 27  # wall s, output tokens (9 x 3 at most)
    assert "- energy: not measured (no NVML device)" in table
    with Image.open(out / "pareto.png") as img:
        assert img.format == "PNG" and img.size[0] > 400


def test_report_re_renders_the_same_table(eval_out: tuple[Path, str], tmp_path: Path) -> None:
    out, _ = eval_out
    result = runner.invoke(app, ["report", str(out / "results.json"), "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "report.md").read_text() == (out / "report.md").read_text()
    assert (tmp_path / "pareto.png").stat().st_size > 0


@pytest.fixture(scope="module")
def server_url(tiny_gemma4: Path) -> Iterator[str]:
    from ecoquant.serve.openai_server import serve_model

    server = serve_model(tiny_gemma4, host="127.0.0.1", port=0, served_name="tiny-gemma4", device="cpu").start()
    yield server.url
    server.stop()
    server.backend.close()


def test_eval_through_the_openai_backend_scores_like_transformers(
    eval_out: tuple[Path, str], server_url: str, tmp_path: Path
) -> None:
    args = [
        "eval",
        "--base",
        "tiny-gemma4",
        "--backend",
        "openai",
        "--url",
        server_url,
        *SMALL,
        "--out",
        str(tmp_path),
        "--no-progress",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    (served,) = RunRecord.load(tmp_path / "results.json").runs
    local = RunRecord.load(eval_out[0] / "results.json").runs[0]
    assert served.backend["kind"] == "openai" and served.backend["url"] == server_url + "/v1"
    # Greedy, batch size 1 on both sides: the same answers, token counts and scores. A server reports only
    # the prompt's total, and a served name has no folder to read an image budget from: no text/image split.
    assert [replace(s, text_tokens=None, image_tokens=None) for s in local.samples] == list(served.samples)
    assert served.modelled_energy is None
    assert served.task_scores == local.task_scores and served.suite_scores == local.suite_scores


def test_energy_from_a_replayed_meter_reaches_the_record_and_table(tiny_gemma4: Path) -> None:
    # Idle: 2 s at 40 W on GPU 0 and 10 W on GPU 1. Suite window: 90 J + 30 J over 1.5 s.
    readings = [
        Reading(0.0, {0: 10_000, 1: 5_000}),
        Reading(2.0, {0: 90_000, 1: 25_000}),
        Reading(3.0, {0: 100_000, 1: 30_000}),
        Reading(4.5, {0: 190_000, 1: 60_000}),
    ]
    nvml = ReplayNvml(readings)
    meter = open_meter(nvml=nvml, clock=nvml.clock, environ={})
    assert isinstance(meter, NvmlMeter)
    config = EvalConfig(
        size=1,
        limit=1,
        device="cpu",
        generation=GenerationSettings(max_new_tokens=2),
        warmup_requests=1,
        idle_seconds=0.001,
        repeats=1,  # one suite window (repeats: tests/test_decision.py)
    )
    record = run_eval(str(tiny_gemma4), (), config, meter=meter, show_progress=False)
    assert record.energy.measured and record.energy.idle_power_w == pytest.approx(50.0)
    (run,) = record.runs
    assert run.energy is not None
    assert run.energy.gpu_energy_j == pytest.approx({"0": 90.0, "1": 30.0})
    assert run.energy.total_j == pytest.approx(120.0) and run.wall_time_s == pytest.approx(1.5)
    assert run.energy.idle_corrected_j == pytest.approx(120.0 - 50.0 * 1.5)
    text = markdown_report(record)
    assert f"| {tiny_gemma4.name} (base) | 120.00 |" in text
    assert "idle baseline: 50.0 W over 2.0 s" in text and "45.00 J" in text


def one_line_error(args: list[str], match: str) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    text = result.output.strip()
    assert "Traceback" not in text and text.startswith("error:"), text
    assert match in " ".join(text.split()), text


def test_cli_errors_are_one_line(tmp_path: Path, tiny_gemma4: Path) -> None:
    one_line_error(["eval", "--base", "x", "--backend", "openai"], "needs --url")
    one_line_error(["eval", "--base", "x", "--prompt-variant", "wordy"], "unknown prompt variant 'wordy'")
    one_line_error(["eval", "--base", "x", "--sampling", "hot"], "unknown sampling preset")
    one_line_error(["report", str(tmp_path / "none.json")], "no such results file")
    one_line_error(["eval", "--base", str(tmp_path / "missing")], "no such folder")
    one_line_error(["eval", "--base", str(tiny_gemma4), "--variant", "nf4:" + str(tmp_path)], "has no config.json")
    (tmp_path / "other.json").write_text('{"schema": "something/2"}')
    one_line_error(["report", str(tmp_path / "other.json")], "not an ecoquant eval record")


def test_prompt_variants_are_listed() -> None:
    result = runner.invoke(app, ["prompt-variants"])
    assert result.exit_code == 0
    assert "short-system" in result.output and "bare" in result.output


def test_eval_records_the_token_split_and_modelled_l4_energy(eval_out: tuple[Path, str]) -> None:
    out, _ = eval_out
    record = RunRecord.load(out / "results.json")
    data = json.loads((out / "results.json").read_text())
    base, variant = record.runs
    for run, raw in zip(record.runs, data["runs"], strict=True):
        for s in run.samples:
            assert s.text_tokens is not None and s.image_tokens is not None and s.images is not None
            assert s.text_tokens + s.image_tokens == s.tokens_in and s.text_tokens > 0
            assert (s.images > 0) == (s.image_tokens > 0)  # every built-in sample has its page or chart
        assert raw["modelled_energy"]["gpu"] == "L4" and set(raw["modelled_energy"]) == {"gpu", "total_j", "parts"}
        parts = raw["modelled_energy"]["parts"]
        assert set(parts) == {"prefill_text", "prefill_image", "vision_encoder", "decode", "draft", "idle"}
        assert sum(parts.values()) == pytest.approx(raw["modelled_energy"]["total_j"])
        assert parts["draft"] == 0.0  # no assistant drafted
        assert all(v > 0 for k, v in parts.items() if k != "draft")
    assert base.modelled_energy is not None and variant.modelled_energy is not None
    # the same prompts, and W4A16 reads fewer bytes per decoded token; prefill compute is the same
    assert [s.image_tokens for s in base.samples] == [s.image_tokens for s in variant.samples]
    assert variant.modelled_energy["parts"]["vision_encoder"] == pytest.approx(base.modelled_energy["parts"]["vision_encoder"])
    per_token = [r.modelled_energy["parts"]["decode"] / sum(max(s.tokens_out - 1, 0) for s in r.samples) for r in (base, variant)]
    assert per_token[1] < per_token[0]
    table = (out / "report.md").read_text()
    assert "energy modelled for L4" in table and "not measured" in table
    from ecoquant.report.table import report_rows

    assert [r.modelled_energy_j for r in report_rows(record)] == [base.modelled_energy["total_j"], variant.modelled_energy["total_j"]]


def test_report_models_another_gpu_and_old_records_still_load(eval_out: tuple[Path, str], tmp_path: Path) -> None:
    out, _ = eval_out
    data = json.loads((out / "results.json").read_text())
    for run in data["runs"]:  # a results.json from before the token split and the roofline
        del run["modelled_energy"]
        for s in run["samples"]:
            del s["text_tokens"], s["image_tokens"], s["images"]
    old = RunRecord.from_dict(data)
    assert all(r.modelled_energy is None and r.samples[0].images is None for r in old.runs)
    assert "energy modelled" not in markdown_report(old)
    # another target GPU: the same counts through another datasheet (decode-bound: more bandwidth, fewer seconds)
    from ecoquant.eval.modelled import run_modelled_energy

    new = RunRecord.load(out / "results.json").runs[0]
    h100 = run_modelled_energy(new.source, new.samples, "h100")
    assert h100 is not None and new.modelled_energy is not None
    assert h100["gpu"] == "H100" and h100["parts"]["decode"] != new.modelled_energy["parts"]["decode"]
    one_line_error(["eval", "--base", "x", "--target-gpu", "B200"], "unknown GPU 'B200'")
    one_line_error(["eval", "--base", "x", "--target-concurrency", "0"], "--target-concurrency must be at least 1")
