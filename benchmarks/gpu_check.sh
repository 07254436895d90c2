#!/usr/bin/env bash
# The one prepared check for a lent GPU machine (H100/H200, no network): every phase inside one
# budget (GPU_CHECK_BUDGET_S, default 420 s), so that a single 10-minute call brings back figures
# that mean what they say.
#   1. setup: the carried wheels installed, the project imported, the machine described;
#   2. the GPU-marked tests (pass/fail/skip counts: gpu_tests);
#   3. the engine benchmark on SDXL-size random models (benchmarks/engine_bench.py), its phases
#      in priority order: build (models, the stock UNet's baselines, FLOPs per face per bucket,
#      every Triton solver kernel compiled), compile (bucket 2, then bucket 16 = 8 CFG pairs),
#      figures (compiled ms per call; s/face on an idle engine timed on bucket 2: 20 inversion +
#      20 generation steps after a warm-up, extrapolated to the paper's 100 + 100; 8 faces at
#      once; host syncs; memory; recompiles), baselines (eager ms per call, fused solver kernels
#      vs eager), then with what is left buckets 4 and 8 and --compile-mode
#      max-autotune-no-cudagraphs on bucket 2.
# A phase left with too little time is not started and reads "skipped: budget"; one that runs
# out is stopped and reads "timed out: budget"; what it measured before is kept (the engine
# benchmark rewrites its JSON after every section).
#
# The last line on stdout is one JSON object (also $OUT/gpu_check.json) with at least: device,
# torch, s_per_face_idle, idle_bucket, ms_per_call, faces_per_min_8, mfu, recompiles_after_warmup,
# host_syncs_per_call, kernel_speedup_vs_eager, peak_gpu_gib_per_face, gpu_tests, buckets_compiled,
# budget_s, elapsed_s. $OUT gets 4 files (the device tool brings back 8 at most): gpu_check.log,
# gpu_check.json, engine_bench_gpu_check.json and .md.
#
# Here, once (network):  bash benchmarks/fetch_gpu_wheels.sh      # diffusers (+ peft) into .whl/
# On the GPU machine, through the device tool's `run`:
#   command: bash benchmarks/gpu_check.sh        timeout_s: 600
#   carry:   [".whl", "clients/python/masquerade_client/v1", "server/masquerade/v1"]
# Git-ignored paths travel only when carried: the wheels, and the generated gRPC stubs (the image
# has no grpc_tools to regenerate them; tests/conftest.py then uses the carried ones).
# Without a GPU the same logic runs end to end on the tiny models, inside the same budget:
#   GPU_CHECK_DEVICE=cpu bash benchmarks/gpu_check.sh
# Other knobs: GPU_CHECK_COMPILE_MODE (the engine's mode, default "default"), PYTHON, OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"

# ---- the budget: each phase's share of GPU_CHECK_BUDGET_S, in percent, in the order they run ----
# A phase may run until its cumulative share is spent (time an earlier phase leaves unused passes
# on); one left with under MIN_PHASE_S seconds is not started.
SHARE_SETUP=4       # carried wheels installed, imports checked, machine described (at least
                    #   SETUP_MIN_S: nothing runs without it)
SHARE_TESTS=16      # the GPU-marked tests
SHARE_BUILD=9       # engine: models, stock-UNet baselines, FLOPs per face, Triton kernels warmed
SHARE_COMPILE=36    # engine: bucket 2, then bucket 16 (they may run on into the figures' share,
                    #         never into the figures' own estimated cost)
SHARE_FIGURES=17    # engine: compiled ms/call, idle s/face on bucket 2, 8 faces at once
SHARE_BASELINES=7   # engine: eager ms/call, fused solver kernels vs eager
# The rest (11 %): buckets 4 and 8, then max-autotune-no-cudagraphs on bucket 2, while time lasts.
SUMMARY_RESERVE_S=8 # kept back for the last line
MIN_PHASE_S=${GPU_CHECK_MIN_PHASE_S:-15}
SETUP_MIN_S=40

