"""`masquerade serve`: flags -> ServerConfig (with its EngineConfig, and a ScaleConfig for Ray) -> serve.

The API layer takes the configs and knows nothing of argparse; this module is the only place
that maps flags to them.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from masquerade.cli.options import (
    add_detection_arguments,
    add_model_arguments,
    add_video_limit_arguments,
    detection_config,
    model_source,
    non_negative_int,
)

log = logging.getLogger(__name__)

HTTP_PORT = 8080


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Adds ``serve`` to the CLI's sub-commands and returns its parser."""
    parser = subparsers.add_parser(
        "serve",
        help="run the gRPC anonymization server",
        description="Serve masquerade.v1.Anonymizer over gRPC, with health, reflection and Prometheus /metrics.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="interface for gRPC; loopback by default. '0.0.0.0' or '[::]' exposes it: add TLS and tokens",
    )
    parser.add_argument("--port", type=int, default=50051, help="gRPC port (0 picks a free one; the log says which)")
    add_model_arguments(parser)
    parser.add_argument("--max-batch", type=int, default=16, help="max samples per UNet call (a CFG pair is 2)")
    parser.add_argument(
        "--max-queue", type=int, default=64, help="admitted, unfinished requests; beyond: RESOURCE_EXHAUSTED"
    )
    parser.add_argument(
        "--max-wait-ms", type=float, default=2.0, help="how long a UNet call waits to fill when jobs are few"
    )
    parser.add_argument("--attention", choices=("sdpa", "xformers"), default="sdpa", help="attention backend on GPU")
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile the UNet per batch bucket before SERVING (default: on with CUDA, off on CPU)",
    )
    parser.add_argument(
        "--compile-mode",
        choices=("default", "max-autotune-no-cudagraphs", "reduce-overhead", "max-autotune"),
        default="default",
        help="torch.compile mode; the max-autotune ones search kernels for many minutes per bucket",
    )
    parser.add_argument(
        "--compile-cache",
        metavar="DIR",
        default=None,
        help="inductor's on-disk cache, reused by the next start (default: ~/.cache/masquerade/torch-compile)",
    )
    parser.add_argument(
        "--vae-chunk", type=int, default=4, help="faces per VAE encode/decode call (bounds the VAE's GPU memory)"
    )
    parser.add_argument("--inversion-chunk", type=int, default=8, help="inversion steps of one face per UNet call")
    add_detection_arguments(parser)
    parser.add_argument(
        "--noise",
        choices=("per_face", "research"),
        default="per_face",
        help="default noise mode of requests that leave params.noise unset (research: the research code's draws)",
    )
    parser.add_argument(
        "--metrics-port", type=int, default=9090, help="HTTP port for /metrics, /livez and /readyz; 0 turns it off"
    )
    parser.add_argument(
        "--metrics-host", default="127.0.0.1", help="interface for the HTTP port (it has no TLS and no tokens)"
    )
    parser.add_argument(
        "--http-port",
        type=int,
        default=HTTP_PORT,
        help="HTTP/JSON API, OpenAPI docs and web page (same tokens, TLS and limits as gRPC); 0 picks a free port",
    )
    parser.add_argument("--http-host", default=None, help="interface for the HTTP API (default: --host)")
    parser.add_argument(
        "--http-cors-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="a web origin (https://app.example) whose pages may call the HTTP API; repeat for more",
    )
    parser.add_argument(
        "--no-http", action="store_true", help="no HTTP API or web page (the metrics and probe port stays)"
    )
    security = parser.add_argument_group("security")
    security.add_argument("--tls-cert", metavar="PEM", help="certificate chain; with --tls-key, serve TLS only")
    security.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert")
    security.add_argument(
        "--tls-client-ca", metavar="PEM", help="CA bundle; clients must present a certificate it signed (mutual TLS)"
    )
    security.add_argument(
        "--auth-token-file",
        metavar="FILE",
        help="one bearer token per line; every RPC but health then needs 'authorization: Bearer <token>' "
        "metadata. SIGHUP rereads the file",
    )
    clients = parser.add_argument_group("priorities and per-client quotas (a token line may set its own)")
    clients.add_argument(
        "--default-priority",
        choices=("interactive", "bulk"),
        default="interactive",
        help="priority of requests that set none, from callers whose token sets no priority=",
    )
    clients.add_argument(
        "--aging-calls",
        type=int,
        default=32,
        help="K: UNet calls holding interactive work a ready bulk job may go without a step of its own",
    )
    clients.add_argument(
        "--interactive-slack",
        type=float,
        default=1.25,
        help="a call holding interactive work takes more bulk steps than the floor only while its measured "
        "cost stays within this factor of the interactive steps' alone",
    )
    clients.add_argument(
        "--interactive-threads",
        type=non_negative_int,
        default=1,
        help="pixel threads (decode, detection, covers) only interactive requests use, beside the shared ones, "
        "so an interactive request's pixel work never queues behind bulk work; 0: none reserved",
    )
    clients.add_argument(
        "--quota-rps", type=float, default=None, help="requests per second per client (token bucket); default none"
    )
    clients.add_argument(
        "--quota-burst", type=int, default=None, help="requests a client may send at once (default: ceil(--quota-rps))"
    )
    clients.add_argument(
        "--quota-faces", type=int, default=None, help="faces in flight per client (detected, not yet answered)"
    )
    parser.add_argument(
        "--drain-seconds",
        type=float,
        default=5.0,
        help="on SIGTERM, how long the port stays open answering NOT_SERVING (and /readyz 503) "
        "before in-flight requests are waited on; a second SIGTERM cuts it short",
    )
    parser.add_argument(
        "--grace-seconds", type=float, default=30.0, help="after the drain, time in-flight requests get to finish"
    )
    parser.add_argument("--max-message-mib", type=int, default=64, help="gRPC receive and send message limit, MiB")
    parser.add_argument(
        "--max-inflight-megapixels",
        type=float,
        default=64.0,
        help="decoded megapixels admitted requests hold at once (sized for 24 GB); others wait holding only "
        "their bytes, and a larger image is refused RESOURCE_EXHAUSTED",
    )
    parser.add_argument(
        "--batch-window",
        type=int,
        default=32,
        help="requests of one AnonymizeBatch stream in flight (answered but unsent count) before it stops being read",
    )
    add_video_serve_arguments(parser)
    parser.add_argument("--log-level", default="INFO", help="DEBUG | INFO | WARNING | ERROR")
    parser.add_argument(
        "--log-format", choices=("text", "json"), default="text", help="'json': every log line is one JSON object"
    )
    add_ray_arguments(parser)  # --ray-replicas etc.: the same contract from engine replicas on Ray Serve
    parser.set_defaults(handler=run)
    return parser


def config_from_args(args: argparse.Namespace):
    """The ServerConfig (with its EngineConfig) the flags describe."""
    from masquerade.api.quota import ClientPolicy, parse_priority
    from masquerade.api.server import MIB, ServerConfig
    from masquerade.engine.engine import EngineConfig
    from masquerade.engine.request import ReversePersonalizationParams

    engine = EngineConfig(
        defaults=ReversePersonalizationParams(noise=getattr(args, "noise", "per_face")),
        models=model_source(args),
        device=args.device,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        max_wait_ms=args.max_wait_ms,
        attention=args.attention,
        compile=args.compile,
        compile_mode=args.compile_mode,
        compile_cache=args.compile_cache,
        vae_chunk=args.vae_chunk,
        inversion_chunk=args.inversion_chunk,
        aging_calls=args.aging_calls,
        max_inflight_megapixels=args.max_inflight_megapixels,
        interactive_slack=args.interactive_slack,
        interactive_threads=args.interactive_threads,
        torch_threads=args.torch_threads,
        **detection_config(args),
    )
    return ServerConfig(
        host=args.host,
        port=args.port,
        metrics_host=args.metrics_host,
        metrics_port=args.metrics_port,
        http_host=args.http_host,
        http_port=None if args.no_http else args.http_port,
        http_cors_origins=tuple(args.http_cors_origin),
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        auth_token_file=args.auth_token_file,
        max_receive_message_bytes=args.max_message_mib * MIB,
        max_send_message_bytes=args.max_message_mib * MIB,
        drain_seconds=args.drain_seconds,
        grace_seconds=args.grace_seconds,
        batch_window=args.batch_window,
        engine=engine,
        video=video_config_from_args(args),
        default_priority=parse_priority(args.default_priority, "--default-priority"),
        quotas=ClientPolicy(requests_per_second=args.quota_rps, burst=args.quota_burst, max_faces=args.quota_faces),
    )


def add_video_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """AnonymizeVideo's spool and limits, AnonymizeFrames' window (api/video_service.py)."""
    from masquerade.api.video_service import VideoConfig

    defaults = VideoConfig()
    video = parser.add_argument_group("video (AnonymizeVideo, AnonymizeFrames)")
    video.add_argument(
        "--video-spool-dir",
        metavar="DIR",
        default=None,
        help="folder for AnonymizeVideo uploads and outputs while they are processed; each call's files are "
        "deleted when it ends (default: <tmp>/masquerade-video-spool)",
    )
    video.add_argument(
        "--max-video-bytes", type=int, default=defaults.max_video_bytes, help="largest AnonymizeVideo upload, bytes"
    )
    video.add_argument(
        "--video-spool-bytes",
        type=int,
        default=None,
        help="bytes the spool may hold over all calls at once, uploads and outputs (default: 4 x --max-video-bytes); "
        "past it a call gets RESOURCE_EXHAUSTED",
    )
    add_video_limit_arguments(video)
    video.add_argument(
        "--max-frame-window",
        type=int,
        default=defaults.max_frame_window,
        help="most AnonymizeFrames frames in flight per stream a client may ask for (its `window`)",
    )
    video.add_argument(
        "--max-video-streams",
        type=int,
        default=defaults.max_video_streams,
        help="AnonymizeVideo + AnonymizeFrames calls served at once; one more gets RESOURCE_EXHAUSTED",
    )
    video.add_argument(
        "--live-detect-max-side",
        type=int,
        default=defaults.live_detect_max_side,
        help="AnonymizeFrames: detect on a copy at most this many pixels on its longest side, without the "
        "small-face tiles (latency over the smallest faces); 0: the full frame, as for files",
    )


def video_config_from_args(args: argparse.Namespace):
    from masquerade.api.video_service import VideoConfig

    return VideoConfig(
        spool_dir=args.video_spool_dir,
        max_video_bytes=args.max_video_bytes,
        spool_bytes=args.video_spool_bytes,
        max_video_seconds=args.max_video_seconds,
        max_video_pixels=args.max_video_pixels,
        max_frame_window=args.max_frame_window,
        max_video_streams=args.max_video_streams,
        live_detect_max_side=args.live_detect_max_side,
        warm_live=True,  # a server's first stream gets the latency of its later ones (api/video_service.py)
    )


def run(args: argparse.Namespace) -> int:
    from masquerade.api.access_log import configure_logging

    configure_logging(args.log_level, args.log_format)
    try:
        config = config_from_args(args)
    except ValueError as exc:
        print(f"masquerade serve: {exc}", file=sys.stderr)
        return 2
    try:
        scale = scale_config_from_args(args)
    except ValueError as exc:
        print(f"masquerade serve: {exc}", file=sys.stderr)
        return 2
    if scale is not None:  # README "Scaling out"
        if config.http_port is not None:
            set_by_hand = http_flags_set(args)
            if set_by_hand:
                print(
                    f"masquerade serve: {', '.join(set_by_hand)}: the HTTP API is not served behind --ray-replicas "
                    "(gRPC only); drop the HTTP flags or serve without Ray",
                    file=sys.stderr,
                )
                return 2
            log.warning(
                "the HTTP API and web page are not served behind --ray-replicas (gRPC only; --no-http silences "
                "this); /metrics, /livez and /readyz stay on --metrics-port"
            )
        from masquerade.scale.server import run_ray_serve

        return run_ray_serve(config, scale)
    from masquerade.api.security import SecurityConfigError
    from masquerade.api.server import serve

    try:
        asyncio.run(serve(config))
    except KeyboardInterrupt:  # a second Ctrl-C during shutdown
        return 130
    except SecurityConfigError as exc:  # an unreadable or empty TLS or token file; the message names the flag
        log.error("%s", exc)
        return 2
    except OSError as exc:
        log.error("%s", exc)
        return 1
    return 0


def http_flags_set(args: argparse.Namespace) -> list[str]:
    """The HTTP API's flags given a value other than their default (Ray Serve cannot honour them)."""
    changed = []
    if args.http_port != HTTP_PORT:
        changed.append("--http-port")
    if args.http_host is not None:
        changed.append("--http-host")
    if args.http_cors_origin:
        changed.append("--http-cors-origin")
    return changed


def add_ray_arguments(parser: argparse.ArgumentParser) -> None:
    """The scale-out flags of ``masquerade serve``; any of them puts the server on Ray Serve."""
    group = parser.add_argument_group(
        "scale out on Ray Serve", "any of these serves the same contract from engine replicas on a Ray cluster"
    )
    group.add_argument(
        "--ray-replicas",
        type=int,
        default=None,
        metavar="N",
        help="engine replicas (one GPU each on CUDA); turns on Ray Serve",
    )
    group.add_argument(
        "--ray-address",
        default=None,
        metavar="auto|HOST:PORT",
        help="join this Ray cluster instead of starting a local one (which is stopped again on exit)",
    )
    group.add_argument("--ray-min-replicas", type=int, default=None, help="autoscaling lower bound")
    group.add_argument("--ray-max-replicas", type=int, default=None, help="autoscaling upper bound")
    group.add_argument(
        "--ray-target-ongoing-requests",
        type=float,
        default=None,
        help="autoscaling target of requests in flight per replica (default: max-batch / 2)",
    )
    group.add_argument(
        "--ray-gpus-per-replica", type=float, default=None, help="default: 1 on CUDA (or auto with GPUs), else 0"
    )
    group.add_argument("--ray-cpus-per-replica", type=float, default=1.0, help="CPUs reserved per replica")


def scale_config_from_args(args: argparse.Namespace):
    """The ScaleConfig the flags ask for, or None for the single-process server."""
    wanted = any(
        getattr(args, name, None) is not None
        for name in ("ray_replicas", "ray_address", "ray_min_replicas", "ray_max_replicas")
    )
    if not wanted:
        return None
    replicas = args.ray_replicas
    if replicas is None:
        replicas = args.ray_min_replicas if args.ray_min_replicas else 1
    from masquerade.scale.config import ScaleConfig

    return ScaleConfig(
        replicas=replicas,
        address=args.ray_address,
        min_replicas=args.ray_min_replicas,
        max_replicas=args.ray_max_replicas,
        target_ongoing_requests=args.ray_target_ongoing_requests,
        gpus_per_replica=args.ray_gpus_per_replica,
        cpus_per_replica=args.ray_cpus_per_replica,
    ).validated()
