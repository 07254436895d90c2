"""Runs the RayService application (``masquerade.scale.app:build``, the import path deploy/kuberay uses)
on a local Ray cluster and prints one JSON line of what a client saw; tests/scale/test_ray_app_builder.py
runs it in its own process, so Ray's driver never lives in the pytest process.

    python tests/scale/kuberay_layout_run.py MODEL_DIR PORT
"""

from __future__ import annotations

import concurrent.futures
import io
import json
import os
import sys
import time

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image


def main(model_dir: str, port: int) -> int:
    os.environ.setdefault("RAY_gcs_server_port_wait_time_s", "120")
    import ray
    from ray import serve

    from masquerade.api.protos import SERVICE_NAME, pb2, pb2_grpc
    from masquerade.scale.app import build
    from masquerade.scale.config import APP_NAME

    report: dict = {}
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    try:
        serve.start(http_options={"location": "NoServer"})
        args = {"models": model_dir, "device": "cpu", "port": port, "replicas": 2, "max_queue": 8, "grace_seconds": 3}
        serve.run(build(args), name=APP_NAME, route_prefix=None)
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        health = health_pb2_grpc.HealthStub(channel)
        end = time.monotonic() + 60
        status = None
        while time.monotonic() < end:
            try:
                status = health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=2).status
            except grpc.RpcError as error:
                status = error.code().name
            if status == health_pb2.HealthCheckResponse.SERVING:
                break
            time.sleep(0.5)
        report["health"] = (
            health_pb2.HealthCheckResponse.ServingStatus.Name(status) if isinstance(status, int) else status
        )
        stub = pb2_grpc.AnonymizerStub(channel)
        report["replicas"] = stub.GetServerInfo(pb2.GetServerInfoRequest(), timeout=30).replicas
        buffer = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(buffer, "PNG")
        request = pb2.AnonymizeRequest(
            request_id="k8s",
            image=buffer.getvalue(),
            params=pb2.ReversePersonalizationParams(steps=10, skip=0.5),
            detection=pb2.DetectionOptions(aligned=True),
        )
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(lambda _: stub.Anonymize(request, timeout=120), range(8)))
        report["served_by"] = sorted({r.served_by for r in responses})
        report["ok"] = sum(1 for r in responses if r.image)
        channel.close()
    finally:
        serve.shutdown()
        ray.shutdown()
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2])))
