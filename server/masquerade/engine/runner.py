"""Turns a StepPlan into one packed UNet call plus the fused solver step.

Row r of a plan is one job's step; the UNet sees rows [0, R) under the
unconditional branch and rows [R, 2R) under the conditional one, each with its
own timestep, text embedding, identity embedding and IP-Adapter scale
(docs/design.md section 1.2, steps 5 and 6). The runner reads job tensors and
returns new ones; the scheduler's update applies them to the jobs, so job state
changes only on the loop's thread, between calls.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from masquerade.engine import solver
from masquerade.engine.job_state import Phase
from masquerade.engine.scheduler import StepPlan, StepSlice
from masquerade.models.optimize import ID_EMBED_DIM, sdxl_time_ids


class TextConditioning:
    """Cache of SDXL prompt embeddings; they depend on the prompt only (docs/design.md 1.2 step 3).

    ``None`` is the all-zeros conditioning c_zero (SDXL's force_zeros_for_empty_prompt);
    ``""`` is c_empty, the encoders run on the empty prompt, which is not zero.
    """

    def __init__(self, pipe, device: torch.device, dtype: torch.dtype, max_entries: int = 256):
        self._pipe = pipe
        self._device = device
        self._dtype = dtype
        self._max_entries = max_entries
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._lock = threading.Lock()
        embeds, pooled = self.get("")
        self._zero = (torch.zeros_like(embeds), torch.zeros_like(pooled))

    def get(self, prompt: str | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeds [77, D], pooled [P]) for a prompt; None gives the zero conditioning."""
        if prompt is None:
            return self._zero
        with self._lock:
            cached = self._cache.get(prompt)
            if cached is None:
                with torch.inference_mode():
                    embeds, _, pooled, _ = self._pipe.encode_prompt(
                        prompt, device=self._device, num_images_per_prompt=1, do_classifier_free_guidance=False
                    )
                cached = (embeds[0].to(self._dtype), pooled[0].to(self._dtype))
                if len(self._cache) >= self._max_entries:
                    self._cache.pop(next(iter(self._cache)))
                self._cache[prompt] = cached
            return cached


@dataclass
class SliceResult:
    """What one slice's rows produced. For inversion ``latents`` are noise maps, else new latents."""

    slice: StepSlice
    latents: torch.Tensor = field(repr=False)  # [count, C, h, w]
    last_output: torch.Tensor = field(repr=False)  # [C, h, w] model output of the slice's last step


UNetFn = Callable[..., torch.Tensor]


def host_to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device``; a CPU tensor goes to CUDA through pinned memory with ``non_blocking=True``.

    A copy from pageable memory makes the host wait until the GPU has finished everything queued
    before it (a UNet call, say); a pinned, non-blocking one is just queued behind it. The caching
    host allocator keeps the pinned block until the copy has run.
    """
    if tensor.device == device or device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


class UNetRunner:
    """Executes plans on one model bundle. Thread-confined: the engine calls it from one worker."""

    def __init__(self, models, conditioning: TextConditioning, unet_fn: UNetFn):
        self.models = models
        self.conditioning = conditioning
        self.device = models.device
        self.dtype = models.dtype
        self.unet_fn = unet_fn
        # Made once, inside inference mode like every call's inputs (a tensor made outside it
        # carries other dispatch keys, and torch.compile's guards would see a new input).
        with torch.inference_mode():
            self._time_ids = sdxl_time_ids(models.face_size, 1, self.device, self.dtype)[0]
            self._null_id = torch.zeros(ID_EMBED_DIM, device=self.device, dtype=self.dtype)

    @torch.inference_mode()
    def run(self, plan: StepPlan) -> list[SliceResult]:
        rows = self._gather_rows(plan)
        eps = self.unet_fn(*rows.unet_inputs)
        eps_uncond, eps_cond = eps[: rows.count], eps[rows.count :]
        return self._solve(plan, rows, eps_uncond, eps_cond)

    def _gather_rows(self, plan: StepPlan) -> _Rows:
        """The packed call's inputs, built without a host-device sync.

        Per-row numbers (timesteps, IP-Adapter scales) travel in one small pinned host buffer
        copied with ``non_blocking=True``; everything else (latents, coefficients, text and
        identity embeddings) is already on the device and is sliced, expanded and concatenated
        there. Every input comes out contiguous.
        """
        latents, coeffs, host_timesteps, host_scales = [], [], [], []
        uncond_text, cond_text, uncond_pooled, cond_pooled, cond_ids = [], [], [], [], []
        empty_embeds, empty_pooled = self.conditioning.get("")
        for piece in plan.slices:
            job, count = piece.job, piece.count
            steps = slice(piece.start, piece.start + count)
            if piece.phase is Phase.INVERSION:
                latents.append(job.noisy_latents[steps])
                # Inversion: both halves under the null identity; uncond c_zero, cond c_empty.
                uncond_embeds, uncond_pool = self.conditioning.get(None)
                identity = self._null_id
            else:
                latents.append(job.latent[None])
                # Generation: uncond (attribute prompt or c_zero, null id), cond (c_empty, s_id e).
                uncond_embeds, uncond_pool = self.conditioning.get(job.attribute_prompt)  # None: c_zero
                identity = job.identity.to(self.dtype)
            host_timesteps += [int(t) for t in job.trajectory.timesteps[steps]]
            host_scales += [float(job.ip_adapter_scale)] * count
            coeffs.append(job.coeffs[steps])
            uncond_text.append(uncond_embeds.expand(count, -1, -1))
            uncond_pooled.append(uncond_pool.expand(count, -1))
            cond_text.append(empty_embeds.expand(count, -1, -1))
            cond_pooled.append(empty_pooled.expand(count, -1))
            cond_ids.append(identity.expand(count, -1))
        count = len(host_timesteps)
        # Timesteps (< 1000) are exact in float32: one transfer carries both per-row tables.
        table = self._to_device(torch.tensor(host_timesteps + host_scales, dtype=torch.float32))
        t = table[:count].long()
        x = torch.cat(latents).to(self.device)  # [R, C, h, w], float32 job state
        unet_inputs = (
            torch.cat([x, x]).to(self.dtype),
            torch.cat([t, t]),
            torch.cat(uncond_text + cond_text),
            torch.cat(uncond_pooled + cond_pooled),
            self._time_ids.expand(2 * count, -1).contiguous(),
            torch.cat([self._null_id.expand(count, -1)] + cond_ids)[:, None, :],  # [2R, 1, 512]
            table[count:].to(self.dtype).repeat(2),  # [2R] IP-Adapter scales
        )
        return _Rows(count=count, x=x, coeffs=torch.cat(coeffs), unet_inputs=unet_inputs)

    def _to_device(self, host: torch.Tensor) -> torch.Tensor:
        return host_to_device(host, self.device)

    def _solve(self, plan: StepPlan, rows: _Rows, eps_uncond, eps_cond) -> list[SliceResult]:
        results: list[SliceResult] = []
        offset = 0
        for piece in plan.slices:
            end = offset + piece.count
            part = slice(offset, end)
            job = piece.job
            x, coeffs = rows.x[part], rows.coeffs[part]
            if piece.phase is Phase.GENERATION:
                prev = job.previous_output if job.previous_output is not None else torch.zeros_like(job.latent)
                noise = job.noise_maps[piece.start : piece.start + 1]
                x_next, m = solver.generation_step(eps_uncond[part], eps_cond[part], x, prev[None], noise, coeffs)
                results.append(SliceResult(piece, x_next, m[-1]))
            else:
                # The second-order term of step i needs m_{i-1}. For the slice's first step it
                # is in the job's history; for the others it is an output of this very pass
                # (m depends on x_{t_i} and the UNet output only). So a first pass gives every
                # m (and the first step's z), a second pass over the later steps, with m_{i-1}
                # as their history, gives their z with the very operations that generation
                # applies in reverse: mu is rounded the same way on both sides, which a
                # correction afterwards (z - (mean_from_m1 / noise_scale) m_{i-1}) would not do.
                prev = torch.zeros_like(x)
                if job.previous_output is not None:
                    prev[0] = job.previous_output
                x_next = job.noisy_latents[piece.start + 1 : piece.start + piece.count + 1]
                eps_u, eps_c = eps_uncond[part], eps_cond[part]
                noise, m = solver.inversion_step(eps_u, eps_c, x, prev, x_next, coeffs)
                if piece.count > 1:
                    later, _ = solver.inversion_step(eps_u[1:], eps_c[1:], x[1:], m[:-1], x_next[1:], coeffs[1:])
                    noise = torch.cat([noise[:1], later])
                results.append(SliceResult(piece, noise, m[-1]))
            offset = end
        return results


@dataclass
class _Rows:
    count: int
    x: torch.Tensor  # [R, C, h, w]
    coeffs: torch.Tensor  # [R, NUM_COEFFS]
    unet_inputs: tuple
