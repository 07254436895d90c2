"""The optimized UNet call: buckets and padding, fused LoRA and attention, torch.compile, VAE chunks.

CPU cases run the same one-time surgery as the GPU path (FaceID LoRA folded in,
fused Q/K/V and IP-Adapter processors) on the tiny models and check that a
bucketed, padded call equals the plain eager diffusers call made before it. The
compiled path runs on CPU too (inductor's C++ backend): one bucket, served with
mixed batch sizes, must not recompile after its warm-up.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from masquerade.engine.diffusion import DiffusionCore
from masquerade.engine.request import ReversePersonalizationParams
from masquerade.models.loader import load_models
from masquerade.models.optimize import (
    AttentionBackendError,
    bucket_for,
    bucket_sizes,
    configure_compile_cache,
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
    # Eager with pad=True: the buckets and input copies of the compiled path, without compiling.
    unet_fn = optimized_unet_fn(models, max_batch=8, compile=False, pad=True, buckets=(2, 4, 8))
    return models, unet_fn, inputs, expected, expected_half_scale


def test_buckets_are_even_and_pad_at_most_two_samples_up_to_16():
    assert bucket_sizes(16) == (2, 4, 6, 8, 12, 16)
    assert bucket_sizes(12) == (2, 4, 6, 8, 12)
    assert bucket_sizes(10) == (2, 4, 6, 8, 10)
    assert bucket_sizes(7) == (2, 4, 6)
    assert bucket_sizes(32) == (2, 4, 6, 8, 12, 16, 24, 32)
    for n in range(2, 17, 2):  # every even call size up to 16
        assert bucket_for(n, bucket_sizes(16)) - n <= 2
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
    assert unet_fn.buckets == (2, 4, 8) and not unet_fn.compiled and unet_fn.pad
    assert unet_fn.prepared["lora_fused"] and not getattr(models.unet, "peft_config", None)
    assert unet_fn.prepared["processors"]["cross_ip"] > 0 and unet_fn.prepared["processors"]["kept"] == 0
    with torch.inference_mode():
        for n, x in inputs.items():  # 6 pads to 8; 2 and 8 are exact
            got = unet_fn(*x)
            assert got.shape == expected[n].shape
            torch.testing.assert_close(got, expected[n], atol=FP32_ATOL, rtol=1e-4)


def test_cuda_graph_modes_run_every_call_on_one_thread_of_their_own(cpu_reference):
    """CUDA graphs are recorded per thread; in those modes warm-up and serving share one thread."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    models, _, inputs, expected, _ = cpu_reference
    unet_fn = optimized_unet_fn(models, max_batch=8, compile=False, pad=True, buckets=(2, 4, 8))
    assert unet_fn._graph_thread is None  # only the CUDA-graph modes on CUDA have one
    unet_fn._graph_thread = ThreadPoolExecutor(1, thread_name_prefix="graphs")  # that path, on CPU
    threads = []
    forward = unet_fn._forward

    def observe(*args):
        threads.append((threading.current_thread().name, torch.is_inference_mode_enabled()))
        return forward(*args)

    unet_fn._forward = observe
    got = unet_fn(*inputs[6])
    torch.testing.assert_close(got, expected[6], atol=FP32_ATOL, rtol=1e-4)
    assert len(threads) == 1 and threads[0][0].startswith("graphs") and threads[0][1]


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


def _mixed_jobs(core, models):
    """Two faces of different lengths: with inversion_chunk=1 their calls hold 2 and then 1 CFG pair."""
    latent = models.face_size // models.vae_scale_factor
    generator = torch.Generator().manual_seed(7)
    jobs = []
    for index, params in enumerate(
        (
            ReversePersonalizationParams(steps=3, seed=1),
            ReversePersonalizationParams(steps=5, seed=2, ip_adapter_scale=0.5, attribute_prompt="an old man"),
        )
    ):
        clean = torch.randn(models.latent_channels, latent, latent, generator=generator)
        identity = torch.nn.functional.normalize(torch.randn(512, generator=generator), dim=0)
        jobs.append(core.make_job("mixed", index, clean, identity, params))
    return jobs


def test_compiled_core_serves_mixed_batch_sizes_without_recompiling(tiny_model_dir):
    """--compile on CPU: one bucket of 4 samples serves calls of 4 (exact) and 2 (padded), no recompile."""
    eager = DiffusionCore(load_models(tiny_model_dir, device="cpu"), max_batch=4, compile=False)
    models = load_models(tiny_model_dir, device="cpu")
    torch._dynamo.reset()
    # One bucket keeps CI's CPU compile to one inductor graph (tens of seconds); the warm-up runs
    # it full and padded. The default compile cache makes a second run of this test quick.
    core = DiffusionCore(models, max_batch=4, compile=True, buckets=(4,))
    unet_fn = core.runner.unet_fn
    assert unet_fn.compiled and unet_fn.pad and unet_fn.compile_mode == "default"
    assert set(unet_fn.warm_seconds) == {4} and unet_fn.recompiles() == 0

    sizes = []
    observed = core.runner.unet_fn

    def observe(*inputs):
        sizes.append(inputs[0].shape[0])
        return observed(*inputs)

    core.runner.unet_fn = observe
    jobs = _mixed_jobs(core, models)
    with torch._dynamo.config.patch(error_on_recompile=True):
        core.run_to_completion(jobs, inversion_chunk=1)
    assert set(sizes) == {2, 4}, sizes  # both exact-fit and padded calls were served
    assert unet_fn.recompiles() == 0

    expected = _mixed_jobs(eager, eager.models)
    eager.run_to_completion(expected, inversion_chunk=1)
    for job, want in zip(jobs, expected):
        assert job.generation_done == job.steps
        torch.testing.assert_close(job.latent, want.latent, atol=1e-4, rtol=1e-4)


