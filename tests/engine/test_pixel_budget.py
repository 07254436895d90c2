"""The in-flight pixel budget: never over its limit, first come first served, cancel-safe, and a clear
refusal for what can never fit."""

from __future__ import annotations

import asyncio
import io

import numpy as np
import pytest
from PIL import Image

from masquerade import metrics
from masquerade.engine.pixel_budget import PixelBudget, PixelBudgetError, header_pixels


def run(coroutine):
    return asyncio.run(coroutine)


def test_holders_never_exceed_the_limit_and_waiters_are_served_in_arrival_order():
    async def scenario():
        budget = PixelBudget(100)
        order, peak = [], 0

        async def hold(name: str, pixels: int, seconds: float):
            nonlocal peak
            async with budget.hold(pixels):
                order.append(name)
                peak = max(peak, budget.used)
                assert metrics.INFLIGHT_MEGAPIXELS._value.get() == budget.used / 1e6
                await asyncio.sleep(seconds)

        first = asyncio.create_task(hold("big", 90, 0.05))
        await asyncio.sleep(0)
        # "large" waits for "big"; "small" would fit beside "big" but must not overtake "large".
        tasks = [asyncio.create_task(hold("large", 60, 0.01)), asyncio.create_task(hold("small", 10, 0.01))]
        await asyncio.sleep(0.01)
        assert budget.waiting == 2
        await asyncio.gather(first, *tasks)
        return order, peak, budget.used

    order, peak, left = run(scenario())
    assert order == ["big", "large", "small"]
    assert peak <= 100 and left == 0


def test_a_cancelled_waiter_leaves_the_queue_and_lets_the_next_one_in():
    async def scenario():
        budget = PixelBudget(100)
        admitted = []

        async def hold(name: str, pixels: int, release: asyncio.Event):
            async with budget.hold(pixels):
                admitted.append(name)
                await release.wait()

        done = asyncio.Event()
        holder = asyncio.create_task(hold("holder", 80, done))
        await asyncio.sleep(0)
        blocked = asyncio.create_task(hold("blocked", 50, done))  # waits for holder
        behind = asyncio.create_task(hold("behind", 20, done))  # fits now, but queued behind "blocked"
        await asyncio.sleep(0.01)
        assert admitted == ["holder"]
        blocked.cancel()
        await asyncio.sleep(0.01)
        assert admitted == ["holder", "behind"] and budget.waiting == 0
        done.set()
        await asyncio.gather(holder, behind)
        with pytest.raises(asyncio.CancelledError):
            await blocked
        return budget.used

    assert run(scenario()) == 0


def test_an_image_larger_than_the_budget_is_refused_naming_the_flag():
    budget = PixelBudget(20_000_000)
    budget.check_fits(20_000_000)
    with pytest.raises(PixelBudgetError, match=r"25\.0 megapixels.*--max-inflight-megapixels 20"):
        budget.check_fits(25_000_000)


def test_header_pixels_reads_the_size_without_decoding():
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((300, 500, 3), np.uint8)).save(buffer, "PNG")
    data = buffer.getvalue()
    assert header_pixels(data) == 150_000
    assert header_pixels(b"not an image") == 0  # decode reports why, with its own message
