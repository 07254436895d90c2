"""The gRPC server: Anonymizer service, health, reflection, /metrics, graceful shutdown.

``serve`` runs until SIGTERM/SIGINT (or its stop event): health goes NOT_SERVING,
new RPCs are refused, in-flight ones get ``grace_seconds`` to finish, then the
engine is shut down. ``start_test_server`` runs the same thing on a background
thread for tests and for other languages' client tests.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from masquerade.api.protos import SERVICE_NAME, pb2_grpc
from masquerade.api.servicer import AnonymizerServicer

if TYPE_CHECKING:
    from masquerade.engine.engine import Engine, EngineConfig

log = logging.getLogger(__name__)

MIB = 1024 * 1024
HEALTH_SERVICES = ("", SERVICE_NAME)  # "" is the whole server, by gRPC health convention


def _default_engine_config() -> EngineConfig:
    from masquerade.engine.engine import EngineConfig

    return EngineConfig()


@dataclass
class ServerConfig:
    """Everything ``serve`` needs; built once from the CLI flags."""

    host: str = "[::]"
    """Interface to listen on ("[::]" all, "127.0.0.1" loopback only)."""
    port: int = 50051
    """gRPC port; 0 picks a free one (the bound address is logged and returned)."""
    metrics_port: int = 9090
    """Prometheus /metrics HTTP port; 0 turns it off."""
    max_receive_message_bytes: int = 64 * MIB
    """Largest request accepted. gRPC's default of 4 MiB is too small for a 12-megapixel JPEG or a PNG."""
    max_send_message_bytes: int = 64 * MIB
    """Largest response sent (the anonymized image plus records)."""
    grace_seconds: float = 30.0
    """On shutdown, how long in-flight requests may run before they are cancelled."""
    batch_window: int = 32
    """Requests of one AnonymizeBatch stream in flight before the server stops reading it."""
    engine: EngineConfig = field(default_factory=_default_engine_config)

    def __post_init__(self) -> None:
        for name in ("port", "metrics_port"):
            value = getattr(self, name)
            if not 0 <= value <= 65535:
                raise ValueError(f"ServerConfig.{name}={value}: must be a TCP port in [0, 65535]")
        for name in ("max_receive_message_bytes", "max_send_message_bytes"):
            value = getattr(self, name)
            if value < MIB:
                raise ValueError(f"ServerConfig.{name}={value}: must be at least 1 MiB ({MIB}); images need room")
        if self.grace_seconds < 0:
            raise ValueError(f"ServerConfig.grace_seconds={self.grace_seconds}: must be >= 0")
        if self.batch_window < 1:
            raise ValueError(f"ServerConfig.batch_window={self.batch_window}: must be >= 1")


@dataclass
class ServingState:
    """What a running ``serve`` reports through its ``on_started`` callback."""

    address: str
    port: int
    metrics_port: int  # 0 when off
    engine: Engine
    stop: Callable[[], None]  # thread-safe: begins the graceful shutdown


async def _mirror_engine_health(engine: Engine, health_servicer, stopping: asyncio.Event) -> None:
    """Health follows engine.ready (models loaded, buckets warm, loop running) until shutdown starts."""
    serving = None
    while not stopping.is_set():
        now_serving = bool(engine.ready)
        if now_serving != serving:
            status = (
                health_pb2.HealthCheckResponse.SERVING if now_serving else health_pb2.HealthCheckResponse.NOT_SERVING
            )
            for name in HEALTH_SERVICES:
                await health_servicer.set(name, status)
            serving = now_serving
        try:
            await asyncio.wait_for(stopping.wait(), timeout=0.1)
        except TimeoutError:
            pass


def _start_metrics_http(config: ServerConfig) -> tuple[object | None, int]:
    if not config.metrics_port:
        return None, 0
    from prometheus_client import start_http_server

    from masquerade.metrics import REGISTRY

    addr = "0.0.0.0" if config.host in ("[::]", "0.0.0.0", "") else config.host.strip("[]")
    httpd, _thread = start_http_server(config.metrics_port, addr=addr, registry=REGISTRY)
    return httpd, httpd.server_port


def _describe(engine: Engine) -> str:
    info = engine.info()
    methods = ",".join(m.value for m, (available, _) in info.methods.items() if available)
    models = ", ".join(f"{role}={where}" for role, where in sorted(info.models.items())) or "none"
    return (
        f"device={info.device} dtype={info.dtype} attention={info.attention_backend} "
        f"methods=[{methods}] default={info.default_method.value} max_batch={info.max_batch} "
        f"max_queue={info.max_queue} models: {models}"
    )


