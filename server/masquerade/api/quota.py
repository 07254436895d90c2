"""Per-client priorities and quotas: who may ask for what, and how often.

A *client* is a bearer token (its ``name=`` in the token file, else the token's id), else the
common name of a mutual-TLS client certificate, else ``anonymous`` (every caller of an open
server shares one quota). Each client has a ``ClientPolicy``: its default priority, the most
urgent priority it may use (a bulk-only token asking for interactive runs as bulk, and the
response says so), requests per second (a token bucket, ``burst`` deep) and faces in flight.
Flags give the values a token line leaves out.

Over quota, a request is refused at once with ``QuotaExceededError``, which carries when to
come back; the servicer turns it into RESOURCE_EXHAUSTED with a ``google.rpc.RetryInfo``
detail. Imports neither grpc nor torch.

Video counts by frames, so that a camera costs the same live or recorded. A live stream is
admitted as one request, which pays for its first frame; every later frame takes one more (a
frame over the quota ends the stream with RESOURCE_EXHAUSTED and RetryInfo, after the frames
before it were answered). A video file is admitted as one request, and its decoded frames
after the first are charged as they are decoded, without refusing (``charge``: the bucket may
go below zero, and the client's next call waits until the debt is paid back at its rate).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from masquerade.engine.job_state import Priority
from masquerade.errors import QuotaExceededError

ANONYMOUS = "anonymous"
MAX_CLIENT_LABELS = 64
"""Distinct client names metrics label by; the rest are counted as "other" (a bounded label)."""
_MAX_TRACKED_CLIENTS = 10_000

PRIORITY_NAMES = {"interactive": Priority.INTERACTIVE, "bulk": Priority.BULK}


def parse_priority(text: str, where: str) -> Priority:
    try:
        return PRIORITY_NAMES[text.strip().lower()]
    except KeyError:
        raise ValueError(f"{where}: priority {text!r} is not one of {', '.join(PRIORITY_NAMES)}") from None


@dataclass(frozen=True)
class ClientPolicy:
    """What one client may do; None takes the server's value (flags), which may be "no limit"."""

    name: str | None = None
    default_priority: Priority | None = None
    max_priority: Priority | None = None  # the most urgent priority allowed (its ceiling)
    requests_per_second: float | None = None
    burst: int | None = None
    max_faces: int | None = None  # faces in flight (detected, not yet answered)

    def __post_init__(self) -> None:
        if self.requests_per_second is not None and not (
            math.isfinite(self.requests_per_second) and self.requests_per_second > 0
        ):
            raise ValueError(f"rps must be a positive number, got {self.requests_per_second!r}")
        if self.burst is not None and self.burst < 1:
            raise ValueError(f"burst must be at least 1, got {self.burst}")
        if self.max_faces is not None and self.max_faces < 1:
            raise ValueError(f"faces must be at least 1, got {self.max_faces}")

    def over(self, defaults: ClientPolicy) -> ClientPolicy:
        """This policy with the fields it leaves unset taken from ``defaults``."""
        unset = {name: getattr(defaults, name) for name in self.__dataclass_fields__ if getattr(self, name) is None}
        return replace(self, **unset)

    def effective_priority(self, asked: Priority | None, server_default: Priority) -> Priority:
        """The priority a request runs at: asked, else the client's default, else the server's; never
        more urgent than the client's ceiling."""
        wanted = asked or self.default_priority or server_default
        return max(wanted, self.max_priority) if self.max_priority is not None else wanted


_FIELD_PARSERS: dict[str, tuple[str, Callable[[str, str], object]]] = {
    "name": ("name", lambda value, where: value),
    "priority": ("default_priority", parse_priority),
    "max-priority": ("max_priority", parse_priority),
    "rps": ("requests_per_second", lambda value, where: float(value)),
    "burst": ("burst", lambda value, where: int(value)),
    "faces": ("max_faces", lambda value, where: int(value)),
}


def parse_policy(words: list[str], where: str) -> ClientPolicy:
    """A token line's ``key=value`` words after the token, e.g. ``name=nightly priority=bulk max-priority=bulk
    rps=2 burst=4 faces=32``. Raises ValueError naming the line and the word."""
    values: dict[str, object] = {}
    for word in words:
        key, sep, value = word.partition("=")
        if not sep or key not in _FIELD_PARSERS or not value:
            raise ValueError(f"{where}: {word!r} is not one of {', '.join(k + '=...' for k in _FIELD_PARSERS)}")
        field_name, parse = _FIELD_PARSERS[key]
        try:
            values[field_name] = parse(value, where)
        except ValueError as exc:
            raise ValueError(f"{where}: {word!r}: {exc}") from None
    try:
        return ClientPolicy(**values)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


class _Bucket:
    __slots__ = ("tokens", "stamp")

    def __init__(self, tokens: float, stamp: float):
        self.tokens = tokens
        self.stamp = stamp


