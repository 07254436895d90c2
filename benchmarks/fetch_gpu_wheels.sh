#!/usr/bin/env bash
# Download into .whl/ the wheels benchmarks/gpu_check.sh installs on a lent GPU machine (no network
# there). That machine has torch (CUDA), triton, transformers, grpcio and protobuf. Requires-Dist,
# checked package by package against that list:
#   always  : diffusers (needs huggingface-hub>=1.32, safetensors>=0.8, Pillow, importlib_metadata,
#             plus filelock/regex/requests/numpy that transformers already brings), peft (accelerate,
#             psutil), onnx (ml_dtypes), onnxruntime (flatbuffers), pytest + pytest-timeout
#   stack/  : only installed by gpu_check.sh when the machine's own huggingface-hub or safetensors
#             is older than diffusers 0.42 needs, with hub's own dependencies. A transformers 4.x
#             there would pin hub<1.0; shipping transformers 5 + tokenizers too would cost ~17 MB and
#             break the 60 MB carry budget, so gpu_check.sh reports that case instead.
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
rm -rf .whl && mkdir -p .whl/stack
download -d .whl \
  diffusers==0.42.1 peft==0.21.2 accelerate==1.15.0 psutil Pillow importlib_metadata zipp \
  onnx==1.23.2 ml_dtypes onnxruntime==1.32.0 flatbuffers \
  pytest pytest-timeout iniconfig pluggy pygments
download -d .whl/stack \
  huggingface-hub==2.4.0 hf-xet httpx2 httpcore2 h11 anyio idna truststore click fsspec typing-extensions \
  safetensors==0.8.0
du -sh .whl .whl/stack
ls .whl .whl/stack
