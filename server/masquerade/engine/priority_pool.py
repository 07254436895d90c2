"""A thread pool that runs the most urgent waiting task first (interactive before bulk).

Detection, alignment, VAE work and post-processing run on a few threads; a plain
ThreadPoolExecutor serves them first come, first served, so one interactive photo
arriving behind a bulk archive would wait for every bulk image's detection. Here
waiting tasks are ordered by (priority, submission order): a running task is never
interrupted, and among equals the order is FIFO. ``reserved`` threads more than
``threads`` run only interactive work, so an interactive task never queues behind bulk
tasks that are already running: bulk work uses ``threads`` at most; and while ``bulk_paused()``
says so (the engine: interactive jobs diffuse on a CPU, whose cores the UNet needs), no bulk
task starts unless it has waited ``max_bulk_pause_s`` already, so bulk pixel work is delayed,
never starved. The queue is bounded
by the engine's admission (``max_queue`` requests, each with at most one task waiting at
a time).
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

from masquerade.engine.job_state import Priority


class PriorityThreadPool:
    def __init__(
        self,
        threads: int,
        name: str,
        reserved: int = 0,
        bulk_paused: Callable[[], bool] = lambda: False,
        max_bulk_pause_s: float = 1.0,
    ):
        if threads < 1 or reserved < 0:
            raise ValueError(f"threads must be at least 1 and reserved at least 0, got {threads} and {reserved}")
        self.bulk_threads = threads
        self._bulk_paused = bulk_paused
        self.max_bulk_pause_s = max_bulk_pause_s
        self._heap: list[tuple[int, int, Future, Callable, tuple, float]] = []
        self._order = itertools.count()
        self._ready = threading.Condition()
        self._closed = False
        self._bulk_running = 0
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}-{index}", daemon=True)
            for index in range(threads + reserved)
        ]
        for thread in self._threads:
            thread.start()
        self.on_start: Callable[[Priority, float], None] | None = None  # (priority, seconds it waited)

    def submit(self, priority: Priority, fn: Callable, *args) -> Future:
        future: Future = Future()
        with self._ready:
            if self._closed:
                raise RuntimeError("the pool is shut down")
            heapq.heappush(self._heap, (int(priority), next(self._order), future, fn, args, time.perf_counter()))
            self._ready.notify()
        return future

    def on_every_thread(self, fn: Callable[[], object], timeout: float = 10.0) -> list[Future]:
        """``fn()`` once on each of the pool's threads (per-thread models loaded ahead of the first request
        that needs them), as interactive tasks: a barrier holds each task on its thread until every one has
        started, so no thread takes two. A thread still busy after ``timeout`` breaks the barrier: the rest
        go on, and its task may then run on a thread that already ran ``fn`` (so ``fn`` must be idempotent)."""
        barrier = threading.Barrier(len(self._threads))

        def once():
            try:
                return fn()
            finally:
                try:
                    barrier.wait(timeout)
                except threading.BrokenBarrierError:
                    pass

        return [self.submit(Priority.INTERACTIVE, once) for _ in self._threads]

    def waiting(self, up_to: Priority) -> int:
        """Tasks queued (not started) at priority ``up_to`` or more urgent."""
        with self._ready:
            return sum(1 for entry in self._heap if entry[0] <= up_to)

    def _runnable(self) -> bool:
        """The most urgent waiting task may start now: interactive always, bulk below its thread count."""
        if not self._heap:
            return False
        if self._heap[0][0] < Priority.BULK:
            return True
        if self._bulk_running >= self.bulk_threads:
            return False
        waited = time.perf_counter() - self._heap[0][5]  # the oldest bulk task: FIFO among equals
        return waited >= self.max_bulk_pause_s or not self._bulk_paused()

    def _work(self) -> None:
        while True:
            with self._ready:
                while not self._runnable():
                    if self._closed and not self._heap:
                        return
                    # A paused bulk task becomes runnable by waiting: recheck now and then.
                    self._ready.wait(timeout=0.05 if self._heap else None)
                priority, _order, future, fn, args, queued = heapq.heappop(self._heap)
                bulk = priority >= Priority.BULK
                self._bulk_running += bulk
            try:
                if not future.set_running_or_notify_cancel():
                    continue  # cancelled while it waited: its request is gone
                if self.on_start is not None:
                    self.on_start(Priority(priority), time.perf_counter() - queued)
                try:
                    future.set_result(fn(*args))
                except BaseException as error:  # handed to the awaiting request, like ThreadPoolExecutor does
                    future.set_exception(error)
                del future, fn, args  # drop the request's arrays before waiting for the next task
            finally:
                if bulk:
                    with self._ready:
                        self._bulk_running -= 1
                        self._ready.notify_all()

    def join(self, timeout: float) -> bool:
        """After ``shutdown``: wait up to ``timeout`` s for the running tasks to end; True when all did.

        A native call (onnxruntime, dlib) still running when the interpreter exits aborts the process
        ("terminate called without an active exception"), so the engine waits for them; a cancelled
        request's task ends at its next cancellation check (masquerade/cancellation.py)."""
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return not any(thread.is_alive() for thread in self._threads)

    def poke(self) -> None:
        """Recheck whether waiting bulk work may start (``bulk_paused`` changed)."""
        with self._ready:
            self._ready.notify_all()

    def shutdown(self, cancel_futures: bool = True) -> None:
        """Stop taking tasks; cancel the waiting ones; running ones finish on their own (threads are daemons)."""
        with self._ready:
            self._closed = True
            if cancel_futures:
                for entry in self._heap:
                    entry[2].cancel()
                self._heap.clear()
            self._ready.notify_all()
