"""``ecoquant serve-config`` and ``ecoquant serve`` without vLLM: the config, the model card, the fallback server.

The vLLM side (the same config served by a real vLLM) is in ``test_vllm_cpu.py``.
"""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from ecoquant.cli import app
from ecoquant.errors import EcoquantError
from ecoquant.eval.backends.base import GENERATION_PRESETS, GenerationSettings, TextPart
from ecoquant.eval.builtin import builtin_suite
from ecoquant.eval.economy import prompt_variant, suite_requests
from ecoquant.eval.runner import limit_suite
from ecoquant.serve.config import (
    CONFIG_FILE,
    ContextBudget,
    ServeConfigOptions,
    build_serve_config,
    choose_max_model_len,
    count_prompt_tokens,
    generation_overrides,
    load_processor,
    modality_limits,
    prompt_lengths,
)
from ecoquant.serve.write import write_serve_config
from ecoquant.serve.launch import (
    CPU_FLAGS,
    ServeOptions,
    VllmInstall,
    background_server,
    find_vllm,
    flag_args,
    plan_serve,
    vllm_command,
)
from ecoquant.serve.model_card import MARKER

runner = CliRunner()

# One sample per task, one prompt variant: 3 requests to measure (about a second).
FAST = ServeConfigOptions(size=1, limit=1, prompt_variants=("default",))


