"""``masquerade serve --ray-replicas N``: the gRPC front end plus a Ray Serve application of engines.

Start-up: the gRPC port opens first (health NOT_SERVING, so probes see "not yet"
rather than "connection refused"), then Ray is started (or joined with
``--ray-address``), the Engine deployment is deployed and ``serve.run`` waits
until its replicas have loaded their models. Health follows the replica count:
SERVING while at least one engine replica runs.

SIGTERM/SIGINT: health NOT_SERVING, new requests refused, in-flight ones get
the grace period, then the application is deleted (replicas drain and stop)
and a Ray cluster this process started is shut down with it: no Ray process
outlives the server. A joined cluster keeps running; only our application goes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import signal
import threading
from collections.abc import Callable
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from masquerade.api.protos import SERVICE_NAME, pb2_grpc
from masquerade.scale.config import APP_NAME, ScaleConfig
from masquerade.scale.frontend import FrontEndServicer

log = logging.getLogger(__name__)

HEALTH_SERVICES = ("", SERVICE_NAME)


async def _mirror_replica_health(
    running_replicas: Callable[[], int],
    health_servicer,
    stopping: asyncio.Event,
    readiness: dict,
    period_s: float = 1.0,
) -> None:
    """SERVING while at least one engine replica runs; NOT_SERVING otherwise and once shutdown starts.

    ``readiness`` (what /readyz answers) gets the same verdict with its reason.
    """
    serving = None
    while not stopping.is_set():
        try:
            running = await asyncio.to_thread(running_replicas)
            now_serving = running > 0
            readiness["state"] = (now_serving, f"{running} engine replicas running")
        except Exception as exc:  # the controller is unreachable: not serving, say why once
            if serving is not False:
                log.warning("cannot read the replica count from Ray Serve: %s", exc)
            now_serving = False
            readiness["state"] = (False, "the Ray Serve controller is unreachable")
        if now_serving != serving:
            status = (
                health_pb2.HealthCheckResponse.SERVING if now_serving else health_pb2.HealthCheckResponse.NOT_SERVING
            )
            for name in HEALTH_SERVICES:
                await health_servicer.set(name, status)
            serving = now_serving
        try:
            await asyncio.wait_for(stopping.wait(), timeout=period_s)
        except TimeoutError:
            pass


async def serve_front_end(
    config,
    connect: Callable[[], Any],
    running_replicas: Callable[[], int],
    *,
    disconnect: Callable[[], None] | None = None,
    stop_event: asyncio.Event | None = None,
    on_started: Callable[[str], None] | None = None,
    handle_signals: bool = True,
) -> None:
    """Serves masquerade.v1.Anonymizer over ``connect()``'s Engine deployment handle until stopped.

    ``config`` is the api ServerConfig (host, port, message limits, grace, metrics port);
    ``connect`` runs on a dedicated thread once the port is open (it may start Ray, deploy
    the engines and block until they are up) and returns the handle; ``disconnect`` runs
    on that same thread after serving has stopped.
    """
    from masquerade.api.security import GateInterceptor, TokenStore, server_credentials

    # The same TLS, mutual TLS and bearer tokens as the single-process server (health needs no token).
    credentials = server_credentials(
        getattr(config, "tls_cert", None), getattr(config, "tls_key", None), getattr(config, "tls_client_ca", None)
    )
    token_file = getattr(config, "auth_token_file", None)
    tokens = TokenStore(token_file) if token_file else None
    stop_event = stop_event or asyncio.Event()
    hurry = asyncio.Event()  # a second SIGTERM/SIGINT cuts the drain short
    loop = asyncio.get_running_loop()
    signals: tuple[int, ...] = ()
    if handle_signals and threading.current_thread() is threading.main_thread():

        def on_signal() -> None:
            # Ray's core worker installs absl's failure-signal handler, which on SIGTERM arms a
            # 3-second alarm that aborts the process: a graceful shutdown takes longer than that.
            signal.alarm(0)
            if stop_event.is_set():
                hurry.set()
            stop_event.set()

        signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        for signum in signals[:2]:
            loop.add_signal_handler(signum, on_signal)
        loop.add_signal_handler(signal.SIGHUP, lambda: tokens.reload() if tokens is not None else False)
    servicer: FrontEndServicer | None = None
    server = grpc.aio.server(
        interceptors=[GateInterceptor(tokens, lambda: servicer is not None and servicer.draining)],
        options=[
            ("grpc.max_receive_message_length", config.max_receive_message_bytes),
            ("grpc.max_send_message_length", config.max_send_message_bytes),
            ("grpc.so_reuseport", 0),
        ],
    )
    health_servicer = health.aio.HealthServicer()
    for name in HEALTH_SERVICES:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
    )
    servicer = FrontEndServicer(
        running_replicas=running_replicas,
        max_receive_message_bytes=config.max_receive_message_bytes,
        max_send_message_bytes=config.max_send_message_bytes,
        batch_window=config.batch_window,
        video=getattr(config, "video", None),
    )
    pb2_grpc.add_AnonymizerServicer_to_server(servicer, server)
    bind = f"{config.host}:{config.port}"
    port = server.add_secure_port(bind, credentials) if credentials is not None else server.add_insecure_port(bind)
    if port == 0:
        raise OSError(f"could not bind gRPC port {config.host}:{config.port}; is another server running there?")
    host = config.host if config.host not in ("[::]", "0.0.0.0", "") else "0.0.0.0"
    stopping = asyncio.Event()
    health_task = None
    # /metrics, /livez and /readyz on the HTTP port, as on the single-process server.
    readiness = {"state": (False, "the engine replicas are starting")}
    probes = None
    if config.metrics_port:
        from masquerade.api.http_probes import ProbeServer

        probes = ProbeServer(
            getattr(config, "metrics_host", config.host), config.metrics_port, lambda: readiness["state"]
        )
    await server.start()
    log.info(
        "front end listening on %s:%d (%s, %s); starting the engine replicas",
        host,
        port,
        "TLS" if credentials is not None else "plaintext",
        f"{len(tokens)} bearer tokens" if tokens is not None else "no tokens",
    )
    # One thread owns the Ray connection from ray.init to ray.shutdown: Ray ties the processes of a
    # cluster it starts to the life of the *thread* that started them (PR_SET_PDEATHSIG), so that
    # thread must outlive serving. It is not the loop's executor: a stop during deployment must not wait.
    connecting: concurrent.futures.Future = concurrent.futures.Future()
    release = threading.Event()

    def own_ray_connection() -> None:
        try:
            connecting.set_result(connect())
        except BaseException as exc:
            connecting.set_exception(exc)
        release.wait()
        if disconnect is not None:
            disconnect()

    owner = threading.Thread(target=own_ray_connection, name="masquerade-ray", daemon=True)
    try:
        owner.start()
        stop_waiter = asyncio.ensure_future(stop_event.wait())
        connected = asyncio.wrap_future(connecting)
        await asyncio.wait({connected, stop_waiter}, return_when=asyncio.FIRST_COMPLETED)
        if stop_event.is_set():
            log.info("stopped while the engine replicas were starting")
            return
        stop_waiter.cancel()
        servicer.attach(connected.result())
        health_task = asyncio.create_task(
            _mirror_replica_health(running_replicas, health_servicer, stopping, readiness)
        )
        metrics_port = probes.port if probes is not None else 0
        address = f"{host}:{port}"
        log.info(
            "masquerade serving on %s through Ray Serve (%d engine replicas running); metrics %s",
            address,
            await asyncio.to_thread(running_replicas),
            f"/metrics, /livez, /readyz on :{metrics_port}" if metrics_port else "off",
        )
        if on_started is not None:
            on_started(address)
        await stop_event.wait()
    finally:
        drain = float(getattr(config, "drain_seconds", 0.0)) if servicer.attached else 0.0
        log.info(
            "shutting down: health NOT_SERVING and new requests refused for %.0fs, "
            "then in-flight requests get up to %.0fs",
            drain,
            config.grace_seconds,
        )
        stopping.set()
        if health_task is not None:
            await asyncio.gather(health_task, return_exceptions=True)
        readiness["state"] = (False, "draining for shutdown")
        await health_servicer.enter_graceful_shutdown()
        servicer.draining = True
        if drain > 0:  # the port stays open, answering NOT_SERVING, so load balancers see us leave
            try:
                await asyncio.wait_for(hurry.wait(), drain)
            except TimeoutError:
                pass
        await server.stop(config.grace_seconds)
        if probes is not None:
            probes.close()
        release.set()
        if owner.is_alive():
            await asyncio.to_thread(owner.join, config.grace_seconds + 120)
        for signum in signals:
            loop.remove_signal_handler(signum)


class RayDeployment:
    """Starts or joins Ray, deploys the Engine application, and takes both down again."""

    def __init__(self, engine, scale: ScaleConfig, *, grace_seconds: float, video=None):
        self.engine = engine
        self.video = video
        self.scale = scale
        self.grace_seconds = grace_seconds
        self.started_cluster = False
        self._connected = False

    def _gpus_per_replica(self) -> float:
        import ray

        if self.scale.gpus_per_replica is not None:
            return self.scale.gpus_per_replica
        device = self.engine.device
        if device.startswith("cuda"):
            return 1.0
        if device == "auto" and ray.cluster_resources().get("GPU", 0) >= 1:
            return 1.0
        return 0.0

    def connect(self):
        """Blocking: Ray up, application deployed and RUNNING; returns the Engine handle."""
        import ray
        from ray import serve

        from masquerade.scale.app import engine_application

        if self.scale.address is None:
            # Ray gives its GCS 30 s to come up; a busy machine (or a cold disk) can take longer.
            os.environ.setdefault("RAY_gcs_server_port_wait_time_s", "120")
            # A face-anonymization server phones nobody home: no Ray usage statistics from a cluster we start.
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            wanted = (self.scale.max_replicas or self.scale.replicas) * self.scale.cpus_per_replica
            ray.init(
                num_cpus=max(os.cpu_count() or 1, int(wanted + 0.999)),
                include_dashboard=False,
                namespace="masquerade",
                configure_logging=False,
            )
            self.started_cluster = True
            log.info("started a local Ray cluster: %s", ray.cluster_resources())
        else:
            ray.init(address=self.scale.address, namespace="masquerade", configure_logging=False)
            log.info("joined the Ray cluster at %s: %s", self.scale.address, ray.cluster_resources())
        self._connected = True
        # No HTTP or gRPC proxy actors: the front end in this process is the only ingress.
        serve.start(http_options={"location": "NoServer"})
        gpus = self._gpus_per_replica()
        app = engine_application(
            self.engine, self.scale, gpus_per_replica=gpus, grace_seconds=self.grace_seconds, video=self.video
        )
        log.info("deploying %s (%s GPU per replica)", self._describe(), gpus)
        return serve.run(app, name=APP_NAME, route_prefix=None)

    def _describe(self) -> str:
        if self.scale.autoscaling:
            return (
                f"{self.scale.replicas} engine replicas, autoscaling within "
                f"[{self.scale.min_replicas}, {self.scale.max_replicas}]"
            )
        return f"{self.scale.replicas} engine replicas"

    def stop(self) -> None:
        """Delete the application (replicas drain and stop); stop the cluster if this process started it."""
        if not self._connected:
            return
        import ray
        from ray import serve

        try:
            if self.started_cluster:
                serve.shutdown()
            else:
                serve.delete(APP_NAME)
        except Exception:
            log.exception("error while stopping the Ray Serve application")
        finally:
            ray.shutdown()
            self._connected = False
            log.info("Ray %s", "cluster stopped" if self.started_cluster else "application deleted; disconnected")


def run_ray_serve(config, scale: ScaleConfig) -> int:
    """The CLI entry: serve until SIGTERM/SIGINT, then take everything down. Returns the exit code."""
    from masquerade.api.security import SecurityConfigError
    from masquerade.scale.app import running_replicas

    deployment = RayDeployment(config.engine, scale, grace_seconds=config.grace_seconds, video=config.video)
    try:
        asyncio.run(serve_front_end(config, deployment.connect, running_replicas, disconnect=deployment.stop))
    except KeyboardInterrupt:
        return 130
    except SecurityConfigError as exc:  # an unreadable TLS or token file; the message names the flag
        log.error("%s", exc)
        return 2
    except OSError as exc:
        log.error("%s", exc)
        return 1
    except RuntimeError as exc:  # serve.run: a deployment failed (its replicas' log says why)
        log.error("the engine replicas could not be deployed: %s", exc)
        return 1
    log.info("stopped")
    return 0
