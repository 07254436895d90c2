"""Iteration-level batching of diffusion steps: what the next UNet call holds, and what its outputs change.

The engine loop is three steps: ``plan()`` packs the next call, the runner
executes it, ``update()`` applies its outputs. ``plan()`` packs
classifier-free-guidance pairs ("rows") from whatever jobs are ready: up to
``inversion_chunk`` inversion steps of one job at once (they are independent,
docs/design.md 1.2 step 5), and one generation step per generating job, at
whatever timestep each job is. ``update()`` is the only place job state changes
once a job has joined: outputs are recorded, failures and the cancels marked
since the last call are applied (releasing tensors), and jobs that left
diffusion are handed back. Imports neither torch nor grpc.

Who goes first (docs/design.md, "Priorities"). A call is filled in this order:

1. *aged* bulk jobs (below), oldest first;
2. interactive jobs;
3. bulk jobs: in a call that holds interactive rows, first the *bulk floor*,
   ``ceil(B / K)`` rows for the B ready bulk jobs that waited longest, then more
   bulk rows only while ``row_budget`` says the call stays about as fast as its
   interactive rows alone (the engine measures call times; on a GPU a fuller
   call costs little, on a CPU it costs in proportion); in a call without
   interactive rows, bulk fills the call.

Within 2 and 3 the clients take turns (each client's first job, then each
client's second, ...; admission order breaks ties), so clients of one priority
share the rows whatever their concurrency. The call's latent shape is that of
the first job in this order.

Invariants (tested in tests/engine/test_scheduler.py on model-free jobs): a call
never exceeds ``max_batch``; an interactive job never waits behind bulk work of
its shape except for the floor's rows; a ready bulk job goes at most K
(``aging_calls``) calls holding interactive rows without a row of its own: the
floor serves the most starved first, and a job that reaches K anyway (another
latent shape, a call of one row) is *aged*: served first, oldest first, its shape
deciding the next call; bulk-only calls go oldest first, so a bulk job only ever
waits for finite work; nothing is restarted or thrown away: priority decides
only who is in the next call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from masquerade.engine.job_state import BatchKey, Phase, Priority

if TYPE_CHECKING:
    from masquerade.engine.job import FaceJob


@dataclass(frozen=True)
class StepSlice:
    """``count`` consecutive steps of one job, starting at step ``start``."""

    job: FaceJob
    phase: Phase
    start: int
    count: int


@dataclass
class StepPlan:
    key: BatchKey
    slices: list[StepSlice] = field(default_factory=list)

    @property
    def rows(self) -> int:
        """CFG pairs in the call; the UNet sees twice as many samples."""
        return sum(s.count for s in self.slices)

    @property
    def samples(self) -> int:
        return 2 * self.rows

    def only(self, job: FaceJob) -> StepPlan:
        """The same call restricted to one job's rows (to retry it alone)."""
        return StepPlan(self.key, [piece for piece in self.slices if piece.job is job])


class SliceOutput(Protocol):
    """What the runner returns per slice (``runner.SliceResult``)."""

    slice: StepSlice
    latents: object  # [count, C, h, w]: noise maps for inversion, new latents for generation
    last_output: object  # [C, h, w] model output of the slice's last step


@dataclass
class StepUpdate:
    """What one update changed: jobs that left diffusion, and jobs whose cursors moved."""

    finished: list[FaceJob] = field(default_factory=list)  # decoded-ready, failed or cancelled
    progressed: list[FaceJob] = field(default_factory=list)


DEFAULT_AGING_CALLS = 32
"""K: calls with interactive rows a ready bulk job may go without a row (see the module docstring)."""


@dataclass
class _Seat:
    """What the scheduler knows of a job besides its diffusion state."""

    priority: Priority
    client: str
    admitted: int  # admission order
    # Bulk only: calls that carried interactive rows while this job was ready and got none, since its last row.
    starved: int = 0


RowBudget = Callable[[int], int]
"""Rows a call may hold in all when ``interactive_rows`` of them are interactive (from measured call times)."""


