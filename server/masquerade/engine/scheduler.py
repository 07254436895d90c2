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

Who goes first (docs/design.md, "Priorities"): every call is filled in this order,

1. *aged* bulk jobs: ready bulk jobs that got no row in the last ``aging_calls``
   calls, oldest first;
2. interactive jobs;
3. the other bulk jobs;

and within 2 and 3 the clients take turns (each client's first job, then each
client's second, ...; admission order breaks ties), so two clients of the same
priority share the rows whatever their concurrency. The call's latent shape is
that of the first job in this order. Invariants: a call never exceeds
``max_batch``; a ready bulk job goes at most ``aging_calls`` calls without a row
before it is aged, and aged jobs are served oldest first ahead of everything
else, so it waits at most ``aging_calls + ceil(A / rows per call)`` calls, A
being the aged jobs ahead of it; nothing is ever restarted or thrown away:
changing priority only changes who is in the next call.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
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


DEFAULT_AGING_CALLS = 16
"""Calls a ready bulk job may go without a row before it is served ahead of interactive work."""


@dataclass
class _Seat:
    """What the scheduler knows of a job besides its diffusion state."""

    priority: Priority
    client: str
    admitted: int  # admission order
    last_row_call: int  # the call count when the job last got a row (or joined)


class StepScheduler:
    """Holds the diffusing jobs; plans one UNet call at a time by priority and applies its outputs."""

    def __init__(self, max_batch: int, inversion_chunk: int, aging_calls: int = DEFAULT_AGING_CALLS):
        if max_batch < 2:
            raise ValueError(f"max_batch must be at least 2 (one CFG pair), got {max_batch}")
        if inversion_chunk < 1:
            raise ValueError(f"inversion_chunk must be at least 1, got {inversion_chunk}")
        if aging_calls < 1:
            raise ValueError(f"aging_calls must be at least 1, got {aging_calls}")
        self.max_rows = max_batch // 2
        self.inversion_chunk = inversion_chunk
        self.aging_calls = aging_calls
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
            self._seats[job] = _Seat(Priority(priority), client, self._admitted, self.calls)
            self._admitted += 1

    def priority_of(self, job: FaceJob) -> Priority:
        return self._seats[job].priority

    def waited_calls(self, job: FaceJob) -> int:
        """Calls since the job last got a row (or joined)."""
        return self.calls - self._seats[job].last_row_call

    def _aged(self, job: FaceJob) -> bool:
        seat = self._seats[job]
        return seat.priority is Priority.BULK and self.calls - seat.last_row_call >= self.aging_calls

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
        ready = self.urgency_order()
        if not ready:
            return None
        plan = StepPlan(key=ready[0].batch_key)
        room = self.max_rows
        for job in ready:
            if room == 0:
                break
            if job.batch_key != plan.key:
                continue
            if job.phase is Phase.GENERATION:
                plan.slices.append(StepSlice(job, Phase.GENERATION, job.generation_done, 1))
                room -= 1
            else:
                count = min(self.inversion_chunk, job.remaining_inversion_steps, room)
                plan.slices.append(StepSlice(job, Phase.INVERSION, job.inversion_done, count))
                room -= count
        return plan

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
        for output in outputs:
            piece, job = output.slice, output.slice.job
            if not job.schedulable:
                continue
            seat = self._seats[job]
            seat.last_row_call = self.calls
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

    def rows_left(self, up_to: Priority) -> int:
        """Steps still to compute (inversion and generation) by ready jobs of priority ``up_to`` or more urgent."""
        return sum(
            2 * job.steps - job.inversion_done - job.generation_done
            for job in self._jobs
            if job.schedulable and self._seats[job].priority <= up_to
        )
