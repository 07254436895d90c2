"""Batched, stateless guidance + DPM-Solver++ step on per-row coefficients.

The solver history lives in the jobs, not here, so one call serves rows at
different steps of different trajectories. On CUDA the fused Triton kernels
run; elsewhere the PyTorch reference, which is also their test oracle.
"""

from masquerade.kernels.guidance_step import (  # noqa: F401 - the engine's solver entry points
    generation_step_auto as generation_step,
    inversion_step_auto as inversion_step,
)
from masquerade.kernels.reference import guided_model_output  # noqa: F401
