"""Issue 20's small faults: drain cut-offs, deadlines in the log, one RESOURCE_EXHAUSTED message, JSON logs
that carry gRPC core's own lines."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from api_support import wait_until

from masquerade.api.access_log import ACCESS_LOGGER
from masquerade.api.protos import pb2, pb2_grpc
from masquerade.engine.engine import EngineConfig
from masquerade_client import build_request


@pytest.fixture
def access_caplog(caplog):
    caplog.set_level(logging.INFO, logger=ACCESS_LOGGER)
    return caplog


def _codes(caplog, prefix: str) -> list[str]:
    return [
        r.access["code"]
        for r in caplog.records
        if r.name == ACCESS_LOGGER and r.access["request_id"].startswith(prefix)
    ]


def _slow(face_png: bytes, request_id: str) -> pb2.AnonymizeRequest:
    return build_request(face_png, aligned=True, skip=0.0, steps=400, request_id=request_id)


def _call(stub, request, timeout=None) -> grpc.StatusCode:
    try:
        stub.Anonymize(request, timeout=timeout)
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


@pytest.mark.timeout(120)
def test_requests_cut_off_at_the_end_of_the_drain_get_unavailable(start_server_sharing_models, face_png, access_caplog):
    """UNAVAILABLE is the code clients retry on another replica; CANCELLED would not be retried."""
    server = start_server_sharing_models(EngineConfig(models="tiny", device="cpu"), grace_seconds=0.5)
    with grpc.insecure_channel(server.address) as channel, ThreadPoolExecutor(4) as pool:
        stub = pb2_grpc.AnonymizerStub(channel)
        calls = [pool.submit(_call, stub, _slow(face_png, f"cut-{i}")) for i in range(4)]
        wait_until(lambda: server.engine.active_jobs >= 2, timeout=30, what="jobs diffusing")
        server.stop()
        codes = [call.result(timeout=30) for call in calls]
    assert codes == [grpc.StatusCode.UNAVAILABLE] * 4
    wait_until(lambda: len(_codes(access_caplog, "cut-")) == 4, what="the access lines")
    assert _codes(access_caplog, "cut-") == ["UNAVAILABLE"] * 4
    errors = [r for r in access_caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]  # an expected end of the drain is not an error


@pytest.mark.timeout(120)
def test_expired_deadlines_are_recorded_as_deadline_exceeded(start_server_sharing_models, face_png, access_caplog):
    server = start_server_sharing_models(EngineConfig(models="tiny", device="cpu"))
    with grpc.insecure_channel(server.address) as channel, ThreadPoolExecutor(6) as pool:
        stub = pb2_grpc.AnonymizerStub(channel)
        stub.GetServerInfo(pb2.GetServerInfoRequest(), timeout=30)  # connected: every call reaches the server
        calls = [pool.submit(_call, stub, _slow(face_png, f"late-{i}"), 0.5 + 0.1 * i) for i in range(6)]
        assert [call.result() for call in calls] == [grpc.StatusCode.DEADLINE_EXCEEDED] * 6
    # A call whose deadline passes before gRPC hands it to the server (a loaded event loop) is never
    # seen, so never logged; every one that was seen must be logged as the deadline, not a cancel.
    wait_until(lambda: len(_codes(access_caplog, "late-")) >= 3, what="the access lines")
    time.sleep(0.5)
    assert set(_codes(access_caplog, "late-")) == {"DEADLINE_EXCEEDED"}


@pytest.mark.timeout(120)
def test_a_full_queue_says_so_once(start_server_sharing_models, face_png):
    server = start_server_sharing_models(EngineConfig(models="tiny", device="cpu", max_queue=1))
    with grpc.insecure_channel(server.address) as channel:
        stub = pb2_grpc.AnonymizerStub(channel)
        first = stub.Anonymize.future(_slow(face_png, "holder"), timeout=60)
        wait_until(lambda: server.engine.queue_depth == 1, what="the queue to fill")
        with pytest.raises(grpc.RpcError) as refused:
            stub.Anonymize(_slow(face_png, "refused"), timeout=30)
        first.cancel()
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    details = refused.value.details()
    assert details.count("retry") == 1 and details.count("queue full") == 1, details


@pytest.mark.timeout(120)
def test_json_logs_carry_grpc_cores_own_lines(tmp_path, certificates):
    """A plaintext client on a TLS port makes gRPC core log a handshake failure from C++: it must
    come out as a JSON record like every other line."""
    command = [sys.executable, "-m", "masquerade.cli", "serve", "--port", "0", "--metrics-port", "0", "--no-http"]
    command += ["--tls-cert", str(certificates.server_cert), "--tls-key", str(certificates.server_key)]
    command += ["--log-format", "json", "--drain-seconds", "0", "--grace-seconds", "1"]
    env = dict(os.environ, MASQUERADE_MODEL_DIR=str(tmp_path / "no-models"))  # classical only: starts fast
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(process.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        wait_until(lambda: any("serving on" in line for line in lines), timeout=60, what="the server to serve")
        address = next(re.search(r"serving on (\S+:\d+) ", line).group(1) for line in lines if "serving on" in line)
        # Plaintext against TLS: the handshake fails.
        with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError):
            pb2_grpc.AnonymizerStub(channel).GetServerInfo(pb2.GetServerInfoRequest(), timeout=2)
        time.sleep(0.5)
        process.terminate()
        assert process.wait(timeout=30) == 0
        reader.join(10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    records = [json.loads(line) for line in lines]  # fails on any line that is not JSON
    native = [r for r in records if r["logger"] == "native.stderr"]
    assert any("andshake" in r["message"] for r in native), records[-5:]
