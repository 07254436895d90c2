"""The per-row coefficient layout shared by the reference step, the Triton kernels and the trajectory table.

Torch-free, so that building or validating a trajectory (and with it a request's parameters)
imports no torch; ``reference``'s docstring describes each column.
"""

NUM_COEFFS = 8
GUIDANCE, X0_FROM_X, X0_FROM_EPS, MEAN_FROM_X, MEAN_FROM_M, MEAN_FROM_M1, NOISE_SCALE = range(7)
