"""uvicorn, hardened, on an asyncio loop we own: header timeouts, a connection cap, TLS and client names.

uvicorn already closes idle keep-alive connections and answers 503 past ``limit_concurrency``,
but it waits forever for the headers of a request that never finishes arriving (a slow-loris
client holds a connection, and its buffer, as long as it likes), and it accepts every
connection the kernel hands it. ``_HardenedProtocol`` adds what it lacks:

- a request's headers must arrive within ``header_timeout_s`` of its first byte (or of the
  connection's start), else 408 and the connection is closed;
- headers larger than ``max_header_bytes`` get 431 and a close;
- past ``max_connections`` open connections, the oldest one with no request in progress (idle, or
  still sending its headers) is closed to make room, so a flood of half-sent requests cannot lock
  out a probe or a real client; only when every connection is serving a request is a new one
  answered 503 and closed.

Everything runs on one event loop, so no client can make the server start a thread.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from dataclasses import dataclass

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger(__name__)

CLIENT_NAME_SCOPE_KEY = "masquerade.client_name"
"""ASGI scope key: the common name of the client's certificate under mutual TLS ("" otherwise)."""


@dataclass(frozen=True)
class HttpLimits:
    """Per-connection bounds of an HTTP port."""

    header_timeout_s: float = 10.0
    """A request's headers must be complete this long after its first byte (or after the connection opens)."""
    keep_alive_s: float = 5.0
    """An idle keep-alive connection is closed after this long."""
    max_connections: int = 256
    """Open connections; past this the oldest idle one is closed for a new one (503 when none is idle)."""
    max_header_bytes: int = 16 * 1024
    """Request line plus headers."""

    def __post_init__(self) -> None:
        if self.header_timeout_s <= 0 or self.keep_alive_s <= 0:
            raise ValueError("HttpLimits: timeouts must be > 0")
        if self.max_connections < 1 or self.max_header_bytes < 1024:
            raise ValueError("HttpLimits: max_connections must be >= 1 and max_header_bytes >= 1024")


def _canned(status: str) -> bytes:
    return f"HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".encode("ascii")


def _protocol_class(limits: HttpLimits) -> type[HttpToolsProtocol]:
    class _HardenedProtocol(HttpToolsProtocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            if len(self.connections) >= limits.max_connections and not self._evict_oldest_idle():
                self.transport = transport
                transport.write(_canned("503 Service Unavailable"))
                transport.close()
                return
            self._opened = self.loop.time()
            super().connection_made(transport)
            self._client_name = _client_common_name(transport)
            self._header_bytes = 0
            self._awaiting_headers = True
            self._header_timer = self.loop.call_later(limits.header_timeout_s, self._header_timeout)

        def _idle(self) -> bool:
            """No request in progress: waiting for (the rest of) a request's headers, or between requests."""
            return not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete)

        def _evict_oldest_idle(self) -> bool:
            idle = [c for c in self.connections if isinstance(c, _HardenedProtocol) and c._idle()]
            if not idle:
                return False
            oldest = min(idle, key=lambda c: c._opened)
            oldest._disarm()
            oldest.transport.write(_canned("408 Request Timeout"))
            oldest.transport.close()
            self.connections.discard(oldest)  # its connection_lost comes later; the room is needed now
            return True

        def _header_timeout(self) -> None:
            self._header_timer = None
            if self._awaiting_headers and not self.transport.is_closing():
                self.transport.write(_canned("408 Request Timeout"))
                self.transport.close()

        def _disarm(self) -> None:
            timer = getattr(self, "_header_timer", None)
            if timer is not None:
                timer.cancel()
                self._header_timer = None

        def data_received(self, data: bytes) -> None:
            if self._awaiting_headers:
                end = data.find(b"\r\n\r\n")  # what follows the blank line is body, not headers
                self._header_bytes += len(data) if end < 0 else end
                if self._header_bytes > limits.max_header_bytes:
                    self._awaiting_headers = False
                    self._disarm()
                    self.transport.write(_canned("431 Request Header Fields Too Large"))
                    self.transport.close()
                    return
            super().data_received(data)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self.scope[CLIENT_NAME_SCOPE_KEY] = self._client_name  # type: ignore[literal-required]
            if not self._awaiting_headers:  # the next request on a keep-alive connection
                self._awaiting_headers = True
                self._header_bytes = 0
                self._disarm()
                self._header_timer = self.loop.call_later(limits.header_timeout_s, self._header_timeout)

        def on_header(self, name: bytes, value: bytes) -> None:
            super().on_header(name, value)
            if self._awaiting_headers and sum(len(n) + len(v) + 4 for n, v in self.headers) > limits.max_header_bytes:
                self._awaiting_headers = False
                self._disarm()
                self.transport.write(_canned("431 Request Header Fields Too Large"))
                self.transport.close()

        def on_headers_complete(self) -> None:
            if self.transport.is_closing():
                return
            self._awaiting_headers = False
            self._disarm()
            super().on_headers_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            if self.flow is None:  # refused in connection_made: never registered
                return
            super().connection_lost(exc)

    return _HardenedProtocol


