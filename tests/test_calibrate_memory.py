"""Peak memory while calibrating is one layer plus activations, not the model (slow: a 2 GB model)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from calibrate_models import save_synthetic_llama

_SCRIPT = r"""
import json, os, resource, sys
from pathlib import Path
import torch
from ecoquant.api import plan_model
from ecoquant.calibrate.run import calibrate
sys.path.insert(0, sys.argv[3])
from calibrate_models import random_batches
path, work = Path(sys.argv[1]), Path(sys.argv[2])
plan = plan_model(path, "text-decoder")
# Every layer is still loaded, run twice and dropped. GPTQ runs on o_proj everywhere
# and on the widest input (down_proj: a 4096 x 4096 Hessian) in the first and last
# layers, which keeps the run to minutes on 2 cores.
selection = [n for n in plan.selection.modules
             if n.endswith("self_attn.o_proj") or n.endswith(("layers.0.mlp.down_proj", "layers.31.mlp.down_proj"))]
batches = random_batches(4, 128, 1024, seed=0)
torch.ones(1) @ torch.ones(1)  # warm up torch's allocator and kernels before the baseline
baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
after_layer = {}

def current_rss(*args):
    layer, batch = args[0], args[1]
    if batch == len(batches) - 1:
        with open("/proc/self/statm") as f:
            after_layer[layer] = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

result = calibrate(path, method="gptq", selection=selection, batches=batches, work_dir=work,
                   on_layer_output=current_rss)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"baseline": baseline, "peak": peak, "modules": len(result.quantized),
                  "after_layer": [after_layer[i] for i in sorted(after_layer)]}))
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads the current RSS from /proc")
def test_peak_memory_is_one_layer_not_the_model(tmp_path: Path) -> None:
    model_bytes = save_synthetic_llama(tmp_path / "model")
    layer_bytes = model_bytes // 32
    assert model_bytes > 2 * 1024**3
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(tmp_path / "model"), str(tmp_path / "work"), str(Path(__file__).parent)],
        capture_output=True, text=True, check=True,
    )
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["modules"] == 32 + 2
    # What calibration adds on top of the libraries is one float32 layer (67 MB), the
    # activations (2 MB) and GPTQ's working set for the widest Linear (the 4096 x 4096
    # Hessian and its factors, ~335 MB); holding the weights would add 2.15 GB.
    grown = report["peak"] - report["baseline"]
    assert grown < model_bytes / 3, report
    # Nothing accumulates as the walk goes deeper: memory after the second half of the
    # layers is no higher than after the first half (to within one layer).
    rss = report["after_layer"]
    assert len(rss) == 32
    assert max(rss[16:31]) - max(rss[1:16]) < layer_bytes, rss
