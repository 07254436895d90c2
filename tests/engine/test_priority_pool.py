"""The preprocess pool runs the most urgent waiting task first, FIFO among equals, and never drops one."""

from __future__ import annotations

import threading
import time

import pytest

from masquerade.engine.job_state import Priority
from masquerade.engine.priority_pool import PriorityThreadPool


def test_waiting_interactive_tasks_run_before_earlier_bulk_ones_and_equals_keep_their_order():
    pool = PriorityThreadPool(1, "test-pool")
    gate, started = threading.Event(), threading.Event()
    ran: list[str] = []
    try:
        blocker = pool.submit(Priority.BULK, lambda: (started.set(), gate.wait()))  # occupies the only thread
        assert started.wait(10)
        futures = [pool.submit(Priority.BULK, ran.append, f"bulk-{i}") for i in range(3)]
        futures += [pool.submit(Priority.INTERACTIVE, ran.append, f"interactive-{i}") for i in range(2)]
        assert pool.waiting(Priority.INTERACTIVE) == 2 and pool.waiting(Priority.BULK) == 5
        gate.set()
        for future in [blocker, *futures]:
            future.result(timeout=10)
        assert ran == ["interactive-0", "interactive-1", "bulk-0", "bulk-1", "bulk-2"]
    finally:
        pool.shutdown()


def test_errors_reach_the_caller_and_a_cancelled_task_never_runs():
    pool = PriorityThreadPool(1, "test-pool")
    gate = threading.Event()
    ran: list[int] = []
    try:
        pool.submit(Priority.BULK, gate.wait)
        cancelled = pool.submit(Priority.INTERACTIVE, ran.append, 1)
        failing = pool.submit(Priority.BULK, lambda: 1 / 0)
        assert cancelled.cancel()
        gate.set()
        with pytest.raises(ZeroDivisionError):
            failing.result(timeout=10)
        assert ran == []
    finally:
        pool.shutdown()


def test_a_reserved_thread_runs_interactive_work_while_bulk_work_holds_every_other_thread():
    pool = PriorityThreadPool(1, "test-pool", reserved=1)
    gate, started = threading.Event(), threading.Event()
    ran: list[str] = []
    try:
        pool.submit(Priority.BULK, lambda: (started.set(), gate.wait()))
        assert started.wait(10)
        second_bulk = pool.submit(Priority.BULK, ran.append, "bulk")
        interactive = pool.submit(Priority.INTERACTIVE, ran.append, "interactive")
        interactive.result(timeout=10)  # on the reserved thread, while bulk holds its one thread
        assert ran == ["interactive"] and not second_bulk.done()  # bulk never takes the reserved thread
        gate.set()
        second_bulk.result(timeout=10)
        assert ran == ["interactive", "bulk"]
    finally:
        pool.shutdown()


def test_paused_bulk_work_waits_for_the_pause_to_end_or_at_most_its_bound():
    paused = [True]
    pool = PriorityThreadPool(1, "test-pool", bulk_paused=lambda: paused[0], max_bulk_pause_s=0.5)
    try:
        started = time.perf_counter()
        delayed = pool.submit(Priority.BULK, time.perf_counter)
        assert pool.submit(Priority.INTERACTIVE, lambda: "now").result(timeout=10) == "now"  # never paused
        assert delayed.result(timeout=10) - started >= 0.5  # waited the bound, then ran: delayed, not starved
        held = pool.submit(Priority.BULK, time.perf_counter)
        time.sleep(0.1)
        assert not held.done()
        paused[0] = False
        pool.poke()  # the engine's signal that interactive work left
        assert held.result(timeout=10) - started < delayed.result() - started + 0.45
    finally:
        pool.shutdown()


def test_on_every_thread_runs_once_on_each_thread_including_the_reserved_ones():
    pool = PriorityThreadPool(2, "test-pool", reserved=1)
    names: list[str] = []
    lock = threading.Lock()

    def note() -> str:
        with lock:
            names.append(threading.current_thread().name)
        return threading.current_thread().name

    try:
        for future in pool.on_every_thread(note):
            future.result(timeout=10)
        assert sorted(names) == ["test-pool-0", "test-pool-1", "test-pool-2"]
    finally:
        pool.shutdown()


def test_on_every_thread_goes_on_when_a_thread_stays_busy():
    """A thread busy past the timeout breaks the barrier: every task still runs (fn is idempotent), none hangs."""
    pool = PriorityThreadPool(2, "test-pool")
    gate, started = threading.Event(), threading.Event()
    ran: list[str] = []
    try:
        busy = pool.submit(Priority.BULK, lambda: (started.set(), gate.wait()))
        assert started.wait(10)
        futures = pool.on_every_thread(lambda: ran.append(threading.current_thread().name), timeout=0.2)
        for future in futures[:1]:
            future.result(timeout=10)  # the free thread ran one, waited 0.2 s for the other, went on
        gate.set()
        for future in [busy, *futures]:
            future.result(timeout=10)
        assert len(ran) == 2
    finally:
        pool.shutdown()
