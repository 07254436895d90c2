#!/usr/bin/env bash
# The one prepared check for a lent GPU machine (H100/H200, no network), <= 7 minutes in all:
#   1. the engine benchmark on SDXL-size random models (FaceID weights kept in memory), the figures
#      of issue 16: s/face idle, faces/min at 8 concurrent, ms per UNet call eager and compiled,
#      MFU, recompiles after warm-up, host syncs per call, peak GPU memory, fused kernel vs eager;
#   2. the kernel benchmark (its own JSON);
#   3. the GPU tests (compiled tiny UNet in fp16 without recompiles, the Triton kernels compiled).
# Each step has a time cap inside one global budget; what a step measured survives a timeout.
# The last line printed is one JSON object: the engine benchmark's summary plus the steps' status.
#
# Here (with network):  bash benchmarks/fetch_gpu_wheels.sh      # ~6 MB into .whl/
# There:                bash benchmarks/gpu_check.sh             # carry .whl; results in $OUT
# Without a GPU the same logic runs end to end on the tiny models:
#                       GPU_CHECK_DEVICE=cpu bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
OUT="${OUT:-/tmp/gpu_check_out}"
BUDGET_S="${GPU_CHECK_BUDGET_S:-420}"
DEVICE="${GPU_CHECK_DEVICE:-cuda}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
rm -f "$OUT"/rc_*
START=$(date +%s)
remaining() { echo $(( BUDGET_S - ($(date +%s) - START) )); }

# step NAME CAP_S CMD...: run CMD with min(CAP_S, time left) seconds; its output goes to $OUT/NAME.log.
step() {
  local name="$1" cap="$2"; shift 2
  local left; left=$(remaining)
  local limit=$(( cap < left ? cap : left ))
  if (( limit < 20 )); then echo "== $name: SKIPPED, only ${left}s of the budget left"; echo skipped > "$OUT/rc_$name"; return 0; fi
  echo "== $name (limit ${limit}s): $*"
  local t0; t0=$(date +%s)
  timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$rc" > "$OUT/rc_$name"
  echo "== $name: rc=$rc in $(( $(date +%s) - t0 ))s$( (( rc == 124 || rc == 137 )) && echo ' (TIMED OUT)')"
  tail -n 15 "$OUT/$name.log"
}

{
echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
"$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)"

if [[ "$DEVICE" == cuda ]]; then
  echo "== carried wheels -> /tmp/site (the image has torch, triton, transformers, accelerate, peft, onnx, onnxruntime, pytest)"
  if ls .whl/*.whl > /dev/null 2>&1; then
    rm -rf /tmp/site
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 2
    # peft is carried too but installed only where the image's is missing or older than the wheel.
    if ls .whl/maybe/*.whl > /dev/null 2>&1; then
      for wheel in .whl/maybe/*.whl; do
        if ! "$PY" - "$wheel" <<'PY'
import sys
from importlib.metadata import PackageNotFoundError, version
from packaging.version import Version
name, wanted = sys.argv[1].rsplit("/", 1)[1].split("-")[:2]
try:
    have = version(name)
except PackageNotFoundError:
    have = None
print(f"{name}: image has {have}, carried {wanted} ->", "kept" if have and Version(have) >= Version(wanted) else "installed")
raise SystemExit(0 if have and Version(have) >= Version(wanted) else 1)
PY
        then "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$wheel"; fi
      done
    fi
  else
    echo "no .whl/*.whl: run benchmarks/fetch_gpu_wheels.sh here and carry .whl (diffusers is not in the image)"
  fi
  export PYTHONPATH="$ROOT/server:$ROOT/kernels:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  unset TRITON_INTERPRET
  BENCH_ARGS=()
  TEST_ARGS=(-m gpu tests/kernels tests/models/test_optimize.py)
else
  export PYTHONPATH="$ROOT/server:$ROOT/kernels${PYTHONPATH:+:$PYTHONPATH}"
  BENCH_ARGS=(--device cpu --models tiny --buckets 2,4 --concurrent-steps 5 --baseline-steps 5 --idle-steps 20 --reps 2)
  TEST_ARGS=(tests/models/test_optimize.py -k "buckets or vae or padding")
fi
export PYTHONDONTWRITEBYTECODE=1
"$PY" -c "import diffusers, peft, transformers, masquerade.models.optimize, masquerade_kernels.guidance_step; print('imports ok: diffusers', diffusers.__version__, 'peft', peft.__version__, 'transformers', transformers.__version__)" \
  || { echo "the project does not import; see above"; exit 3; }

# 1. The figures. The benchmark stops compiling further buckets when its own budget runs short.
ENGINE_CAP=$(( $(remaining) - 110 ))
# GPU_CHECK_COMPILE_MODE=reduce-overhead measures CUDA graphs instead of the server's default mode.
step engine_bench "$ENGINE_CAP" "$PY" benchmarks/engine_bench.py --out "$OUT" --label gpu_check \
  --compile-mode "${GPU_CHECK_COMPILE_MODE:-default}" --budget-s $(( ENGINE_CAP - 45 )) "${BENCH_ARGS[@]}"
# 2. The fused kernels on their own (CUDA only; on CPU the engine benchmark ran them interpreted).
if [[ "$DEVICE" == cuda ]]; then
  step kernel_bench 40 "$PY" benchmarks/kernel_bench.py --results-dir "$OUT" --batches 1,2,4,8,16
fi
# 3. The GPU tests.
step pytest_gpu 90 "$PY" -m pytest "${TEST_ARGS[@]}" -q -p no:cacheprovider -o cache_dir=/tmp/pytest_cache --timeout 80 -rs
echo "== done in $(( $(date +%s) - START ))s; files in $OUT:"
ls -la "$OUT"
} 2>&1 | tee "$OUT/gpu_check.log" >&2

# The last line: one JSON object (stdout), whatever ran.
"$PY" - "$OUT" "$(( $(date +%s) - START ))" <<'PY'
import json, pathlib, re, sys
out, total = sys.argv[1:]
steps = ("engine_bench", "kernel_bench", "pytest_gpu")
rc_files = {name: pathlib.Path(out) / f"rc_{name}" for name in steps}
rcs = [rc_files[name].read_text().strip() if rc_files[name].is_file() else "not run" for name in steps]
path = pathlib.Path(out) / "engine_bench_gpu_check.json"
summary = json.loads(path.read_text()).get("summary", {}) if path.is_file() else {"engine_bench": "no result"}
tests = pathlib.Path(out) / "pytest_gpu.log"
last = [l for l in tests.read_text().splitlines() if re.search(r"\d+ (passed|failed|skipped|error)", l)] if tests.is_file() else []
summary.update(
    gpu_check_seconds=int(total),
    steps_rc=dict(zip(steps, rcs)),
    gpu_tests=last[-1].strip("= ") if last else None,
)
print(json.dumps(summary))
PY
