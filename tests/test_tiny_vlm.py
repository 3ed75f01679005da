"""The shipped trained tiny Gemma-4 VLM: loads offline, reads the basic pages, needs the image, and
GPTQ keeps at least as much of its quality as RTN."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from ecoquant.api import QuantizeConfig, quantize
from ecoquant.cli import app
from ecoquant.demo import DEMO_CALIBRATION
from ecoquant.eval.backends.base import generation_settings
from ecoquant.eval.backends.transformers_backend import TransformersBackend, TransformersOptions
from ecoquant.eval.economy import prompt_variant, suite_requests
from ecoquant.eval.loaders import load_suite
from ecoquant.eval.runner import EvalConfig, run_eval
from ecoquant.eval.tasks import Suite, Task, score_in_order, suite_scores
from ecoquant.fixtures.tiny_vlm import CHECKSUMS, SHIPPED_DIR, tiny_vlm_path, verify_checksums, write_checksums
from ecoquant.quantize.scheme import QuantScheme
from ecoquant.report.table import mean_recovery, recovery

#: Evaluation pages per basic task for the floors (6 tasks: 120 samples).
FLOOR_PAGES = 20
FLOOR = 0.7
SETTINGS = generation_settings(max_new_tokens=8)


def test_fixture_folder_is_complete_small_and_intact() -> None:
    folder = tiny_vlm_path()
    assert folder == SHIPPED_DIR
    assert verify_checksums(folder) == []
    total = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert total <= 30 * 1024 * 1024
    for name in ("config.json", "model.safetensors", "tokenizer.json", "processor_config.json", "chat_template.jinja",
                 "TRAINING.json", "loss.csv", "loss.png", CHECKSUMS):
        assert (folder / name).is_file(), name
    record = json.loads((folder / "TRAINING.json").read_text())
    assert record["train_minutes"] <= 45
    assert record["recipe"]["seed"] and record["steps_done"] > 0


def test_checksum_mismatch_is_detected(tmp_path: Path) -> None:
    copy = tmp_path / "m"
    copy.mkdir()
    for p in SHIPPED_DIR.iterdir():
        if p.is_file():
            (copy / p.name).write_bytes(p.read_bytes())
    assert verify_checksums(copy) == []
    (copy / "config.json").write_text("{}")
    assert verify_checksums(copy) == ["config.json"]
    write_checksums(copy)  # the writer the training script uses: its list is what the verifier reads
    assert verify_checksums(copy) == []
    assert (copy / CHECKSUMS).read_text() != (SHIPPED_DIR / CHECKSUMS).read_text()


def test_cli_prints_the_folder_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = CliRunner().invoke(app, ["fixtures", "tiny-vlm"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1] == str(SHIPPED_DIR)


def test_loads_offline_with_every_module_type(monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    processor = AutoProcessor.from_pretrained(SHIPPED_DIR)
    model = AutoModelForImageTextToText.from_pretrained(SHIPPED_DIR, dtype=torch.bfloat16)
    assert type(model).__name__ == "Gemma4ForConditionalGeneration"
    assert model.model.vision_tower is not None and model.model.audio_tower is not None
    text = model.config.get_text_config()
    assert text.hidden_size_per_layer_input > 0
    assert model.model.language_model.embed_tokens_per_layer.weight.numel() > 0
    layers = model.model.language_model.layers
    shared = [i for i, layer in enumerate(layers) if layer.self_attn.is_kv_shared_layer]
    assert {text.layer_types[i] for i in shared} == {"sliding_attention", "full_attention"}
    for i in shared:  # shared layers read an earlier layer's K/V and have no projections of their own
        assert not hasattr(layers[i].self_attn, "k_proj") and not hasattr(layers[i].self_attn, "v_proj")
    assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()
    assert processor.tokenizer.convert_tokens_to_ids("<|image|>") == model.config.image_token_id


@pytest.fixture(scope="module")
def floor_suite(tmp_path_factory: pytest.TempPathFactory) -> Suite:
    return load_suite("builtin-basic", cache_dir=tmp_path_factory.mktemp("basic"), size=FLOOR_PAGES)


@pytest.fixture(scope="module")
def base_scores(floor_suite: Suite) -> dict[str, float]:
    return _scores(str(SHIPPED_DIR), floor_suite)


def _scores(model: str, suite: Suite) -> dict[str, float]:
    backend = TransformersBackend.load(model, TransformersOptions(device="cpu", batch_size=8))
    try:
        rows = suite_requests(suite, prompt_variant("default"), SETTINGS)
        completions = backend.generate([r for _, _, r in rows], SETTINGS)
    finally:
        backend.close()
    return suite_scores(score_in_order([task for task, _, _ in rows], [c.text for c in completions]))


def test_base_model_reaches_the_floor_on_each_half(base_scores: dict[str, float]) -> None:
    assert base_scores["doc"] >= FLOOR, base_scores
    assert base_scores["image"] >= FLOOR, base_scores


def _shuffled_images(suite: Suite) -> Suite:
    """Each sample asked about the next sample's image (same task): the question no longer matches the picture."""
    tasks = []
    for t in suite.tasks:
        s = t.samples
        samples = [dataclasses.replace(x, images=s[(i + 1) % len(s)].images) for i, x in enumerate(s)]
        tasks.append(Task(t.name, t.suite, t.metric, t.prompt_suffix, t.max_new_tokens, tuple(samples)))
    return Suite(f"{suite.name}-shuffled", tuple(tasks))


