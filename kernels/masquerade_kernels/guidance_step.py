"""Fused classifier-free guidance + DPM-Solver++(2M SDE) step as one Triton pass.

One kernel reads the packed UNet halves, the latent, the solver history and the
stored noise (generation) or the next fixed latent (inversion), and writes the
step's two outputs; the math, and the oracle the tests compare against, is
``masquerade_kernels.reference``. ``*_auto`` pick the kernel where it can run
and the reference elsewhere; the engine calls those.

Memory layout: each row (sample) is addressed as a [C, S] tile -- channels by
the merged spatial dims -- with its own row, channel and spatial strides per
tensor, so NCHW and channels-last tensors are read in place side by side: the
channels-last CFG halves ``out[:B]`` / ``out[B:]`` of a packed UNet output
next to an NCHW latent, ``x[::2]`` or an expanded noise map cost no copy. Only
a tensor whose spatial dims do not merge into one stride (a crop, a W-major
transpose) is first copied. Outputs are fresh tensors in ``x``'s dtype, laid
out like ``x`` where ``x``'s rows are dense (NCHW or channels-last), else NCHW.
"""

from __future__ import annotations

import math
import os

import torch

from masquerade_kernels.reference import (
    NUM_COEFFS,
    generation_step_reference,
    inversion_step_reference,
)

try:  # Triton is optional: without it the engine runs the reference.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


if tl is not None:

    def _guidance_step_kernel(
        eps_uncond_ptr,
        eps_cond_ptr,
        x_ptr,
        prev_model_output_ptr,
        step_input_ptr,  # noise z (generation) or the fixed next latent (inversion)
        coeffs_ptr,
        step_output_ptr,  # x_next (generation) or noise z (inversion)
        model_output_ptr,
        channels,
        spatial,
        # Per tensor: (row, channel, spatial) strides in elements. A stride of 1 is specialised
        # by Triton, so each load is vectorised along its own contiguous axis.
        eps_uncond_rs,
        eps_uncond_cs,
        eps_uncond_ss,
        eps_cond_rs,
        eps_cond_cs,
        eps_cond_ss,
        x_rs,
        x_cs,
        x_ss,
        prev_model_output_rs,
        prev_model_output_cs,
        prev_model_output_ss,
        step_input_rs,
        step_input_cs,
        step_input_ss,
        out_rs,  # both outputs share one layout
        out_cs,
        out_ss,
        coeffs_row_stride,
        coeffs_col_stride,
        INVERT: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_S: tl.constexpr,
    ):
        block = tl.program_id(0)
        # int64 so that row * row_stride cannot overflow on large packed batches.
        row = tl.program_id(1).to(tl.int64)
        c = tl.arange(0, BLOCK_C)[:, None]
        s = block * BLOCK_S + tl.arange(0, BLOCK_S)[None, :]
        mask = (c < channels) & (s < spatial)

        # Coefficients are read from device memory, never baked in as Python
        # floats, so one compiled kernel (and one captured CUDA graph) serves
        # every timestep, order and guidance scale.
        row_coeffs = coeffs_ptr + row * coeffs_row_stride
        guidance = tl.load(row_coeffs + 0 * coeffs_col_stride)
        x0_from_x = tl.load(row_coeffs + 1 * coeffs_col_stride)
        x0_from_eps = tl.load(row_coeffs + 2 * coeffs_col_stride)
        mean_from_x = tl.load(row_coeffs + 3 * coeffs_col_stride)
        mean_from_m = tl.load(row_coeffs + 4 * coeffs_col_stride)
        mean_from_m1 = tl.load(row_coeffs + 5 * coeffs_col_stride)
        noise_scale = tl.load(row_coeffs + 6 * coeffs_col_stride)

        # Every input is streamed exactly once: do not let it evict the UNet's
        # working set from L2.
        eps_u = tl.load(
            eps_uncond_ptr + row * eps_uncond_rs + c * eps_uncond_cs + s * eps_uncond_ss,
            mask=mask,
            eviction_policy="evict_first",
        ).to(tl.float32)
        eps_c = tl.load(
            eps_cond_ptr + row * eps_cond_rs + c * eps_cond_cs + s * eps_cond_ss,
            mask=mask,
            eviction_policy="evict_first",
        ).to(tl.float32)
        x = tl.load(x_ptr + row * x_rs + c * x_cs + s * x_ss, mask=mask, eviction_policy="evict_first").to(tl.float32)

        # Same operations in the same order as the reference; with FMA
        # contraction off (see the launcher) and IEEE division every fp32
        # intermediate rounds exactly as in eager PyTorch.
        eps = eps_u + guidance * (eps_c - eps_u)
        model_output = x0_from_x * x - x0_from_eps * eps
        mean = mean_from_x * x + mean_from_m * model_output
        # A first-order row (mean_from_m1 == 0) neither reads nor multiplies
        # its history: a stale or uninitialised buffer may hold NaN/Inf, and
        # 0 * NaN is NaN. Skipping the load also saves a tensor of traffic.
        if mean_from_m1 != 0.0:
            prev = tl.load(
                prev_model_output_ptr
                + row * prev_model_output_rs
                + c * prev_model_output_cs
                + s * prev_model_output_ss,
                mask=mask,
                eviction_policy="evict_first",
            ).to(tl.float32)
            mean = mean + mean_from_m1 * prev

        step_input = tl.load(
            step_input_ptr + row * step_input_rs + c * step_input_cs + s * step_input_ss,
            mask=mask,
            eviction_policy="evict_first",
        ).to(tl.float32)
        if INVERT:
            # `/` lowers to div.full.f32 (up to 2 ulp); div_rn is correctly
            # rounded like torch's division, and costs nothing in a
            # bandwidth-bound kernel.
            step_output = tl.math.div_rn(step_input - mean, noise_scale)
        else:
            step_output = mean + noise_scale * step_input

        tl.store(
            step_output_ptr + row * out_rs + c * out_cs + s * out_ss,
            step_output.to(step_output_ptr.dtype.element_ty),
            mask=mask,
        )
        tl.store(
            model_output_ptr + row * out_rs + c * out_cs + s * out_ss,
            model_output.to(model_output_ptr.dtype.element_ty),
            mask=mask,
        )


