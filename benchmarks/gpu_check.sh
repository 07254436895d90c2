#!/usr/bin/env bash
# The one prepared check for a lent GPU machine (H100/H200, no network): install the carried wheels,
# make the project importable without pip-installing it, then run the gpu tests, the kernel
# benchmark and the engine benchmark (--quick) inside one global time budget. Logs and results go
# to $OUT (7 files at most). Prepare here with benchmarks/fetch_gpu_wheels.sh, carry .whl/, run as
#   bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu_check_out}"
BUDGET_S="${GPU_CHECK_BUDGET_S:-460}"  # everything below finishes inside ~8 minutes
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
START=$(date +%s)
remaining() { echo $(( BUDGET_S - ($(date +%s) - START) )); }

# step NAME CAP_S CMD...: run CMD with min(CAP_S, time left) seconds, its output in $OUT/NAME.log.
step() {
  local name="$1" cap="$2"; shift 2
  local left; left=$(remaining)
  local limit=$(( cap < left ? cap : left ))
  if (( limit < 20 )); then echo "== $name: SKIPPED, only ${left}s of the budget left"; return 0; fi
  echo "== $name (limit ${limit}s): $*"
  local t0=$(date +%s)
  timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name: rc=$rc in $(( $(date +%s) - t0 ))s$( (( rc == 124 || rc == 137 )) && echo ' (TIMED OUT)')"
  tail -n 25 "$OUT/$name.log"
}

echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'gpu', torch.cuda.get_device_name(0))"

echo "== install carried wheels into /tmp/site"
ls .whl/*.whl > /dev/null || { echo "no .whl/*.whl: run benchmarks/fetch_gpu_wheels.sh and carry .whl"; exit 2; }
rm -rf /tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
# diffusers 0.42 needs huggingface-hub>=1.32 and safetensors>=0.8: bring ours only where the box's are older.
if ! python3 - <<'PY'
from importlib.metadata import version
from packaging.version import Version
ok = Version(version("huggingface_hub")) >= Version("1.32") and Version(version("safetensors")) >= Version("0.8")
print("machine's huggingface_hub", version("huggingface_hub"), "safetensors", version("safetensors"), "->", "kept" if ok else "replaced")
raise SystemExit(0 if ok else 1)
PY
then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/stack/*.whl
fi

echo "== project as the masquerade package (layout of pyproject's package-dir)"
rm -rf /tmp/pkg && mkdir -p /tmp/pkg
cp -r server /tmp/pkg/masquerade
cp -r kernels /tmp/pkg/masquerade/kernels
cp -r clients/python /tmp/pkg/masquerade/client
export PYTHONPATH="/tmp/pkg:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
export PYTHONDONTWRITEBYTECODE=1
python3 -c "import diffusers, peft, transformers, onnx, onnxruntime, masquerade.models.optimize as o, masquerade_kernels.guidance_step; print('imports ok: diffusers', diffusers.__version__, 'peft', peft.__version__, 'transformers', transformers.__version__)" \
  || { echo "the project does not import; see above (an old transformers 4.x pins huggingface-hub<1.0)"; exit 3; }

step pytest_gpu 150 python3 -m pytest -m gpu tests/kernels tests/models -q -p no:cacheprovider -o cache_dir=/tmp/pytest_cache --timeout 140 -rs
step kernel_bench 60 python3 benchmarks/kernel_bench.py --results-dir "$OUT"
step engine_bench 400 python3 benchmarks/engine_bench.py --quick --out "$OUT"
echo "== done in $(( $(date +%s) - START ))s; files in $OUT:"
ls -la "$OUT"
