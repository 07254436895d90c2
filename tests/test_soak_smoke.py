"""The soak benchmark's smoke run: a few seconds of the full request mix against a spawned tiny-model server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_soak_smoke_run_has_no_unexpected_errors_and_writes_its_results(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, str(REPO_ROOT / "benchmarks" / "soak.py"), "--minutes", "0.15", "--concurrency", "3"]
    command += ["--warmup-minutes", "0.02", "--idle-seconds", "1", "--no-large-check", "--label", "smoke"]
    command += ["--out", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=400, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "soak_smoke.json").read_text())
    assert (tmp_path / "soak_smoke.png").stat().st_size > 0
    assert report["requests"] > 0 and report["requests"] == report["ok"] + report["expected_errors"]
    assert report["unexpected_errors"] == 0 and report["crashes"] == 0 and report["server_exit_code"] == 0
    assert report["rss_start_mb"] > 0 and report["threads_end"] > 0 and report["fds_end"] > 0
    assert "unexpected errors 0" in done.stdout
