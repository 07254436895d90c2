"""HTTP on the metrics port: /metrics, /livez and /readyz for load balancers and orchestrators.

/livez answers 200 while the process runs; /readyz 200 only while the server is
SERVING (503 while models load or while it drains); any other path is 404. GET and
HEAD both work.

The probes run on their own thread and their own event loop, away from the loop that
serves gRPC and the HTTP API, so a busy server still answers its probes in time. The
server is the API's hardened uvicorn (api/http/transport.py): headers must arrive
within a few seconds, and open connections are capped, so no client can make it
start threads or hold memory (it starts none: one loop serves every connection).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from masquerade.api.http.transport import HttpLimits, HttpServer
from masquerade.metrics import REGISTRY

log = logging.getLogger(__name__)

PROBE_LIMITS = HttpLimits(header_timeout_s=5.0, keep_alive_s=5.0, max_connections=64, max_header_bytes=8 * 1024)
"""Probes and scrapers send a few small requests; anything beyond this is not a probe."""


def probe_app(readiness: Callable[[], tuple[bool, str]]) -> Starlette:
    async def metrics(_: Request) -> Response:
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    async def livez(_: Request) -> Response:
        return PlainTextResponse("ok\n")

    async def readyz(_: Request) -> Response:
        ready, reason = readiness()
        return PlainTextResponse(f"{reason}\n", status_code=200 if ready else 503)

    async def not_found(_: Request, __: Exception) -> Response:
        return PlainTextResponse("not found: try /metrics, /livez or /readyz\n", status_code=404)

    app = Starlette(
        routes=[Route("/metrics", metrics), Route("/livez", livez), Route("/readyz", readyz)],  # GET (and HEAD)
        exception_handlers={404: not_found},
    )
    app.router.redirect_slashes = False  # /readyz/ is not a probe path: 404, not a redirect to one
    return app


class ProbeServer:
    """The probe port, serving from its own thread; ``readiness()`` returns (ready, reason) for /readyz."""

    def __init__(
        self,
        host: str,
        port: int,
        readiness: Callable[[], tuple[bool, str]],
        *,
        limits: HttpLimits = PROBE_LIMITS,
    ):
        self.readiness = readiness
        self._loop = asyncio.new_event_loop()
        self._server = HttpServer(probe_app(readiness), host, port, limits=limits)  # binds now: errors raise here
        self.port = self._server.port
        started = threading.Event()
        self._error: BaseException | None = None

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            try:
                self._loop.run_until_complete(self._server.start())
            except BaseException as exc:
                self._error = exc
                started.set()
                return
            started.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="masquerade-probes", daemon=True)
        self._thread.start()
        started.wait()
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        future = asyncio.run_coroutine_threadsafe(self._server.stop(grace_seconds=1.0), self._loop)
        try:
            future.result(timeout=10)
        except Exception:
            log.warning("the probe port did not stop cleanly", exc_info=True)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self._loop.close()