def test_compile_cache_goes_where_asked_unless_the_user_set_inductors(tmp_path, monkeypatch):
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())  # what inductor writes on first use
    assert configure_compile_cache(tmp_path / "ours") == tmp_path / "ours"
    assert (tmp_path / "ours").is_dir()
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "user"))
    assert configure_compile_cache(tmp_path / "ours") == tmp_path / "user"
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    monkeypatch.setenv("MASQUERADE_COMPILE_CACHE", str(tmp_path / "env"))
    assert configure_compile_cache(None) == tmp_path / "env"


def test_ip_adapter_faceid_loads_from_an_in_memory_state_dict(tiny_model_dir):
    """The engine benchmark's path: random FaceID weights go to load_ip_adapter without a file."""
    from diffusers import StableDiffusionXLPipeline

    from masquerade.models.layout import ModelLayout
    from masquerade.models.loader import _load_ip_adapter
    from masquerade.models.tiny import ip_adapter_faceid_state_dict

    pipe = StableDiffusionXLPipeline.from_pretrained(str(ModelLayout(tiny_model_dir).sdxl))
    _load_ip_adapter(pipe, ip_adapter_faceid_state_dict(pipe.unet, lora_rank=8))
    assert type(pipe.unet.encoder_hid_proj.image_projection_layers[0]).__name__ == "IPAdapterFaceIDImageProjection"
    assert pipe.unet.peft_config  # the FaceID LoRA came along


def test_serve_flags_reach_the_engine_config():
    from masquerade.cli import build_parser
    from masquerade.cli.serve import config_from_args

    def engine_config(*flags):
        return config_from_args(build_parser().parse_args(["serve", *flags])).engine

    default = engine_config()
    assert default.compile is None and default.compile_mode == "default" and default.vae_chunk == 4
    assert engine_config("--no-compile").compile is False
    chosen = engine_config("--compile", "--compile-cache", "/tmp/cache", "--vae-chunk", "2")
    assert chosen.compile is True and chosen.compile_cache == "/tmp/cache" and chosen.vae_chunk == 2
    with pytest.raises(SystemExit):
        engine_config("--compile-mode", "fastest")


def test_vae_in_chunks_equals_one_batch(tiny_models):
    whole = DiffusionCore(tiny_models, vae_chunk=8)
    chunked = DiffusionCore(tiny_models, vae_chunk=2)
    size = tiny_models.face_size
    crops = np.random.default_rng(3).integers(0, 256, (5, size, size, 3), dtype=np.uint8)
    latents = whole.encode(crops)
    assert latents.shape[0] == 5
    torch.testing.assert_close(chunked.encode(crops), latents, atol=1e-5, rtol=1e-5)
    one, parts = whole.decode(latents), chunked.decode(latents)
    assert one.shape == parts.shape == (5, size, size, 3)
    assert np.abs(one.astype(int) - parts.astype(int)).max() <= 1
    with pytest.raises(ValueError, match="vae_chunk"):
        DiffusionCore(tiny_models, vae_chunk=0)


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
    unet_fn = optimized_unet_fn(models, max_batch=8, compile=True, buckets=(2, 8))
    assert unet_fn.compiled and unet_fn.compile_mode == "default" and set(unet_fn.warm_seconds) == {2, 8}
    with torch._dynamo.config.patch(error_on_recompile=True):
        for n, x in inputs.items():
            torch.testing.assert_close(unet_fn(*x), expected[n], atol=FP16_ATOL, rtol=FP16_ATOL)
        # Inputs made outside inference mode, with a stride-0 time_ids: copied into the bucket's own.
        x = inputs[6]
        unet_fn(*x[:4], x[4][:1].expand(6, -1), x[5], torch.full((6,), 0.5, device="cuda", dtype=models.dtype))
        models.pipe.set_ip_adapter_scale(0.5)  # an adapter-wide scale is a buffer: no recompile either
        unet_fn(*inputs[6])
        models.pipe.set_ip_adapter_scale(1.0)
    assert unet_fn.recompiles() == 0
    with torch.inference_mode():
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(unet_fn.eager_forward)(*inputs[2])
    assert explanation.graph_break_count == 0, explanation.break_reasons
