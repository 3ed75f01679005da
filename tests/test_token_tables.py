"""Token tables past the seed's module set: int4/int8 embeddings and PLE table, an untied low-bit head, bytes per token.

On the trained tiny VLM (vocab 1024, hidden 256, PLE width 768): the layout
written is the one vLLM's ``CompressedTensorsEmbeddingWNA16Int`` and WNA16
head load (checked against a real vLLM in tests/test_vllm_cpu.py), the
tables transformers reads back are exactly RTN of the source's, an untied
bf16 head is the tied embedding byte for byte, the configs say untied at
both levels, the bytes-per-token figure is the sum of what the written
checkpoint stores, and what transformers' own loading would misread (mixed
schemes with tables) is loaded through a dense copy that reads it right.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from ecoquant.api import QuantizeConfig, quantize
from ecoquant.cli import app
from ecoquant.errors import EcoquantError
from ecoquant.eval.backends.transformers_backend import TransformersBackend, TransformersOptions
from ecoquant.export.footprint import NOT_PER_TOKEN
from ecoquant.fixtures.tiny_vlm import tiny_vlm_path
from ecoquant.models.dense import quantized_load_kwargs
from ecoquant.quantize.rtn import rtn_quantize
from ecoquant.quantize.scheme import QuantScheme

EMB = "model.language_model.embed_tokens"
PLE = "model.language_model.embed_tokens_per_layer"
IDS = torch.tensor([[2, 100, 200, 300, 400, 500, 17, 33, 64, 900]])


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tables")
    kinds = {"seed": {}, "head8": {"lm_head": "int8"}, "head4": {"lm_head": "int4"},
             "emb4": {"embeddings": "int4", "lm_head": "int4"}, "emb4-bf16head": {"embeddings": "int4"},
             "emb8": {"embeddings": "int8", "lm_head": "int8"}}
    return {k: quantize(tiny_vlm_path(), root / k, QuantizeConfig(**kw), show_progress=False).out for k, kw in kinds.items()}


def tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def log_probs(path: Path) -> torch.Tensor:
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.bfloat16, **quantized_load_kwargs(path)).eval()
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=IDS).logits.float(), -1)


def kl(p: torch.Tensor, q: torch.Tensor) -> float:
    return float((p.exp() * (p - q)).sum(-1).mean())


def test_int4_tables_are_written_in_the_embedding_scheme_layout(built: dict[str, Path]) -> None:
    t = tensors(built["emb4"])
    assert f"{EMB}.weight" not in t and f"{PLE}.weight" not in t and "lm_head.weight" not in t
    assert t[f"{EMB}.weight_packed"].dtype == torch.int32 and tuple(t[f"{EMB}.weight_packed"].shape) == (1024, 256 * 4 // 32)
    assert tuple(t[f"{EMB}.weight_scale"].shape) == (1024, 2) and t[f"{EMB}.weight_scale"].dtype == torch.bfloat16
    assert t[f"{EMB}.weight_shape"].tolist() == [1024, 256]
    assert tuple(t[f"{PLE}.weight_packed"].shape) == (1024, 768 // 8) and tuple(t[f"{PLE}.weight_scale"].shape) == (1024, 6)
    assert tuple(t["lm_head.weight_packed"].shape) == (1024, 32)
    assert not any(k.endswith("weight_zero_point") for k in t)
    config = json.loads((built["emb4"] / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and config["text_config"]["tie_word_embeddings"] is False
    qc = config["quantization_config"]
    assert qc["config_groups"]["embeddings_0"]["targets"] == [EMB, PLE]
    assert qc["config_groups"]["lm_head"]["targets"] == ["re:.*lm_head$"]
    assert qc["config_groups"]["embeddings_0"]["weights"]["symmetric"] is True
    assert "lm_head" not in qc["ignore"]
    recipe = json.loads((built["emb4"] / "quant_recipe.json").read_text())
    assert recipe["token_tables"]["lm_head"]["untied_from"] == EMB and set(recipe["token_tables"]["embeddings"]) == {EMB, PLE}


def test_transformers_reads_back_exactly_rtn_of_the_tables(built: dict[str, Path]) -> None:
    from transformers import AutoModelForImageTextToText

    src = tensors(tiny_vlm_path())
    path = built["emb4"]
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.bfloat16, **quantized_load_kwargs(path))
    scheme = QuantScheme(num_bits=4, group_size=128)
    for name, module in ((EMB, model.model.language_model.embed_tokens), (PLE, model.model.language_model.embed_tokens_per_layer)):
        expected = rtn_quantize(src[f"{name}.weight"], scheme).dequantize(scheme, torch.bfloat16)
        assert torch.equal(module.weight.data, expected), name
    head = rtn_quantize(src[f"{EMB}.weight"], scheme).dequantize(scheme, torch.bfloat16)
    assert torch.equal(model.lm_head.weight.data, head)


def test_untied_bf16_head_is_the_embedding_byte_for_byte(built: dict[str, Path]) -> None:
    t = tensors(built["emb4-bf16head"])
    assert torch.equal(t["lm_head.weight"], tensors(tiny_vlm_path())[f"{EMB}.weight"])
    config = json.loads((built["emb4-bf16head"] / "config.json").read_text())
    assert "lm_head" in config["quantization_config"]["ignore"] and "lm_head" not in config["quantization_config"]["config_groups"]


def test_quality_cost_of_each_table_choice(built: dict[str, Path]) -> None:
    """Measured KL to bf16 (10 tokens): int8 head ~ free, int4 head and int4 tables cost more than the seed's set."""
    base = log_probs(tiny_vlm_path())
    kls = {k: kl(base, log_probs(built[k])) for k in ("seed", "head8", "head4", "emb4", "emb4-bf16head")}
    print({k: round(v, 5) for k, v in kls.items()})
    assert kls["head8"] < 1.5 * kls["seed"] + 1e-3  # int8 head: about free
    assert kls["head4"] > kls["head8"] and kls["emb4"] > kls["seed"]
    assert all(v < 0.2 for v in kls.values())  # every checkpoint still computes the model


