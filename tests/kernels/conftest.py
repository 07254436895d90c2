"""Kernel tests run Triton's interpreter on CPU where there is no GPU.

triton.jit picks interpreter or compiler from TRITON_INTERPRET when it
decorates, so the variable is set here, before any test module imports a
kernel. On a CUDA machine it is left alone: the CUDA cases then run compiled,
and the CPU cases set it for themselves (see ``kernel_device``).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