class QuotaBook:
    """Token buckets (requests per second) per client, and the faces-in-flight check; thread-safe.

    ``faces_in_flight(client)`` is the engine's count of the client's detected faces not yet
    answered (a request's faces count from detection to its result). ``faces_retry_after(client)``
    says how long a client at its faces quota should wait; ``clock`` is injectable for tests.
    """

    def __init__(
        self,
        faces_in_flight: Callable[[str], int] = lambda client: 0,
        faces_retry_after: Callable[[str], float] = lambda client: 1.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.faces_in_flight = faces_in_flight
        self.faces_retry_after = faces_retry_after
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()

    def admit(self, client: str, policy: ClientPolicy) -> None:
        """Counts one request against ``client``'s quotas, or raises QuotaExceededError with when to retry.

        A request is admitted while the client holds fewer faces than its quota: one request may take
        it past the quota (its faces are only known once detected), the next one waits.
        """
        if policy.max_faces is not None:
            held = self.faces_in_flight(client)
            if held >= policy.max_faces:
                wait = max(0.05, self.faces_retry_after(client))
                raise QuotaExceededError(
                    f"client {client!r} has {held} faces in flight and its quota is {policy.max_faces}; "
                    f"retry in {wait:.2f} s",
                    wait,
                )
        rate = policy.requests_per_second
        if rate is None:
            return
        depth = float(policy.burst or max(1, math.ceil(rate)))
        now = self._clock()
        with self._lock:
            bucket = self._buckets.get(client)
            if bucket is None:
                if len(self._buckets) >= _MAX_TRACKED_CLIENTS:
                    self._forget_idle(now)
                bucket = self._buckets[client] = _Bucket(depth, now)
            bucket.tokens = min(depth, bucket.tokens + (now - bucket.stamp) * rate)
            bucket.stamp = now
            if bucket.tokens < 1.0:
                wait = (1.0 - bucket.tokens) / rate
                raise QuotaExceededError(
                    f"client {client!r} is over its quota of {rate:g} requests per second; retry in {wait:.2f} s",
                    wait,
                )
            bucket.tokens -= 1.0

    def charge(self, client: str, policy: ClientPolicy, count: float) -> None:
        """Takes ``count`` more requests from ``client``'s bucket without refusing: work already admitted whose
        size was known only once it ran (a video file's decoded frames). The bucket may go below zero; the
        client's next request then waits until the debt is paid back at its rate."""
        rate = policy.requests_per_second
        if rate is None or count <= 0:
            return
        depth = float(policy.burst or max(1, math.ceil(rate)))
        now = self._clock()
        with self._lock:
            bucket = self._buckets.get(client)
            if bucket is None:
                if len(self._buckets) >= _MAX_TRACKED_CLIENTS:
                    self._forget_idle(now)
                bucket = self._buckets[client] = _Bucket(depth, now)
            bucket.tokens = min(depth, bucket.tokens + (now - bucket.stamp) * rate) - count
            bucket.stamp = now

    def _forget_idle(self, now: float) -> None:
        """Drops buckets idle for a minute that owe nothing (refilled, or nearly: nothing worth keeping)."""
        for name in [
            name for name, bucket in self._buckets.items() if now - bucket.stamp > 60.0 and bucket.tokens >= 0.0
        ]:
            del self._buckets[name]


class ClientLabels:
    """Bounded metric label values for client names: the first MAX_CLIENT_LABELS seen, then "other"."""

    def __init__(self, limit: int = MAX_CLIENT_LABELS):
        self.limit = limit
        self._known: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, client: str) -> str:
        with self._lock:
            if client in self._known:
                return client
            if len(self._known) < self.limit:
                self._known.add(client)
                return client
        return "other"


class ClientAdmission:
    """Who is calling, at what priority, and whether their quota lets them in (the servicer's one call).

    ``defaults``: the flags' policy (--default-priority is ``server_priority``; --quota-rps,
    --quota-burst and --quota-faces the quotas of a client whose token line sets none).
    """

    def __init__(
        self,
        defaults: ClientPolicy = ClientPolicy(),
        server_priority: Priority = Priority.INTERACTIVE,
        quotas: QuotaBook | None = None,
    ):
        self.defaults = defaults
        self.server_priority = Priority(server_priority)
        self.quotas = quotas or QuotaBook()
        self.labels = ClientLabels()

    def policy_for(self, token_policy: ClientPolicy | None) -> ClientPolicy:
        return (token_policy or ClientPolicy()).over(self.defaults)

    def admit(self, client: str, policy: ClientPolicy, asked: Priority | None) -> Priority:
        """The request's effective priority; raises QuotaExceededError (counted per client) when over quota."""
        from masquerade import metrics

        try:
            self.quotas.admit(client, policy)
        except QuotaExceededError:
            metrics.QUOTA_REFUSALS.labels(client=self.labels(client)).inc()
            raise
        return policy.effective_priority(asked, self.server_priority)

    def charge(self, client: str, policy: ClientPolicy, count: float) -> None:
        """Counts ``count`` more requests against ``client`` without refusing (see ``QuotaBook.charge``)."""
        self.quotas.charge(client, policy, count)


def client_name(token_id: str | None, token_policy: ClientPolicy | None, certificate_name: str | None) -> str:
    """The name quotas and turns are kept under: the token's name= (else ``token-<id>``), else the
    client certificate's common name (``cert:<name>``), else ANONYMOUS."""
    if token_id is not None:
        return (token_policy.name if token_policy is not None and token_policy.name else None) or f"token-{token_id}"
    if certificate_name:
        return f"cert:{certificate_name}"
    return ANONYMOUS