# triton.jit decides between compiling and interpreting when it decorates, from
# TRITON_INTERPRET at that moment; decorating lazily, once per mode, lets tests
# and tools set the variable after this module was imported.
_jitted_kernels: dict[bool, object] = {}


def _interpret_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def _kernel():
    interpret = _interpret_requested()
    kernel = _jitted_kernels.get(interpret)
    if kernel is None:
        kernel = _jitted_kernels[interpret] = triton.jit(_guidance_step_kernel)
    return kernel


def guidance_step_available(device: torch.device | str) -> bool:
    """Whether the Triton kernels can run on ``device`` in this process.

    True on CUDA (with triton importable) and on CPU when TRITON_INTERPRET=1
    asks for Triton's interpreter (tests, smoke runs); False elsewhere. Under
    TRITON_INTERPRET=1 CUDA tensors go through the interpreter too (slowly).
    """
    if triton is None:
        return False
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available()
    if device.type == "cpu":
        return _interpret_requested()
    return False


def _row_layout(shape: torch.Size, strides: tuple[int, ...]) -> tuple[int, ...] | None:
    """Strides of the non-batch dims if each row is one dense block, else None.

    Size-1 dims are reported as 0: their stride never moves the pointer.
    """
    dims = sorted((stride, size) for stride, size in zip(strides[1:], shape[1:]) if size != 1)
    expected = 1
    for stride, size in dims:
        if stride != expected:
            return None
        expected *= size
    return tuple(stride if size != 1 else 0 for stride, size in zip(strides[1:], shape[1:]))


# Channel counts up to this are tiled as [C, S]; wider rows are walked as one flat run.
_MAX_TILED_CHANNELS = 64


def _split(shape: torch.Size) -> tuple[int, int, int]:
    """(first merged dim, C, S): a row is C channels by S merged spatial positions."""
    if len(shape) >= 3 and triton.next_power_of_2(shape[1]) <= _MAX_TILED_CHANNELS:
        return 2, shape[1], math.prod(shape[2:])
    return 1, 1, math.prod(shape[1:])


