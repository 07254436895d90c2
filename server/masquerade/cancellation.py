"""Cancellation that reaches pixel work running on worker threads.

asyncio cancels a request's coroutine at once, but the decode, detection, alignment
and encoding it started on a thread pool run on: a thread cannot be interrupted. The
engine runs each pool task inside ``scope(flag)`` with the request's flag, sets the flag
when the request is cancelled or its deadline passes, and the pixel code calls
``check()`` between its steps (each detection tile, each face, before encoding), which
raises ``Cancelled`` once the flag is set. Outside a scope ``check()`` does nothing.

Like ``masquerade.errors``, this module imports nothing of the project: every layer may use it.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator


class Cancelled(Exception):
    """The request this pixel work belongs to was cancelled or ran past its deadline."""


_local = threading.local()


@contextlib.contextmanager
def scope(flag: threading.Event | None) -> Iterator[None]:
    """Runs the block with ``flag`` as this thread's cancel flag (None: nothing to check)."""
    previous = getattr(_local, "flag", None)
    _local.flag = flag
    try:
        yield
    finally:
        _local.flag = previous


def check() -> None:
    """Raises Cancelled when this thread's current work has been cancelled."""
    flag = getattr(_local, "flag", None)
    if flag is not None and flag.is_set():
        raise Cancelled("the request was cancelled; its pixel work stopped")
