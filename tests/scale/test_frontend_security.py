"""The Ray front end keeps the single-process server's TLS and bearer tokens.

The front end runs for real on loopback; its engines are still "starting" (the connect
step waits until the test ends), which is exactly when probes and clients first reach it:
health answers without a token, every other RPC needs one, and an authenticated call
learns the engines are not up yet (UNAVAILABLE).
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from masquerade.api.protos import SERVICE_NAME, pb2, pb2_grpc
from masquerade.api.server import ServerConfig
from server_support import free_port, make_certificates, write_token_file

TOKEN = "scale-test-token-0123456789"


class FrontEndWithoutEngines:
    """serve_front_end on its own thread; ``connect`` blocks until stop, so no Ray is involved."""

    def __init__(self, config: ServerConfig):
        from masquerade.scale.server import serve_front_end

        self.config = config
        self._release = threading.Event()
        self._started = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self.error: BaseException | None = None

        def run() -> None:
            async def main() -> None:
                self._loop = asyncio.get_running_loop()
                self._stop = asyncio.Event()
                self._started.set()
                await serve_front_end(
                    config,
                    lambda: self._release.wait(60),
                    lambda: 0,
                    stop_event=self._stop,
                    handle_signals=False,
                )

            try:
                asyncio.run(main())
            except BaseException as exc:
                self.error = exc
            finally:
                self._started.set()

        self._thread = threading.Thread(target=run, daemon=True)

    def __enter__(self) -> FrontEndWithoutEngines:
        self._thread.start()
        self._started.wait(30)
        return self

    def __exit__(self, *exc) -> None:
        self._release.set()
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)


def _config(tmp_path: Path, **overrides) -> ServerConfig:
    settings = dict(host="127.0.0.1", port=free_port(), metrics_port=0, grace_seconds=1)
    return ServerConfig(**{**settings, **overrides})


def _wait_health(channel: grpc.Channel) -> int:
    health = health_pb2_grpc.HealthStub(channel)
    grpc.channel_ready_future(channel).result(timeout=20)
    return health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5).status


def test_tokens_guard_every_rpc_but_health(tmp_path):
    config = _config(tmp_path, auth_token_file=str(write_token_file(tmp_path, [TOKEN])))
    with FrontEndWithoutEngines(config), grpc.insecure_channel(f"127.0.0.1:{config.port}") as channel:
        assert _wait_health(channel) == health_pb2.HealthCheckResponse.NOT_SERVING  # engines still starting
        stub = pb2_grpc.AnonymizerStub(channel)
        with pytest.raises(grpc.RpcError) as missing:
            stub.GetServerInfo(pb2.GetServerInfoRequest(), timeout=10)
        assert missing.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as wrong:
            stub.Anonymize(pb2.AnonymizeRequest(image=b"x"), timeout=10, metadata=[("authorization", "Bearer nope")])
        assert wrong.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as starting:
            stub.GetServerInfo(pb2.GetServerInfoRequest(), timeout=10, metadata=[("authorization", f"Bearer {TOKEN}")])
        assert starting.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "starting" in starting.value.details()


def test_tls_only_when_configured(tmp_path):
    certs = make_certificates(tmp_path / "certs")
    config = _config(tmp_path, tls_cert=str(certs.server_cert), tls_key=str(certs.server_key))
    with FrontEndWithoutEngines(config):
        credentials = grpc.ssl_channel_credentials(root_certificates=certs.ca_cert.read_bytes())
        with grpc.secure_channel(f"localhost:{config.port}", credentials) as channel:
            assert _wait_health(channel) == health_pb2.HealthCheckResponse.NOT_SERVING
        with grpc.insecure_channel(f"127.0.0.1:{config.port}") as plaintext:
            with pytest.raises(grpc.RpcError) as refused:
                health_pb2_grpc.HealthStub(plaintext).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert refused.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def test_http_probes_say_not_ready_while_the_engines_start(tmp_path):
    import urllib.error
    import urllib.request

    config = _config(tmp_path, metrics_port=free_port())
    with FrontEndWithoutEngines(config), grpc.insecure_channel(f"127.0.0.1:{config.port}") as channel:
        assert _wait_health(channel) == health_pb2.HealthCheckResponse.NOT_SERVING
        base = f"http://127.0.0.1:{config.metrics_port}"
        assert urllib.request.urlopen(f"{base}/livez", timeout=5).status == 200
        with pytest.raises(urllib.error.HTTPError) as not_ready:
            urllib.request.urlopen(f"{base}/readyz", timeout=5)
        assert not_ready.value.code == 503 and b"starting" in not_ready.value.read()
        assert b"masquerade_requests" in urllib.request.urlopen(f"{base}/metrics", timeout=5).read()


def test_unreadable_token_file_stops_start_up(tmp_path):
    from masquerade.api.security import SecurityConfigError

    config = _config(tmp_path, auth_token_file=str(tmp_path / "missing.txt"))
    front_end = FrontEndWithoutEngines(config)
    with front_end:
        pass
    assert isinstance(front_end.error, SecurityConfigError)
    assert "--auth-token-file" in str(front_end.error)
