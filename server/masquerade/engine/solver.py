"""Batched, stateless guidance + DPM-Solver++ step on per-row coefficients.

The solver history lives in the jobs, not here, so one call serves rows at
different steps of different trajectories. On CUDA the fused Triton kernels
run; on CPU the PyTorch reference, which is also their test oracle (the
kernels' own tests run them on CPU through Triton's interpreter).
"""

from __future__ import annotations

import torch

from masquerade_kernels import guidance_step, reference


def _fused(x: torch.Tensor, coeffs: torch.Tensor) -> bool:
    # The kernels compute in float32; a float64 trajectory (the exactness check) takes the reference.
    float32_state = x.dtype != torch.float64 and coeffs.dtype == torch.float32
    return float32_state and x.device.type == "cuda" and guidance_step.guidance_step_available(x.device)


def generation_step(eps_uncond, eps_cond, x, prev_model_output, noise, coeffs):
    """(x_next, m) for a batch of generation rows."""
    step = guidance_step.generation_step if _fused(x, coeffs) else reference.generation_step_reference
    return step(eps_uncond, eps_cond, x, prev_model_output, noise, coeffs)


def inversion_step(eps_uncond, eps_cond, x, prev_model_output, x_next, coeffs):
    """(noise map z, m) for a batch of inversion rows."""
    step = guidance_step.inversion_step if _fused(x, coeffs) else reference.inversion_step_reference
    return step(eps_uncond, eps_cond, x, prev_model_output, x_next, coeffs)
