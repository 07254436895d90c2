"""The fused guidance + solver step kernels agree with the PyTorch reference.

CPU cases run through Triton's interpreter (TRITON_INTERPRET=1, see conftest);
``gpu`` cases run the compiled kernels and skip without CUDA.
"""

from __future__ import annotations

import pytest
import torch

from masquerade_kernels import guidance_step as gs
from masquerade_kernels.reference import (
    GUIDANCE,
    MEAN_FROM_M,
    MEAN_FROM_M1,
    MEAN_FROM_X,
    NOISE_SCALE,
    NUM_COEFFS,
    X0_FROM_EPS,
    X0_FROM_X,
    generation_step_reference,
    inversion_step_reference,
)

triton = pytest.importorskip("triton")

# The kernel performs the reference's fp32 operations in the same order, with
# no FMA contraction and correctly rounded division, so fp32 results should be
# identical; the small slack only guards against a compiler re-association.
# fp16/bf16 outputs are then one rounding of the same fp32 value: fp16 rounds
# to nearest-even on both sides, but Triton's *interpreter* truncates
# fp32 -> bf16 (the compiled kernel rounds to nearest-even like torch), so a
# stored value may differ by one unit in the last place: 2^-10 relative for
# fp16, 2^-7 for bf16.
TOLERANCES = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=1e-3, atol=1e-5),
    torch.bfloat16: dict(rtol=1e-2, atol=1e-5),
}
DTYPES = list(TOLERANCES)
ODD_SHAPES = [(3, 4, 7, 9), (1, 4, 5, 5), (5, 3, 17, 13)]

STEPS = {
    "generation": (gs.generation_step, generation_step_reference),
    "inversion": (gs.inversion_step, inversion_step_reference),
}

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, requires_cuda])])
def kernel_device(request, monkeypatch) -> torch.device:
    """A device the kernels run on: CPU through the interpreter, CUDA compiled."""
    if request.param == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    return torch.device(request.param)


def step_coeffs(batch: int, second_order: list[bool], device, generator: torch.Generator) -> torch.Tensor:
    """Random per-row coefficients in the ranges an SDXL schedule produces."""

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(batch, generator=generator)

    coeffs = torch.zeros(batch, NUM_COEFFS)
    coeffs[:, GUIDANCE] = uniform(-10.0, 7.5)
    coeffs[:, X0_FROM_X] = uniform(1.0, 1.6)
    coeffs[:, X0_FROM_EPS] = uniform(0.05, 1.3)
    coeffs[:, MEAN_FROM_X] = uniform(0.3, 1.0)
    coeffs[:, MEAN_FROM_M] = uniform(0.01, 0.5)
    coeffs[:, MEAN_FROM_M1] = torch.where(
        torch.tensor(second_order, dtype=torch.bool), -uniform(0.01, 0.3), torch.zeros(batch)
    )
    coeffs[:, NOISE_SCALE] = uniform(0.05, 0.6)
    coeffs[:, 7] = float("nan")  # padding must never be read
    return coeffs.to(device)


def step_inputs(shape, dtype, device, *, seed: int = 0, second_order: list[bool] | None = None):
    """(eps_uncond, eps_cond, x, prev_model_output, noise_or_x_next, coeffs) as the engine passes them."""
    generator = torch.Generator().manual_seed(seed)
    batch = shape[0]
    if second_order is None:
        second_order = [row % 2 == 1 for row in range(batch)]  # first- and second-order rows mixed

    def randn() -> torch.Tensor:
        return torch.randn(shape, generator=generator).to(device=device, dtype=dtype)

    # The UNet returns both CFG halves packed in one tensor.
    packed = torch.randn((2 * batch,) + tuple(shape[1:]), generator=generator).to(device=device, dtype=dtype)
    eps_uncond, eps_cond = packed[:batch], packed[batch:]
    return eps_uncond, eps_cond, randn(), randn(), randn(), step_coeffs(batch, second_order, device, generator)


