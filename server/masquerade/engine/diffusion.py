"""Reverse personalization on face crops: encode, make jobs, run steps, decode.

Knows tensors and the algorithm of docs/design.md section 1, not requests or pixels
beyond the aligned crops. The async engine drives the same scheduler and
runner step by step; ``run_to_completion`` is the synchronous loop used by
tests and offline tools.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Sequence

import numpy as np
import torch

from masquerade.engine.job import FaceJob
from masquerade.engine.noise import face_noise_seed, inversion_noise  # noqa: F401  (face_noise_seed re-exported)
from masquerade.engine.request import ReversePersonalizationParams
from masquerade.engine.runner import TextConditioning, UNetRunner, host_to_device
from masquerade.engine.scheduler import StepScheduler
from masquerade.engine.trajectory import Trajectory, build_trajectory
from masquerade.models.optimize import DEFAULT_COMPILE_MODE, optimized_unet_fn

TRAJECTORY_CACHE_SIZE = 64
DEFAULT_VAE_CHUNK = 4  # faces per VAE encode/decode call (--vae-chunk)


class DiffusionCore:
    def __init__(
        self,
        models,
        *,
        max_batch: int = 16,
        compile: bool | None = False,
        compile_mode: str = DEFAULT_COMPILE_MODE,
        attention: str = "sdpa",
        unet_fn=None,
        buckets: Sequence[int] | None = None,
        compile_cache: str | None = None,
        vae_chunk: int = DEFAULT_VAE_CHUNK,
    ):
        if vae_chunk < 1:
            raise ValueError(f"vae_chunk must be at least 1, got {vae_chunk}")
        self.models = models
        self.max_batch = max_batch
        self.vae_chunk = vae_chunk
        self.device = models.device
        self.dtype = models.dtype
        # Job state (latents, noise maps, solver history, coefficients) and the solver's arithmetic:
        # float32 under an fp16/fp32 UNet, float64 under a float64 one, so that a float64 model set
        # runs the whole trajectory in float64 (the reconstruction invariant's exact-arithmetic check).
        self.state_dtype = torch.float64 if models.dtype == torch.float64 else torch.float32
        self.conditioning = TextConditioning(models.pipe, models.device, models.dtype)
        # The same prepared UNet on every device (fused LoRA and attention, per-sample IP-Adapter
        # scale); compiled per batch bucket when asked (compile=None: on CUDA only). Benchmarks may
        # pass their own.
        if unet_fn is None:
            unet_fn = optimized_unet_fn(
                models,
                max_batch=max_batch,
                compile=compile,
                compile_mode=compile_mode,
                attention=attention,
                buckets=buckets,
                compile_cache=compile_cache,
            )
        self.runner = UNetRunner(models, self.conditioning, unet_fn)
        self._alphas_cumprod = models.alphas_cumprod.double().cpu().numpy()
        # Keyed by the client-chosen (steps, skip): bounded, so odd values cannot grow it without end.
        self.trajectory = functools.lru_cache(maxsize=TRAJECTORY_CACHE_SIZE)(self._build_trajectory)
        self._vae_lock = threading.Lock()

    # ---- trajectories and jobs -------------------------------------------------

    def _build_trajectory(self, steps: int, skip: float) -> Trajectory:
        return build_trajectory(self._alphas_cumprod, int(steps), float(skip))

    def make_job(
        self,
        request_id: str,
        face_index: int,
        clean_latent: torch.Tensor,  # [C, h, w] x_0 (kept in the state dtype)
        identity: torch.Tensor,  # [512] unit ArcFace embedding e
        params: ReversePersonalizationParams,
        noise_index: int | None = None,  # the noise stream, if not the face's index (a video track's)
    ) -> FaceJob:
        trajectory = self.trajectory(params.steps, params.skip)
        # Edit-friendly inversion: every x_{t_i} gets its own fresh Gaussian noise (engine/noise.py).
        stream = face_index if noise_index is None else noise_index
        noise = inversion_noise(
            params.seed, stream, params.noise, trajectory.steps, tuple(clean_latent.shape), self.device
        )
        # Host tables travel through pinned memory without blocking (no wait for the UNet's queue).
        state = self.state_dtype
        x0 = host_to_device(clean_latent.detach().to(state), self.device)
        alphas = host_to_device(torch.from_numpy(trajectory.alphas).to(state).view(-1, 1, 1, 1), self.device)
        sigmas = host_to_device(torch.from_numpy(trajectory.sigmas).to(state).view(-1, 1, 1, 1), self.device)
        noisy = torch.cat([alphas * x0 + sigmas * noise.to(state), x0[None]])
        table = trajectory.coefficients(
            params.guidance_scale, dtype=np.float64 if state == torch.float64 else np.float32
        )
        coeffs = host_to_device(torch.from_numpy(table), self.device)
        return FaceJob(
            request_id=request_id,
            face_index=face_index,
            trajectory=trajectory,
            coeffs=coeffs,
            noisy_latents=noisy,
            identity=host_to_device(params.id_emb_scale * identity.float(), self.device),
            attribute_prompt=params.attribute_prompt,
            ip_adapter_scale=params.ip_adapter_scale,
        )

    # ---- VAE and identity ------------------------------------------------------

    # The VAE runs in fp32 at 1024^2 (SDXL's overflows in fp16): its activations are ~1 GiB per
    # face, so a request's faces go through in chunks of ``vae_chunk`` (--vae-chunk), never all at
    # once next to a UNet call that needs the memory too. Each chunk's result is the same as the
    # whole batch's: the VAE treats samples independently.

    @torch.inference_mode()
    def encode(self, crops: np.ndarray) -> torch.Tensor:
        """[F, S, S, 3] uint8 RGB -> clean latents x_0 [F, C, S/8, S/8] float32 (the posterior mean)."""
        vae = self.models.vae
        parts = []
        for start in range(0, max(len(crops), 1), self.vae_chunk):
            chunk = torch.from_numpy(np.ascontiguousarray(crops[start : start + self.vae_chunk])).to(self.device)
            images = (chunk.permute(0, 3, 1, 2).float() / 127.5 - 1.0).to(vae.dtype)
            with self._vae_lock:
                parts.append(vae.encode(images).latent_dist.mean.float())
        return torch.cat(parts) * vae.config.scaling_factor

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """[F, C, h, w] latents -> [F, S, S, 3] uint8 RGB."""
        vae = self.models.vae
        parts = []
        for start in range(0, max(len(latents), 1), self.vae_chunk):
            chunk = latents[start : start + self.vae_chunk].to(self.device, vae.dtype) / vae.config.scaling_factor
            with self._vae_lock:
                images = vae.decode(chunk, return_dict=False)[0]
            images = ((images.float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
            parts.append(images.permute(0, 2, 3, 1).cpu().numpy())
        return np.concatenate(parts)

    @torch.inference_mode()
    def embed_identity(self, arcface_crops: np.ndarray) -> torch.Tensor:
        """[F, 112, 112, 3] uint8 RGB -> [F, 512] unit ArcFace embeddings (float32, on CPU)."""
        # onnxruntime (masquerade.models.arcface) takes the crops as they are, on the CPU.
        return self.models.arcface(np.ascontiguousarray(arcface_crops.transpose(0, 3, 1, 2)))

    # ---- synchronous loop --------------------------------------------------------

    def run_to_completion(self, jobs: list[FaceJob], *, max_batch: int | None = None, inversion_chunk: int = 8) -> None:
        """Run jobs through inversion and generation with continuous batching."""
        scheduler = StepScheduler(max_batch=max_batch or self.max_batch, inversion_chunk=inversion_chunk)
        scheduler.add(jobs)
        while (plan := scheduler.plan()) is not None:
            scheduler.update(self.runner.run(plan))
