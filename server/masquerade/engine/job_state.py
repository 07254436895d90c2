"""Job statuses, request phases and batch keys: shared by the scheduler (no torch), the jobs and the events."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class JobStatus(enum.IntEnum):
    """Ordered so that ``status >= JobStatus.DONE`` means finished."""

    QUEUED = 0
    ENCODED = 1
    INVERTING = 2
    GENERATING = 3
    DECODED = 4
    DONE = 5
    FAILED = 6
    CANCELLED = 7

    @property
    def finished(self) -> bool:
        return self >= JobStatus.DONE

    @property
    def diffusing(self) -> bool:
        return self in (JobStatus.INVERTING, JobStatus.GENERATING)


class Phase(enum.Enum):
    """Where a request is; a diffusing job is in INVERSION or GENERATION (docs/design.md 1.2 steps 5 and 6)."""

    PREPROCESS = "preprocess"
    INVERSION = "inversion"
    GENERATION = "generation"
    POSTPROCESS = "postprocess"


class Priority(enum.IntEnum):
    """How urgently a request's work runs; the values are the wire enum's, lower runs first."""

    INTERACTIVE = 1  # someone is waiting for this one photo
    BULK = 2  # throughput work: archives, pipelines, nightly batches

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True)
class BatchKey:
    """Jobs share a UNet call only when these match (everything else is per row)."""

    latent_shape: tuple[int, int, int]
