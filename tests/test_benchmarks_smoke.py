"""Benchmarks whose code paths CI runs: the engine benchmark's --smoke run (the GPU benchmark's path on tiny CPU models) and the CPU threads layouts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_engine_bench_smoke_writes_its_json(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("OMP_NUM_THREADS", "1")  # on a loaded CI machine, spinning OpenMP threads cost tenfold
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "engine_bench.py"), "--smoke", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "engine_bench_cpu_tiny.json").read_text())
    assert (tmp_path / "engine_bench_cpu_tiny.md").is_file()
    assert report["mode"] == "smoke" and "total_s" in report
    assert [row["bucket"] for row in report["unet"]["buckets"]] == report["buckets"]
    assert {row["faces"] for row in report["per_face"]} == {1, 2}
    assert report["optimizations"]["lora_fused"]
    assert report["sdxl_config_params_m"]["unet"] == 2567.5
    # The last line is the summary object gpu_check.sh ends with; GPU-only figures are null on CPU.
    last = json.loads(done.stdout.strip().splitlines()[-1])
    assert last == report["summary"] and last["device"] == "cpu" and not last["measured_on_gpu"]
    assert last["s_per_face_idle"] > 0 and last["peak_gpu_gib"] == "n/a: cpu"
    assert set(last["ms_per_call_eager"]) == {"2", "4"}
    assert set(last["tflop_per_face"]) == {"2", "4"} and all(v > 0 for v in last["tflop_per_face"].values())
    assert last["ms_per_call"] == {"2": "off (--no-compile)", "4": "off (--no-compile)"}


def test_cpu_threads_benchmark_measures_every_layout(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "cpu_threads.py"), "--calls", "3", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "cpu_threads.json").read_text())
    assert set(report["results"]) == {"main only", "second thread", "engine setting"}
    for result in report["results"].values():
        assert set(result["seconds"]) == {"1", "2", "4", "8"} and all(s > 0 for s in result["seconds"].values())
    # The engine's setting: the cores divided among the 5 threads that may call torch, at least one.
    cores = len(os.sched_getaffinity(0))
    assert report["results"]["engine setting"]["threads"] == max(1, cores // 5)
