"""The HTTP ports against clients that misbehave: half-sent requests, huge headers, connection floods.

Both HTTP ports (probes and the API) run the same hardened uvicorn (api/http/transport.py);
these tests drive the probe port, which needs no engine, with real sockets.
"""

from __future__ import annotations

import http.client
import socket
import threading
import time
from pathlib import Path

import pytest
from api_support import http_get, wait_until

from masquerade.api.http.transport import HttpLimits
from masquerade.api.http_probes import ProbeServer


def _threads() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no Threads: line in /proc/self/status")


@pytest.fixture
def probes():
    ready = {"state": (True, "ready")}
    server = ProbeServer(
        "127.0.0.1",
        0,
        lambda: ready["state"],
        limits=HttpLimits(header_timeout_s=1.5, keep_alive_s=1.0, max_connections=64, max_header_bytes=4096),
    )
    yield server, ready
    server.close()


def _head(port: int, path: str) -> tuple[int, bytes, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("HEAD", path)
        reply = connection.getresponse()
        return reply.status, reply.read(), dict(reply.getheaders())
    finally:
        connection.close()


def test_head_and_get_on_every_probe(probes):
    server, ready = probes
    for path in ("/livez", "/readyz", "/metrics"):
        status, body, _ = _head(server.port, path)
        assert (status, body) == (200, b""), path
    assert http_get(server.port, "/livez") == (200, "ok\n")
    ready["state"] = (False, "draining")
    assert _head(server.port, "/readyz")[0] == 503
    assert http_get(server.port, "/readyz") == (503, "draining\n")
    assert http_get(server.port, "/nope")[0] == 404


def _half_sent(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\nX-Slow: ")  # never finishes its headers
    return sock


def test_400_half_sent_requests_start_no_thread_and_do_not_lock_out_probes(probes):
    server, _ = probes
    before = _threads()
    sockets = [_half_sent(server.port) for _ in range(400)]
    try:
        # Past the cap of 64 each new connection evicts the oldest half-sent one; the last 64 wait for the
        # header timeout. A probe arriving in the middle of the flood is served at once.
        assert _threads() <= before + 2, "the probe server started threads for idle connections"
        started = time.monotonic()
        assert http_get(server.port, "/livez") == (200, "ok\n")
        assert time.monotonic() - started < 1.0
        replies: list[bytes] = []
        lock = threading.Lock()

        def drain(sock: socket.socket) -> None:
            try:
                data = sock.recv(4096)
            except OSError:
                data = b""
            with lock:
                replies.append(data)

        started = time.monotonic()
        readers = [threading.Thread(target=drain, args=(sock,)) for sock in sockets]
        for reader in readers:
            reader.start()
        for reader in readers:
            reader.join(timeout=10)
        elapsed = time.monotonic() - started
        timed_out = sum(reply.startswith(b"HTTP/1.1 408") for reply in replies)
        assert timed_out == 400, [reply[:40] for reply in replies if not reply.startswith(b"HTTP/1.1 408")][:3]
        assert elapsed < 8, f"half-sent requests were held {elapsed:.1f}s; the header timeout is 1.5s"
    finally:
        for sock in sockets:
            sock.close()
    # Once they are gone the port answers again.
    wait_until(lambda: http_get(server.port, "/livez")[0] == 200, timeout=5, what="/livez after the flood")


def test_probes_answer_while_connections_trickle(probes):
    server, _ = probes
    sockets = [_half_sent(server.port) for _ in range(32)]  # under the cap: they hold connections, not the loop
    try:
        started = time.monotonic()
        assert http_get(server.port, "/livez") == (200, "ok\n")
        assert time.monotonic() - started < 1.0
    finally:
        for sock in sockets:
            sock.close()


def test_oversized_headers_get_431(probes):
    server, _ = probes
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\n" + b"X-Big: " + b"a" * 8000 + b"\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 431")
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"GET /" + b"a" * 9000)  # a request line that never ends
        assert sock.recv(4096).startswith(b"HTTP/1.1 431")


def test_keep_alive_connection_is_closed_when_idle(probes):
    server, _ = probes
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = b""
        while not reply.endswith(b"\r\n\r\nok\n"):  # headers and body may come in separate reads
            reply += sock.recv(4096)
        assert reply.startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        assert sock.recv(4096) == b""  # closed by the server
        assert time.monotonic() - started < 4