def test_mixed_schemes_load_through_a_dense_copy_read_right(built: dict[str, Path]) -> None:
    """int8 tables and head next to int4 Linears: transformers alone would read them as int4; the dense copy does not."""
    from transformers import AutoModelForImageTextToText

    from ecoquant.models.dense import loadable, needs_dense_copy

    path = built["emb8"]
    assert needs_dense_copy(path) and not needs_dense_copy(built["emb4"]) and not needs_dense_copy(built["head8"])
    with pytest.raises(EcoquantError, match="mixes weight schemes"):
        quantized_load_kwargs(path)  # transformers' own dequantize path would be wrong here
    with loadable(path) as (folder, kwargs):
        assert folder != path and kwargs == {}
        model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.bfloat16, **kwargs)
    assert not folder.exists()  # the copy is gone once loaded
    src = tensors(tiny_vlm_path())
    int8 = QuantScheme(num_bits=8, group_size=128)
    expected = rtn_quantize(src[f"{PLE}.weight"], int8).dequantize(int8, torch.bfloat16)
    assert torch.equal(model.model.language_model.embed_tokens_per_layer.weight.data, expected)
    assert torch.equal(model.lm_head.weight.data, rtn_quantize(src[f"{EMB}.weight"], int8).dequantize(int8, torch.bfloat16))
    backend = TransformersBackend.load(path, TransformersOptions(device="cpu"))  # the eval path takes the same route
    backend.close()
    assert kl(log_probs(tiny_vlm_path()), _log_probs_dense(path)) < 0.02  # int8 tables: close to the seed's set


def test_dense_copy_equals_transformers_own_dequantization(built: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoModelForImageTextToText

    from ecoquant.models.dense import write_dense_copy

    path = built["emb4"]  # one scheme everywhere: transformers' dequantize path is right, so it is the reference
    ours = AutoModelForImageTextToText.from_pretrained(write_dense_copy(path, tmp_path / "dense"), dtype=torch.bfloat16)
    theirs = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.bfloat16, **quantized_load_kwargs(path))
    a, b = ours.state_dict(), theirs.state_dict()
    assert set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a)


def _log_probs_dense(path: Path) -> torch.Tensor:
    from transformers import AutoModelForImageTextToText

    from ecoquant.models.dense import loadable

    with loadable(path) as (folder, kwargs):
        model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.bfloat16, **kwargs).eval()
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=IDS).logits.float(), -1)


def test_bytes_per_token_is_what_the_checkpoint_stores(built: dict[str, Path]) -> None:
    """The recipe's figure, recomputed from the written headers: language-model tensors in full, one row per table."""
    per_token = {}
    for kind, path in built.items():
        recipe = json.loads((path / "quant_recipe.json").read_text())["bytes_per_token"]
        total = 0
        tied_head = 0
        with safe_open(str(path / "model.safetensors"), "pt") as f:
            for name in f.keys():  # noqa: SIM118
                if any(m in name for m in NOT_PER_TOKEN):
                    continue
                sl = f.get_slice(name)
                size = sl.get_shape()
                nbytes = torch.empty(0, dtype=f.get_tensor(name).dtype).element_size() * int(torch.tensor(size).prod())
                if name.startswith((EMB + ".", PLE + ".")):
                    if name.startswith(EMB + ".weight") and "lm_head.weight" not in f.keys() and not any(k.startswith("lm_head") for k in f.keys()):  # noqa: SIM118
                        tied_head += nbytes
                    if not name.endswith("weight_shape"):
                        total += nbytes // size[0]
                else:
                    total += nbytes
        assert recipe["total_bytes"] == total + tied_head, kind
        per_token[kind] = recipe["total_bytes"]
        assert recipe["bf16_total_bytes"] == json.loads((built["seed"] / "quant_recipe.json").read_text())["bytes_per_token"]["bf16_total_bytes"]
    assert per_token["seed"] > per_token["head8"] > per_token["head4"] >= per_token["emb4"]


