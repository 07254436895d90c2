"""One face's diffusion state: a small state machine with a step cursor per phase.

The scheduler reads statuses and cursors; the runner reads the tensors and
hands results back through the ``record_*`` methods, the only mutators.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from masquerade.engine.job_state import BatchKey, JobStatus, StepPhase
from masquerade.engine.trajectory import Trajectory

_job_ids = itertools.count(1)


@dataclass(eq=False)
class FaceJob:
    request_id: str
    face_index: int
    trajectory: Trajectory = field(repr=False)
    coeffs: torch.Tensor = field(repr=False)  # [N, NUM_COEFFS] float32, on the engine's device
    noisy_latents: torch.Tensor = field(repr=False)  # [N + 1, C, h, w]: x_{t_0..t_{N-1}} then x_0
    identity: torch.Tensor = field(repr=False)  # [512] s_id * e, the generation's identity embedding
    attribute_prompt: str = field(repr=False)
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

    def __post_init__(self) -> None:
        self.noise_maps = torch.empty_like(self.noisy_latents[:-1])

    @property
    def steps(self) -> int:
        return self.trajectory.steps

    @property
    def batch_key(self) -> BatchKey:
        return BatchKey(tuple(self.noisy_latents.shape[1:]))

    @property
    def phase(self) -> StepPhase | None:
        if self.status is JobStatus.INVERTING:
            return StepPhase.INVERSION
        if self.status is JobStatus.GENERATING:
            return StepPhase.GENERATION
        return None

    @property
    def remaining_inversion_steps(self) -> int:
        return self.steps - self.inversion_done

    def start(self) -> None:
        self.status = JobStatus.INVERTING

    def record_inversion(self, start: int, noise: torch.Tensor, last_output: torch.Tensor) -> None:
        """Store noise maps of steps [start, start + len(noise)); they must follow the previous ones."""
        assert start == self.inversion_done, (start, self.inversion_done)
        self.noise_maps[start : start + len(noise)] = noise
        self.inversion_done += len(noise)
        self.previous_output = last_output
        if self.inversion_done == self.steps:
            # Generation starts from the inversion's first noisy latent with a fresh
            # solver history (DESIGN section 1: the reset keeps reconstruction exact).
            self.latent = self.noisy_latents[0].clone()
            self.previous_output = None
            self.noisy_latents = self.noisy_latents[:1]  # the rest is no longer needed
            self.status = JobStatus.GENERATING

    def record_generation(self, latent: torch.Tensor, model_output: torch.Tensor) -> None:
        self.latent = latent
        self.previous_output = model_output
        self.generation_done += 1
        if self.generation_done == self.steps:
            self.noise_maps = None
            self.previous_output = None
            self.status = JobStatus.DECODED

    def fail(self, reason: str) -> None:
        if not self.status.finished:
            self.status, self.failure = JobStatus.FAILED, reason
            self._release()

    def cancel(self) -> None:
        if not self.status.finished:
            self.status = JobStatus.CANCELLED
            self._release()

    def finish(self) -> None:
        self.status = JobStatus.DONE

    def _release(self) -> None:
        self.noise_maps = self.latent = self.previous_output = None
        self.noisy_latents = self.noisy_latents[:0]
