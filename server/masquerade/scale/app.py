"""The Ray Serve application: the Engine deployment, and the builder a KubeRay RayService imports.

``engine_application`` is what ``masquerade serve --ray-replicas N`` deploys: N
``EngineReplica``s (autoscaled between bounds when asked), each holding one engine
on one GPU. ``build`` is the import path for ``serveConfigV2`` (deploy/kuberay):
the same Engine deployment plus a ``FrontEnd`` deployment that serves the gRPC
contract from inside the cluster, pinned to the head node by a custom resource
so the head pod's Service and gRPC probes reach it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

from masquerade.engine.engine import EngineConfig
from masquerade.scale.config import APP_NAME, ENGINE_DEPLOYMENT, ScaleConfig

log = logging.getLogger(__name__)

FRONTEND_DEPLOYMENT = "FrontEnd"
FRONTEND_RESOURCE = "masquerade_frontend"
"""Custom resource the head node advertises (rayStartParams.resources) so the front end runs there."""


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


def engine_application(engine: EngineConfig, scale: ScaleConfig, *, gpus_per_replica: float, grace_seconds: float):
    """The bound Engine deployment (a Serve Application) with its options."""
    from ray import serve

    from masquerade.scale.replica import EngineReplica

    options = engine_deployment_options(engine, scale, gpus_per_replica=gpus_per_replica, grace_seconds=grace_seconds)
    return serve.deployment(EngineReplica).options(**options).bind(engine, grace_seconds)


def running_replicas(app_name: str = APP_NAME) -> int:
    """Engine replicas in the RUNNING state now (asks the Serve controller; blocking)."""
    from ray import serve

    app = serve.status().applications.get(app_name)
    if app is None or ENGINE_DEPLOYMENT not in app.deployments:
        return 0
    return int(app.deployments[ENGINE_DEPLOYMENT].replica_states.get("RUNNING", 0))


class FrontEnd:
    """Serves the gRPC contract from inside the cluster (KubeRay); one replica on the head node.

    The gRPC server runs on its own thread and event loop, exactly as under
    ``masquerade serve --ray-replicas``, over the Engine deployment's handle.
    """

    def __init__(self, engine_handle, server_config) -> None:
        from masquerade.scale.server import serve_front_end

        self._stop = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        started = threading.Event()

        def run() -> None:
            async def main() -> None:
                self._loop = asyncio.get_running_loop()
                self._stop_event = asyncio.Event()
                await serve_front_end(
                    server_config,
                    lambda: engine_handle,
                    running_replicas,
                    stop_event=self._stop_event,
                    on_started=lambda _address: started.set(),
                    handle_signals=False,
                )

            asyncio.run(main())

        self._thread = threading.Thread(target=run, name="masquerade-frontend", daemon=True)
        self._thread.start()
        if not started.wait(120):
            raise RuntimeError(f"the gRPC front end did not start on port {server_config.port}")

    def check_health(self) -> None:
        if not self._thread.is_alive():
            raise RuntimeError("the gRPC front end's thread stopped")

    def __del__(self) -> None:
        if self._loop is not None and self._stop_event is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stop_event.set)
            self._thread.join(60)


def build(args: dict[str, Any]):
    """Application builder for serveConfigV2 (``import_path: masquerade.scale.app:build``).

    ``args`` keys (all optional): models, device, port, max_batch, max_queue, max_wait_ms,
    grace_seconds, max_message_mib, replicas, min_replicas, max_replicas,
    target_ongoing_requests, gpus_per_replica, frontend_on_head (default true).
    serveConfigV2's per-deployment settings (autoscaling_config, ray_actor_options) override these.
    """
    from ray import serve

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
        "frontend_on_head",
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
    mib = int(args.get("max_message_mib", 64))
    server_config = ServerConfig(
        host="[::]",
        port=int(args.get("port", 50051)),
        metrics_port=0,
        max_receive_message_bytes=mib * MIB,
        max_send_message_bytes=mib * MIB,
        grace_seconds=grace,
        engine=engine,
    )
    gpus = scale.gpus_per_replica if scale.gpus_per_replica is not None else (1.0 if engine.device != "cpu" else 0.0)
    engine_app = engine_application(engine, scale, gpus_per_replica=gpus, grace_seconds=grace)
    actor_options: dict[str, Any] = {"num_cpus": 0}
    if str(args.get("frontend_on_head", True)).lower() not in ("false", "0", "no"):
        actor_options["resources"] = {FRONTEND_RESOURCE: 0.01}
    return (
        serve.deployment(FrontEnd)
        .options(name=FRONTEND_DEPLOYMENT, num_replicas=1, ray_actor_options=actor_options, max_ongoing_requests=1)
        .bind(engine_app, server_config)
    )


def _optional_int(value) -> int | None:
    return None if value is None else int(value)


def _optional_float(value) -> float | None:
    return None if value is None else float(value)