async def serve(
    config: ServerConfig,
    engine: Engine | None = None,
    *,
    stop_event: asyncio.Event | None = None,
    on_started: Callable[[ServingState], None] | None = None,
    handle_signals: bool = True,
) -> None:
    """Serves until SIGTERM/SIGINT or ``stop_event``; then shuts down gracefully.

    With ``engine=None`` the engine is built from ``config.engine`` *after* the port is
    open, so health probes answer NOT_SERVING (not connection refused) while models load.
    A given engine may be built but not started; ``serve`` starts it.
    """
    stop_event = stop_event or asyncio.Event()
    loop = asyncio.get_running_loop()
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", config.max_receive_message_bytes),
            ("grpc.max_send_message_length", config.max_send_message_bytes),
            # Two servers silently sharing one port would split traffic between them.
            ("grpc.so_reuseport", 0),
        ]
    )
    servicer = AnonymizerServicer(
        max_receive_message_bytes=config.max_receive_message_bytes,
        max_send_message_bytes=config.max_send_message_bytes,
        batch_window=config.batch_window,
    )
    pb2_grpc.add_AnonymizerServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    for name in HEALTH_SERVICES:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
    )
    port = server.add_insecure_port(f"{config.host}:{config.port}")
    if port == 0:
        raise OSError(f"could not bind gRPC port {config.host}:{config.port}; is another server running there?")
    host = config.host if config.host not in ("[::]", "0.0.0.0", "") else "0.0.0.0"
    address = f"{host}:{port}"
    await server.start()

    if handle_signals and threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop_event.set)

    httpd = None
    stopping = asyncio.Event()
    health_task = None
    try:
        if engine is None:
            from masquerade.engine.engine import Engine

            log.info("loading models (%s) ...", config.engine.models)
            engine = await asyncio.to_thread(Engine.build, config.engine)
        await engine.start()
        servicer.attach(engine)
        health_task = asyncio.create_task(_mirror_engine_health(engine, health_servicer, stopping))
        httpd, metrics_port = _start_metrics_http(config)
        metrics_note = f"metrics on http://{host}:{metrics_port}/metrics" if metrics_port else "metrics off"
        log.info("masquerade serving on %s (%s); %s", address, _describe(engine), metrics_note)
        if on_started is not None:
            on_started(
                ServingState(
                    address=address,
                    port=port,
                    metrics_port=metrics_port,
                    engine=engine,
                    stop=lambda: loop.call_soon_threadsafe(stop_event.set),
                )
            )
        await stop_event.wait()
    finally:
        log.info("shutting down: health NOT_SERVING, draining in-flight requests for up to %.0fs", config.grace_seconds)
        stopping.set()
        if health_task is not None:
            await asyncio.gather(health_task, return_exceptions=True)
        await health_servicer.enter_graceful_shutdown()
        # Stop accepting RPCs and let in-flight ones finish, while the engine stops
        # admitting and drains; both give up at the grace period.
        waits = [server.stop(config.grace_seconds)]
        if engine is not None:
            waits.append(engine.shutdown(config.grace_seconds))
        results = await asyncio.gather(*waits, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                log.error("error during shutdown", exc_info=result)
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
        if handle_signals and threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)
        log.info("stopped")


class BackgroundServer:
    """``serve`` on its own event loop in a daemon thread; for tests and client tests.

    ``start()`` blocks until the server is SERVING-capable (engine started) and
    returns self; ``address`` is "127.0.0.1:PORT"; ``engine`` is the live engine.
    """

    def __init__(self, config: ServerConfig, engine: Engine | None = None):
        self.config = config
        self._engine = engine
        self._state: ServingState | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="masquerade-test-server", daemon=True)

    def _run(self) -> None:
        def on_started(state: ServingState) -> None:
            self._state = state
            self._started.set()

        try:
            asyncio.run(serve(self.config, self._engine, on_started=on_started, handle_signals=False))
        except BaseException as exc:
            self._error = exc
        finally:
            self._started.set()

    def start(self, timeout: float = 300.0) -> BackgroundServer:
        self._thread.start()
        if not self._started.wait(timeout):
            raise TimeoutError(f"test server did not start within {timeout}s")
        if self._state is None:
            raise RuntimeError("test server failed to start") from self._error
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self._state.port}"

    @property
    def metrics_port(self) -> int:
        return self._state.metrics_port

    @property
    def engine(self) -> Engine:
        return self._state.engine

    def stop(self, timeout: float | None = None) -> None:
        """Graceful stop; waits for the thread (up to grace + 30 s unless ``timeout`` says otherwise)."""
        if self._state is not None and self._thread.is_alive():
            self._state.stop()
        self._thread.join(self.config.grace_seconds + 30 if timeout is None else timeout)


def start_test_server(
    engine_config: EngineConfig, *, grace_seconds: float = 2.0, metrics: bool = False
) -> tuple[str, Callable[[], None]]:
    """Starts a server on 127.0.0.1 (free port) in a background thread; returns (address, stop)."""
    config = ServerConfig(
        host="127.0.0.1",
        port=0,
        metrics_port=0,
        grace_seconds=grace_seconds,
        engine=engine_config,
    )
    if metrics:
        config = dataclasses.replace(config, metrics_port=_free_port())
    server = BackgroundServer(config).start()
    return server.address, server.stop


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