def test_image_blind_control_scores_near_chance(floor_suite: Suite, base_scores: dict[str, float]) -> None:
    blind = _scores(str(SHIPPED_DIR), _shuffled_images(floor_suite))
    # Chance per half is about 0.02 (doc) and 0.2 (image): see test_basic_pages.
    assert blind["doc"] < 0.15, blind
    assert blind["image"] < 0.4, blind
    assert blind["doc"] < base_scores["doc"] - 0.5 and blind["image"] < base_scores["image"] - 0.3


def test_gptq_recovers_at_least_as_much_as_rtn(tmp_path: Path, floor_suite: Suite, base_scores: dict[str, float]) -> None:
    rtn = quantize(SHIPPED_DIR, tmp_path / "rtn", QuantizeConfig(scheme=QuantScheme(observer="minmax")), show_progress=False)
    gptq = quantize(SHIPPED_DIR, tmp_path / "gptq", QuantizeConfig(method="gptq", calibration=DEMO_CALIBRATION),
                    show_progress=False)
    means = {}
    for name, result in (("rtn", rtn), ("gptq", gptq)):
        scores = _scores(str(result.out), floor_suite)
        means[name] = mean_recovery([recovery(scores[k], base_scores[k]) for k in ("doc", "image")])
    assert means["gptq"] is not None and means["rtn"] is not None
    assert means["gptq"] >= means["rtn"], means


def test_eval_runner_reports_real_scores_for_the_fixture(tmp_path: Path) -> None:
    config = EvalConfig(suite="builtin-basic", size=2, cache_dir=tmp_path, generation=SETTINGS, idle_seconds=0.0,
                        device="cpu")
    record = run_eval(str(tiny_vlm_path()), [], config, show_progress=False)
    run = record.runs[0]
    assert run.suite_scores["doc"] > 0 and run.suite_scores["image"] > 0
    assert run.tokens_out > 0


