"""Health, reflection, /metrics, graceful shutdown and the `serve` command."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from api_support import wait_until
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from masquerade.api.protos import SERVICE_NAME
from masquerade.engine.engine import EngineConfig
from masquerade_client import AnonymizerClient


def _health(address: str, service: str) -> str:
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        except grpc.RpcError as error:
            return error.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def test_health_is_serving_for_the_server_and_the_service(server, client):
    assert _health(server.address, "") == "SERVING"
    assert _health(server.address, SERVICE_NAME) == "SERVING"


def test_reflection_lists_the_service_and_health(server):
    with grpc.insecure_channel(server.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = list(
            stub.ServerReflectionInfo(
                iter(
                    [
                        reflection_pb2.ServerReflectionRequest(list_services=""),
                        reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE_NAME),
                    ]
                ),
                timeout=10,
            )
        )
    names = {service.name for service in replies[0].list_services_response.service}
    assert {SERVICE_NAME, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names
    assert replies[1].file_descriptor_response.file_descriptor_proto  # clients can build stubs from it


def _scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}"] = sample.value
    return samples


def test_concurrent_requests_share_unet_calls(server, client, face_png):
    steps, concurrency = 8, 16
    before = _scrape(server.metrics_port)
    with ThreadPoolExecutor(concurrency) as pool:
        responses = list(
            pool.map(
                lambda i: client.anonymize(face_png, aligned=True, steps=steps, seed=i, request_id=f"load-{i}"),
                range(concurrency),
            )
        )
    assert all(r.faces[0].status for r in responses)
    after = _scrape(server.metrics_port)
    calls = after["masquerade_unet_batch_size_count{}"] - before.get("masquerade_unet_batch_size_count{}", 0)
    samples = after["masquerade_unet_batch_size_sum{}"] - before.get("masquerade_unet_batch_size_sum{}", 0)
    assert samples == concurrency * steps * 2 * 2  # inversion + generation, a CFG pair each
    # Run one at a time, generation alone would take concurrency * steps calls of one pair each.
    assert calls < concurrency * steps, (calls, samples)
    assert samples / calls > 2
    assert after["masquerade_requests_total{method=unspecified,rpc=Anonymize,status=OK}"] >= concurrency


def test_a_request_among_fifteen_others_equals_the_request_alone(client, face_png):
    """Batching across requests must not change a request's result beyond float tolerance."""
    import io

    import numpy as np
    from PIL import Image

    def pixels(response) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(response.image)).convert("RGB"), dtype=np.int16)

    alone = pixels(client.anonymize(face_png, aligned=True, steps=6, seed=42, request_id="alone"))
    with ThreadPoolExecutor(16) as pool:
        futures = [
            pool.submit(client.anonymize, face_png, aligned=True, steps=4 + i % 5, seed=i, request_id=f"crowd-{i}")
            for i in range(15)
        ]
        target = pool.submit(client.anonymize, face_png, aligned=True, steps=6, seed=42, request_id="crowded")
        crowded = pixels(target.result())
        for future in futures:
            future.result()
    assert np.abs(crowded - alone).max() <= 3  # PNG output, so only float noise can differ


def test_graceful_shutdown_finishes_in_flight_requests(start_server_sharing_models, face_png):
    draining = start_server_sharing_models(EngineConfig(models="tiny", device="cpu"), grace_seconds=30)
    with AnonymizerClient(draining.address, timeout=60) as c:
        c.wait_ready(timeout=10)
        stream = c.anonymize_stream(face_png, aligned=True, skip=0.0, steps=60, request_id="in-flight")
        for event in stream:
            if event.WhichOneof("event") == "progress":
                break
        stopper = threading.Thread(target=draining.stop)
        stopper.start()
        wait_until(lambda: _health(draining.address, SERVICE_NAME) != "SERVING", what="health to leave SERVING")
        kinds = [event.WhichOneof("event") for event in stream]
        assert kinds[-1] == "result"
        stopper.join(30)
        assert not stopper.is_alive()


@pytest.mark.timeout(120)
def test_serve_command_logs_its_address_and_stops_on_sigterm():
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "masquerade.api.cli",
            "serve",
            "--models",
            "tiny",
            "--device",
            "cpu",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--metrics-port",
            "0",
            "--grace-seconds",
            "5",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        address = None
        deadline = time.monotonic() + 90
        while address is None and time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            match = re.search(r"masquerade serving on (\S+:\d+) \(", line)
            if match:
                address = match.group(1)
                assert "methods=[reverse_personalization" in line
        assert address, "the serve command never logged its address"
        with AnonymizerClient(address, timeout=30) as c:
            c.wait_ready(timeout=10)
            assert c.server_info().limits.max_queue == 64
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
