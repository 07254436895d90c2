"""The gRPC server: Anonymizer service, health, reflection, HTTP probes, TLS, tokens and a visible drain.

``serve`` runs until SIGTERM/SIGINT (or its stop function). It then drains in two
stages: health goes NOT_SERVING, /readyz 503 and new RPCs UNAVAILABLE at once while
the port stays open for ``drain_seconds`` (so load balancers see it leave); then
in-flight requests get ``grace_seconds`` before the engine shuts down.
Tests start it on a background thread through tests/server_support.py.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from masquerade.api.http_probes import ProbeServer
from masquerade.api.protos import SERVICE_NAME, pb2_grpc
from masquerade.api.quota import ClientAdmission, ClientPolicy
from masquerade.api.security import GateInterceptor, TokenStore, is_loopback, server_credentials
from masquerade.api.servicer import AnonymizerServicer
from masquerade.api.video_service import VideoConfig
from masquerade.engine.job_state import Priority

if TYPE_CHECKING:
    from masquerade.engine.engine import Engine, EngineConfig

log = logging.getLogger(__name__)

MIB = 1024 * 1024
HEALTH_SERVICES = ("", SERVICE_NAME)  # "" is the whole server, by gRPC health convention
LOOPBACK = "127.0.0.1"
HANDLER_ANSWER_SECONDS = 2.0  # after the engine's grace: time for handlers to answer what it cancelled


def _default_engine_config() -> EngineConfig:
    from masquerade.engine.engine import EngineConfig

    return EngineConfig()


@dataclass
class ServerConfig:
    """Everything ``serve`` needs; built once from the CLI flags. Secure by default: loopback only."""

    host: str = LOOPBACK
    """Interface for gRPC. Loopback by default; "0.0.0.0" or "[::]" exposes it (then use TLS and tokens)."""
    port: int = 50051
    """gRPC port; 0 picks a free one (the bound address is logged and returned)."""
    metrics_host: str = LOOPBACK
    """Interface for the HTTP port (/metrics, /livez, /readyz); these answer without a token."""
    metrics_port: int = 9090
    """HTTP port for /metrics, /livez and /readyz; 0 turns it off."""
    http_host: str | None = None
    """Interface for the HTTP/JSON API and web page; None means the gRPC ``host``."""
    http_port: int | None = None
    """Port of the HTTP/JSON API and web page (api/http/); None turns it off, 0 picks a free one.
    Same tokens, TLS and limits as gRPC. The CLI's default is 8080."""
    http_cors_origins: tuple[str, ...] = ()
    """Web origins (``https://app.example``) whose pages may call the HTTP API from the browser; none by default."""
    tls_cert: str | None = None
    """PEM certificate chain; with ``tls_key`` the server speaks only TLS."""
    tls_key: str | None = None
    """PEM private key of ``tls_cert``."""
    tls_client_ca: str | None = None
    """PEM CA bundle; when set, clients must present a certificate it signed (mutual TLS)."""
    auth_token_file: str | None = None
    """One bearer token per line; when set every RPC but health needs ``authorization: Bearer <token>``."""
    max_receive_message_bytes: int = 64 * MIB
    """Largest request accepted. gRPC's default of 4 MiB is too small for a 12-megapixel JPEG or a PNG."""
    max_send_message_bytes: int = 64 * MIB
    """Largest response sent (the anonymized image plus records)."""
    drain_seconds: float = 5.0
    """On shutdown, how long the port stays open answering NOT_SERVING before in-flight requests are waited on."""
    grace_seconds: float = 30.0
    """After the drain, how long in-flight requests may run before they are cancelled."""
    batch_window: int = 32
    """Requests of one AnonymizeBatch stream in flight before the server stops reading it."""
    default_priority: Priority = Priority.INTERACTIVE
    """What PRIORITY_UNSPECIFIED means for a caller whose token line sets no ``priority=``."""
    quotas: ClientPolicy = field(default_factory=ClientPolicy)
    """Per-client quotas (requests per second, burst, faces in flight) for clients whose token line
    sets none; a client is a token, a client certificate's name, or every anonymous caller together."""
    video: VideoConfig = field(default_factory=VideoConfig)
    """AnonymizeVideo's spool and limits, AnonymizeFrames' window (api/video_service.py)."""
    engine: EngineConfig = field(default_factory=_default_engine_config)

    def __post_init__(self) -> None:
        for name in ("port", "metrics_port", "http_port"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 65535:
                raise ValueError(f"ServerConfig.{name}={value}: must be a TCP port in [0, 65535]")
        for name in ("max_receive_message_bytes", "max_send_message_bytes"):
            value = getattr(self, name)
            if value < MIB:
                raise ValueError(f"ServerConfig.{name}={value}: must be at least 1 MiB ({MIB}); images need room")
        for name in ("drain_seconds", "grace_seconds"):
            if getattr(self, name) < 0:
                raise ValueError(f"ServerConfig.{name}={getattr(self, name)}: must be >= 0")
        if self.batch_window < 1:
            raise ValueError(f"ServerConfig.batch_window={self.batch_window}: must be >= 1")

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None or self.tls_key is not None


@dataclass
class ServingState:
    """What a running ``serve`` reports through its ``on_started`` callback."""

    address: str
    port: int
    metrics_port: int  # 0 when off
    engine: Engine
    stop: Callable[[], None]  # thread-safe: begins the drain (a second call skips the rest of the drain)
    reload_tokens: Callable[[], bool]  # thread-safe: what SIGHUP does; False when no token file or reload failed
    tls: bool = False
    http_port: int = 0  # the HTTP/JSON API's port; 0 when off


class _Lifecycle:
    """Loading -> serving -> draining, as /readyz, health and the RPC gate see it."""

    def __init__(self) -> None:
        self.engine: Engine | None = None
        self.draining = False

    def readiness(self) -> tuple[bool, str]:
        if self.draining:
            return False, "draining"
        if self.engine is None:
            return False, "loading"
        if not self.engine.ready:
            return False, "not ready"  # warming up, or its loop has stopped
        return True, "ready"


async def _set_health(health_servicer, serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in HEALTH_SERVICES:
        await health_servicer.set(name, status)


async def _mirror_engine_health(lifecycle: _Lifecycle, health_servicer, stopping: asyncio.Event) -> None:
    """Health follows readiness (models loaded, loop running) until the drain starts."""
    serving = None
    while not stopping.is_set():
        now_serving, _ = lifecycle.readiness()
        if now_serving != serving:
            await _set_health(health_servicer, now_serving)
            serving = now_serving
        try:
            await asyncio.wait_for(stopping.wait(), timeout=0.1)
        except TimeoutError:
            pass


def _warn_about_exposure(config: ServerConfig, tokens: TokenStore | None) -> None:
    if not is_loopback(config.host):
        if not config.tls:
            log.warning(
                "gRPC listens on %s without TLS: face photos, results and tokens cross the network in clear text "
                "and can be read or altered on the way; pass --tls-cert/--tls-key, or bind 127.0.0.1 behind a "
                "TLS-terminating proxy",
                config.host,
            )
        if tokens is None:
            log.warning(
                "gRPC listens on %s without --auth-token-file: anyone who can reach the port can submit photos "
                "and use the GPU",
                config.host,
            )
    if config.metrics_port and not is_loopback(config.metrics_host):
        log.warning(
            "the HTTP port listens on %s: /metrics, /livez and /readyz answer anyone who can reach it, "
            "without TLS or tokens",
            config.metrics_host,
        )


def _describe(engine: Engine) -> str:
    info = engine.info()
    methods = ",".join(m.value for m, (available, _) in info.methods.items() if available)
    models = ", ".join(f"{role}={where}" for role, where in sorted(info.models.items())) or "none"
    return (
        f"device={info.device} dtype={info.dtype} attention={info.attention_backend} "
        f"methods=[{methods}] default={info.default_method.value} max_batch={info.max_batch} "
        f"max_queue={info.max_queue} models: {models}"
    )


def _display_host(host: str) -> str:
    return "0.0.0.0" if host in ("[::]", "0.0.0.0", "") else host


@dataclass
class SecuredServer:
    """A gRPC server with the security gate installed and its port bound (not yet started)."""

    server: grpc.aio.Server
    port: int
    address: str  # host:port as logged ("0.0.0.0:PORT" for a wildcard bind)
    tokens: TokenStore | None
    security: str  # "plaintext" / "TLS" / "mutual TLS", and the token count: for the start-up log

    def reload_tokens(self) -> bool:
        """What SIGHUP does; False when there is no token file or the reload failed."""
        return self.tokens.reload() if self.tokens is not None else False


def secured_grpc_server(config: ServerConfig, draining: Callable[[], bool]) -> SecuredServer:
    """A grpc.aio server on ``config``'s host and port with its TLS, tokens and the drain gate.

    Any front end (this module's ``serve``, a scale-out front end) adds its services and starts it.
    Raises SecurityConfigError naming the flag for an unusable TLS or token file, OSError when the port is taken.
    """
    tokens = TokenStore(config.auth_token_file) if config.auth_token_file else None
    credentials = server_credentials(config.tls_cert, config.tls_key, config.tls_client_ca)
    server = grpc.aio.server(
        interceptors=[GateInterceptor(tokens, draining)],
        options=[
            ("grpc.max_receive_message_length", config.max_receive_message_bytes),
            ("grpc.max_send_message_length", config.max_send_message_bytes),
            # Two servers silently sharing one port would split traffic between them.
            ("grpc.so_reuseport", 0),
        ],
    )
    bind = f"{config.host}:{config.port}"
    port = server.add_secure_port(bind, credentials) if credentials else server.add_insecure_port(bind)
    if port == 0:
        raise OSError(f"could not bind gRPC port {bind}; is another server running there?")
    _warn_about_exposure(config, tokens)
    transport = ("mutual TLS" if config.tls_client_ca else "TLS") if credentials else "plaintext"
    auth = f"{len(tokens)} bearer token(s)" if tokens is not None else "no token auth"
    return SecuredServer(server, port, f"{_display_host(config.host)}:{port}", tokens, f"{transport}, {auth}")


async def serve(
    config: ServerConfig,
    engine: Engine | None = None,
    *,
    stop_event: asyncio.Event | None = None,
    on_started: Callable[[ServingState], None] | None = None,
    handle_signals: bool = True,
) -> None:
    """Serves until SIGTERM/SIGINT or ``stop_event``; then drains and shuts down gracefully.

    With ``engine=None`` the engine is built from ``config.engine`` *after* the ports are
    open, so health probes answer NOT_SERVING and /readyz 503 (not connection refused)
    while models load. A given engine may be built but not started; ``serve`` starts it.
    Raises SecurityConfigError (a ValueError naming the flag) for unusable TLS or token files.
    """
    stop_event = stop_event or asyncio.Event()
    hurry = asyncio.Event()  # a second stop request: skip what is left of the drain
    loop = asyncio.get_running_loop()
    lifecycle = _Lifecycle()
    listener = secured_grpc_server(config, lambda: lifecycle.draining)
    server, port, address = listener.server, listener.port, listener.address

    def request_stop() -> None:
        if stop_event.is_set():
            hurry.set()
        stop_event.set()

    servicer = AnonymizerServicer(
        max_receive_message_bytes=config.max_receive_message_bytes,
        max_send_message_bytes=config.max_send_message_bytes,
        batch_window=config.batch_window,
        video=config.video,
        clients=ClientAdmission(config.quotas, config.default_priority),
    )
    pb2_grpc.add_AnonymizerServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    await _set_health(health_servicer, False)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
    )
    await server.start()

    signals = handle_signals and threading.current_thread() is threading.main_thread()
    if signals:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, request_stop)
        loop.add_signal_handler(signal.SIGHUP, listener.reload_tokens)

    probes = None
    http_api = None
    stopping = asyncio.Event()
    health_task = None
    try:
        if config.metrics_port:
            probes = ProbeServer(config.metrics_host, config.metrics_port, lifecycle.readiness)
        if config.http_port is not None:
            from masquerade.api.http import start_http_api  # FastAPI is imported only when the port is on

            http_api = await start_http_api(config, servicer, listener.tokens, lambda: lifecycle.draining)
        security = listener.security
        log.info("masquerade listening on %s (%s); loading models", address, security)
        health_task = asyncio.create_task(_mirror_engine_health(lifecycle, health_servicer, stopping))
        if engine is None:
            from masquerade.engine.engine import Engine

            log.info("loading models (%s) ...", config.engine.models)
            engine = await asyncio.to_thread(Engine.build, config.engine)
        await engine.start()
        servicer.attach(engine)
        lifecycle.engine = engine
        http_note = (
            f"metrics and probes on http://{_display_host(config.metrics_host)}:{probes.port}/{{metrics,livez,readyz}}"
            if probes
            else "metrics off"
        )
        if http_api is not None:
            http_note += f"; HTTP API and web page on {http_api.url}"
        log.info("masquerade serving on %s (%s); %s; %s", address, _describe(engine), security, http_note)
        if on_started is not None:
            on_started(
                ServingState(
                    address=address,
                    port=port,
                    metrics_port=probes.port if probes else 0,
                    engine=engine,
                    stop=lambda: loop.call_soon_threadsafe(request_stop),
                    reload_tokens=listener.reload_tokens,
                    tls=config.tls,
                    http_port=http_api.port if http_api is not None else 0,
                )
            )
        await stop_event.wait()
    finally:
        # Stage 1, visible drain: every probe says "not ready" at once while the port stays open.
        lifecycle.draining = True
        stopping.set()
        if health_task is not None:
            await asyncio.gather(health_task, return_exceptions=True)
        await _set_health(health_servicer, False)
        servicer.draining = True  # AnonymizeBatch streams already open take no new requests either
        if lifecycle.engine is not None and config.drain_seconds > 0 and not hurry.is_set():
            log.info("draining: health NOT_SERVING, /readyz 503, new RPCs UNAVAILABLE for %gs", config.drain_seconds)
            try:
                await asyncio.wait_for(hurry.wait(), timeout=config.drain_seconds)
            except TimeoutError:
                pass
        # Stage 2: close the port; in-flight requests get the grace period while the engine drains.
        log.info("shutting down: in-flight requests get up to %gs", config.grace_seconds)
        await health_servicer.enter_graceful_shutdown()
        # gRPC cuts the calls still open a moment after the engine's grace ends, so a request the engine
        # cancels is first answered UNAVAILABLE (retry elsewhere) by its handler, not cut off at random.
        waits = [server.stop(config.grace_seconds + HANDLER_ANSWER_SECONDS)]
        if http_api is not None:
            waits.append(http_api.stop(config.grace_seconds))
        if engine is not None:
            waits.append(engine.shutdown(config.grace_seconds))
        results = await asyncio.gather(*waits, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                log.error("error during shutdown", exc_info=result)
        if probes is not None:
            probes.close()
        servicer.video.close()  # the spool folder; every call's files went when the call ended
        if signals:
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(signum)
        log.info("stopped")