BUDGET_S="${GPU_CHECK_BUDGET_S:-420}"
DEVICE="${GPU_CHECK_DEVICE:-cuda}"
if [[ -z "${PYTHON:-}" && "$DEVICE" == cpu && -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; fi
PY="${PYTHON:-python3}"
OUT="${OUT:-/tmp/gpu_check_out}"
mkdir -p "$OUT"
# Step statuses and the tests' report live here, not in $OUT (the setup step re-enters this script).
WORK="${GPU_CHECK_WORK:-$(mktemp -d /tmp/gpu_check_work.XXXXXX)}"
export GPU_CHECK_WORK="$WORK"
START=$(date +%s)
deadline() { echo $(( START + BUDGET_S * $1 / 100 )); }
END_AT=$(( START + BUDGET_S - SUMMARY_RESERVE_S ))
D_SETUP=$(deadline $SHARE_SETUP)
(( D_SETUP < START + SETUP_MIN_S )) && D_SETUP=$(( START + SETUP_MIN_S ))
D_TESTS=$(deadline $(( SHARE_SETUP + SHARE_TESTS )))
D_BUILD=$(deadline $(( SHARE_SETUP + SHARE_TESTS + SHARE_BUILD )))
D_COMPILE=$(deadline $(( SHARE_SETUP + SHARE_TESTS + SHARE_BUILD + SHARE_COMPILE )))
D_FIGURES=$(deadline $(( SHARE_SETUP + SHARE_TESTS + SHARE_BUILD + SHARE_COMPILE + SHARE_FIGURES )))
D_BASELINES=$(deadline $(( SHARE_SETUP + SHARE_TESTS + SHARE_BUILD + SHARE_COMPILE + SHARE_FIGURES + SHARE_BASELINES )))

# step NAME DEADLINE CMD...: run CMD until DEADLINE (unix s); its status goes to $WORK/status_NAME.
step() {
  local name="$1" until="$2"; shift 2
  local limit=$(( until - $(date +%s) ))
  (( until > END_AT )) && limit=$(( END_AT - $(date +%s) ))
  if (( limit < MIN_PHASE_S )); then
    echo "== $name: skipped: budget (${limit}s left of its share)"
    echo "skipped: budget" > "$WORK/status_$name"
    return 0
  fi
  echo "== $name (limit ${limit}s): $*"
  local t0; t0=$(date +%s)
  timeout -k 5 "$limit" "$@"
  local rc=$? took=$(( $(date +%s) - t0 ))
  if (( rc == 124 || rc == 137 )); then echo "timed out: budget (${limit}s)" > "$WORK/status_$name"
  elif (( rc == 0 )); then echo "done in ${took}s" > "$WORK/status_$name"
  else echo "failed: rc $rc after ${took}s" > "$WORK/status_$name"; fi
  echo "== $name: $(cat "$WORK/status_$name")"
}

setup() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  if [[ "$DEVICE" == cuda ]]; then
    echo "carried wheels -> /tmp/site (the image has torch, triton, transformers, accelerate, peft, onnx, onnxruntime, pytest)"
    if ls .whl/*.whl > /dev/null 2>&1; then
      rm -rf /tmp/site
      "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || return 2
      # peft is carried too but installed only where the image's is missing or older than the wheel.
      for wheel in .whl/maybe/*.whl; do
        [[ -e "$wheel" ]] || continue
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
    else
      echo "no .whl/*.whl: run benchmarks/fetch_gpu_wheels.sh here and carry .whl (diffusers is not in the image)"
    fi
  fi
  "$PY" - "$WORK/machine.json" <<'PY'
import json, sys
import diffusers, peft, torch, transformers
import masquerade.models.optimize, masquerade_kernels.guidance_step  # noqa: F401  (the project imports)
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "gpu", gpu)
print("diffusers", diffusers.__version__, "peft", peft.__version__, "transformers", transformers.__version__)
json.dump({"device": gpu or "cpu", "torch": torch.__version__}, open(sys.argv[1], "w"))
PY
}

if [[ "$DEVICE" == cuda ]]; then
  export PYTHONPATH="$ROOT/server:$ROOT/kernels:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  unset TRITON_INTERPRET
  BENCH_ARGS=(--device cuda --models sdxl)
  TEST_ARGS=(-m gpu tests/kernels tests/models/test_optimize.py tests/models/test_arcface.py)
else
  export PYTHONPATH="$ROOT/server:$ROOT/kernels${PYTHONPATH:+:$PYTHONPATH}"
  # The same phases, buckets and steps on the tiny models; the tests: one that runs on CPU and the
  # CUDA cases, which skip, so every count is exercised.
  BENCH_ARGS=(--device cpu --models tiny --compile-estimate-s 40 --idle-steps 6 --concurrent-steps 4
    --baseline-steps 4 --reps 2)
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # a shared CPU: busy-waiting threads slow it tenfold
  TEST_ARGS=(tests/kernels/test_guidance_step.py -k "empty_batch or sdxl_latent")
fi
export PYTHONDONTWRITEBYTECODE=1
if [[ "${1:-}" == __setup ]]; then setup; exit $?; fi  # `timeout` runs programs, not functions
# A result left in $OUT by an earlier run must not pass for this run's.
rm -f "$OUT/gpu_check.json" "$OUT/engine_bench_gpu_check.json" "$OUT/engine_bench_gpu_check.md"

{
echo "== gpu_check: device $DEVICE, budget ${BUDGET_S}s, python $PY, out $OUT"
step setup "$D_SETUP" bash "$ROOT/benchmarks/gpu_check.sh" __setup
if [[ "$(cat "$WORK/status_setup")" != done* ]]; then
  echo "== the project does not import here; see above"
  for name in tests engine_bench; do echo "not run: setup $(cat "$WORK/status_setup")" > "$WORK/status_$name"; done
else
  # -v: one line per finished test, so the counts survive a run stopped at its deadline.
  step tests "$D_TESTS" bash -c '"$@" 2>&1 | tee "$GPU_CHECK_WORK/pytest.log"' pytest \
    "$PY" -m pytest "${TEST_ARGS[@]}" -v -rs -p no:cacheprovider --junitxml="$WORK/pytest.xml" \
    --timeout $(( D_TESTS > $(date +%s) ? D_TESTS - $(date +%s) : 1 )) -o junit_family=xunit2
  step engine_bench "$END_AT" "$PY" benchmarks/engine_bench.py "${BENCH_ARGS[@]}" --out "$OUT" --label gpu_check \
    --compile-mode "${GPU_CHECK_COMPILE_MODE:-default}" --started-at "$START" --budget-s "$BUDGET_S" \
    --deadlines "build=$D_BUILD,compile=$D_COMPILE,figures=$D_FIGURES,baselines=$D_BASELINES,extra=$END_AT"
fi
echo "== done in $(( $(date +%s) - START ))s; files in $OUT:"
ls -la "$OUT"
} 2>&1 | tee "$OUT/gpu_check.log" >&2

# The last line: one JSON object (stdout and $OUT/gpu_check.json), whatever ran.
"$PY" - "$OUT" "$WORK" "$START" "$BUDGET_S" <<'PY'
import json, pathlib, sys, time
import xml.etree.ElementTree as ET

out, work = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
start, budget = int(sys.argv[3]), int(sys.argv[4])
SKIPPED = "skipped: budget"

def status(name):
    path = work / f"status_{name}"
    return path.read_text().strip() if path.is_file() else SKIPPED

phases = {name: status(name) for name in ("setup", "tests", "engine_bench")}
machine_path = work / "machine.json"
machine = json.loads(machine_path.read_text()) if machine_path.is_file() else {"device": None, "torch": None}

report_path = out / "engine_bench_gpu_check.json"
report = json.loads(report_path.read_text()) if report_path.is_file() else {}
engine = report.get("summary", {})
engine_status = phases["engine_bench"]
# A figure the engine did not reach: its phase ran out of budget, or the benchmark failed.
unreached = SKIPPED if engine_status.startswith(("timed out", "skipped")) else f"not measured: engine_bench {engine_status}"

def figure(key):
    value = engine.get(key)
    if value is None and not engine_status.startswith("done"):
        return unreached
    return value

junit = work / "pytest.xml"
if junit.is_file():
    suites = ET.parse(junit).getroot()
    suites = [suites] if suites.tag == "testsuite" else list(suites)
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    gpu_tests = {
        "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
        "failed": counts["failures"] + counts["errors"],
        "skipped": counts["skipped"],
        "status": phases["tests"],
    }
elif (work / "pytest.log").is_file():  # stopped before its report: count the tests that finished
    import re
    outcomes = re.findall(r" (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b", (work / "pytest.log").read_text())
    gpu_tests = {
        "passed": sum(o in ("PASSED", "XFAIL", "XPASS") for o in outcomes),
        "failed": sum(o in ("FAILED", "ERROR") for o in outcomes),
        "skipped": outcomes.count("SKIPPED"),
        "status": phases["tests"],
    }
else:
    gpu_tests = SKIPPED if phases["tests"].startswith(("skipped", "timed out")) else f"no report: tests {phases['tests']}"

engine_phases = {k: v if v != "running" else "timed out: budget" for k, v in engine.get("phases", {}).items()}
ms_per_call = figure("ms_per_call")
if isinstance(ms_per_call, dict):  # a bucket whose compile the run never reached ran out of budget
    ms_per_call = {k: (unreached if v is None else v) for k, v in ms_per_call.items()}
result = {
    "device": engine.get("device") or machine["device"],
    "torch": engine.get("torch") or machine["torch"],
    "s_per_face_idle": figure("s_per_face_idle"),
    "s_per_face_idle_method": engine.get("s_per_face_idle_method"),
    "idle_bucket": figure("idle_bucket"),
    "ms_per_call": ms_per_call,
    "ms_per_call_eager": figure("ms_per_call_eager"),
    "faces_per_min_8": figure("faces_per_min_8"),
    "mfu": figure("mfu"),
    "recompiles_after_warmup": figure("recompiles_after_warmup"),
    "host_syncs_per_call": figure("host_syncs_per_call"),
    "kernel_speedup_vs_eager": figure("kernel_speedup_vs_eager"),
    "peak_gpu_gib_per_face": figure("peak_gpu_gib_per_face"),
    "gpu_tests": gpu_tests,
    "buckets_compiled": engine.get("buckets_compiled", []),
    "compile_s": engine.get("compile_s"),
    "compile_mode": engine.get("compile_mode"),
    "extra_compile_mode": figure("extra_compile_mode"),
    "tflop_per_face": figure("tflop_per_face"),
    "research_loop_s_per_face": figure("research_loop_s_per_face"),
    "speedup_vs_research_loop": engine.get("speedup_vs_research_loop"),
    "targets": engine.get("targets"),
    "measured_on_gpu": engine.get("measured_on_gpu", machine["device"] not in (None, "cpu")),
    "models": engine.get("models"),
    "phases": {**phases, **{f"engine.{k}": v for k, v in engine_phases.items()}},
    "budget_s": budget,
    "elapsed_s": None,
}
result["elapsed_s"] = round(time.time() - start, 1)
(out / "gpu_check.json").write_text(json.dumps(result, indent=1) + "\n")
print(json.dumps(result))
PY
rm -rf "$WORK"
