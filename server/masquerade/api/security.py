"""Transport security and the RPC gate: TLS credentials, bearer tokens, and refusing RPCs while draining.

Health is always let through (load balancers' probes carry no token, and must see
NOT_SERVING while the server drains); every other service, reflection included,
needs a valid token when a token file is configured.

Auth before work (docs/design.md section 10): the gate decides from the call's metadata
alone. A refused call is answered by a handler that never asks gRPC for the request
message, so its body is neither received past HTTP/2's flow-control window nor parsed.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import hmac
import inspect
import ipaddress
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc

from masquerade import metrics
from masquerade.api.access_log import AccessRecord
from masquerade.api.quota import ClientPolicy, parse_policy

log = logging.getLogger(__name__)

HEALTH_PREFIX = "/grpc.health.v1.Health/"
AUTHORIZATION = "authorization"


class SecurityConfigError(ValueError):
    """A TLS or token file is missing, unreadable or empty; the message names the flag."""


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    bare = host.strip().strip("[]")
    if bare == "localhost":
        return True
    try:
        return ipaddress.ip_address(bare).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def read_pem(path: str | Path | None, flag: str) -> bytes | None:
    if path is None:
        return None
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise SecurityConfigError(f"{flag} {path}: cannot read it ({exc.strerror or exc})") from exc
    if b"-----BEGIN " not in data:
        raise SecurityConfigError(f"{flag} {path}: not a PEM file (no '-----BEGIN' line)")
    return data


def server_credentials(
    cert: str | Path | None, key: str | Path | None, client_ca: str | Path | None
) -> grpc.ServerCredentials | None:
    """TLS credentials for add_secure_port; None means plaintext. A client CA turns on mutual TLS."""
    if cert is None and key is None:
        if client_ca is not None:
            raise SecurityConfigError("--tls-client-ca needs --tls-cert and --tls-key: mutual TLS is TLS first")
        return None
    if cert is None or key is None:
        missing = "--tls-key" if key is None else "--tls-cert"
        raise SecurityConfigError(f"{missing} is missing: TLS needs both --tls-cert and --tls-key")
    cert_pem = read_pem(cert, "--tls-cert")
    key_pem = read_pem(key, "--tls-key")
    ca_pem = read_pem(client_ca, "--tls-client-ca")
    return grpc.ssl_server_credentials(
        [(key_pem, cert_pem)], root_certificates=ca_pem, require_client_auth=ca_pem is not None
    )


@dataclass(frozen=True)
class Principal:
    """Who a call's token says it is. Per-token settings (priority, quotas) are fields added here."""

    token_id: str
    """The first 12 hex digits of the token's SHA-256: names the token in logs without revealing it."""
    policy: ClientPolicy | None = None
    """The token line's settings (name, default priority and ceiling, quotas: api/quota.py); None: none set."""


_current_principal: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "masquerade_principal", default=None
)


def current_principal() -> Principal | None:
    """The caller of the RPC being handled (set by GateInterceptor); None when the server has no token file."""
    return _current_principal.get()


@contextlib.contextmanager
def principal_scope(principal: Principal | None) -> Iterator[None]:
    """``current_principal()`` returns ``principal`` inside the block (front ends other than gRPC: HTTP)."""
    token = _current_principal.set(principal)
    try:
        yield
    finally:
        _current_principal.reset(token)


