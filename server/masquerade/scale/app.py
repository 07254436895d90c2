"""The Ray Serve application: the Engine deployment, and the builder a KubeRay RayService imports.

``engine_application`` is what ``masquerade serve --ray-replicas N`` deploys: N
``EngineReplica``s (autoscaled between bounds when asked), each holding one engine
on one GPU. ``build`` is the import path for ``serveConfigV2`` (deploy/kuberay): the same
Engine deployment, whose replicas also serve the gRPC contract on their node
(``FrontEndThread``), so each GPU worker pod answers the gRPC port and its gRPC
readiness probe. (Not the head pod: KubeRay submits the application only once the
head pod is ready, so a head probe that waits for the application never passes.)
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

from masquerade.engine.engine import EngineConfig
from masquerade.scale.config import APP_NAME, ENGINE_DEPLOYMENT, ScaleConfig

log = logging.getLogger(__name__)


def target_ongoing_requests(engine: EngineConfig, scale: ScaleConfig) -> float:
    """Default autoscaling target: the faces whose CFG pairs fill one UNet call (max_batch / 2)."""
    if scale.target_ongoing_requests is not None:
        return scale.target_ongoing_requests
    return max(1.0, engine.max_batch / 2)


def engine_deployment_options(
    engine: EngineConfig, scale: ScaleConfig, *, gpus_per_replica: float, grace_seconds: float
) -> dict[str, Any]:
    """Options of the Engine deployment.

    ``max_ongoing_requests`` equals the engine's queue, so Ray never sends a replica more
    than its engine admits (it would answer RESOURCE_EXHAUSTED); the surplus waits in the
    router's queue (``max_queued_requests``) until some replica has room.
    """
    options: dict[str, Any] = {
        "name": ENGINE_DEPLOYMENT,
        "ray_actor_options": {"num_gpus": gpus_per_replica, "num_cpus": scale.cpus_per_replica},
        "max_ongoing_requests": engine.max_queue,
        "max_queued_requests": scale.max_queued_requests or engine.max_queue,
        "graceful_shutdown_timeout_s": grace_seconds + 5,
        "graceful_shutdown_wait_loop_s": 1.0,
        "health_check_period_s": 5.0,
        "health_check_timeout_s": 30.0,
    }
    if scale.autoscaling:
        options["autoscaling_config"] = {
            "min_replicas": scale.min_replicas,
            "initial_replicas": scale.replicas,
            "max_replicas": scale.max_replicas,
            "target_ongoing_requests": target_ongoing_requests(engine, scale),
        }
    else:
        options["num_replicas"] = scale.replicas
    return options


def engine_application(
    engine: EngineConfig,
    scale: ScaleConfig,
    *,
    gpus_per_replica: float,
    grace_seconds: float,
    frontend=None,
    video=None,
):
    """The bound Engine deployment (a Serve Application) with its options.

    ``frontend`` (an api ServerConfig): each replica also serves the gRPC contract on that
    port of its node (the KubeRay layout); None: the caller runs the front end (the CLI).
    ``video`` (an api VideoConfig): each replica's spool and video limits; None: the defaults.
    """
    from ray import serve

    from masquerade.scale.replica import EngineReplica

    options = engine_deployment_options(engine, scale, gpus_per_replica=gpus_per_replica, grace_seconds=grace_seconds)
    video = video if video is not None else getattr(frontend, "video", None)
    return (
        serve.deployment(EngineReplica).options(**options).bind(engine, grace_seconds, frontend=frontend, video=video)
    )


def running_replicas(app_name: str = APP_NAME) -> int:
    """Engine replicas in the RUNNING state now (asks the Serve controller; blocking)."""
    from ray import serve

    app = serve.status().applications.get(app_name)
    if app is None or ENGINE_DEPLOYMENT not in app.deployments:
        return 0
    return int(app.deployments[ENGINE_DEPLOYMENT].replica_states.get("RUNNING", 0))


class FrontEndThread:
    """The gRPC front end on its own thread and event loop, inside an engine replica (KubeRay).

    Exactly the front end of ``masquerade serve --ray-replicas``, over the Engine
    deployment's handle: whichever pod a client's connection lands on, each request
    goes to a replica with room. Started once per node; when the port is taken (a
    second replica on the same node) it stays off.
    """

    def __init__(self, server_config, app_name: str = APP_NAME) -> None:
        from masquerade.scale.server import serve_front_end

        self.port = server_config.port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._error: BaseException | None = None
        started = threading.Event()

        def connect():
            from ray import serve

            return serve.get_deployment_handle(ENGINE_DEPLOYMENT, app_name=app_name)

        def run() -> None:
            async def main() -> None:
                self._loop = asyncio.get_running_loop()
                self._stop_event = asyncio.Event()
                await serve_front_end(
                    server_config,
                    connect,
                    lambda: running_replicas(app_name),
                    stop_event=self._stop_event,
                    on_started=lambda _address: started.set(),
                    handle_signals=False,
                )

            try:
                asyncio.run(main())
            except BaseException as exc:
                self._error = exc
            finally:
                started.set()

        self._thread = threading.Thread(target=run, name="masquerade-frontend", daemon=True)
        self._thread.start()
        started.wait(120)
        if self._error is not None:
            raise self._error

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float) -> None:
        if self._loop is not None and self._stop_event is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stop_event.set)
            self._thread.join(timeout)


def build(args: dict[str, Any]):
    """Application builder for serveConfigV2 (``import_path: masquerade.scale.app:build``).

    ``args`` keys (all optional): models, device, port, max_batch, max_queue, max_wait_ms,
    grace_seconds, max_message_mib, replicas, min_replicas, max_replicas,
    target_ongoing_requests, gpus_per_replica, serve_grpc (default true: every engine
    replica's node serves the gRPC contract on ``port``), tls_cert, tls_key,
    tls_client_ca, auth_token_file (files on the worker pods; as the serve flags). serveConfigV2's per-deployment
    settings (autoscaling_config, ray_actor_options) override these.
    """
    from masquerade.api.server import MIB, ServerConfig

    known = {
        "models",
        "device",
        "port",
        "max_batch",
        "max_queue",
        "max_wait_ms",
        "grace_seconds",
        "max_message_mib",
        "replicas",
        "min_replicas",
        "max_replicas",
        "target_ongoing_requests",
        "gpus_per_replica",
        "serve_grpc",
        "tls_cert",
        "tls_key",
        "tls_client_ca",
        "auth_token_file",
    }
    unknown = sorted(set(args) - known)
    if unknown:
        raise ValueError(f"masquerade.scale.app:build: unknown args {unknown}; known: {sorted(known)}")
    engine = EngineConfig(
        models=str(args.get("models", "default")),
        device=str(args.get("device", "cuda")),
        max_batch=int(args.get("max_batch", 16)),
        max_queue=int(args.get("max_queue", 64)),
        max_wait_ms=float(args.get("max_wait_ms", 2.0)),
    ).validated()
    scale = ScaleConfig(
        replicas=int(args.get("replicas", 1)),
        min_replicas=_optional_int(args.get("min_replicas")),
        max_replicas=_optional_int(args.get("max_replicas")),
        target_ongoing_requests=_optional_float(args.get("target_ongoing_requests")),
        gpus_per_replica=_optional_float(args.get("gpus_per_replica")),
    ).validated()
    grace = float(args.get("grace_seconds", 30.0))
    serve_grpc = str(args.get("serve_grpc", True)).lower() not in ("false", "0", "no")
    mib = int(args.get("max_message_mib", 64))
    server_config = ServerConfig(
        host="[::]",
        port=int(args.get("port", 50051)),
        metrics_port=0,
        max_receive_message_bytes=mib * MIB,
        max_send_message_bytes=mib * MIB,
        grace_seconds=grace,
        engine=engine,
        **{name: args[name] for name in ("tls_cert", "tls_key", "tls_client_ca", "auth_token_file") if args.get(name)},
    )
    gpus = scale.gpus_per_replica if scale.gpus_per_replica is not None else (1.0 if engine.device != "cpu" else 0.0)
    return engine_application(
        engine, scale, gpus_per_replica=gpus, grace_seconds=grace, frontend=server_config if serve_grpc else None
    )


def _optional_int(value) -> int | None:
    return None if value is None else int(value)


def _optional_float(value) -> float | None:
    return None if value is None else float(value)