def assert_matches_reference(step: str, inputs, case: str = "") -> None:
    kernel, reference = STEPS[step]
    x = inputs[2]
    got = kernel(*inputs)
    want = reference(*inputs)
    for name, g, w in zip(("step output", "model output"), got, want):
        assert g.dtype == x.dtype, f"{name} should come back in x's dtype"
        assert g.shape == x.shape
        torch.testing.assert_close(
            g, w, equal_nan=True, msg=lambda m: f"{step} {name} {case}: {m}", **TOLERANCES[x.dtype]
        )


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ODD_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_step_matches_reference(kernel_device, step, dtype, shape):
    assert_matches_reference(step, step_inputs(shape, dtype, kernel_device, seed=sum(shape)))


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sdxl_latent_matches_reference_on_cuda(monkeypatch, step, dtype):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert_matches_reference(step, step_inputs((4, 4, 128, 128), dtype, torch.device("cuda")))


@pytest.mark.parametrize("step", STEPS)
def test_first_order_row_ignores_garbage_history(kernel_device, step):
    inputs = list(step_inputs((3, 4, 5, 6), torch.float32, kernel_device, second_order=[False, True, False]))
    prev = inputs[3]
    prev[0] = float("nan")
    prev[2] = float("inf")
    kernel, _ = STEPS[step]
    got = kernel(*inputs)
    for output in got:
        assert torch.isfinite(output[[0, 2]]).all(), "a first-order row must not read its history"
    assert_matches_reference(step, inputs)

    # A second-order row does use its history: garbage there shows, as in the reference.
    prev[1, 0, 0, 0] = float("nan")
    assert torch.isnan(kernel(*inputs)[0][1, 0, 0, 0])
    assert_matches_reference(step, inputs)


@pytest.mark.parametrize("step", STEPS)
def test_final_step_rows(kernel_device, step):
    # Rows whose mean is the model output itself with a unit noise scale (a step
    # that lands on sigma = 0, as an earlier trajectory had) still match.
    inputs = step_inputs((4, 4, 6, 5), torch.float32, kernel_device, second_order=[False, True, False, True])
    coeffs = inputs[-1]
    coeffs[1:3, MEAN_FROM_X] = 0.0
    coeffs[1:3, MEAN_FROM_M] = 1.0
    coeffs[1:3, MEAN_FROM_M1] = 0.0
    coeffs[1:3, NOISE_SCALE] = 1.0
    assert_matches_reference(step, inputs)