def test_demo_is_the_decision_and_a_rerun_reuses_everything(tmp_path: Path) -> None:
    """The demo runs optimize's staged search: recoveries really differ, the pick is by modelled L4 energy
    (no NVML here), and the submission folder is complete."""
    from ecoquant.demo import run_demo
    from ecoquant.energy.roofline import PARTS
    from ecoquant.optimize.run import CHOICE_FILE
    from ecoquant.report.table import report_rows

    result = run_demo(tmp_path / "demo", show_progress=False)
    choice = json.loads((result.results.parent / CHOICE_FILE).read_text())
    outcomes = [o for stage in choice["search"]["stages"].values() for o in stage.values()]
    recoveries = [o["mean_recovery"] for o in outcomes if o["mean_recovery"] is not None]
    assert any(r < 1.0 for r in recoveries), recoveries  # at least one candidate loses quality
    assert any(o["passes_gate_on_subset"] for o in outcomes)  # and at least one keeps the gate
    assert {"weights", "serving", "final"} <= set(choice["search"]["stages"])

    # the pick: the cheapest finalist by energy modelled for the L4 among those over the gate
    assert result.choice.metric == "modelled_energy_j" and result.choice.modelled_for == "L4"
    rows = report_rows(result.record)
    passing = [r for r in rows if r.role == "variant" and r.mean_recovery is not None and r.mean_recovery >= 0.8]
    assert result.choice.pick == min(passing, key=lambda r: (r.modelled_energy_j, -(r.mean_recovery or 0))).model
    for row in rows:
        assert row.modelled_energy_j is not None and row.modelled_energy_j > 0
        assert set(row.modelled_energy["parts"]) == set(PARTS)
        assert sum(row.modelled_energy["parts"].values()) == pytest.approx(row.modelled_energy_j)
        if row.role == "variant":
            bounds = (row.recovery_interval or {}).get("mean")
            assert bounds is not None and bounds[0] <= row.mean_recovery <= bounds[1], row
    text = (result.results.parent / "report.md").read_text()
    assert "energy modelled for L4" in text and "not measured" in text

    sub = result.submission
    assert sub is not None
    for name in ("vllm_config.yaml", "README.md", "quant_recipe.json", "config.json"):
        assert (sub / name).is_file(), name
    assert any(sub.glob("*.safetensors"))

    # the MTP lever: stage 2 probed the kept weights with the shipped assistant, each acceptance measured on
    # its own quantized target, and tried the k that acceptance chose (levers.MtpLever.ks_after)
    drafted = {n: o for n, o in choice["search"]["stages"]["serving"].items() if "+mtp" in n}
    probes = [n for n in drafted if n.endswith("+mtp4")]
    assert probes and all(drafted[n]["mean_accepted_per_step"] is not None for n in drafted), drafted
    assert all(0.0 <= o["mean_accepted_per_step"] <= int(n.rsplit("+mtp", 1)[1]) for n, o in drafted.items())
    # the lever's energy modelled for the L4 comes split into its parts, the assistant's own among them
    assert all(o["parts"]["draft"] > 0 and o["parts"]["decode"] > 0 for o in drafted.values()), drafted
    pick_run = next(r for r in result.record.runs if r.label == result.choice.pick)
    if pick_run.speculative:  # a drafting pick ships its assistant inside the folder, named relatively
        import yaml

        draft = json.loads(yaml.safe_load((sub / "vllm_config.yaml").read_text())["speculative_config"])
        assert draft["model"] == "./assistant" and (sub / "assistant" / "config.json").is_file()
    assert json.loads((sub / "choice.json").read_text())["vllm"]["min_version"] is not None

    # the acceptance table: the bf16 target against the W4A16 and W8A8 targets, at the probe's k
    from ecoquant.demo import target_acceptance

    table = target_acceptance(tmp_path / "demo", show_progress=False)
    assert [a.role for a in table] == ["bf16 base", "W4A16", "W8A8-INT8"], table
    assert all(a.target_steps > 0 and 0.0 <= a.acceptance_rate <= 1.0 for a in table), table
    assert table[0].mean_accepted_per_step > 0  # the assistant was distilled from the bf16 target: it drafts

    again = run_demo(tmp_path / "demo", show_progress=False)
    assert again.quantized == () and again.evaluated == ()
    assert again.choice.pick == result.choice.pick
