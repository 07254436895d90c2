"""The HTTP/JSON API, its OpenAPI document and the web page, served beside gRPC on the same event loop.

``start_http_api`` is what ``masquerade.api.server.serve`` calls when ``--http-port`` is on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from masquerade.api.security import TokenStore, is_loopback

if TYPE_CHECKING:
    from masquerade.api.http.transport import HttpServer
    from masquerade.api.server import ServerConfig
    from masquerade.api.servicer import AnonymizerServicer

log = logging.getLogger(__name__)


class HttpApi:
    """A started HTTP API: its port, its URL for the log, and ``stop``."""

    def __init__(self, server: HttpServer, display_host: str):
        self._server = server
        self.port = server.port
        scheme = "https" if server.tls else "http"
        host = f"[{display_host}]" if ":" in display_host else display_host
        self.url = f"{scheme}://{host}:{server.port}/"

    async def stop(self, grace_seconds: float) -> None:
        await self._server.stop(grace_seconds)


async def start_http_api(
    config: ServerConfig,
    servicer: AnonymizerServicer,
    tokens: TokenStore | None,
    draining: Callable[[], bool],
) -> HttpApi:
    """Binds and starts the HTTP API with the gRPC port's TLS, tokens and message-size limit."""
    from masquerade.api.http.app import ApiLimits, build_app
    from masquerade.api.http.transport import HttpServer

    host = config.http_host if config.http_host is not None else config.host
    app = build_app(
        servicer,
        tokens=tokens,
        draining=draining,
        limits=ApiLimits(max_body_bytes=config.max_receive_message_bytes),
        cors_origins=config.http_cors_origins,
    )
    server = HttpServer(
        app,
        host,
        config.http_port or 0,
        tls_cert=config.tls_cert,
        tls_key=config.tls_key,
        tls_client_ca=config.tls_client_ca,
    )
    await server.start()
    if not is_loopback(host):
        if not server.tls:
            log.warning(
                "the HTTP API listens on %s without TLS: photos, results and tokens cross the network in clear text; "
                "pass --tls-cert/--tls-key (they apply to both ports) or bind it to loopback behind a TLS proxy",
                host,
            )
        if tokens is None:
            log.warning(
                "the HTTP API listens on %s without --auth-token-file: anyone who can reach it can use it", host
            )
    bare = host.strip("[]")
    return HttpApi(server, "0.0.0.0" if bare in ("::", "0.0.0.0", "") else bare)