def test_inversion_noise_regenerates_the_fixed_latent(kernel_device):
    """Generation with the noise the inversion stored lands back on the inversion's x_next."""
    eps_uncond, eps_cond, x, prev, x_next, coeffs = step_inputs((3, 4, 7, 9), torch.float32, kernel_device)
    noise, inverted_m = gs.inversion_step(eps_uncond, eps_cond, x, prev, x_next, coeffs)
    regenerated, generated_m = gs.generation_step(eps_uncond, eps_cond, x, prev, noise, coeffs)
    torch.testing.assert_close(generated_m, inverted_m, rtol=0, atol=0)
    torch.testing.assert_close(regenerated, x_next, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("step", STEPS)
def test_strided_and_channels_last_views(kernel_device, step):
    eps_uncond, eps_cond, x, prev, io, coeffs = step_inputs((4, 3, 6, 5), torch.float16, kernel_device)
    # Row-strided views are read in place; a channels-last x sets the layout.
    x_every_other = torch.stack([x, x + 1], dim=1)[:, 0]  # rows 2 * C*H*W apart
    assert not x_every_other.is_contiguous()

    def w_major(t: torch.Tensor) -> torch.Tensor:
        """Same values, rows dense but laid out W-major: a layout x does not share."""
        return t.transpose(2, 3).contiguous().transpose(2, 3)

    to_channels_last = lambda t: t.contiguous(memory_format=torch.channels_last)  # noqa: E731
    cases = {
        "channels-last x and eps": (
            to_channels_last(eps_uncond),
            to_channels_last(eps_cond),
            to_channels_last(x),
            prev,
            io,
        ),
        "row-strided x": (eps_uncond, eps_cond, x_every_other, prev, io),
        "noise broadcast over rows": (eps_uncond, eps_cond, x, prev, io[:1].expand_as(io)),
        "W-major eps_cond and history (copied)": (eps_uncond, w_major(eps_cond), x, w_major(prev), io),
    }
    for case, tensors in cases.items():
        assert_matches_reference(step, (*tensors, coeffs), case=case)
    strided_coeffs = torch.stack([coeffs, coeffs], dim=2)[..., 0]
    assert strided_coeffs.stride(1) == 2
    assert_matches_reference(step, (eps_uncond, eps_cond, x, prev, io, strided_coeffs))

    channels_last_x = x.contiguous(memory_format=torch.channels_last)
    got = STEPS[step][0](eps_uncond, eps_cond, channels_last_x, prev, io, coeffs)
    assert all(t.is_contiguous(memory_format=torch.channels_last) for t in got), "outputs follow x's layout"


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_channels_last_unet_output_is_read_in_place(kernel_device, monkeypatch, step, dtype):
    """The engine's case: the UNet returns both CFG halves packed channels-last, the latent,
    history and noise are NCHW. The halves are read where they lie (no copy) and the result
    equals the reference."""
    eps_uncond, eps_cond, x, prev, io, coeffs = step_inputs((3, 4, 6, 5), dtype, kernel_device, seed=7)
    packed = torch.cat([eps_uncond, eps_cond]).contiguous(memory_format=torch.channels_last)
    halves = packed[:3], packed[3:]
    assert not halves[0].is_contiguous() and halves[0].data_ptr() == packed.data_ptr()
    copies = []
    packed_copy = gs._packed_copy
    monkeypatch.setattr(gs, "_packed_copy", lambda t, strides: copies.append(t.shape) or packed_copy(t, strides))

    assert_matches_reference(step, (*halves, x, prev, io, coeffs), case="channels-last halves, NCHW x")
    # The other way round too: a channels-last latent among NCHW halves.
    x_last = x.contiguous(memory_format=torch.channels_last)
    assert_matches_reference(
        step, (eps_uncond, eps_cond, x_last, prev, io, coeffs), case="NCHW halves, channels-last x"
    )
    assert copies == [], f"inputs were copied before the kernel read them: {copies}"

    # Outputs follow x's layout; a crop, whose spatial dims do not merge, is the one case copied.
    got = STEPS[step][0](*halves, x, prev, io, coeffs)
    assert all(t.is_contiguous() for t in got)
    got = STEPS[step][0](*halves, x_last, prev, io, coeffs)
    assert all(t.is_contiguous(memory_format=torch.channels_last) for t in got)
    assert_matches_reference(step, (*halves, x, prev, io[:, :, :, :], coeffs))
    assert copies == []
    crop = torch.nn.functional.pad(io, (1, 1, 1, 1))[:, :, 1:-1, 1:-1]
    assert_matches_reference(step, (*halves, x, prev, crop, coeffs), case="cropped step input")
    assert copies == [crop.shape], "only the crop is copied"


def test_sliced_latent_is_copied_not_misread(kernel_device):
    # A crop of each row is not one dense block: it must go through a copy.
    eps_uncond, eps_cond, x, prev, noise, coeffs = step_inputs((2, 4, 9, 8), torch.float32, kernel_device)
    cropped = [t[:, :, 1:6, 2:7] for t in (eps_uncond, eps_cond, x, prev, noise)]
    assert gs._row_layout(cropped[2].shape, cropped[2].stride()) is None
    assert_matches_reference("generation", (*cropped, coeffs))


def test_mixed_input_dtypes_follow_x(kernel_device):
    eps_uncond, eps_cond, x, prev, noise, coeffs = step_inputs((2, 4, 5, 5), torch.float16, kernel_device)
    inputs = (eps_uncond, eps_cond, x.float(), prev, noise.bfloat16(), coeffs)
    assert_matches_reference("generation", inputs)


def test_empty_batch(kernel_device):
    inputs = step_inputs((0, 4, 5, 5), torch.float16, kernel_device)
    x_next, model_output = gs.generation_step(*inputs)
    assert x_next.shape == model_output.shape == (0, 4, 5, 5)


@pytest.mark.parametrize(
    "break_inputs, error, message",
    [
        (lambda t: t.__setitem__(1, t[1][:, :, :-1]), ValueError, "eps_cond has shape"),
        (lambda t: t.__setitem__(4, t[4][:2]), ValueError, "noise has shape"),
        (lambda t: t.__setitem__(5, t[5][:, :7]), ValueError, r"coeffs has shape \(3, 7\), expected \(3, 8\)"),
        (lambda t: t.__setitem__(5, t[5][:2]), ValueError, "coeffs has shape"),
        (lambda t: t.__setitem__(5, t[5].double()), TypeError, "coeffs must be float32"),
        (lambda t: t.__setitem__(3, t[3].to(torch.int32)), TypeError, "prev_model_output has dtype torch.int32"),
        (lambda t: t.__setitem__(0, t[0].numpy()), TypeError, "eps_uncond must be a torch.Tensor"),
        (lambda t: [t.__setitem__(i, t[i].flatten()) for i in range(5)], ValueError, "x must be a batch"),
    ],
    ids=["eps_cond", "noise", "coeffs-columns", "coeffs-rows", "coeffs-dtype", "int-history", "numpy", "flat"],
)
def test_mismatched_inputs_are_rejected_by_name(break_inputs, error, message):
    inputs = list(step_inputs((3, 4, 5, 6), torch.float32, "cpu"))
    break_inputs(inputs)
    with pytest.raises(error, match=message):
        gs.generation_step(*inputs)


def test_x_next_named_in_inversion_errors():
    inputs = list(step_inputs((3, 4, 5, 6), torch.float32, "cpu"))
    inputs[4] = inputs[4][:, :2]
    with pytest.raises(ValueError, match="x_next has shape"):
        gs.inversion_step(*inputs)


def test_inputs_on_two_devices_are_rejected():
    inputs = list(step_inputs((2, 4, 5, 6), torch.float32, "cpu"))
    for index, name in ((5, "coeffs"), (3, "prev_model_output")):
        on_two_devices = list(inputs)
        on_two_devices[index] = inputs[index].to("meta")
        with pytest.raises(ValueError, match=f"{name} is on meta"):
            gs.generation_step(*on_two_devices)


@pytest.mark.parametrize("step", STEPS)
def test_auto_on_cpu_without_interpreter_is_the_reference(monkeypatch, step):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not gs.guidance_step_available("cpu")

    def kernel_must_not_run(*args, **kwargs):
        raise AssertionError("the Triton kernel ran on CPU without TRITON_INTERPRET")

    monkeypatch.setattr(gs, "_launch", kernel_must_not_run)
    inputs = step_inputs((3, 4, 7, 9), torch.float16, "cpu")
    auto = {"generation": gs.generation_step_auto, "inversion": gs.inversion_step_auto}[step]
    for got, want in zip(auto(*inputs), STEPS[step][1](*inputs)):
        assert torch.equal(got, want)


def test_auto_under_interpreter_runs_the_kernel(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert gs.guidance_step_available("cpu")
    calls = []
    launch = gs._launch
    monkeypatch.setattr(gs, "_launch", lambda *a, **k: calls.append(k["invert"]) or launch(*a, **k))
    inputs = step_inputs((2, 4, 5, 5), torch.float32, "cpu")
    gs.generation_step_auto(*inputs)
    gs.inversion_step_auto(*inputs)
    assert calls == [False, True]
