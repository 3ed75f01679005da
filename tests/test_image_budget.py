"""The image-token budget (``--max-soft-tokens``): validated per processor, honoured by every path that renders images.

The trained tiny VLM has Gemma-4's image processor (default budget 70 there,
pooling 2 x 2): its 128 x 128 pages become 64 soft tokens at 70, 121 at 140,
256 at 280. The same request must count the same tokens in the transformers
backend, in ``serve-config``'s measurement, in the built-in server and (the
vLLM group, tests/test_vllm_cpu.py) in vLLM.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from ecoquant.cli import app
from ecoquant.errors import EcoquantError
from ecoquant.eval.backends.base import GenerationSettings
from ecoquant.eval.backends.transformers_backend import TransformersBackend, TransformersOptions
from ecoquant.eval.economy import prompt_variant, suite_requests
from ecoquant.eval.image_budget import check_max_soft_tokens
from ecoquant.eval.loaders import load_suite
from ecoquant.eval.runner import EvalConfig, limit_suite
from ecoquant.fixtures.tiny_vlm import tiny_vlm_path
from ecoquant.serve.config import CONFIG_FILE, ServeConfigOptions, count_prompt_tokens, load_processor
from ecoquant.serve.launch import ServeOptions, plan_serve
from ecoquant.serve.ports import free_port


@pytest.fixture(scope="module")
def one_request():  # noqa: ANN201
    suite = limit_suite(load_suite("builtin-basic", size=1), 1)
    return suite_requests(suite, prompt_variant("default"), GenerationSettings(max_new_tokens=4))[0][2]


def test_allowed_budgets_come_from_the_processor_table(tmp_path: Path) -> None:
    assert check_max_soft_tokens(tiny_vlm_path(), 140) == 140
    assert check_max_soft_tokens(tiny_vlm_path(), None) is None
    with pytest.raises(EcoquantError, match=r"--max-soft-tokens 100 is not a budget Gemma4ImageProcessor allows; choose one of 70, 140"):
        check_max_soft_tokens(tiny_vlm_path(), 100)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(EcoquantError, match="takes no image-token budget"):
        check_max_soft_tokens(tmp_path, 280)


def test_budget_changes_the_image_tokens_counted(one_request) -> None:  # noqa: ANN001
    processor = load_processor(tiny_vlm_path())
    counts = {b: count_prompt_tokens(processor, one_request, b) for b in (None, 70, 140, 280)}
    assert counts[None] == counts[70]  # the fixture's own default
    assert counts[70] < counts[140] < counts[280]
    assert counts[140] - counts[70] == 121 - 64 and counts[280] - counts[70] == 256 - 64


def test_transformers_backend_honours_the_budget(one_request) -> None:  # noqa: ANN001
    processor = load_processor(tiny_vlm_path())
    for budget in (None, 140):
        backend = TransformersBackend.load(tiny_vlm_path(), TransformersOptions(device="cpu", batch_size=1, max_soft_tokens=budget))
        try:
            (completion,) = backend.generate([one_request], GenerationSettings(max_new_tokens=4))
            assert backend.describe()["max_soft_tokens"] == budget
        finally:
            backend.close()
        assert completion.tokens_in == count_prompt_tokens(processor, one_request, budget)
    with pytest.raises(EcoquantError, match="not a budget"):
        TransformersBackend.load(tiny_vlm_path(), TransformersOptions(max_soft_tokens=99))
    with pytest.raises(EcoquantError, match="cannot reach a server someone else started"):
        EvalConfig(backend="openai", urls=("http://127.0.0.1:1",), max_soft_tokens=140)


def test_serve_config_writes_the_budget_and_measures_with_it(tmp_path: Path) -> None:
    args = ["serve-config", str(tiny_vlm_path()), "--suite", "builtin-basic", "--size", "1", "--prompt-variant", "default"]
    plain = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "a")])
    wide = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "b"), "--max-soft-tokens", "280"])
    assert plain.exit_code == 0 and wide.exit_code == 0, plain.output + wide.output
    a = yaml.safe_load((tmp_path / "a" / CONFIG_FILE).read_text())
    b = yaml.safe_load((tmp_path / "b" / CONFIG_FILE).read_text())
    assert "mm_processor_kwargs" not in a
    assert json.loads(b["mm_processor_kwargs"]) == {"max_soft_tokens": 280}
    assert b["max_model_len"] > a["max_model_len"]
    bad = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "c"), "--max-soft-tokens", "300"])
    assert bad.exit_code == 2 and "choose one of 70, 140, 280, 560, 1120" in bad.output and "Traceback" not in bad.output


def test_builtin_server_serves_with_the_configs_budget(tmp_path: Path, one_request) -> None:  # noqa: ANN001
    from ecoquant.eval.backends.openai_backend import openai_messages
    from ecoquant.serve.launch import transformers_server

    config = tmp_path / CONFIG_FILE
    config.write_text(f"model: {tiny_vlm_path()}\nmm_processor_kwargs: '{{\"max_soft_tokens\": 140}}'\n")
    port = free_port()
    plan = plan_serve(tiny_vlm_path(), ServeOptions(backend="transformers", config=config, port=port))
    assert plan.max_soft_tokens == 140
    assert plan_serve(tiny_vlm_path(), ServeOptions(backend="transformers", config=config, max_soft_tokens=280)).max_soft_tokens == 280
    server = transformers_server(plan, ServeOptions(backend="transformers", port=port)).start()
    try:
        body = {"model": plan.served_name, "messages": openai_messages(one_request.messages), "max_tokens": 2}
        request = urllib.request.Request(f"{server.url}/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            usage = json.load(response)["usage"]
    finally:
        server.stop()
        server.backend.close()
    assert usage["prompt_tokens"] == count_prompt_tokens(load_processor(tiny_vlm_path()), one_request, 140)


def test_optimize_grid_validates_budgets(tmp_path: Path) -> None:
    grid = tmp_path / "g.yaml"
    grid.write_text("grid:\n  method: [rtn]\n  max_soft_tokens: [70, 100]\n")
    result = CliRunner().invoke(app, ["optimize", str(tiny_vlm_path()), "--out", str(tmp_path / "o"), "--grid", str(grid), "--dry-run"])
    assert result.exit_code == 2 and "candidate rtn-auto+img100: --max-soft-tokens 100 is not a budget" in result.output
    _ = ServeConfigOptions(max_soft_tokens=70)  # options alone are not validated: only against a checkpoint
