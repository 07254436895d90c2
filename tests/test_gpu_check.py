"""The GPU check's logic, proven without a GPU.

- the test session starts where grpc_tools cannot be imported (the GPU machine's image): the
  root conftest uses the stubs present, or none, instead of failing the whole run;
- ``GPU_CHECK_DEVICE=cpu bash benchmarks/gpu_check.sh`` with a small budget ends inside it,
  prints every key the issue names as its last line (a phase that did not fit says
  "skipped: budget") and leaves at most 8 files in $OUT, also where grpc_tools is hidden;
- the engine benchmark compiles bucket 2 and bucket 16 before any other.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
STUBS = ("anonymizer_pb2.py", "anonymizer_pb2.pyi", "anonymizer_pb2_grpc.py")


def hide_grpc_tools(folder: Path) -> dict[str, str]:
    """An environment whose Python cannot import grpc_tools (a module of that name that refuses to load)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "grpc_tools.py").write_text('raise ImportError("grpc_tools hidden by the test")\n')
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(folder), env.get("PYTHONPATH")) if p)
    return env


def conftest_tree(root: Path, stubs: str) -> Path:
    """A checkout's skeleton: the real root conftest, stubgen.py and proto/, one trivial test.

    ``stubs``: "absent", or "stale" (present but older than the proto, so a regeneration is due).
    """
    shutil.copy(REPO_ROOT / "tests" / "conftest.py", (root / "tests").mkdir(parents=True) or root / "tests")
    (root / "tests" / "test_trivial.py").write_text("def test_runs():\n    assert True\n")
    (root / "clients" / "python").mkdir(parents=True)
    shutil.copy(REPO_ROOT / "clients" / "python" / "stubgen.py", root / "clients" / "python")
    shutil.copytree(REPO_ROOT / "proto", root / "proto")
    (root / "pyproject.toml").write_text('[tool.pytest.ini_options]\ntestpaths = ["tests"]\n')
    output = root / "clients" / "python" / "masquerade_client" / "v1"
    if stubs == "stale":
        output.mkdir(parents=True)
        for name in (*STUBS, "__init__.py"):
            (output / name).write_text("# carried stub\n")
            os.utime(output / name, (1_000_000, 1_000_000))  # 1970: older than any proto
    return output


@pytest.mark.parametrize("stubs", ["stale", "absent"])
def test_session_starts_without_grpc_tools(tmp_path: Path, stubs: str) -> None:
    root = tmp_path / "checkout"
    output = conftest_tree(root, stubs)
    before = {p.name: p.read_text() for p in output.glob("*")} if output.is_dir() else {}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(root / "tests")],
        cwd=root,
        env=hide_grpc_tools(tmp_path / "hide"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "1 passed" in done.stdout
    after = {p.name: p.read_text() for p in output.glob("*")} if output.is_dir() else {}
    assert after == before, "the stubs present are used as they are, never half-regenerated"


def test_session_regenerates_stale_stubs_with_grpc_tools(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools.protoc")
    root = tmp_path / "checkout"
    output = conftest_tree(root, "stale")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(root / "tests")],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "class AnonymizerStub" in (output / "anonymizer_pb2_grpc.py").read_text()


# The keys the issue asks of the last line, and what a CPU run may say instead of a figure.
REQUIRED_KEYS = (
    "device",
    "torch",
    "s_per_face_idle",
    "idle_bucket",
    "ms_per_call",
    "faces_per_min_8",
    "mfu",
    "recompiles_after_warmup",
    "host_syncs_per_call",
    "kernel_speedup_vs_eager",
    "peak_gpu_gib_per_face",
    "gpu_tests",
    "buckets_compiled",
    "budget_s",
    "elapsed_s",
)
NOT_A_FIGURE = ("skipped: budget", "timed out: budget", "n/a")


def load_engine_bench():
    spec = importlib.util.spec_from_file_location("engine_bench", REPO_ROOT / "benchmarks" / "engine_bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_figure_buckets_compile_first() -> None:
    engine_bench = load_engine_bench()
    assert engine_bench.compile_order((2, 4, 8, 16), 16) == [2, 16, 4, 8]
    assert engine_bench.compile_order((16, 8, 2, 4, 32), 16) == [2, 16, 4, 8, 32]
    assert engine_bench.compile_order((2, 4), 2) == [2, 4]
    with pytest.raises(ValueError, match="must hold 2"):
        engine_bench.compile_order((4, 8, 16), 16)


def test_budget_deadlines_follow_the_shares() -> None:
    engine_bench = load_engine_bench()
    budget = engine_bench.Budget.from_shares(
        1000.0, 200.0, {"build": 10, "compile": 40, "figures": 20, "baselines": 10}
    )
    assert budget.deadlines == {
        "build": 1020.0,
        "compile": 1100.0,
        "figures": 1140.0,
        "baselines": 1160.0,
        "extra": 1200.0,
    }


def test_cpu_mode_in_a_small_budget_prints_every_key_without_grpc_tools(tmp_path: Path) -> None:
    """The whole script on the tiny models in 55 s, its Python unable to import grpc_tools."""
    budget = 55
    out = tmp_path / "out"
    env = hide_grpc_tools(tmp_path / "hide")
    env.update(GPU_CHECK_DEVICE="cpu", GPU_CHECK_BUDGET_S=str(budget), GPU_CHECK_MIN_PHASE_S="5", OUT=str(out))
    env.update(PYTHON=sys.executable)
    env.pop("TRITON_INTERPRET", None)
    started = time.monotonic()
    done = subprocess.run(
        ["bash", str(REPO_ROOT / "benchmarks" / "gpu_check.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=budget + 60,
    )
    took = time.monotonic() - started
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    log = (out / "gpu_check.log").read_text()

    missing = [key for key in REQUIRED_KEYS if key not in result]
    assert not missing, f"keys missing from the last line: {missing}"
    assert result == json.loads((out / "gpu_check.json").read_text())
    assert result["device"] == "cpu" and result["torch"] and result["budget_s"] == budget
    assert result["elapsed_s"] <= budget and took <= budget + 10, (result["elapsed_s"], took)
    # Each figure is measured, or says why not; nothing is silently missing.
    for key in REQUIRED_KEYS:
        value = result[key]
        assert value is not None, f"{key} is null:\n{log[-3000:]}"
        if isinstance(value, str) and key not in ("device", "torch"):
            assert value.startswith(NOT_A_FIGURE), f"{key}: {value!r}"
    assert set(result["ms_per_call"]) == {"2", "4", "8", "16"}
    assert result["idle_bucket"] == 2 or result["idle_bucket"].startswith(NOT_A_FIGURE)
    assert result["phases"]["setup"].startswith("done")
    tests = result["gpu_tests"]
    if isinstance(tests, dict):  # the tests' phase fitted: counted from pytest's report or its log
        assert {"passed", "failed", "skipped"} <= set(tests) and tests["failed"] == 0, tests
    else:
        assert tests.startswith(NOT_A_FIGURE), tests
    # Buckets compile one after the other in the figures' order; one that does not fit stops the rest.
    compiled = result["buckets_compiled"]
    assert compiled == ["2", "16", "4", "8"][: len(compiled)], compiled
    failed = {name: status for name, status in result["phases"].items() if str(status).startswith("failed")}
    assert not failed, f"{failed}\n{log[-3000:]}"
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8, files
