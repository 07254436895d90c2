"""The KubeRay layout end to end on a local Ray cluster: the application deploy/kuberay/rayservice.yaml
imports (``masquerade.scale.app:build``) serves the gRPC contract from its engine replicas' node.

Two CPU replicas on tiny models share one node, so one of them serves the port and the other
skips it; every request still goes through the deployment handle, so both replicas do work.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ray.serve", reason="the [ray] extra is not installed")

pytestmark = pytest.mark.ray


def test_rayservice_application_serves_grpc_from_the_replicas(tiny_model_dir):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    script = Path(__file__).with_name("kuberay_layout_run.py")
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", OMP_NUM_THREADS="1")
    run = subprocess.run(
        [sys.executable, str(script), str(tiny_model_dir), str(port)],
        capture_output=True,
        text=True,
        timeout=420,
        env=env,
    )
    lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
    assert run.returncode == 0 and lines, f"rc={run.returncode}\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    report = json.loads(lines[-1])
    assert report["health"] == "SERVING"
    assert report["replicas"] == 2
    assert report["ok"] == 8
    assert len(report["served_by"]) == 2, report  # one pod's front end, both replicas' engines
