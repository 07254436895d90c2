"""One face's diffusion state: a small state machine with a step cursor per phase.

The scheduler reads statuses and cursors and, in its update step, applies a
UNet call's outputs through the ``record_*`` methods. A cancel or failure
asked for from elsewhere (a client cancel, a deadline, a failed request) only
*marks* a diffusing job; the scheduler applies the mark between UNet calls,
so no tensor a call in flight reads is ever released under it (docs/design.md
section 2: jobs join and leave between UNet calls).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from masquerade.engine.job_state import BatchKey, JobStatus, Phase
from masquerade.engine.trajectory import Trajectory

_job_ids = itertools.count(1)


@dataclass(eq=False)
class FaceJob:
    request_id: str
    face_index: int
    trajectory: Trajectory = field(repr=False)
    coeffs: torch.Tensor = field(repr=False)  # [N, NUM_COEFFS] in the state dtype (float32; float64 models: float64)
    # [N + 1, C, h, w]: x_{t_0..t_{N-1}} then x_0; dropped once the inversion is done.
    noisy_latents: torch.Tensor | None = field(repr=False)
    identity: torch.Tensor = field(repr=False)  # [512] s_id * e, the generation's identity embedding
    attribute_prompt: str | None = field(repr=False)  # None: c_zero; "" is c_empty (docs/design.md 1.2 step 3)
    ip_adapter_scale: float = 1.0
    job_id: int = field(default_factory=lambda: next(_job_ids))
    status: JobStatus = JobStatus.ENCODED
    failure: str = ""
    # Inversion: steps [0, inversion_done) have their noise maps.
    inversion_done: int = 0
    # Generation: steps [0, generation_done) have been applied to ``latent``.
    generation_done: int = 0
    noise_maps: torch.Tensor | None = field(default=None, repr=False)  # [N, C, h, w]
    latent: torch.Tensor | None = field(default=None, repr=False)  # [C, h, w] current generation latent
    previous_output: torch.Tensor | None = field(default=None, repr=False)  # [C, h, w] last model output m
    # A cancel or failure waiting for the scheduler's next update: (CANCELLED or FAILED, reason).
    pending_stop: tuple[JobStatus, str] | None = None
    batch_key: BatchKey = field(init=False)

    def __post_init__(self) -> None:
        self.batch_key = BatchKey(tuple(self.noisy_latents.shape[1:]))
        self.noise_maps = torch.empty_like(self.noisy_latents[:-1])

    @property
    def steps(self) -> int:
        return self.trajectory.steps

    @property
    def phase(self) -> Phase | None:
        if self.status is JobStatus.INVERTING:
            return Phase.INVERSION
        if self.status is JobStatus.GENERATING:
            return Phase.GENERATION
        return None

    @property
    def remaining_inversion_steps(self) -> int:
        return self.steps - self.inversion_done

    @property
    def schedulable(self) -> bool:
        """Diffusing and not marked to stop: the scheduler may give it rows in the next call."""
        return self.status.diffusing and self.pending_stop is None

    # ---- called by the scheduler (the engine loop's thread, no UNet call in flight) ----

    def start(self) -> None:
        self.status = JobStatus.INVERTING

    def record_inversion(self, start: int, noise: torch.Tensor, last_output: torch.Tensor) -> None:
        """Store noise maps of steps [start, start + len(noise)); they must follow the previous ones."""
        assert start == self.inversion_done, (start, self.inversion_done)
        self.noise_maps[start : start + len(noise)] = noise
        self.inversion_done += len(noise)
        # A view would keep the whole call's outputs alive; one latent is what must stay.
        self.previous_output = last_output.clone()
        if self.inversion_done == self.steps:
            # Generation starts from the inversion's first noisy latent with a fresh
            # solver history (docs/design.md 1.2: the reset keeps reconstruction exact).
            # Clone it: a view would keep all N + 1 noisy latents alive through generation.
            self.latent = self.noisy_latents[0].clone()
            self.previous_output = None
            self.noisy_latents = None
            self.status = JobStatus.GENERATING

    def record_generation(self, latent: torch.Tensor, model_output: torch.Tensor) -> None:
        self.latent = latent
        self.previous_output = model_output
        self.generation_done += 1
        if self.generation_done == self.steps:
            self.noise_maps = None
            self.previous_output = None
            self.status = JobStatus.DECODED

    def apply_pending_stop(self) -> bool:
        """Turn a mark into the final status and release the tensors; True if there was one."""
        if self.pending_stop is None:
            return False
        status, reason = self.pending_stop
        self.pending_stop = None
        self._stop(status, reason)
        return True

    # ---- called from anywhere on the engine loop's thread ----

    def cancel(self) -> None:
        self._request_stop(JobStatus.CANCELLED, "")

    def fail(self, reason: str) -> None:
        self._request_stop(JobStatus.FAILED, reason)

    def finish(self) -> None:
        """The generated latent was decoded: nothing of this face needs to stay."""
        self.status = JobStatus.DONE
        self._release()

    def _request_stop(self, status: JobStatus, reason: str) -> None:
        if self.status.finished:
            return
        if self.status.diffusing:
            # A UNet call may be reading this job's tensors right now: only mark it.
            if self.pending_stop is None:
                self.pending_stop = (status, reason)
        else:
            self._stop(status, reason)  # not in the scheduler: no call can be reading it

    def _stop(self, status: JobStatus, reason: str) -> None:
        if self.status.finished:
            return
        self.status = status
        if status is JobStatus.FAILED:
            self.failure = reason
        self._release()

    def _release(self) -> None:
        self.noise_maps = self.latent = self.previous_output = self.noisy_latents = None
