"""The optimized UNet call: buckets and padding, fused LoRA and attention, and (on CUDA) torch.compile.

CPU cases run the same one-time surgery as the GPU path (FaceID LoRA folded in,
fused Q/K/V and IP-Adapter processors) on the tiny models and check that a
bucketed, padded call equals the plain eager diffusers call made before it.
"""

from __future__ import annotations

import pytest
import torch

from masquerade.models.loader import load_models
from masquerade.models.optimize import (
    AttentionBackendError,
    bucket_for,
    bucket_sizes,
    example_inputs,
    optimized_unet_fn,
    pad_to_bucket,
    stock_unet_fn,
    unet_forward,
)

# fp32 on CPU: fusing the LoRA and concatenating projections only reorders sums.
FP32_ATOL = 1e-4
# fp16 on CUDA: inductor fuses and reorders fp16 ops through ~70 attention blocks.
FP16_ATOL = 2e-2

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def cpu_reference(tiny_model_dir):
    """(models prepared by optimized_unet_fn, its unet_fn, eager outputs recorded *before* preparing)."""
    models = load_models(tiny_model_dir, device="cpu")
    assert models.unet.peft_config, "the tiny IP-Adapter-FaceID should load its LoRA as a peft adapter"
    inputs = {n: example_inputs(models, n) for n in (2, 6, 8)}
    with torch.inference_mode():
        models.pipe.set_ip_adapter_scale(1.0)
        expected = {n: stock_unet_fn(models.unet)(*x) for n, x in inputs.items()}
        models.pipe.set_ip_adapter_scale(0.5)
        expected_half_scale = stock_unet_fn(models.unet)(*inputs[6])
        models.pipe.set_ip_adapter_scale(1.0)
    # compile is CUDA-only (eager here); pad=True exercises the buckets the compiled path uses.
    unet_fn = optimized_unet_fn(models, max_batch=8, compile=True, pad=True)
    return models, unet_fn, inputs, expected, expected_half_scale


def test_buckets_are_even_powers_of_two_up_to_max_batch():
    assert bucket_sizes(16) == (2, 4, 8, 16)
    assert bucket_sizes(12) == (2, 4, 8, 12)
    assert bucket_sizes(7) == (2, 4, 6)
    assert bucket_sizes(2) == (2,)
    with pytest.raises(ValueError, match="max_batch"):
        bucket_sizes(1)
    assert [bucket_for(n, (2, 4, 8)) for n in (1, 2, 3, 4, 5, 8)] == [2, 2, 4, 4, 8, 8]
    with pytest.raises(ValueError, match="max-batch"):
        bucket_for(9, (2, 4, 8))


def test_padding_repeats_the_last_row_and_keeps_the_length():
    a = torch.arange(6.0).view(3, 2)
    b = torch.arange(3)
    (pa, pb), n = pad_to_bucket((a, b), (2, 4, 8))
    assert n == 3 and pa.shape == (4, 2) and pb.tolist() == [0, 1, 2, 2]
    assert torch.equal(pa[3], a[2])
    (same,), n = pad_to_bucket((a[:2],), (2, 4))
    assert n == 2 and same.shape == (2, 2)
    with pytest.raises(ValueError, match="disagree"):
        pad_to_bucket((a, b[:2]), (4,))


def test_bucketed_call_equals_eager_call_between_buckets(cpu_reference):
    models, unet_fn, inputs, expected, _ = cpu_reference
    assert unet_fn.buckets == (2, 4, 8) and not unet_fn.compiled
    assert unet_fn.prepared["lora_fused"] and not getattr(models.unet, "peft_config", None)
    assert unet_fn.prepared["processors"]["cross_ip"] > 0 and unet_fn.prepared["processors"]["kept"] == 0
    with torch.inference_mode():
        for n, x in inputs.items():  # 6 pads to 8; 2 and 8 are exact
            got = unet_fn(*x)
            assert got.shape == expected[n].shape
            torch.testing.assert_close(got, expected[n], atol=FP32_ATOL, rtol=1e-4)