class StepScheduler:
    """Holds the diffusing jobs; plans one UNet call at a time by priority and applies its outputs."""

    def __init__(
        self,
        max_batch: int,
        inversion_chunk: int,
        aging_calls: int = DEFAULT_AGING_CALLS,
        row_budget: RowBudget | None = None,
    ):
        if max_batch < 2:
            raise ValueError(f"max_batch must be at least 2 (one CFG pair), got {max_batch}")
        if inversion_chunk < 1:
            raise ValueError(f"inversion_chunk must be at least 1, got {inversion_chunk}")
        if aging_calls < 1:
            raise ValueError(f"aging_calls must be at least 1, got {aging_calls}")
        self.max_rows = max_batch // 2
        self.inversion_chunk = inversion_chunk
        self.aging_calls = aging_calls
        self.row_budget = row_budget  # None: a call with interactive rows may be filled to max_batch
        self._jobs: list[FaceJob] = []
        self._seats: dict[FaceJob, _Seat] = {}
        self._admitted = 0
        self.calls = 0  # UNet calls applied so far
        self.rows_served: dict[tuple[Priority, str], int] = {}  # steps computed, by (priority, client)

    def __len__(self) -> int:
        return len(self._jobs)

    @property
    def jobs(self) -> tuple[FaceJob, ...]:
        return tuple(self._jobs)

    def add(self, jobs: Iterable[FaceJob], priority: Priority = Priority.INTERACTIVE, client: str = "") -> None:
        for job in jobs:
            job.start()
            self._jobs.append(job)
            self._seats[job] = _Seat(Priority(priority), client, self._admitted)
            self._admitted += 1

    def priority_of(self, job: FaceJob) -> Priority:
        return self._seats[job].priority

    def starved_calls(self, job: FaceJob) -> int:
        """Calls with interactive rows since this bulk job last got a row (0 for interactive jobs)."""
        return self._seats[job].starved

    def _aged(self, job: FaceJob) -> bool:
        seat = self._seats[job]
        return seat.priority is Priority.BULK and seat.starved >= self.aging_calls

    def urgency_order(self) -> list[FaceJob]:
        """The ready jobs, most urgent first: aged bulk, then interactive, then bulk (clients taking turns)."""
        ready = [job for job in self._jobs if job.schedulable]
        turn: dict[tuple[int, str], int] = {}
        keys = {}
        for job in sorted(ready, key=lambda j: self._seats[j].admitted):
            seat = self._seats[job]
            if self._aged(job):
                keys[job] = (0, 0, seat.admitted)
                continue
            tier = 1 if seat.priority is Priority.INTERACTIVE else 2
            rank = turn.get((tier, seat.client), 0)
            turn[(tier, seat.client)] = rank + 1
            keys[job] = (tier, rank, seat.admitted)
        return sorted(ready, key=keys.__getitem__)

    def plan(self) -> StepPlan | None:
        """The next call's rows, or None when no job can run (none diffusing, or all marked to stop)."""
        order = self.urgency_order()
        if not order:
            return None
        plan = StepPlan(key=order[0].batch_key)
        fits = [job for job in order if job.batch_key == plan.key]
        aged = [job for job in fits if self._aged(job)]
        interactive = [job for job in fits if self._seats[job].priority is Priority.INTERACTIVE]
        bulk = [job for job in fits if self._seats[job].priority is Priority.BULK and job not in aged]
        for job in aged:
            self._take(plan, job, self.max_rows)
        if not interactive:
            for job in bulk:
                self._take(plan, job, self.max_rows)
            return plan
        # The bulk floor: the bulk jobs that must get a row now for none of them to wait K such calls
        # (the most starved first); one row stays for interactive work.
        due = self._bulk_due(bulk)[: max(0, self.max_rows - plan.rows - 1)]
        for job in interactive:
            self._take(plan, job, self.max_rows - len(due))
        interactive_rows = sum(piece.count for piece in plan.slices if piece.job in interactive)
        for job in due:
            self._take(plan, job, plan.rows + 1)
        # More bulk rows only as far as the call stays about as fast as the interactive rows alone.
        budget = self.max_rows if self.row_budget is None else self.row_budget(interactive_rows)
        served = {piece.job for piece in plan.slices}
        for job in bulk:
            if job not in served:
                self._take(plan, job, min(self.max_rows, budget))
        return plan

    def floor_per_call(self, bulk_jobs: int) -> int:
        """Bulk rows a call holding interactive rows carries in the steady state: ``ceil(B / K)``."""
        return -(-bulk_jobs // self.aging_calls)

    def _bulk_due(self, bulk: list[FaceJob]) -> list[FaceJob]:
        """The fewest of the most starved bulk jobs that must get a row in this call so that, with
        ``ceil(B / K)`` rows in each later call holding interactive rows, none waits K such calls
        (earliest deadline first). A short interactive request thus runs its first calls alone."""
        if not bulk:
            return []
        per_call = self.floor_per_call(len(bulk))
        order = sorted(bulk, key=lambda j: (-self._seats[j].starved, self._seats[j].admitted))
        # The job at position p among those left out is served in later call 1 + p // per_call, and must
        # be by then: starved + 1 + p // per_call < K, so at least p + 1 - per_call * (K - starved - 1)
        # jobs ahead of it go now.
        due = max(
            (
                index + 1 - per_call * (self.aging_calls - self._seats[job].starved - 1)
                for index, job in enumerate(order)
            ),
            default=0,
        )
        return order[: max(0, due)]

    def _take(self, plan: StepPlan, job: FaceJob, up_to_rows: int) -> None:
        """Adds ``job``'s next steps to ``plan`` while it holds fewer than ``up_to_rows`` rows."""
        room = min(up_to_rows, self.max_rows) - plan.rows
        if room <= 0:
            return
        if job.phase is Phase.GENERATION:
            plan.slices.append(StepSlice(job, Phase.GENERATION, job.generation_done, 1))
        else:
            count = min(self.inversion_chunk, job.remaining_inversion_steps, room)
            plan.slices.append(StepSlice(job, Phase.INVERSION, job.inversion_done, count))

    def update(self, outputs: Iterable[SliceOutput] = (), failures: Mapping[FaceJob, str] | None = None) -> StepUpdate:
        """Apply a call's outputs and failures, then every pending cancel; retire jobs that left.

        Called on the engine loop's thread with no UNet call in flight, after every call and
        whenever a cancel wakes an idle loop. ``failures`` gives, per job, why its rows could not
        be computed. A job marked to stop while the call ran gets no outputs: it just leaves.
        """
        update = StepUpdate()
        outputs = list(outputs)
        if outputs or failures:
            self.calls += 1  # an idle wake (cancels only) is not a call
        in_call = {output.slice.job for output in outputs} | set(failures or ())
        if any(self._seats[job].priority is Priority.INTERACTIVE for job in in_call if job in self._seats):
            for job in self._jobs:  # interactive work held this call: ready bulk jobs left out starve a call more
                seat = self._seats[job]
                if seat.priority is Priority.BULK and job.schedulable and job not in in_call:
                    seat.starved += 1
        for output in outputs:
            piece, job = output.slice, output.slice.job
            if not job.schedulable:
                continue
            seat = self._seats[job]
            seat.starved = 0
            served = (seat.priority, seat.client)
            self.rows_served[served] = self.rows_served.get(served, 0) + piece.count
            if piece.phase is Phase.INVERSION:
                job.record_inversion(piece.start, output.latents, output.last_output)
            else:
                job.record_generation(output.latents[0], output.last_output)
            update.progressed.append(job)
        for job, reason in (failures or {}).items():
            job.fail(reason)
        for job in self._jobs:
            job.apply_pending_stop()
        staying = []
        for job in self._jobs:
            (staying if job.status.diffusing else update.finished).append(job)
        for job in update.finished:
            del self._seats[job]
        self._jobs = staying
        return update

    def ready_counts(self) -> dict[Priority, int]:
        """Jobs that may get rows in the next call, by priority."""
        counts = dict.fromkeys(Priority, 0)
        for job in self._jobs:
            if job.schedulable:
                counts[self._seats[job].priority] += 1
        return counts

    def rows_left(self, up_to: Priority) -> int:
        """Steps still to compute (inversion and generation) by ready jobs of priority ``up_to`` or more urgent."""
        return sum(
            2 * job.steps - job.inversion_done - job.generation_done
            for job in self._jobs
            if job.schedulable and self._seats[job].priority <= up_to
        )