def _tile_strides(tensor: torch.Tensor, first_merged: int) -> tuple[int, int, int] | None:
    """(row, channel, spatial) strides addressing ``tensor`` as [B, C, S], or None where the
    dims from ``first_merged`` on do not collapse into one stride (a crop, a transpose)."""
    shape, strides = tensor.shape, tensor.stride()
    merged = [(size, stride) for size, stride in zip(shape[first_merged:], strides[first_merged:]) if size != 1]
    for (_, outer), (size, inner) in zip(merged, merged[1:]):
        if outer != inner * size:
            return None
    spatial_stride = merged[-1][1] if merged else 0
    channel_stride = strides[1] if first_merged == 2 and shape[1] != 1 else 0
    row_stride = strides[0] if shape[0] != 1 else 0
    return row_stride, channel_stride, spatial_stride


def _output_strides(x: torch.Tensor, first_merged: int) -> tuple[int, ...]:
    """x's strides where its rows are dense and tile-addressable (NCHW, channels-last), else NCHW's."""
    row_numel = math.prod(x.shape[1:])
    if _row_layout(x.shape, x.stride()) is not None and _tile_strides(x, first_merged) is not None:
        return (row_numel,) + tuple(x.stride()[1:])
    strides, step = [], 1
    for size in reversed(x.shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


def _packed_copy(tensor: torch.Tensor, strides: tuple[int, ...]) -> torch.Tensor:
    """A copy of ``tensor`` laid out with ``strides`` (the outputs' layout): the kernel's only copy."""
    packed = torch.empty_strided(tensor.shape, strides, dtype=tensor.dtype, device=tensor.device)
    packed.copy_(tensor)
    return packed


def _validate(
    named_tensors: dict[str, torch.Tensor],
    coeffs: torch.Tensor,
) -> None:
    """Raise with the offending argument's name when the step's inputs do not fit together."""
    for name, tensor in {**named_tensors, "coeffs": coeffs}.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    x = named_tensors["x"]
    if x.dim() < 2:
        raise ValueError(f"x must be a batch of latents [B, C, H, W], got shape {tuple(x.shape)}")
    for name, tensor in named_tensors.items():
        if tensor.shape != x.shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}, but x has {tuple(x.shape)}; they must match")
        if tensor.dtype not in _SUPPORTED_DTYPES:
            raise TypeError(f"{name} has dtype {tensor.dtype}; supported are float16, bfloat16 and float32")
        if tensor.device != x.device:
            raise ValueError(f"{name} is on {tensor.device}, but x is on {x.device}; move all inputs to one device")
    if coeffs.dtype != torch.float32:
        raise TypeError(f"coeffs must be float32, got {coeffs.dtype}")
    if coeffs.shape != (x.size(0), NUM_COEFFS):
        raise ValueError(
            f"coeffs has shape {tuple(coeffs.shape)}, expected ({x.size(0)}, {NUM_COEFFS}): one row per sample"
        )
    if coeffs.device != x.device:
        raise ValueError(f"coeffs is on {coeffs.device}, but x is on {x.device}; build them on the latent's device")


