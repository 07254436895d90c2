"""Iteration-level batching of diffusion steps: decides what the next UNet call holds.

``StepScheduler.plan()`` packs classifier-free-guidance pairs ("rows") from
whatever jobs are ready: up to ``inversion_chunk`` inversion steps of one job
at once (they are independent, DESIGN section 1 step 5), and one generation
step per generating job, at whatever timestep each job is. Oldest jobs first,
so a job admitted earlier is never starved by later ones. Imports neither
torch nor grpc: it only reads job statuses and cursors.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from masquerade.engine.job_state import BatchKey, StepPhase

if TYPE_CHECKING:
    from masquerade.engine.job import FaceJob


@dataclass(frozen=True)
class StepSlice:
    """``count`` consecutive steps of one job, starting at step ``start``."""

    job: FaceJob
    phase: StepPhase
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


class StepScheduler:
    """Holds the diffusing jobs in admission order and plans one UNet call at a time."""

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

    def drop_finished(self) -> list[FaceJob]:
        """Remove jobs that left diffusion (done, failed, cancelled, or ready to decode); return them."""
        leaving = [job for job in self._jobs if not job.status.diffusing]
        if leaving:
            self._jobs = [job for job in self._jobs if job.status.diffusing]
        return leaving

    def plan(self) -> StepPlan | None:
        """The next call's rows, or None when no job is diffusing."""
        ready = [job for job in self._jobs if job.status.diffusing]
        if not ready:
            return None
        plan = StepPlan(key=ready[0].batch_key)
        room = self.max_rows
        for job in ready:
            if room == 0:
                break
            if job.batch_key != plan.key:
                continue
            if job.phase is StepPhase.GENERATION:
                plan.slices.append(StepSlice(job, StepPhase.GENERATION, job.generation_done, 1))
                room -= 1
            else:
                count = min(self.inversion_chunk, job.remaining_inversion_steps, room)
                plan.slices.append(StepSlice(job, StepPhase.INVERSION, job.inversion_done, count))
                room -= count
        return plan
