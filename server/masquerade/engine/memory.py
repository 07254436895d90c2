"""Give freed heap memory back to the operating system after requests.

A large image (tens of megapixels) makes glibc's malloc grow its heaps and
arenas by gigabytes; freeing the arrays puts the pages on malloc's free lists,
not back to the OS, so the server's RSS would stay at its peak forever.
``malloc_trim(0)`` releases them. It costs well under a millisecond on a
quiet heap, but it takes the arena locks, so trims are coalesced on one
thread, run ``settle_s`` after a request (the caller is still dropping its
arrays when it asks) and at most every ``min_interval_s``. On a C library
without ``malloc_trim`` (musl, macOS) this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading
import time

log = logging.getLogger(__name__)


def _load_malloc_trim():
    name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_MALLOC_TRIM = _load_malloc_trim()


def trim_now() -> bool:
    """Return free heap pages to the OS at once; False where the C library cannot."""
    if _MALLOC_TRIM is None:
        return False
    _MALLOC_TRIM(0)
    return True


class MemoryReturner:
    """Coalesces trim requests from any thread onto one daemon thread."""

    def __init__(self, min_interval_s: float = 0.25, settle_s: float = 0.2):
        self.min_interval_s = min_interval_s
        self.settle_s = settle_s
        self._wanted = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.trims = 0

    @property
    def available(self) -> bool:
        return _MALLOC_TRIM is not None

    def request_trim(self) -> None:
        """Ask for a trim soon (within ``settle_s + min_interval_s``); cheap, never blocks."""
        if _MALLOC_TRIM is None:
            return
        self._wanted.set()
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="masquerade-memory", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        last = 0.0
        while True:
            self._wanted.wait()
            time.sleep(max(self.settle_s, last + self.min_interval_s - time.monotonic()))
            self._wanted.clear()  # requests from now on get another trim after this one
            trim_now()
            self.trims += 1
            last = time.monotonic()
