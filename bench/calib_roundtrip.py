"""Check the calibration text handed to the external tools in ``gemma3_methods.py``.

Re-encodes each decoded window with the model's tokenizer (as llmcompressor
and AutoRound do, ``<bos>`` added) and prints how many give back exactly
ecoquant's own token ids, and how many are full ``seq_len`` long (AutoRound
skips shorter ones). Usage::

    uv run python bench/calib_roundtrip.py /tmp/g3/calib-128x512.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from transformers import AutoTokenizer

from ecoquant.calibrate.data import CalibrationConfig, load_calibration
from ecoquant.fixtures.gemma3_gguf import gemma3_270m_path


def main() -> None:
    texts = json.loads(Path(sys.argv[1]).read_text())
    seq_len = int(sys.argv[2]) if len(sys.argv) > 2 else 512
    base = gemma3_270m_path()
    tok = AutoTokenizer.from_pretrained(base)
    cal = load_calibration(base, CalibrationConfig(source="corpus", num_samples=len(texts), max_length=seq_len),
                           tokenizer=tok)
    ours = [b["input_ids"][0].tolist() for b in cal.batches]
    theirs = [tok(t)["input_ids"] for t in texts]
    same = sum(a == b for a, b in zip(ours, theirs, strict=True))
    full = sum(len(ids) == seq_len for ids in theirs)
    print(f"{len(texts)} windows: {same} re-encode to ecoquant's token ids; {full} are {seq_len} tokens long")


if __name__ == "__main__":
    main()
