"""The ``serve`` sub-command: flags -> ServerConfig + EngineConfig -> ``serve``.

``masquerade.cli`` calls ``register(subparsers)``; the parsed namespace carries
``handler`` (and ``func``), which returns the exit code. Standalone: ``python -m masquerade.api.cli serve ...``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Adds ``serve`` to the CLI's sub-commands and returns its parser."""
    parser = subparsers.add_parser(
        "serve",
        help="run the gRPC anonymization server",
        description="Serve masquerade.v1.Anonymizer over gRPC, with health, reflection and Prometheus /metrics.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--host", default="[::]", help="interface to listen on")
    parser.add_argument("--port", type=int, default=50051, help="gRPC port (0 picks a free one; the log says which)")
    models = parser.add_mutually_exclusive_group()
    models.add_argument("--model-dir", metavar="DIR", help="folder holding the real model files")
    models.add_argument(
        "--models",
        choices=("default", "tiny"),
        default="default",
        help="'default': real weights from $MASQUERADE_MODEL_DIR or ~/.cache/masquerade/models "
        "(classical methods only when absent); 'tiny': tiny random models for smoke tests",
    )
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--max-batch", type=int, default=16, help="max samples per UNet call (a CFG pair is 2)")
    parser.add_argument(
        "--max-queue", type=int, default=64, help="admitted, unfinished requests; beyond: RESOURCE_EXHAUSTED"
    )
    parser.add_argument(
        "--max-wait-ms", type=float, default=2.0, help="how long a UNet call waits to fill when jobs are few"
    )
    parser.add_argument("--attention", choices=("sdpa", "xformers"), default="sdpa", help="attention backend on GPU")
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile the UNet per batch bucket at start-up (CUDA)"
    )
    parser.add_argument(
        "--compile-mode",
        default="max-autotune-no-cudagraphs",
        help='torch.compile mode; "default" starts in seconds rather than minutes',
    )
    parser.add_argument("--inversion-chunk", type=int, default=8, help="inversion steps of one face per UNet call")
    parser.add_argument("--metrics-port", type=int, default=9090, help="Prometheus /metrics port; 0 turns it off")
    parser.add_argument(
        "--grace-seconds", type=float, default=30.0, help="on SIGTERM, time in-flight requests get to finish"
    )
    parser.add_argument("--max-message-mib", type=int, default=64, help="gRPC receive and send message limit, MiB")
    parser.add_argument("--log-level", default="INFO", help="DEBUG | INFO | WARNING | ERROR")
    parser.set_defaults(func=run_serve, handler=run_serve)  # masquerade.cli dispatches on `handler`
    return parser


def config_from_args(args: argparse.Namespace):
    """The ServerConfig (with its EngineConfig) the flags describe."""
    from masquerade.api.server import MIB, ServerConfig
    from masquerade.engine.engine import EngineConfig

    engine = EngineConfig(
        models=args.model_dir or args.models,
        device=args.device,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        max_wait_ms=args.max_wait_ms,
        attention=args.attention,
        compile=args.compile,
        compile_mode=args.compile_mode,
        inversion_chunk=args.inversion_chunk,
    )
    return ServerConfig(
        host=args.host,
        port=args.port,
        metrics_port=args.metrics_port,
        max_receive_message_bytes=args.max_message_mib * MIB,
        max_send_message_bytes=args.max_message_mib * MIB,
        grace_seconds=args.grace_seconds,
        engine=engine,
    )


def run_serve(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        config = config_from_args(args)
    except ValueError as exc:
        print(f"masquerade serve: {exc}", file=sys.stderr)
        return 2
    from masquerade.api.server import serve

    try:
        asyncio.run(serve(config))
    except KeyboardInterrupt:  # a second Ctrl-C during shutdown
        return 130
    except OSError as exc:
        log.error("%s", exc)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="masquerade")
    subparsers = parser.add_subparsers(dest="command", required=True)
    register(subparsers)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
