#!/usr/bin/env bash
# Download, here, the wheels bench/device_check.sh needs on a GPU machine that has PyTorch but no network:
# the packages ecoquant imports that the device image lacks or holds in another version, at the versions
# of uv.lock, for that image's Python (3.12, x86-64 Linux). They go to bench/device_wheels/ (ignored by
# git; about 20 MiB, under the device tool's 64 MiB), which the run carries:
#
#   bash bench/device_wheels.sh     # here, once
#   run(command="bash bench/device_check.sh", carry=["bench/device_wheels"], timeout_s=540)
#
# Which, and why (the image's package list: /work/.library/device/KINDS.md, read 2026-11-17):
#   transformers        the image has 5.17; ecoquant pins 5.23 (Gemma-4 support as ecoquant uses it)
#   regex               transformers 5.23 checks regex>=2025.10.22 at import; the image's version is not listed
#   compressed-tensors  not in the image (the checkpoint writer and loader); needs pydantic, loguru
#   pydantic, pydantic-core, annotated-types, typing-inspection, loguru: not in the image
#   typer               the version ecoquant's CLI is written for (the image's is not listed)
#   rapidfuzz           not in the image (ANLS and relaxed accuracy in the evaluation)
# Everything else ecoquant imports there (torch, numpy, safetensors, pillow, rich, nvidia-ml-py, pyyaml,
# tqdm, accelerate, sentencepiece, matplotlib; huggingface-hub 1.33 and tokenizers 0.23.2, inside
# transformers 5.23's ranges >=1.31 and >=0.23.1,<0.24) is in the image.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=bench/device_wheels
PACKAGES="transformers regex compressed-tensors pydantic pydantic-core annotated-types typing-inspection loguru typer rapidfuzz"

pins=$(python3 - "$PACKAGES" <<'PY'
import sys, tomllib
lock = tomllib.load(open("uv.lock", "rb"))
wanted = sys.argv[1].split()
found = {}
for p in lock["package"]:
    if p["name"] in wanted and p["name"] not in found:
        found[p["name"]] = p["version"]
missing = [w for w in wanted if w not in found]
if missing:
    sys.exit(f"not in uv.lock: {missing}")
print(" ".join(f"{n}=={found[n]}" for n in wanted))
PY
)
rm -rf "$DEST" && mkdir -p "$DEST"
for pin in $pins; do
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" "$pin" >&2
done
ls -1 "$DEST" >&2
du -sh "$DEST" >&2
