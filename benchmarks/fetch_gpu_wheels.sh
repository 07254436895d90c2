#!/usr/bin/env bash
# Download the wheels benchmarks/gpu_check.sh installs on a lent GPU machine (no network there).
# That machine has torch (CUDA), triton, transformers, grpcio and protobuf; these are the rest of
# what the gpu tests and benchmarks import, with each one's Requires-Dist checked against that list.
#   diffusers   -> huggingface-hub, safetensors, filelock, numpy, Pillow, regex, requests, httpx,
#                  importlib_metadata (the box's transformers already brings hub/safetensors/regex/
#                  requests/numpy/filelock; they are pinned here anyway so versions match ours)
#   peft        -> accelerate, psutil, tqdm, packaging, pyyaml (transformers brings the last three)
#   onnx        -> protobuf, numpy, ml_dtypes, typing_extensions
#   onnxruntime -> coloredlogs/humanfriendly, flatbuffers, sympy (only for its profiling tools)
#   pytest      -> iniconfig, pluggy, packaging, pygments; pytest-timeout -> pytest
# Usage: benchmarks/fetch_gpu_wheels.sh [python-version, default 3.12]
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER="${1:-3.12}"
mkdir -p .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: \
  --python-version "$PYVER" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d .whl \
  diffusers==0.42.1 peft==0.18.0 accelerate psutil huggingface-hub safetensors \
  onnx ml_dtypes onnxruntime flatbuffers coloredlogs humanfriendly \
  pytest pytest-timeout iniconfig pluggy pygments importlib_metadata zipp httpx httpcore h11 anyio sniffio
du -sh .whl
ls .whl
