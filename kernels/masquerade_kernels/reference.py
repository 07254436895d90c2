"""Plain PyTorch reference of the guidance + DPM-Solver++(2M SDE) step.

This is the CPU path of the engine and the oracle that the Triton kernels are
tested against. Every step is expressed on per-row coefficients (one row = one
job's step in a packed UNet call), so rows at different timesteps, orders and
guidance scales share one call. See DESIGN section 1 for the formulas.

Arithmetic is float32 (whatever the UNet's dtype), or float64 when the latent or the
coefficient table is float64: a float64 model set then runs the whole trajectory in
float64, which the reconstruction test uses to check the invariant to ~1e-12.

Coefficient layout, one float32 (or float64) row of ``NUM_COEFFS`` per sample:

=====  ============  =========================================================
index  name          meaning
=====  ============  =========================================================
0      guidance      g in  eps = eps_u + g (eps_c - eps_u)
1      x0_from_x     1 / alpha_s          (model output m = a x - b eps)
2      x0_from_eps   sigma_s / alpha_s
3      mean_from_x   (sigma_t / sigma_s) e^{-h}
4      mean_from_m   alpha_t (1 - e^{-2h}) (1 + 1 / (2 r)) for 2nd order, else alpha_t (1 - e^{-2h})
5      mean_from_m1  -alpha_t (1 - e^{-2h}) / (2 r) for 2nd order, else 0
6      noise_scale   varsigma = sigma_t sqrt(1 - e^{-2h}); the last step lands on discrete t = 0, so > 0
7      (padding)     keeps a row 32 bytes
=====  ============  =========================================================
"""

from __future__ import annotations

import torch

from masquerade_kernels.coefficients import (  # noqa: F401  (re-exported: callers name the columns here)
    GUIDANCE,
    MEAN_FROM_M,
    MEAN_FROM_M1,
    MEAN_FROM_X,
    NOISE_SCALE,
    NUM_COEFFS,
    X0_FROM_EPS,
    X0_FROM_X,
)


def _per_row(coeffs: torch.Tensor, index: int, like: torch.Tensor) -> torch.Tensor:
    """Column ``index`` of ``coeffs`` shaped to broadcast over ``like``'s rows."""
    return coeffs[:, index].reshape((-1,) + (1,) * (like.dim() - 1))


def _working_dtype(x: torch.Tensor, coeffs: torch.Tensor) -> torch.dtype:
    """float32 (fp16/bf16/fp32 latents, as the kernels compute), float64 when the latent or the table is float64."""
    return torch.promote_types(torch.promote_types(x.dtype, coeffs.dtype), torch.float32)


def guided_model_output(
    eps_uncond: torch.Tensor,  # [B, C, H, W]
    eps_cond: torch.Tensor,  # [B, C, H, W]
    x: torch.Tensor,  # [B, C, H, W] latent at s
    coeffs: torch.Tensor,  # [B, NUM_COEFFS] float32
) -> torch.Tensor:
    """The data prediction m = (x - sigma_s eps_hat) / alpha_s, in the working dtype (float32 unless float64)."""
    work = _working_dtype(x, coeffs)
    eps_u, eps_c, xw, coeffs = eps_uncond.to(work), eps_cond.to(work), x.to(work), coeffs.to(work)
    g = _per_row(coeffs, GUIDANCE, xw)
    eps = eps_u + g * (eps_c - eps_u)
    return _per_row(coeffs, X0_FROM_X, xw) * xw - _per_row(coeffs, X0_FROM_EPS, xw) * eps


def solver_mean(
    x: torch.Tensor,  # [B, C, H, W]
    model_output: torch.Tensor,  # [B, C, H, W] in the working dtype
    prev_model_output: torch.Tensor,  # [B, C, H, W]; ignored where mean_from_m1 is 0
    coeffs: torch.Tensor,  # [B, NUM_COEFFS]
) -> torch.Tensor:
    """The solver's mean mu of the next latent, in the working dtype."""
    work = _working_dtype(x, coeffs)
    xw, coeffs = x.to(work), coeffs.to(work)
    mean = _per_row(coeffs, MEAN_FROM_X, xw) * xw + _per_row(coeffs, MEAN_FROM_M, xw) * model_output.to(work)
    m1 = _per_row(coeffs, MEAN_FROM_M1, xw)
    # A first-order row has m1 == 0; multiplying a stale or uninitialised history
    # by zero would still let NaN/Inf through, so such rows skip the term.
    return torch.where(m1 != 0, mean + m1 * prev_model_output.to(work), mean)


def generation_step_reference(
    eps_uncond: torch.Tensor,
    eps_cond: torch.Tensor,
    x: torch.Tensor,
    prev_model_output: torch.Tensor,
    noise: torch.Tensor,  # [B, C, H, W] stored noise map z_i
    coeffs: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One generation step: returns (x_next = mu + varsigma z, m), both in x's dtype."""
    m = guided_model_output(eps_uncond, eps_cond, x, coeffs)
    mean = solver_mean(x, m, prev_model_output, coeffs)
    x_next = mean + _per_row(coeffs.to(mean.dtype), NOISE_SCALE, mean) * noise.to(mean.dtype)
    return x_next.to(x.dtype), m.to(x.dtype)


def inversion_step_reference(
    eps_uncond: torch.Tensor,
    eps_cond: torch.Tensor,
    x: torch.Tensor,
    prev_model_output: torch.Tensor,
    x_next: torch.Tensor,  # [B, C, H, W] the fixed noisy latent of the next timestep
    coeffs: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One inversion step: returns (z = (x_next - mu) / varsigma, m), both in x's dtype."""
    m = guided_model_output(eps_uncond, eps_cond, x, coeffs)
    mean = solver_mean(x, m, prev_model_output, coeffs)
    noise = (x_next.to(mean.dtype) - mean) / _per_row(coeffs.to(mean.dtype), NOISE_SCALE, mean)
    return noise.to(x.dtype), m.to(x.dtype)
