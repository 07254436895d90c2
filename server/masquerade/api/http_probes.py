"""HTTP on the metrics port: /metrics, /livez and /readyz for load balancers and orchestrators.

/livez answers 200 while the process runs; /readyz 200 only while the server is
SERVING (503 while models load or while it drains); any other path is 404.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from masquerade.metrics import REGISTRY

log = logging.getLogger(__name__)


class _ThreadingHTTPServerV6(ThreadingHTTPServer):
    address_family = socket.AF_INET6


class ProbeServer:
    """A small threaded HTTP server; ``readiness()`` returns (ready, reason) for /readyz."""

    def __init__(self, host: str, port: int, readiness: Callable[[], tuple[bool, str]]):
        self.readiness = readiness
        probe = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # http.server dispatches on this name
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._reply(200, generate_latest(REGISTRY), CONTENT_TYPE_LATEST)
                elif path == "/livez":
                    self._reply(200, b"ok\n")
                elif path == "/readyz":
                    ready, reason = probe.readiness()
                    self._reply(200 if ready else 503, f"{reason}\n".encode())
                else:
                    self._reply(404, b"not found: try /metrics, /livez or /readyz\n")

            def _reply(self, code: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args) -> None:  # probes every few seconds: keep them quiet
                log.debug("%s %s", self.address_string(), format % args)

        bare = host.strip("[]")
        server_class = _ThreadingHTTPServerV6 if ":" in bare else ThreadingHTTPServer
        self._httpd = server_class((bare, port), Handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="masquerade-http", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