@pytest.fixture(scope="module")
def w4a16(tiny_gemma4: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ecoquant.api import QuantizeConfig, quantize

    out = tmp_path_factory.mktemp("serve") / "tiny-w4a16"
    quantize(tiny_gemma4, out, QuantizeConfig(), show_progress=False)
    return out


@pytest.fixture(scope="module")
def fast_suite(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201 - a Suite
    return limit_suite(builtin_suite(None, 1), 1)


# ------------------------------------------------------------------ pure choices


def test_max_model_len_worked_example_and_rounding() -> None:
    # The docstring's example: 372 + 32 = 404 tokens, +25% = 505 -> 512.
    assert choose_max_model_len(404) == 512
    # Small suites get the 64-token floor: 183 + 64 = 247 -> 256.
    assert choose_max_model_len(183) == 256
    # Exactly on a multiple after the margin stays there; one more token moves up a step.
    assert choose_max_model_len(64) == 128
    assert choose_max_model_len(65) == 256
    for needed in (1, 100, 404, 1000, 3000):
        chosen = choose_max_model_len(needed)
        assert chosen % 128 == 0 and chosen >= needed * 1.25 and chosen >= needed + 64
    assert choose_max_model_len(404, margin=0.0) == 512  # the 64-token floor still applies
    assert choose_max_model_len(404, margin=1.0) == 896


def test_max_model_len_respects_the_model_context() -> None:
    assert choose_max_model_len(404, limit=480) == 480  # margin trimmed to fit the model
    with pytest.raises(EcoquantError, match="needs 500 tokens but the model holds at most 480"):
        choose_max_model_len(500, limit=480)


def test_generation_defaults_follow_the_eval_presets() -> None:
    assert generation_overrides(GENERATION_PRESETS["greedy"]) == {"temperature": 0.0}
    assert generation_overrides(GENERATION_PRESETS["gemma"]) == {"temperature": 1.0, "top_p": 0.95, "top_k": 64}
    assert generation_overrides(GenerationSettings(do_sample=True, temperature=0.7)) == {"temperature": 0.7}


def test_modality_limits_come_from_the_checkpoint_config() -> None:
    e4b_like = {"vision_config": {}, "audio_config": {}, "video_token_id": 3}
    assert modality_limits(e4b_like, 1) == {"image": 1, "audio": 0, "video": 0}
    assert modality_limits({"vision_config": {}, "audio_config": None}, 2) == {"image": 2}


# ------------------------------------------------------------------ measuring the suite


def test_prompt_lengths_count_image_tokens(w4a16: Path, fast_suite) -> None:  # noqa: ANN001
    from transformers import AutoProcessor

    budget = prompt_lengths(w4a16, fast_suite, ("default", "short-system"))
    assert budget.requests == 2 * fast_suite.n_samples
    assert budget.max_images == 1
    assert budget.prompt_variant == "short-system"  # the same question with a system turn is longer
    # The longest request re-measured with its image dropped: the difference is the image's soft tokens
    # (70 for the tiny model's processor) plus its begin/end markers.
    processor = AutoProcessor.from_pretrained(w4a16)
    task, sample, request = next(
        (t, s, r) for t, s, r in suite_requests(fast_suite, prompt_variant("short-system"), GenerationSettings()) if r.id == budget.request
    )
    text_only = [
        {"role": m.role, "content": [{"type": "text", "text": p.text} for p in m.parts if isinstance(p, TextPart)]}
        for m in request.messages
    ]
    n_text = len(processor.apply_chat_template(text_only, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
    assert budget.prompt_tokens - n_text >= processor.image_processor.max_soft_tokens
    assert budget.answer_tokens == task.max_new_tokens


def test_config_for_a_compressed_tensors_checkpoint(w4a16: Path) -> None:
    result = write_serve_config(w4a16, FAST)
    text = result.config_path.read_text()
    cfg = yaml.safe_load(text)
    assert result.config_path == w4a16 / CONFIG_FILE
    # vLLM detects compressed-tensors from config.json: no quantization key.
    assert "quantization" not in cfg and "load_format" not in cfg
    assert cfg["model"] == str(w4a16.resolve())
    assert cfg["dtype"] == "bfloat16"
    budget = result.config.budget
    assert isinstance(budget, ContextBudget)
    assert cfg["max_model_len"] == choose_max_model_len(budget.total_tokens) >= budget.total_tokens
    # The comment says how the number was chosen, with the measured numbers.
    assert f"{budget.request} ({budget.prompt_variant}) = {budget.prompt_tokens} prompt tokens" in text
    assert f"+ {budget.answer_tokens} answer tokens" in text
    # Mappings are JSON strings, as vLLM's --config parser passes them to its JSON options.
    assert json.loads(cfg["limit_mm_per_prompt"]) == {"image": 1, "audio": 0, "video": 0}
    assert json.loads(cfg["override_generation_config"]) == {"temperature": 0.0}
    assert result.config.as_dict() == {**cfg}


def test_nf4_config_for_the_bf16_base(tiny_gemma4: Path, tmp_path: Path) -> None:
    opts = ServeConfigOptions(nf4=True, max_model_len=300, sampling="gemma")
    result = write_serve_config(tiny_gemma4, opts, out=tmp_path)
    cfg = yaml.safe_load(result.config_path.read_text())
    assert cfg["quantization"] == "bitsandbytes" and cfg["load_format"] == "bitsandbytes"
    assert cfg["max_model_len"] == 300
    assert json.loads(cfg["override_generation_config"]) == {"temperature": 1.0, "top_p": 0.95, "top_k": 64}
    card = result.card_path.read_text() if result.card_path else ""
    assert "runtime bitsandbytes NF4 (baseline)" in card and "13.7%" in card
    assert not (tiny_gemma4 / CONFIG_FILE).exists()  # --out kept the base folder untouched


def test_nf4_of_a_quantized_checkpoint_is_refused(w4a16: Path, tmp_path: Path) -> None:
    with pytest.raises(EcoquantError, match="already quantized"):
        build_serve_config(w4a16, ServeConfigOptions(nf4=True, max_model_len=256))


def test_plain_bf16_folder_gets_a_config_but_no_card(tiny_gemma4: Path, tmp_path: Path) -> None:
    result = write_serve_config(tiny_gemma4, ServeConfigOptions(max_model_len=256), out=tmp_path)
    assert result.card_path is None and not (tmp_path / "README.md").exists()
    assert "quantization" not in yaml.safe_load(result.config_path.read_text())


# ------------------------------------------------------------------ model card


def packed_modules(path: Path) -> list[str]:
    """Modules stored quantized, read from the safetensors header (not from ecoquant's own bookkeeping)."""
    from ecoquant.models.loading import tensor_infos

    return [t.name.removesuffix(".weight_packed") for t in tensor_infos(path) if t.name.endswith(".weight_packed")]


def card_facts(card: str) -> tuple[int, int, list[int], list[str]]:
    """From a card: the quantized count, the kept count, the per-kind counts of the quantized section,
    and the ignore list it shows."""
    quantized = int(card.split("## What is quantized\n\n", 1)[1].split(" modules", 1)[0])
    kept = int(card.split("`quantization_config.ignore` keeps ", 1)[1].split(" ", 1)[0])
    section = card.split("## What is quantized", 1)[1].split("##", 1)[0]
    kinds = [int(line.rsplit("× ", 1)[1]) for line in section.splitlines() if line.startswith("  - `")]
    shown = card.split("<summary>quantization_config.ignore</summary>", 1)[1].split("</details>", 1)[0]
    ignore = [line[3:-1] for line in shown.splitlines() if line.startswith("- `")]
    return quantized, kept, kinds, ignore


def test_card_is_generated_from_the_checkpoint(w4a16: Path) -> None:
    recipe = json.loads((w4a16 / "quant_recipe.json").read_text())
    qconfig = json.loads((w4a16 / "config.json").read_text())["quantization_config"]
    result = write_serve_config(w4a16, FAST)
    card = result.card_path.read_text() if result.card_path else ""
    assert card.startswith(MARKER)
    assert "W4A16 (RTN, compressed-tensors)" in card
    quantized, kept, kinds, ignore = card_facts(card)
    assert quantized == len(packed_modules(w4a16)) == len(recipe["modules"]) == sum(kinds)
    assert kept == len(qconfig["ignore"]) and ignore == qconfig["ignore"]
    assert str(w4a16.parent) not in card and f"of `{Path(recipe['source']['model']).name}`" in card
    assert "None: RTN is data-free." in card
    assert "vllm serve --config vllm_config.yaml" in card
    assert f"max_model_len: {yaml.safe_load(result.config_path.read_text())['max_model_len']}" in card
    assert recipe["ecoquant"]["git_sha"] is None or recipe["ecoquant"]["git_sha"] in card
    assert "Apache 2.0" in card  # gemma4's license note


def test_card_of_an_int4_head_pick_is_its_quantization_config(tiny_gemma4: Path, tmp_path: Path) -> None:
    """Found in the demo: a pick whose head is int4 in its own group was carded as "37 Linear modules"
    with ``lm_head`` under the ignore patterns (the recipe's view, not the checkpoint's)."""
    from ecoquant.api import QuantizeConfig, quantize

    out = tmp_path / "head4"
    quantize(tiny_gemma4, out, QuantizeConfig(lm_head="int4"), show_progress=False)
    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    assert "lm_head" in qconfig["config_groups"] and "lm_head" in packed_modules(out)
    card = (write_serve_config(out, FAST).card_path or out / "missing").read_text()
    quantized, kept, kinds, ignore = card_facts(card)
    assert quantized == len(packed_modules(out)) == sum(kinds)
    assert kept == len(qconfig["ignore"]) and ignore == qconfig["ignore"] and "lm_head" not in ignore
    assert "- group `lm_head` (targets `re:.*lm_head$`): W4A16" in card and "  - `lm_head` × 1" in card
    kept_section = card.split("## What is kept in bf16", 1)[1].split("##", 1)[0]
    assert "lm_head" not in kept_section


def test_card_never_replaces_a_foreign_readme(w4a16: Path, tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text("# the base model's own card\n")
    with pytest.raises(EcoquantError, match="not written by ecoquant"):
        write_serve_config(w4a16, FAST, out=tmp_path)
    assert not (tmp_path / CONFIG_FILE).exists()  # refused before writing anything
    write_serve_config(w4a16, FAST, out=tmp_path, overwrite=True)
    assert (tmp_path / "README.md").read_text().startswith(MARKER)
    write_serve_config(w4a16, FAST, out=tmp_path)  # ours: replaced without asking


def test_card_includes_eval_results(tiny_gemma4: Path, w4a16: Path, tmp_path: Path) -> None:
    from ecoquant.eval.runner import EvalConfig, run_eval
    from ecoquant.report.table import markdown_table, report_rows

    config = EvalConfig(size=1, limit=1, device="cpu", batch_size=1, warmup_requests=0, idle_seconds=0,
                        generation=GenerationSettings(max_new_tokens=2))
    # The checkpoint alone (as the base row) is enough to check the card: half the time of base + variant.
    record = run_eval(str(w4a16), [], config, show_progress=False)
    results = record.save(tmp_path / "results.json")
    result = write_serve_config(w4a16, FAST, out=tmp_path / "card", results=results)
    card = result.card_path.read_text() if result.card_path else ""
    assert markdown_table(report_rows(record)) in card
    assert f"This checkpoint is the row `{w4a16.name}`." in card
    assert "energy modelled for L4" in card  # a W4A16 checkpoint's roofline, labelled as modelled


# ------------------------------------------------------------------ CLI


def test_serve_config_cli(w4a16: Path, tmp_path: Path) -> None:
    args = ["serve-config", str(w4a16), "--size", "1", "--limit", "1", "--prompt-variant", "default",
            "--sampling", "gemma", "--model-id", "org/tiny-w4a16", "--out", str(tmp_path),
            "--option", "max-num-seqs=4", "--option", "speculative_config={method: mtp, num_speculative_tokens: 2}",
            "--option", "max_model_len=4096"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    cfg = yaml.safe_load((tmp_path / CONFIG_FILE).read_text())
    assert cfg["model"] == "org/tiny-w4a16"
    assert json.loads(cfg["override_generation_config"])["top_k"] == 64
    assert cfg["max_num_seqs"] == 4 and cfg["max_model_len"] == 4096  # an option replaces the measured value
    assert json.loads(cfg["speculative_config"]) == {"method": "mtp", "num_speculative_tokens": 2}
    assert list(cfg).count("max_model_len") == 1
    assert (tmp_path / "README.md").is_file()


def test_serve_config_cli_errors_are_one_line(tmp_path: Path) -> None:
    result = runner.invoke(app, ["serve-config", str(tmp_path)])
    assert result.exit_code == 2
    assert "is not a model folder" in result.output
    result = runner.invoke(app, ["serve-config", str(tmp_path), "--sampling", "hot"])
    assert result.exit_code == 2 and "unknown sampling preset 'hot'" in result.output
    result = runner.invoke(app, ["serve-config", str(tmp_path), "--option", "max_num_seqs"])
    assert result.exit_code == 2 and "--option takes KEY=VALUE" in result.output
    result = runner.invoke(app, ["serve-config", str(tmp_path), "--option", "model=x"])
    assert result.exit_code == 2 and "not a serving option" in result.output


# ------------------------------------------------------------------ launching


def test_vllm_command_lines() -> None:
    cfg = Path("/m/vllm_config.yaml")
    gpu = vllm_command(VllmInstall(Path("/env/bin/python"), "vllm", "0.20.2"), cfg, {"port": 8001, "enforce-eager": True})
    assert gpu == ["/env/bin/python", "-m", "vllm.entrypoints.cli.main", "serve", "--config", str(cfg), "--port", "8001", "--enforce-eager"]
    cpu = vllm_command(VllmInstall(Path("/env/bin/python"), "vllm-cpu", "0.32.0"), cfg)
    assert cpu == ["/env/bin/python", "-m", "vllm.entrypoints.openai.api_server", "--config", str(cfg)]
    assert flag_args({"a": False, "b": None, "c": 0.3}) == ["--c", "0.3"]
    assert flag_args(CPU_FLAGS) == ["--gpu-memory-utilization", "0.3", "--enforce-eager"]


def test_an_interpreter_without_vllm_is_an_error_not_a_fallback(monkeypatch: pytest.MonkeyPatch, tiny_gemma4: Path) -> None:
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("this environment has vLLM")
    with pytest.raises(EcoquantError, match="has no vLLM installed"):
        find_vllm(sys.executable)
    monkeypatch.setenv("ECOQUANT_VLLM_PYTHON", sys.executable)
    with pytest.raises(EcoquantError, match="has no vLLM installed"):
        plan_serve(tiny_gemma4, ServeOptions(backend="vllm", config=None))


def test_plan_uses_the_folder_config_and_sees_nf4(w4a16: Path, tiny_gemma4: Path, tmp_path: Path) -> None:
    write_serve_config(w4a16, FAST)
    plan = plan_serve(w4a16, ServeOptions(backend="transformers"))
    assert plan.backend == "transformers" and plan.config_path == w4a16 / CONFIG_FILE and not plan.nf4
    assert plan.served_name == str(w4a16) and not plan.temporary_config
    write_serve_config(tiny_gemma4, ServeConfigOptions(nf4=True, max_model_len=256), out=tmp_path)
    plan = plan_serve(tiny_gemma4, ServeOptions(backend="transformers", config=tmp_path / CONFIG_FILE))
    assert plan.nf4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_serve_falls_back_to_the_transformers_server(w4a16: Path, tmp_path: Path) -> None:
    """`ecoquant serve --backend transformers` answers the eval backend's endpoints with the checkpoint."""
    from ecoquant.eval.backends.openai_backend import OpenAIBackend

    write_serve_config(w4a16, FAST)
    port = _free_port()
    exe = Path(sys.executable).parent / "ecoquant"
    cmd = [str(exe), "serve", str(w4a16), "--backend", "transformers", "--port", str(port), "--device", "cpu"]
    url = f"http://127.0.0.1:{port}"
    with background_server(cmd, url, tmp_path / "serve.log", ready_timeout_s=180):
        suite = limit_suite(builtin_suite(None, 1), 1)
        requests = [r for _, _, r in suite_requests(suite, prompt_variant("default"), GenerationSettings(max_new_tokens=3))]
        backend = OpenAIBackend(url, str(w4a16), concurrency=1, timeout_s=120)
        completions = backend.generate(requests, GenerationSettings(max_new_tokens=3))
        backend.close()
    assert "with transformers" in (tmp_path / "serve.log").read_text()
    # The server counts prompt tokens as serve-config measures them (image tokens included).
    processor = load_processor(w4a16)
    assert [c.tokens_in for c in completions] == [count_prompt_tokens(processor, r) for r in requests]
    assert all(1 <= c.tokens_out <= 3 for c in completions)


def test_nf4_needs_a_vllm_that_still_has_bitsandbytes(tiny_gemma4: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ecoquant.serve import launch

    assert launch.version_tuple("0.32.0+cpu") == (0, 32, 0) and launch.version_tuple("0.10.1.1") == (0, 10, 1, 1)
    assert launch.vllm_runs_nf4(VllmInstall(Path("p"), "vllm", "0.20.2"))
    assert launch.vllm_runs_nf4(VllmInstall(Path("p"), "vllm", "0.27.1"))
    assert not launch.vllm_runs_nf4(VllmInstall(Path("p"), "vllm-cpu", "0.32.0"))
    write_serve_config(tiny_gemma4, ServeConfigOptions(nf4=True, max_model_len=256), out=tmp_path)
    new = VllmInstall(Path("/env/bin/python"), "vllm-cpu", "0.32.0")
    monkeypatch.setattr(launch, "find_vllm", lambda python=None: new)
    opts = {"config": tmp_path / CONFIG_FILE}
    with pytest.raises(EcoquantError, match="vLLM 0.32.0 has no bitsandbytes"):
        plan_serve(tiny_gemma4, ServeOptions(backend="vllm", **opts))
    plan = plan_serve(tiny_gemma4, ServeOptions(backend="auto", **opts))
    assert plan.backend == "transformers" and plan.nf4  # auto: the transformers server runs NF4
    old = VllmInstall(Path("/env/bin/python"), "vllm", "0.20.2")
    monkeypatch.setattr(launch, "find_vllm", lambda python=None: old)
    plan = plan_serve(tiny_gemma4, ServeOptions(backend="auto", **opts))
    assert plan.backend == "vllm" and plan.command[:4] == ("/env/bin/python", "-m", "vllm.entrypoints.cli.main", "serve")


def test_the_source_is_named_by_hub_id_or_folder_name_never_a_local_path(tmp_path: Path) -> None:
    from ecoquant.serve.checkpoint_facts import public_source

    snapshot = "/root/.cache/huggingface/hub/models--google--gemma-4-E4B-it/snapshots/0123abcd"
    assert public_source({"model": "google/gemma-4-E4B-it", "path": snapshot}) == "google/gemma-4-E4B-it"
    assert public_source({"model": snapshot, "path": snapshot}) == "google/gemma-4-E4B-it"
    (tmp_path / "my-model").mkdir()
    assert public_source({"model": str(tmp_path / "my-model"), "path": str(tmp_path / "my-model")}) == "my-model"
    assert public_source(None) == "the base model"