class TokenStore:
    """Bearer tokens from a file (one per line; blank lines and '#' comments ignored); ``reload`` on SIGHUP.

    A line may follow its token with ``key=value`` settings (api/quota.py ``parse_policy``), e.g.
    ``s3cret name=nightly priority=bulk max-priority=bulk rps=2 burst=4 faces=32``; a bare token
    line is a token with the server's defaults, as before.

    Only SHA-256 digests are kept, so comparing them takes the same time whatever the presented length.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._tokens: tuple[tuple[bytes, Principal], ...] = self._read()
        self._lock = threading.Lock()

    def _read(self) -> tuple[tuple[bytes, Principal], ...]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except OSError as exc:
            raise SecurityConfigError(f"--auth-token-file {self.path}: cannot read it ({exc.strerror or exc})") from exc
        tokens = []
        for number, line in enumerate(text.splitlines(), start=1):
            words = line.split()
            if not words or words[0].startswith("#"):
                continue
            token, settings = words[0], words[1:]
            if not line.isascii():
                raise SecurityConfigError(
                    f"--auth-token-file {self.path}: line {number} holds non-ASCII characters; "
                    "a bearer token is one word of ASCII characters"
                )
            try:
                policy = parse_policy(settings, f"line {number}") if settings else None
            except ValueError as exc:
                raise SecurityConfigError(f"--auth-token-file {self.path}: {exc}") from None
            digest = hashlib.sha256(token.encode()).digest()
            tokens.append((digest, Principal(token_id=digest.hex()[:12], policy=policy)))
        if not tokens:
            raise SecurityConfigError(f"--auth-token-file {self.path}: holds no token; write one token per line")
        return tuple(tokens)

    def reload(self) -> bool:
        """Rereads the file; on failure keeps the tokens in force and logs why. True when reloaded."""
        try:
            tokens = self._read()
        except SecurityConfigError as exc:
            log.error("token reload failed, keeping the previous tokens: %s", exc)
            return False
        with self._lock:
            self._tokens = tokens
        log.info("reloaded %d bearer token(s) from %s", len(tokens), self.path)
        return True

    def __len__(self) -> int:
        return len(self._tokens)

    def lookup(self, presented: bytes) -> Principal | None:
        """The token's principal, or None. Constant time: digests of equal length are compared,
        every stored one, with no early exit."""
        digest = hashlib.sha256(presented).digest()
        with self._lock:
            tokens = self._tokens
        found = None
        for token, principal in tokens:
            if hmac.compare_digest(token, digest):
                found = principal
        return found

    def accepts(self, presented: bytes) -> bool:
        return self.lookup(presented) is not None


def bearer_token(metadata) -> bytes | None:
    """The token of an ``authorization: Bearer <token>`` header (scheme case-insensitive, RFC 6750)."""
    for key, value in metadata or ():
        if key.lower() != AUTHORIZATION:
            continue
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip().encode("latin-1")
        return None
    return None


def _rejecting_handler(rpc: str, code: grpc.StatusCode, details: str) -> grpc.RpcMethodHandler:
    """A handler that answers ``code`` without reading the request (and logs one access line).

    It is request-streaming whatever the method's shape: gRPC reads a unary request in full
    (and would parse it) before calling its handler, while a streaming handler gets the
    messages only as it asks for them, and this one never asks. With no deserializer, even a
    message that did arrive would stay bytes. The client sees only the status, as for any
    failed call of its method's shape.
    """

    async def reject(_requests, context: grpc.aio.ServicerContext) -> None:
        record = AccessRecord.from_context(rpc, context)
        record.finish(code)
        await context.abort(code, details)

    return grpc.stream_stream_rpc_method_handler(reject)


def _with_principal(handler: grpc.RpcMethodHandler, principal: Principal) -> grpc.RpcMethodHandler:
    """``handler`` with ``current_principal()`` returning ``principal`` while it runs."""
    behaviour_field = (
        ("stream_stream" if handler.response_streaming else "stream_unary")
        if handler.request_streaming
        else ("unary_stream" if handler.response_streaming else "unary_unary")
    )
    behaviour = getattr(handler, behaviour_field)

    if handler.response_streaming and inspect.isasyncgenfunction(behaviour):

        async def run_streaming(request, context):
            _current_principal.set(principal)  # each RPC runs in its own task: the value stays with it
            async for response in behaviour(request, context):
                yield response

        wrapped = run_streaming
    else:

        async def run(request, context):
            _current_principal.set(principal)
            return await behaviour(request, context)

        wrapped = run
    make = getattr(grpc, f"{behaviour_field}_rpc_method_handler")
    return make(
        wrapped, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
    )


class GateInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates every RPC but health's from its metadata, and refuses new ones (UNAVAILABLE) once
    draining starts; a refused call's message is never read (``_rejecting_handler``)."""

    def __init__(self, tokens: TokenStore | None, draining: Callable[[], bool]):
        self.tokens = tokens
        self.draining = draining

    async def intercept_service(self, continuation, handler_call_details: grpc.HandlerCallDetails):
        method = handler_call_details.method or ""
        if method.startswith(HEALTH_PREFIX):
            return await continuation(handler_call_details)
        rpc = method.rsplit("/", 1)[-1]
        principal = None
        if self.tokens is not None:
            presented = bearer_token(handler_call_details.invocation_metadata)
            principal = self.tokens.lookup(presented) if presented is not None else None
            if principal is None:
                metrics.AUTH_FAILURES.labels(reason="missing" if presented is None else "invalid").inc()
                why = "no 'authorization: Bearer <token>' metadata" if presented is None else "the token is not valid"
                # Refused before looking the method up: an unauthenticated caller learns nothing of what exists.
                return _rejecting_handler(
                    rpc, grpc.StatusCode.UNAUTHENTICATED, f"{why}; send a token listed in the server's token file"
                )
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        if self.draining():
            return _rejecting_handler(
                rpc, grpc.StatusCode.UNAVAILABLE, "the server is draining for shutdown; retry on another replica"
            )
        return _with_principal(handler, principal) if principal is not None else handler
