"""The memory budget that admission enforces: decoded megapixels in flight, not requests.

A request's memory is set by its pixels: a 116 KB blank PNG of 6300x6300 decodes to
119 MB, and its post-processing holds a few more copies. The engine counts each
request's decoded pixels (read from the image header, before any pixel is decoded)
against ``EngineConfig.max_inflight_megapixels`` for as long as it holds them; a request
that does not fit waits, holding only its compressed bytes, and is decoded once it is
admitted. One that can never fit is refused (``PixelBudgetError``, RESOURCE_EXHAUSTED
naming the limit). Waiters are served first come, first served: a large request is not
starved by a stream of small ones. See docs/design.md section 10.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import io
import warnings
from collections.abc import AsyncIterator

from masquerade import metrics
from masquerade.errors import ResourceLimitError


class PixelBudgetError(ResourceLimitError):
    """The request's decoded image alone is larger than the whole in-flight budget."""


def header_pixels(data: bytes) -> int:
    """Width x height from the image header alone (no pixel decoded); 0 when unreadable (decode reports why)."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
    except Exception:  # any failure here is decode's to report, with its own message
        return 0
    return max(int(width), 0) * max(int(height), 0)


class PixelBudget:
    """Decoded pixels in flight, at most ``limit`` (FIFO waiters). Used on the engine's event loop only."""

    def __init__(self, limit_pixels: int):
        if limit_pixels < 1:
            raise ValueError(f"the in-flight pixel budget must be positive, got {limit_pixels}")
        self.limit = int(limit_pixels)
        self.used = 0
        self._waiters: collections.deque[tuple[int, asyncio.Future]] = collections.deque()

    def check_fits(self, pixels: int) -> None:
        if pixels > self.limit:
            raise PixelBudgetError(
                f"image: {pixels / 1e6:.1f} megapixels decoded is more than this server's whole in-flight "
                f"budget (--max-inflight-megapixels {self.limit / 1e6:g}); send a smaller image"
            )

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @contextlib.asynccontextmanager
    async def hold(self, pixels: int) -> AsyncIterator[None]:
        """Holds ``pixels`` of the budget for the block, waiting (FIFO) until they fit."""
        pixels = min(int(pixels), self.limit)  # check_fits refused larger ones; a 0 (unreadable) costs nothing
        await self._acquire(pixels)
        try:
            yield
        finally:
            self._release(pixels)

    async def _acquire(self, pixels: int) -> None:
        if not self._waiters and self.used + pixels <= self.limit:
            self._take(pixels)
            return
        future = asyncio.get_running_loop().create_future()
        entry = (pixels, future)
        self._waiters.append(entry)
        self._publish()
        try:
            await future  # _wake takes the pixels for us before resolving it
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self._release(pixels)  # granted just as it was cancelled: give them back
            else:
                with contextlib.suppress(ValueError):  # _wake drops cancelled waiters it meets at the head
                    self._waiters.remove(entry)
                self._wake()  # the head may have changed
                self._publish()
            raise

    def _take(self, pixels: int) -> None:
        self.used += pixels
        self._publish()

    def _release(self, pixels: int) -> None:
        self.used -= pixels
        self._wake()
        self._publish()

    def _wake(self) -> None:
        while self._waiters and self.used + self._waiters[0][0] <= self.limit:
            pixels, future = self._waiters.popleft()
            if not future.done():
                self._take(pixels)
                future.set_result(None)

    def _publish(self) -> None:
        metrics.INFLIGHT_MEGAPIXELS.set(self.used / 1e6)
        metrics.PIXEL_BUDGET_WAITING.set(len(self._waiters))
