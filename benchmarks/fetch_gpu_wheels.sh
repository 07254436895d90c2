#!/usr/bin/env bash
# Download into .whl/ the wheels benchmarks/gpu_check.sh installs on a lent GPU machine (no network
# there). Only what its image lacks (/work/.library/device/KINDS.md lists the image's packages: torch,
# triton, transformers 5, huggingface-hub 1.33, safetensors 0.8, accelerate, peft, onnx, onnxruntime,
# numpy, Pillow, requests, regex, filelock, zipp, opencv, pytest, pytest-timeout):
#   .whl/        diffusers (Requires-Dist: importlib_metadata, filelock, huggingface-hub>=1.32,
#                numpy, regex, requests, safetensors>=0.8, Pillow). Installed --no-deps: its
#                importlib_metadata requirement is not carried, as diffusers on Python 3.12 reads
#                the standard library's importlib.metadata and never imports the backport
#   .whl/maybe/  peft: the image's version is not recorded; gpu_check.sh installs this one only
#                where the image's is missing or older
# Usage: benchmarks/fetch_gpu_wheels.sh [python-version, default 3.12]
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER="${1:-3.12}"
download() {
  python3 -m pip download --quiet --no-deps --only-binary=:all: \
    --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any "$@"
}
rm -rf .whl && mkdir -p .whl/maybe
download -d .whl diffusers==0.42.1
download -d .whl/maybe peft==0.21.2
du -sh .whl
ls .whl .whl/maybe
