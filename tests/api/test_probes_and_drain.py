"""HTTP probes (/livez, /readyz, /metrics, 404), the visible drain, loopback defaults and the exposure warning."""

from __future__ import annotations

import logging
import queue
import time
from dataclasses import replace

import grpc
import pytest
from api_support import health_status, http_get, wait_until

from masquerade.api.protos import pb2, pb2_grpc
from masquerade.api.server import ServerConfig
from masquerade.cli.serve import config_from_args, register
from masquerade.engine.engine import EngineConfig
from masquerade_client import build_request
from server_support import free_port, secured, write_token_file


def test_http_port_serves_probes_and_metrics_and_nothing_else(server, client):
    assert http_get(server.metrics_port, "/livez") == (200, "ok\n")
    assert http_get(server.metrics_port, "/readyz") == (200, "ready\n")
    status, body = http_get(server.metrics_port, "/metrics")
    assert status == 200 and "masquerade_requests_total" in body
    for path in ("/", "/metrics/extra", "/health", "/readyz/"):
        assert http_get(server.metrics_port, path)[0] == 404, path


def test_drain_is_visible_before_the_port_closes(start_server_sharing_models, face_png):
    drain_seconds = 3.0
    draining = start_server_sharing_models(
        EngineConfig(models="tiny", device="cpu"),
        grace_seconds=30,
        configure=lambda config: replace(config, drain_seconds=drain_seconds, metrics_port=free_port()),
    )
    request = build_request(face_png, aligned=True, skip=0.0, steps=40, request_id="in-flight")
    with grpc.insecure_channel(draining.address) as channel:
        stub = pb2_grpc.AnonymizerStub(channel)
        stream = stub.AnonymizeStream(request, timeout=120)
        for event in stream:
            if event.WhichOneof("event") == "progress":
                break
        assert http_get(draining.metrics_port, "/readyz")[0] == 200
        started = time.monotonic()
        draining.begin_stop()
        wait_until(lambda: http_get(draining.metrics_port, "/readyz") == (503, "draining\n"), timeout=1, what="503")
        assert health_status(draining.address) == "NOT_SERVING"  # answered: the port is still open
        with pytest.raises(grpc.RpcError) as caught:
            stub.GetServerInfo(pb2.GetServerInfoRequest(), timeout=5)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE and "draining" in caught.value.details()
        assert time.monotonic() - started < drain_seconds, "the checks above must run inside the drain"
        assert http_get(draining.metrics_port, "/livez")[0] == 200
        kinds = [event.WhichOneof("event") for event in stream]
        assert kinds[-1] == "result"  # the request in flight when the drain began still finishes
    wait_until(lambda: not draining.running, timeout=drain_seconds + 30, what="the server to stop")
    assert time.monotonic() - started >= drain_seconds
    assert health_status(draining.address) == "UNAVAILABLE"


def test_defaults_bind_loopback_only():
    import argparse

    parser = argparse.ArgumentParser()
    args = register(parser.add_subparsers()).parse_args([])
    config = config_from_args(args)
    assert (config.host, config.metrics_host) == ("127.0.0.1", "127.0.0.1")
    assert (ServerConfig().host, ServerConfig().metrics_host) == ("127.0.0.1", "127.0.0.1")
    assert config.drain_seconds == 5.0 and config.tls_cert is None and config.auth_token_file is None


def test_exposed_bind_without_tls_warns_naming_the_risk(start_server_sharing_models, certificates, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="masquerade.api.server")
    engine_config = EngineConfig(models="tiny", device="cpu")
    start_server_sharing_models(engine_config, configure=lambda config: replace(config, host="0.0.0.0"))
    warnings = [r.getMessage() for r in caplog.records if r.name == "masquerade.api.server"]
    assert any("without TLS" in w and "clear text" in w for w in warnings), warnings
    assert any("without --auth-token-file" in w for w in warnings), warnings
    caplog.clear()
    token_file = write_token_file(tmp_path, ["t"])
    start_server_sharing_models(
        engine_config,
        configure=lambda config: secured(replace(config, host="0.0.0.0"), certificates, token_file=token_file),
    )
    assert not [r for r in caplog.records if r.name == "masquerade.api.server"]


def test_open_batch_stream_is_refused_new_images_while_draining(start_server_sharing_models, face_png):
    draining = start_server_sharing_models(
        EngineConfig(models="tiny", device="cpu"),
        grace_seconds=30,
        configure=lambda config: replace(config, drain_seconds=2.0),
    )
    outgoing: queue.Queue = queue.Queue()
    with grpc.insecure_channel(draining.address) as channel:
        responses = pb2_grpc.AnonymizerStub(channel).AnonymizeBatch(iter(outgoing.get, None), timeout=120)
        outgoing.put(build_request(face_png, aligned=True, skip=0.0, steps=40, request_id="before"))
        wait_until(lambda: draining.engine.active_jobs == 1, what="the first image to reach the scheduler")
        draining.begin_stop()
        wait_until(lambda: health_status(draining.address) == "NOT_SERVING", timeout=1, what="NOT_SERVING")
        outgoing.put(build_request(face_png, aligned=True, method="blur", request_id="during"))
        outgoing.put(None)
        outcomes = {response.request_id: response for response in responses}
    assert outcomes["before"].WhichOneof("outcome") == "result"
    assert outcomes["during"].error.code == grpc.StatusCode.UNAVAILABLE.value[0]
    assert "draining" in outcomes["during"].error.message
