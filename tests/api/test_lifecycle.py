"""Health, reflection, /metrics, graceful shutdown and the `serve` command."""

from __future__ import annotations

import json
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
from api_support import health_status, http_get, wait_until
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from masquerade.api.protos import SERVICE_NAME, pb2, pb2_grpc
from server_support import free_port, write_token_file


def test_health_is_serving_for_the_server_and_the_service(server, client):
    assert health_status(server.address, "") == "SERVING"
    assert health_status(server.address, SERVICE_NAME) == "SERVING"


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


def _get_info(address: str, token: str | None) -> grpc.StatusCode:
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    with grpc.insecure_channel(address) as channel:
        try:
            pb2_grpc.AnonymizerStub(channel).GetServerInfo(pb2.GetServerInfoRequest(), metadata=metadata, timeout=5)
        except grpc.RpcError as error:
            return error.code()
    return grpc.StatusCode.OK


@pytest.mark.timeout(180)
def test_serve_command_loads_serves_reloads_tokens_and_drains_visibly(tmp_path):
    """`masquerade serve` as deployed: /readyz 503 while loading, loopback by default, SIGHUP rereads the
    token file, SIGTERM turns probes NOT_SERVING while the port stays open, and every log line is JSON."""
    metrics_port, drain_seconds = free_port(), 3.0
    token_file = write_token_file(tmp_path, ["first-token"])
    command = [sys.executable, "-m", "masquerade.cli", "serve", "--models", "tiny", "--device", "cpu"]
    command += ["--port", "0", "--metrics-port", str(metrics_port), "--auth-token-file", str(token_file)]
    command += ["--drain-seconds", str(drain_seconds), "--grace-seconds", "5", "--log-format", "json"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(process.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        seen: list[int] = []
        deadline = time.monotonic() + 120
        while (not seen or seen[-1] != 200) and time.monotonic() < deadline and process.poll() is None:
            try:
                seen.append(http_get(metrics_port, "/readyz")[0])
            except OSError:  # the HTTP port is not open yet
                pass
            time.sleep(0.05)
        assert seen and seen[0] == 503 and seen[-1] == 200, f"/readyz never went 503 -> 200: {seen}\n{lines}"
        messages = [json.loads(line).get("message", "") for line in list(lines)]
        listening = [re.search(r"listening on (\S+:\d+) ", m) for m in messages]
        address = next(match.group(1) for match in listening if match)
        assert address.startswith("127.0.0.1:")  # loopback unless --host says otherwise
        assert any("methods=[reverse_personalization" in m for m in messages)

        assert _get_info(address, None) == grpc.StatusCode.UNAUTHENTICATED
        assert _get_info(address, "first-token") == grpc.StatusCode.OK
        write_token_file(tmp_path, ["second-token"])
        process.send_signal(signal.SIGHUP)
        wait_until(lambda: _get_info(address, "second-token") == grpc.StatusCode.OK, what="the reloaded token")
        assert _get_info(address, "first-token") == grpc.StatusCode.UNAUTHENTICATED

        stopped_at = time.monotonic()
        process.send_signal(signal.SIGTERM)
        wait_until(lambda: http_get(metrics_port, "/readyz")[0] == 503, timeout=1, what="/readyz 503")
        assert health_status(address) == "NOT_SERVING"  # answered, so the port is still open
        assert time.monotonic() - stopped_at < drain_seconds
        assert process.wait(timeout=60) == 0
        assert time.monotonic() - stopped_at >= drain_seconds
        reader.join(10)
        records = [json.loads(line) for line in lines]  # fails on any line that is not JSON
        access = [r for r in records if r.get("event") == "access" and r["rpc"] == "GetServerInfo"]
        assert {r["code"] for r in access} == {"OK", "UNAUTHENTICATED"}
        assert all(r["peer"].startswith("ipv4:127.0.0.1:") for r in access)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
