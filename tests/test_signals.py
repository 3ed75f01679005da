"""SIGTERM and SIGHUP stop a command as Ctrl-C does; a rerun clears what a harder kill left.

Found by trying ecoquant as a new user would: SIGTERM during ``ecoquant
quantize`` (what ``timeout`` and job schedulers send) left ``.OUT.partial-*``
beside the output, although the README said an interrupted run leaves nothing.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ecoquant.fixtures.tiny_vlm import tiny_vlm_path
from ecoquant.scratch import OWNER_FILE, remove_stale
from ecoquant.signals import Interrupted, stop_on_signals

# Runs the CLI with one hook: the process signals itself at a chosen point of the work.
SIGNALLER = textwrap.dedent(
    """
    import os, signal, sys
    sig = getattr(signal, os.environ["SEND_SIGNAL"])
    when = os.environ["SIGNAL_AT"]
    if when.startswith("layer"):
        import ecoquant.calibrate.sequential as seq
        layer = seq.LayerWalk._layer
        def hooked(self, i, *args):
            layer(self, i, *args)
            if i == int(when.removeprefix("layer")):
                os.kill(os.getpid(), sig)
        seq.LayerWalk._layer = hooked
    elif when == "export":  # after the first tensor of the export is written
        import ecoquant.export.compressed_tensors as ct
        write = ct.write_streaming
        def hooked(path, tensors, metadata=None, on_tensor=None):
            def each(t):
                if on_tensor is not None:
                    on_tensor(t)
                os.kill(os.getpid(), sig)
            return write(path, tensors, metadata, on_tensor=each)
        ct.write_streaming = hooked
    from ecoquant.cli import app
    sys.argv = ["ecoquant", *sys.argv[1:]]
    app()
    """
)
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def ecoquant(args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", SIGNALLER, *args], env={**ENV, "SEND_SIGNAL": "SIGTERM",
                          "SIGNAL_AT": "never", **env}, capture_output=True, text=True, timeout=900)


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("name", ["SIGTERM", "SIGHUP"])
def test_a_signal_during_the_export_removes_the_partial_output(tmp_path: Path, name: str) -> None:
    out = tmp_path / "q"
    t = time.perf_counter()
    done = ecoquant(["quantize", str(tiny_vlm_path()), "--out", str(out), "--no-progress"], SEND_SIGNAL=name,
                    SIGNAL_AT="export")
    assert done.returncode == 128 + getattr(signal, name), done.stderr
    assert done.stderr.strip().splitlines() == [f"stopped ({name}): temporary files removed"], done.stderr
    assert list(tmp_path.iterdir()) == []  # no .q.partial-*, no q
    assert time.perf_counter() - t < 120


def test_a_rerun_removes_partial_folders_no_live_process_holds(tmp_path: Path) -> None:
    def partial(name: str, owner: str | None) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        if owner is not None:
            (folder / OWNER_FILE).write_text(owner + "\n")
        return folder

    here = socket.gethostname()
    stale = partial(".q.partial-a", f"{dead_pid()} {here}")
    (stale / "model.safetensors").write_bytes(b"half")
    live = partial(".q.partial-b", f"{os.getpid()} {here}")
    elsewhere = partial(".q.partial-c", f"{dead_pid()} another-host")  # a shared disk: cannot tell, so kept
    just_made = partial(".q.partial-d", None)  # being created this instant
    other_output = partial(".r.partial-e", f"{dead_pid()} {here}")
    assert remove_stale(tmp_path, ".q.partial-") == [stale]
    assert live.is_dir() and elsewhere.is_dir() and just_made.is_dir() and other_output.is_dir()
    os.utime(just_made, (time.time() - 3600, time.time() - 3600))  # an older ecoquant's, an hour old
    assert remove_stale(tmp_path, ".q.partial-") == [just_made]


def test_a_quantize_rerun_clears_a_stale_partial_and_leaves_only_the_output(tmp_path: Path) -> None:
    stale = tmp_path / ".q.partial-x"
    stale.mkdir()
    (stale / OWNER_FILE).write_text(f"{dead_pid()} {socket.gethostname()}\n")
    done = ecoquant(["quantize", str(tiny_vlm_path()), "--out", str(tmp_path / "q"), "--no-progress"])
    assert done.returncode == 0, done.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["q"]
    assert not (tmp_path / "q" / OWNER_FILE).exists()


def test_stop_on_signals_restores_the_handlers() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted) as err, stop_on_signals():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises at the next bytecode
    assert err.value.signum == signal.SIGTERM and isinstance(err.value, KeyboardInterrupt)
    assert signal.getsignal(signal.SIGTERM) == before


@pytest.mark.slow
def test_sigterm_during_gptq_keeps_the_calibration_and_a_rerun_gives_the_same_bytes(tmp_path: Path) -> None:
    """Three GPTQ runs of the tiny VLM: about a minute of CPU each."""
    args = [str(tiny_vlm_path()), "--method", "gptq", "--calib", "corpus", "--calib-samples", "2", "--calib-length", "32",
            "--observer", "minmax", "--scale-passes", "1", "--no-progress"]
    whole = ecoquant(["quantize", *args, "--out", str(tmp_path / "whole")])
    assert whole.returncode == 0, whole.stderr
    out, work = tmp_path / "cut", tmp_path / ".cut.calib"
    killed = ecoquant(["quantize", *args, "--out", str(out)], SIGNAL_AT="layer0")
    assert killed.returncode == 128 + signal.SIGTERM, killed.stderr
    assert killed.stderr.strip().splitlines() == [
        f"calibration so far kept in {work}: rerun the same command to resume",
        "stopped (SIGTERM): temporary files removed",
    ], killed.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [".cut.calib", "whole"]
    assert (work / "units" / "layer_0000.json").is_file()
    again = ecoquant(["quantize", *args, "--out", str(out)])
    assert again.returncode == 0, again.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut", "whole"]
    a = {p.name: p.read_bytes() for p in (tmp_path / "whole").iterdir()}
    b = {p.name: p.read_bytes() for p in out.iterdir()}
    assert a.keys() == b.keys()
    assert all(a[k] == b[k] for k in a if k != "quant_recipe.json")  # the recipe's timings differ