def _client_common_name(transport: asyncio.Transport) -> str:
    cert = transport.get_extra_info("peercert")
    if not cert:
        return ""
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)[:128]
    return ""


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host`` ("[::]" and other IPv6 forms work); OSError names the address."""
    bare = host.strip("[]")
    family = socket.AF_INET6 if ":" in bare else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((bare, port))
        sock.listen(1024)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"could not bind HTTP port {host}:{port}: {exc.strerror}") from None
    return sock


class HttpServer:
    """An ASGI app served by uvicorn on the caller's running event loop (no signal handlers, no threads)."""

    def __init__(
        self,
        app,
        host: str,
        port: int,
        *,
        limits: HttpLimits | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        tls_client_ca: str | None = None,
    ):
        self.limits = limits or HttpLimits()
        self.host = host
        self._socket = bind_socket(host, port)
        self.port = self._socket.getsockname()[1]
        config = uvicorn.Config(
            app,
            http=_protocol_class(self.limits),
            lifespan="off",
            access_log=False,  # requests are logged once, by the app, in the server's access log
            log_config=None,
            server_header=False,
            proxy_headers=False,  # the peer in the access log is the socket's, not a header's claim
            timeout_keep_alive=max(1, round(self.limits.keep_alive_s)),
            ssl_certfile=tls_cert,
            ssl_keyfile=tls_key,
            ssl_ca_certs=tls_client_ca,
            ssl_cert_reqs=ssl.CERT_REQUIRED if tls_client_ca else ssl.CERT_NONE,
        )
        config.load()  # builds the TLS context now, so a bad certificate fails here and not at the first client
        self._server = uvicorn.Server(config)
        self._main_loop: asyncio.Task | None = None

    @property
    def tls(self) -> bool:
        return self._server.config.ssl is not None

    async def start(self) -> None:
        # Server.serve() would install its own signal handlers; the gRPC server owns those, so start by parts.
        self._server.lifespan = self._server.config.lifespan_class(self._server.config)
        await self._server.startup(sockets=[self._socket])
        # uvicorn's tick loop refreshes the Date header; the server's own shutdown ends it.
        self._main_loop = asyncio.create_task(self._server.main_loop(), name="masquerade-http-ticks")

    async def stop(self, grace_seconds: float) -> None:
        """Stops accepting, lets open requests finish for up to ``grace_seconds``, then cancels them."""
        self._server.should_exit = True
        self._server.config.timeout_graceful_shutdown = max(1, round(grace_seconds))
        if self._main_loop is not None:
            await asyncio.gather(self._main_loop, return_exceptions=True)
        if self._server.started:
            await self._server.shutdown(sockets=[self._socket])
        else:
            self._socket.close()