def test_ip_adapter_scale_is_per_sample(cpu_reference):
    """Rows with scales 0.5 and 1.0 in one call equal diffusers' calls at each scale."""
    models, unet_fn, inputs, expected, expected_half_scale = cpu_reference
    mixed = torch.tensor([0.5, 1.0, 0.5, 1.0, 0.5, 1.0])
    with torch.inference_mode():
        got = unet_fn(*inputs[6][:-1], mixed)
    want = torch.where((mixed == 0.5).view(-1, 1, 1, 1), expected_half_scale, expected[6])
    torch.testing.assert_close(got, want, atol=FP32_ATOL, rtol=1e-4)
    assert not torch.allclose(expected_half_scale, expected[6], atol=1e-3)


def test_set_ip_adapter_scale_still_reaches_the_fused_processors(cpu_reference):
    models, unet_fn, inputs, expected, expected_half_scale = cpu_reference
    with torch.inference_mode():
        models.pipe.set_ip_adapter_scale(0.5)
        try:
            got = unet_forward(models.unet, *inputs[6][:-1])  # no per-sample scales: the adapter-wide one
        finally:
            models.pipe.set_ip_adapter_scale(1.0)
    torch.testing.assert_close(got, expected_half_scale, atol=FP32_ATOL, rtol=1e-4)


def test_preparing_twice_is_a_no_op_and_xformers_on_cpu_names_the_flag(cpu_reference):
    models, unet_fn, inputs, expected, _ = cpu_reference
    again = optimized_unet_fn(models, max_batch=4, compile=False)
    with torch.inference_mode():
        torch.testing.assert_close(again(*inputs[2]), expected[2], atol=FP32_ATOL, rtol=1e-4)
    with pytest.raises(AttentionBackendError, match="--attention"):
        optimized_unet_fn(models, max_batch=4, compile=False, attention="xformers")


def test_fused_unet_traces_without_graph_breaks(cpu_reference):
    models, unet_fn, inputs, _, _ = cpu_reference
    torch._dynamo.reset()
    with torch.inference_mode():
        explanation = torch._dynamo.explain(unet_fn.eager_forward)(*inputs[2])
    assert explanation.graph_break_count == 0, explanation.break_reasons


@pytest.mark.gpu
@requires_cuda
def test_compiled_buckets_match_eager_in_fp16_without_breaks_or_recompiles(tiny_model_dir):
    models = load_models(tiny_model_dir, device="cuda")
    inputs = {n: example_inputs(models, n) for n in (2, 6, 8)}
    with torch.inference_mode():
        models.pipe.set_ip_adapter_scale(1.0)
        expected = {n: stock_unet_fn(models.unet)(*x) for n, x in inputs.items()}
    torch._dynamo.reset()
    # Two buckets keep the lent GPU's minutes for the benchmark; 6 samples pad into 8.
    unet_fn = optimized_unet_fn(models, max_batch=8, compile=True, compile_mode="default", buckets=(2, 8))
    assert unet_fn.compiled and set(unet_fn.warm_seconds) == {2, 8}
    with torch.inference_mode(), torch._dynamo.config.patch(error_on_recompile=True):
        for n, x in inputs.items():
            torch.testing.assert_close(unet_fn(*x), expected[n], atol=FP16_ATOL, rtol=FP16_ATOL)
        # New per-sample scales must not recompile (they are a tensor input), nor an adapter-wide one.
        unet_fn(*inputs[6][:-1], torch.full((6,), 0.5, device="cuda", dtype=models.dtype))
        models.pipe.set_ip_adapter_scale(0.5)
        unet_fn(*inputs[6])
        models.pipe.set_ip_adapter_scale(1.0)
    with torch.inference_mode():
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(unet_fn.eager_forward)(*inputs[2])
    assert explanation.graph_break_count == 0, explanation.break_reasons