def _block_size(channels: int, spatial: int, batch: int) -> tuple[int, int, int]:
    """(BLOCK_C, BLOCK_S, num_warps): 2048-element tiles for bandwidth, smaller ones so small batches fill the GPU."""
    block_c = triton.next_power_of_2(channels)
    block_s = max(1, 2048 // block_c)
    # About 4 programs per SM on a 132-SM H100 before giving up width.
    while block_c * block_s > 256 and block_s > 1 and batch * triton.cdiv(spatial, block_s) < 512:
        block_s //= 2
    return block_c, block_s, max(1, min(8, block_c * block_s // 256))


def _launch(
    eps_uncond: torch.Tensor,
    eps_cond: torch.Tensor,
    x: torch.Tensor,
    prev_model_output: torch.Tensor,
    step_input: torch.Tensor,
    coeffs: torch.Tensor,
    *,
    invert: bool,
    step_input_name: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    if triton is None:
        raise RuntimeError(
            "the fused guidance step needs triton: install masquerade[triton], or call the *_auto functions"
        )
    named = {
        "eps_uncond": eps_uncond,
        "eps_cond": eps_cond,
        "x": x,
        "prev_model_output": prev_model_output,
        step_input_name: step_input,
    }
    _validate(named, coeffs)

    first_merged, channels, spatial = _split(x.shape)
    output_strides = _output_strides(x, first_merged)
    operands = []
    for tensor in named.values():
        strides = _tile_strides(tensor, first_merged)
        if strides is None:
            tensor = _packed_copy(tensor, output_strides)
            strides = _tile_strides(tensor, first_merged)
        operands.append((tensor, strides))

    batch = x.size(0)
    step_output = torch.empty_strided(x.shape, output_strides, dtype=x.dtype, device=x.device)
    model_output = torch.empty_strided(x.shape, output_strides, dtype=x.dtype, device=x.device)
    if batch == 0 or channels * spatial == 0:
        return step_output, model_output

    block_c, block_s, num_warps = _block_size(channels, spatial, batch)
    grid = (triton.cdiv(spatial, block_s), batch)
    _kernel()[grid](
        *(tensor for tensor, _ in operands),
        coeffs,
        step_output,
        model_output,
        channels,
        spatial,
        *(stride for _, strides in operands for stride in strides),
        *_tile_strides(step_output, first_merged),
        coeffs.stride(0),
        coeffs.stride(1),
        INVERT=invert,
        BLOCK_C=block_c,
        BLOCK_S=block_s,
        num_warps=num_warps,
        # No a*b+c -> fma contraction: the kernel is bandwidth-bound, so FMAs
        # buy nothing, and without them results match the eager reference's
        # roundings instead of differing by an ulp here and there.
        enable_fp_fusion=False,
    )
    return step_output, model_output


def generation_step(
    eps_uncond: torch.Tensor,  # [B, C, H, W]
    eps_cond: torch.Tensor,  # [B, C, H, W]
    x: torch.Tensor,  # [B, C, H, W] latent at s
    prev_model_output: torch.Tensor,  # [B, C, H, W]; not read where coeffs[:, 5] == 0
    noise: torch.Tensor,  # [B, C, H, W] stored noise map z_i
    coeffs: torch.Tensor,  # [B, NUM_COEFFS] float32, same device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused generation step: returns (x_next = mu + varsigma z, m), both in x's dtype."""
    return _launch(eps_uncond, eps_cond, x, prev_model_output, noise, coeffs, invert=False, step_input_name="noise")


def inversion_step(
    eps_uncond: torch.Tensor,
    eps_cond: torch.Tensor,
    x: torch.Tensor,
    prev_model_output: torch.Tensor,
    x_next: torch.Tensor,  # [B, C, H, W] the fixed noisy latent of the next timestep
    coeffs: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused inversion step: returns (z = (x_next - mu) / varsigma, m), both in x's dtype."""
    return _launch(eps_uncond, eps_cond, x, prev_model_output, x_next, coeffs, invert=True, step_input_name="x_next")


def generation_step_auto(
    eps_uncond: torch.Tensor,
    eps_cond: torch.Tensor,
    x: torch.Tensor,
    prev_model_output: torch.Tensor,
    noise: torch.Tensor,
    coeffs: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``generation_step`` where the kernel can run on x's device, the reference elsewhere."""
    step = generation_step if guidance_step_available(x.device) else generation_step_reference
    return step(eps_uncond, eps_cond, x, prev_model_output, noise, coeffs)


def inversion_step_auto(
    eps_uncond: torch.Tensor,
    eps_cond: torch.Tensor,
    x: torch.Tensor,
    prev_model_output: torch.Tensor,
    x_next: torch.Tensor,
    coeffs: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``inversion_step`` where the kernel can run on x's device, the reference elsewhere."""
    step = inversion_step if guidance_step_available(x.device) else inversion_step_reference
    return step(eps_uncond, eps_cond, x, prev_model_output, x_next, coeffs)


__all__ = [
    "generation_step",
    "inversion_step",
    "generation_step_auto",
    "inversion_step_auto",
    "guidance_step_available",
]
