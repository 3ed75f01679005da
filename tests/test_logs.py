"""Logs for a person: off a terminal, a line per step with its time, not per module or per sample.

Found by reading ``ecoquant demo 2>log`` (issue 31): 662 lines for a one-minute run, 247 of them
"export: i/N module", 240 one per sample, 83 progress bars and warnings of transformers and
compressed-tensors. Under pytest stderr is not a terminal, which is the case checked here.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from ecoquant.cli import app
from ecoquant.fixtures.tiny_vlm import tiny_vlm_path
from ecoquant.progress import is_verbose, progress_bar, quiet, verbose

ECOQUANT = Path(sys.executable).parent / "ecoquant"


def bar_lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    with progress_bar("export", 3) as advance:
        for name in ("a", "b", "c"):
            advance(name)
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def test_off_a_terminal_a_bar_is_one_line_a_step_line_with_verbose_none_inside_a_reported_step(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert not Console(stderr=True).is_terminal
    (line,) = bar_lines(capsys)
    assert line.startswith("export: 3/3 in ") and line.endswith(" s")
    with verbose():
        assert is_verbose()
        assert [x.split(" (")[0] for x in bar_lines(capsys)] == ["export: 1/3 a", "export: 2/3 b", "export: 3/3 c"]
        with quiet():  # --verbose wins over a step's quiet
            assert len(bar_lines(capsys)) == 3
    assert not is_verbose()
    with quiet():
        assert bar_lines(capsys) == []


def test_optimize_steps_are_one_line_each_off_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    from ecoquant.optimize.run import Stages

    def run() -> list[str]:
        stages = Stages(Console(stderr=True))
        with stages.stage("rtn-auto", "quantize"), progress_bar("rtn W4A16 export", 2) as advance:
            advance("q_proj")
            advance("k_proj")
        return [line for line in capsys.readouterr().err.splitlines() if line.strip()]

    (line,) = run()
    assert line.startswith("optimize: rtn-auto: quantize done in ")
    with verbose():
        lines = run()
    assert lines[0] == "optimize: rtn-auto: quantize ..." and len(lines) == 4 and "1/2 q_proj" in lines[1]


def test_loads_are_quiet_but_real_warnings_still_show(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """Loading a W4A16 checkpoint with an int4 head drew its bars and the ``re:.*lm_head$`` warning."""
    from ecoquant.api import QuantizeConfig, quantize
    from ecoquant.eval.backends.transformers_backend import TransformersBackend, TransformersOptions
    from ecoquant.quiet import quiet_loads

    out = tmp_path / "head4"
    quantize(tiny_vlm_path(), out, QuantizeConfig(lm_head="int4"), show_progress=False)
    capfd.readouterr()
    bars = ("Applying quantization config", "Compressing model", "Loading weights", "Dispatching model", "Decompressing model")
    harmless = "Could not match `re:.*lm_head$`"

    def load() -> tuple[str, str]:
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            TransformersBackend.load(out, TransformersOptions(device="cpu", batch_size=1)).close()
        return capfd.readouterr().err, caplog.text

    err, logged = load()
    assert not [b for b in bars if b in err] and harmless not in logged, err + logged
    with verbose():
        err, logged = load()
    assert "Applying quantization config" in err and "Decompressing model" in err and harmless in logged  # kept
    caplog.clear()
    with caplog.at_level(logging.WARNING), quiet_loads():
        logging.getLogger("compressed_tensors.utils.match").warning("Could not match `re:.*q_proj$` in instance of X")
    assert "re:.*q_proj$" in caplog.text  # not a known-harmless one: it shows


def test_quantize_off_a_terminal_is_a_few_lines(tmp_path: Path) -> None:
    def stderr_lines(*extra: str) -> list[str]:
        out = tmp_path / f"q{len(extra)}"
        run = subprocess.run([str(ECOQUANT), "quantize", str(tiny_vlm_path()), "--out", str(out), *extra],
                             capture_output=True, text=True, timeout=600, check=True)
        return [line for line in run.stderr.splitlines() if line.strip()]

    plain = stderr_lines()
    assert len(plain) <= 3 and any(line.startswith("rtn W4A16 export: 37/37 in ") for line in plain), plain


@pytest.mark.slow
def test_the_demo_log_off_a_terminal_fits_on_a_screen(tmp_path: Path) -> None:
    """The whole demo (minutes on 2 cores), stderr to a file: under 60 lines above its tables."""
    with (tmp_path / "demo.err").open("w") as err:
        subprocess.run([str(ECOQUANT), "demo", "--out", str(tmp_path / "demo")], stdout=subprocess.DEVNULL, stderr=err,
                       timeout=3600, check=True)
    lines = [line for line in (tmp_path / "demo.err").read_text().splitlines() if line.strip()]
    assert len(lines) < 60, "\n".join(lines)
    assert not [line for line in lines if "export:" in line or "Compressing model" in line or "it/s]" in line]
