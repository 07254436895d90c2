"""Iteration-level batching of diffusion steps: what the next UNet call holds, and what its outputs change.

The engine loop is three steps: ``plan()`` packs the next call, the runner
executes it, ``update()`` applies its outputs. ``plan()`` packs
classifier-free-guidance pairs ("rows") from whatever jobs are ready: up to
``inversion_chunk`` inversion steps of one job at once (they are independent,
docs/design.md 1.2 step 5), and one generation step per generating job, at
whatever timestep each job is. Oldest jobs first, so a job admitted earlier is
never starved by later ones. ``update()`` is the only place job state changes
once a job has joined: outputs are recorded, failures and the cancels marked
since the last call are applied (releasing tensors), and jobs that left
diffusion are handed back. Imports neither torch nor grpc.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from masquerade.engine.job_state import BatchKey, Phase

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


class StepScheduler:
    """Holds the diffusing jobs in admission order; plans one UNet call at a time and applies its outputs."""

    def __init__(self, max_batch: int, inversion_chunk: int):
        if max_batch < 2:
            raise ValueError(f"max_batch must be at least 2 (one CFG pair), got {max_batch}")
        if inversion_chunk < 1:
            raise ValueError(f"inversion_chunk must be at least 1, got {inversion_chunk}")
        self.max_rows = max_batch // 2
        self.inversion_chunk = inversion_chunk
        self._jobs: list[FaceJob] = []

    def __len__(self) -> int:
        return len(self._jobs)

    @property
    def jobs(self) -> tuple[FaceJob, ...]:
        return tuple(self._jobs)

    def add(self, jobs: Iterable[FaceJob]) -> None:
        for job in jobs:
            job.start()
            self._jobs.append(job)

    def plan(self) -> StepPlan | None:
        """The next call's rows, or None when no job can run (none diffusing, or all marked to stop)."""
        ready = [job for job in self._jobs if job.schedulable]
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
        for output in outputs:
            piece, job = output.slice, output.slice.job
            if not job.schedulable:
                continue
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
        self._jobs = staying
        return update
