"""Timesteps and per-step solver coefficients of one trajectory (docs/design.md section 1).

Pure float64 arithmetic on the training schedule; the result is a table with
one row of ``masquerade_kernels.reference`` coefficients per step, so a packed
UNet call can mix rows of any trajectories.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from masquerade_kernels.coefficients import (
    GUIDANCE,
    MEAN_FROM_M,
    MEAN_FROM_M1,
    MEAN_FROM_X,
    NOISE_SCALE,
    NUM_COEFFS,
    X0_FROM_EPS,
    X0_FROM_X,
)

TRAIN_TIMESTEPS = 1000


def scaled_linear_alphas_cumprod(beta_start: float = 0.00085, beta_end: float = 0.012, steps: int = 1000) -> np.ndarray:
    """SDXL's training schedule: betas linear in sqrt space."""
    betas = np.linspace(beta_start**0.5, beta_end**0.5, steps, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


def inversion_timesteps(steps: int, skip: float) -> np.ndarray:
    """t_i = int(linspace(T - skip*T - 1, 1, N)), descending; the paper's 299..1 for the defaults."""
    first = TRAIN_TIMESTEPS - skip * TRAIN_TIMESTEPS - 1
    timesteps = np.linspace(first, 1, steps).astype(np.int64)
    if steps > 1 and np.any(np.diff(timesteps) >= 0):
        raise ValueError(
            f"steps={steps} with skip={skip} repeats timesteps between {int(first)} and 1; "
            f"use at most {int(first)} steps or a smaller skip"
        )
    if timesteps[-1] < 1:
        raise ValueError(f"skip={skip} leaves no timestep above 0; use a skip below {1 - 2 / TRAIN_TIMESTEPS}")
    return timesteps


@dataclass(frozen=True)
class Trajectory:
    """The steps of one (N, skip) run; step i goes from ``timesteps[i]`` to the next, the last to discrete t = 0."""

    timesteps: np.ndarray  # [N] int64, descending
    alphas: np.ndarray  # [N] float64, sqrt(alpha_bar) at each timestep
    sigmas: np.ndarray  # [N] float64, sqrt(1 - alpha_bar)
    base_coeffs: np.ndarray  # [N, NUM_COEFFS] float64; the guidance column is filled per job

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    def coefficients(self, guidance_scale: float, dtype: np.dtype | type = np.float32) -> np.ndarray:
        """[N, NUM_COEFFS] rows for a job with this guidance scale, in the job's state dtype.

        float32 for the engine (the kernels' layout); float64 where the whole trajectory runs in
        float64 (the reconstruction test's exact-arithmetic check, docs/design.md 1.2).
        """
        table = self.base_coeffs.copy()
        table[:, GUIDANCE] = guidance_scale
        return table.astype(dtype)


def _lambda(alpha: float, sigma: float) -> float:
    return math.log(alpha) - math.log(sigma)


def build_trajectory(alphas_cumprod: np.ndarray, steps: int, skip: float) -> Trajectory:
    """Per-step coefficients of DPM-Solver++(2M) SDE, reset at the start of the run.

    The first step is first order (no history); every later step is second
    order using the previous step's output, the last one included: it goes from
    t_{N-1} (1 for the defaults) to the discrete t = 0 of the training schedule,
    where sigma_0 = sqrt(1 - alpha_bar_0) = sqrt(beta_0) is small but not zero.
    That is what the research code's scheduler does (diffusers'
    ``final_sigmas_type="sigma_min"``, no lower-order final step), and the
    inversion's x_0 is the target of that step, so reconstruction stays exact.
    """
    alphas_cumprod = np.asarray(alphas_cumprod, dtype=np.float64)
    timesteps = inversion_timesteps(steps, skip)
    alpha_bar = alphas_cumprod[timesteps]
    alphas, sigmas = np.sqrt(alpha_bar), np.sqrt(1.0 - alpha_bar)
    # Where each step lands: the next timestep, then discrete t = 0 (not sigma = 0).
    alpha_bar_next = np.append(alpha_bar[1:], alphas_cumprod[0])
    alphas_next, sigmas_next = np.sqrt(alpha_bar_next), np.sqrt(1.0 - alpha_bar_next)
    coeffs = np.zeros((steps, NUM_COEFFS), dtype=np.float64)
    for i in range(steps):
        alpha_s, sigma_s = alphas[i], sigmas[i]
        alpha_t, sigma_t = alphas_next[i], sigmas_next[i]
        coeffs[i, X0_FROM_X] = 1.0 / alpha_s
        coeffs[i, X0_FROM_EPS] = sigma_s / alpha_s
        h = _lambda(alpha_t, sigma_t) - _lambda(alpha_s, sigma_s)
        data_weight = alpha_t * (1.0 - math.exp(-2.0 * h))
        coeffs[i, MEAN_FROM_X] = (sigma_t / sigma_s) * math.exp(-h)
        coeffs[i, NOISE_SCALE] = sigma_t * math.sqrt(1.0 - math.exp(-2.0 * h))
        if i == 0:
            coeffs[i, MEAN_FROM_M] = data_weight
        else:
            h_prev = _lambda(alpha_s, sigma_s) - _lambda(alphas[i - 1], sigmas[i - 1])
            r = h_prev / h
            # m + D1/2 with D1 = (m - m1)/r, written as weights on m and m1.
            coeffs[i, MEAN_FROM_M] = data_weight * (1.0 + 0.5 / r)
            coeffs[i, MEAN_FROM_M1] = -data_weight * 0.5 / r
    return Trajectory(timesteps=timesteps, alphas=alphas, sigmas=sigmas, base_coeffs=coeffs)
