"""The inversion's Gaussian noise for one face: x_{t_i} = alpha_i x_0 + sigma_i eps_i (docs/design.md 1.2 step 5).

Two ways to draw eps, chosen per request (``ReversePersonalizationParams.noise``):

``per_face`` (the default)
    Each face of a request gets its own stream: a generator seeded with a
    number derived from (seed, face index) by NumPy's SeedSequence, one float32
    draw of [N, C, h, w] in timestep order (row 0 is t_0, the noisiest). Two
    faces of one photo never share noise, and a face's result does not depend
    on the other faces. The generator lives on the engine's device (CPU or
    CUDA), so the same seed gives the same output on the same kind of device;
    CPU and CUDA streams differ.

``research``
    Exactly the research code's draws: one CPU ``torch.Generator`` seeded with
    ``seed``, re-seeded for every face (so every face of a photo gets the same
    noise), N float16 draws of [1, C, h, w] starting at the last timestep
    (t = 1) and going up to the first, then moved to the device. With seed 0
    and real weights this reproduces the research output, apart from the
    deviations listed in the README. Bit-exact draws assume the same torch
    version's CPU generator.
"""

from __future__ import annotations

import numpy as np
import torch

from masquerade.engine.request import NOISE_MODES

PER_FACE, RESEARCH = NOISE_MODES


def face_noise_seed(seed: int, face_index: int) -> int:
    """Independent, reproducible generator seed per face of a request (``per_face`` mode)."""
    return int(np.random.SeedSequence([int(seed), int(face_index)]).generate_state(1, dtype=np.uint64)[0] >> 1)


def inversion_noise(
    seed: int,
    face_index: int,
    mode: str,
    steps: int,
    latent_shape: tuple[int, ...],
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """[N, *latent_shape] float32 on ``device``: row i is eps_i of timestep t_i (descending, as in a Trajectory)."""
    shape = tuple(int(d) for d in latent_shape)
    device = torch.device(device)
    if mode == PER_FACE:
        generator = torch.Generator(device=device).manual_seed(face_noise_seed(seed, face_index))
        return torch.randn((steps,) + shape, generator=generator, device=device, dtype=torch.float32)
    if mode == RESEARCH:
        generator = torch.Generator(device="cpu").manual_seed(int(seed))
        # The research code draws one [1, C, h, w] float16 tensor per timestep, t = 1 first.
        ascending = [
            torch.randn((1,) + shape, generator=generator, device="cpu", dtype=torch.float16) for _ in range(steps)
        ]
        return torch.cat(ascending[::-1]).to(device=device, dtype=torch.float32)
    raise ValueError(f"unknown noise mode {mode!r}; use one of {', '.join(NOISE_MODES)}")