def test_e4b_twin_bytes_per_token_for_the_four_module_sets() -> None:
    from ecoquant.fixtures.e4b_twin import e4b_twin_path
    from ecoquant.plan import plan_footprint, plan_model, plan_tables, plan_token_bytes

    twin = e4b_twin_path()
    scheme = QuantScheme()
    rows = {}
    for label, preset, head in (("seed", "gemma4-e", None), ("+int4 head", "gemma4-e", "int4"), ("+int4 tables", "gemma4-e-int4-tables", None)):
        plan = plan_model(twin, preset)
        tables = plan_tables(plan, scheme, plan.preset.embeddings, head or plan.preset.lm_head)
        rows[label] = (plan_footprint(plan, scheme, tables).after_bytes, plan_token_bytes(plan, scheme, tables))
    bf16 = rows["seed"][1].bf16_total
    gb = 1e9
    # the figures: 3.4 GB per token with the seed's set, 2.4 GB with an int4 head
    assert 3.3 * gb < rows["seed"][1].total < 3.6 * gb and 2.3 * gb < rows["+int4 head"][1].total < 2.6 * gb
    assert rows["seed"][1].head == 262144 * 2560 * 2  # the tied bf16 head, read in full
    # untying adds a head beside the bf16 embedding: the footprint grows by the int4 head while per-token bytes drop
    assert rows["+int4 head"][0] - rows["seed"][0] == 262144 * (2560 // 2 + 2560 // 128 * 2) + 16
    assert rows["+int4 tables"][0] < 0.6 * rows["seed"][0]  # PLE 5.25 GiB -> ~1.5 GiB
    assert bf16 > rows["seed"][1].total


def test_cli_options_presets_and_errors(tmp_path: Path) -> None:
    runner = CliRunner()
    ok = runner.invoke(app, ["quantize", str(tiny_vlm_path()), "--out", str(tmp_path / "a"), "--preset", "gemma4-e-int4-tables", "--no-progress"])
    assert ok.exit_code == 0, ok.output
    recipe = json.loads((tmp_path / "a" / "quant_recipe.json").read_text())
    assert set(recipe["token_tables"]["embeddings"]) == {EMB, PLE} and recipe["token_tables"]["lm_head"]["scheme"]["num_bits"] == 4
    shown = runner.invoke(app, ["inspect", str(tmp_path / "a")])
    assert "bytes per decoded token" in shown.output
    bad = runner.invoke(app, ["quantize", str(tiny_vlm_path()), "--out", str(tmp_path / "b"), "--embeddings", "int3"])
    assert bad.exit_code == 2 and "--embeddings takes bf16, int4 or int8" in bad.output
    odd = runner.invoke(app, ["quantize", str(tiny_vlm_path()), "--out", str(tmp_path / "c"), "--lm-head", "int4", "--group-size", "-1"])
    assert odd.exit_code == 0, odd.output  # per-channel head: allowed


def test_a_head_already_untied_in_the_source_is_replaced_by_its_packed_form(tmp_path: Path) -> None:
    """Writer and footprint share one decision per tensor: the source's own lm_head.weight is not also copied."""
    import shutil

    from safetensors.torch import save_file

    src = tmp_path / "untied"
    shutil.copytree(tiny_vlm_path(), src)
    weights = tensors(tiny_vlm_path())
    weights["lm_head.weight"] = weights[f"{EMB}.weight"].clone()
    save_file(weights, str(src / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["tie_word_embeddings"] = False
    config["text_config"]["tie_word_embeddings"] = False
    (src / "config.json").write_text(json.dumps(config))
    out = quantize(src, tmp_path / "head4", QuantizeConfig(lm_head="int4"), show_progress=False).out
    written = tensors(out)
    assert "lm_head.weight" not in written and tuple(written["lm_head.weight_packed"].shape) == (1024, 32)
    assert f"{EMB}.weight" in written  # the embedding itself stays bf16
    recipe = json.loads((out / "quant_recipe.json").read_text())
    assert recipe["token_tables"]["lm_head"]["untied_from"] == "lm_head"
    assert kl(log_probs(tiny_vlm_path()), log_probs(out)) < 0.2
