"""The UNet as the step loop calls it: fused weights, one attention backend, compiled per bucket.

``optimized_unet_fn`` returns a callable with ``UNetRunner``'s ``unet_fn``
signature. It folds the IP-Adapter-FaceID LoRA into the base weights, fuses the
attention projections (without dropping the IP-Adapter branch), picks the
attention kernel and, when compiled, pads every call to a batch-size bucket
that was compiled and warmed at start-up (DESIGN sections 2, 4 and 6). Compile
works on any device (inductor's C++ backend on CPU, Triton on CUDA), so CI runs
the compiled path on the tiny models; it is on by default only on CUDA.

Zero recompiles after warm-up: the compiled function only ever sees one
preallocated set of input tensors per bucket (same dtype, device, strides and
inference-mode flag on every call); each call copies its rows into them, pads
by repeating the last row, and the warm-up runs every bucket both exactly full
and padded. ``recompiles()`` counts Dynamo compiles since the warm-up.
"""

from __future__ import annotations

import inspect
import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from masquerade.models.fused_attention import (  # noqa: F401  (re-exported: callers import them from here)
    ATTENTION_BACKENDS,
    AttentionBackendError,
    FusedSelfAttnProcessor,
    attention_kernel,
    fuse_faceid_lora,
    fused_ip_adapter_processor_class,
    install_fused_attention,
)

log = logging.getLogger(__name__)

# "default" compiles an SDXL bucket in about a minute on an H100; max-autotune's GEMM/conv search
# costs many minutes per bucket at start-up for a gain nobody has measured here (the engine
# benchmark compares modes when asked: --compile-mode). Inductor's cache (--compile-cache) makes
# a restart reuse the compiled kernels either way.
DEFAULT_COMPILE_MODE = "default"
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs", "reduce-overhead", "max-autotune")
# Modes that replay CUDA graphs. Inductor's CUDA-graph trees are thread-local, and the engine warms
# the buckets on its start-up thread but calls the UNet from its own worker thread; in these modes
# every compiled call (warm-up included) therefore runs on one thread that OptimizedUNet owns, so
# the graphs recorded while warming are the ones replayed. One SDXL call at 1024^2 is tens of ms
# of GPU work, so the launch overhead graphs remove (~2,000 launches, a few ms) is mostly hidden
# already: the default mode does not use them until the benchmark shows a gain.
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
# Even bucket sizes: CFG pairs make every call even; below 8 every even size has its own graph,
# above it the steps grow by half, so at most 2 samples of 12 (17 %) are padding up to 16.
BUCKET_LADDER = (2, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128)
ID_EMBED_DIM = 512
TIME_IDS_DIM = 6

# ---- batch-size buckets (pure helpers) ---------------------------------------------------


def bucket_sizes(max_batch: int) -> tuple[int, ...]:
    """The even bucket ladder (2, 4, 6, 8, 12, 16, 24, ...) below ``max_batch``, plus ``max_batch`` rounded down to even."""
    if max_batch < 2:
        raise ValueError(f"max_batch must be at least 2 (one CFG pair), got {max_batch}")
    top = max_batch - max_batch % 2
    return tuple(size for size in BUCKET_LADDER if size < top) + (top,)


def bucket_for(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds ``n`` samples."""
    for size in sorted(buckets):
        if size >= n:
            return size
    raise ValueError(f"a UNet call of {n} samples exceeds the largest bucket {max(buckets)}; raise --max-batch")


def pad_to_bucket(rows: Sequence[torch.Tensor], buckets: Sequence[int]) -> tuple[tuple[torch.Tensor, ...], int]:
    """Pad every tensor along dim 0 to the bucket of their common length by repeating the last row.

    Returns (padded tensors, original length); slice outputs back with ``[:n]``. The UNet
    treats samples independently (GroupNorm and attention are per sample), so the
    repeated rows change nothing but the shape.
    """
    n = rows[0].shape[0]
    if n == 0:
        raise ValueError("cannot pad an empty batch")
    for tensor in rows:
        if tensor.shape[0] != n:
            raise ValueError(f"rows disagree on the batch size: {[t.shape[0] for t in rows]}")
    size = bucket_for(n, buckets)
    if size == n:
        return tuple(rows), n
    padded = tuple(torch.cat([t, t[-1:].expand(size - n, *t.shape[1:])]) for t in rows)
    return padded, n


def _prepare_unet(models, attention: str) -> dict[str, object]:
    """Apply the one-time changes to ``models`` (idempotent); return what was done, for logs and reports."""
    unet = models.unet
    done = getattr(unet, "_masquerade_optimized", None)
    if done is not None:
        if done["attention"] != attention:
            raise AttentionBackendError(
                f"--attention {attention}: this model bundle was already prepared with --attention {done['attention']}"
            )
        return done
    attend = attention_kernel(attention, models.device)
    lora_fused = fuse_faceid_lora(models.pipe)
    counts = install_fused_attention(unet, attend)
    # The engine passes per-sample IP-Adapter scales to every processor; one that cannot take
    # them would silently apply the adapter-wide scale instead.
    unsupported = [
        name
        for name, processor in unet.attn_processors.items()
        if "ip_sample_scales" not in inspect.signature(processor.__call__).parameters
    ]
    if unsupported:
        raise RuntimeError(
            f"{len(unsupported)} attention modules kept processors without per-sample IP-Adapter scales "
            f"(first: {unsupported[0]}); this UNet has attention features the fused processors do not cover"
        )
    if models.device.type == "cuda":
        unet.to(memory_format=torch.channels_last)
    done = {"attention": attention, "lora_fused": lora_fused, "processors": counts}
    unet._masquerade_optimized = done
    log.info(
        "UNet prepared: attention %s, FaceID LoRA %s, fused processors %s, channels_last %s",
        attention,
        "fused" if lora_fused else "absent",
        counts,
        models.device.type == "cuda",
    )
    return done


# ---- the callable the runner uses ---------------------------------------------------------------


def unet_forward(unet, sample, timesteps, text_embeds, pooled, time_ids, id_embeds, ip_scales=None) -> torch.Tensor:
    """One UNet evaluation with the runner's inputs -> eps [B, 4, h, w].

    ``ip_scales`` ([B], per-sample IP-Adapter scale) needs the processors that
    ``install_fused_attention`` puts in; diffusers' own would drop it with a warning.
    """
    return unet(
        sample,
        timesteps,
        encoder_hidden_states=text_embeds,
        added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids, "image_embeds": [id_embeds]},
        cross_attention_kwargs=None if ip_scales is None else {"ip_sample_scales": ip_scales},
        return_dict=False,
    )[0]


def stock_unet_fn(unet):
    """The unprepared diffusers UNet with the runner's signature, for baselines and references.

    diffusers' processors know only one adapter-wide IP-Adapter scale (``set_ip_adapter_scale``),
    so the per-sample ``ip_scales`` are dropped: valid when every row has that scale.
    """

    def forward(sample, timesteps, text_embeds, pooled, time_ids, id_embeds, ip_scales=None):
        return unet_forward(unet, sample, timesteps, text_embeds, pooled, time_ids, id_embeds)

    return forward


def example_inputs(models, batch: int) -> tuple[torch.Tensor, ...]:
    """Inputs of one UNet call of ``batch`` samples with the runner's shapes, dtype and device (all contiguous)."""
    unet = models.unet
    latent = models.face_size // models.vae_scale_factor
    device, dtype = models.device, models.dtype
    generator = torch.Generator(device="cpu").manual_seed(batch)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device, dtype)

    pooled_dim = models.pipe.text_encoder_2.config.projection_dim
    return (
        randn(batch, unet.config.in_channels, latent, latent),  # sample
        torch.randint(1, 1000, (batch,), generator=generator).to(device),  # timesteps
        randn(batch, 77, unet.config.cross_attention_dim),  # text_embeds
        randn(batch, pooled_dim),  # pooled
        sdxl_time_ids(models.face_size, batch, device, dtype),  # time_ids
        randn(batch, 1, ID_EMBED_DIM),  # id_embeds
        torch.ones(batch, device=device, dtype=dtype),  # ip_scales
    )


def sdxl_time_ids(face_size: int, batch: int, device, dtype) -> torch.Tensor:
    """SDXL's micro-conditioning (original size, crop corner, target size) for aligned S x S crops: [batch, 6]."""
    row = torch.tensor([face_size, face_size, 0, 0, face_size, face_size], dtype=dtype)
    return row.repeat(batch, 1).to(device)


# ---- compile cache and counters ---------------------------------------------------------------------


def default_compile_cache() -> Path:
    """``$MASQUERADE_COMPILE_CACHE``, else ``~/.cache/masquerade/torch-compile``."""
    env = os.environ.get("MASQUERADE_COMPILE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "masquerade" / "torch-compile"


def configure_compile_cache(path: str | os.PathLike | None) -> Path:
    """Point inductor's on-disk caches (FX graphs, Triton kernels, autotuning) at ``path`` and keep them on.

    A restart with the same cache and the same torch, model and bucket shapes loads the compiled
    graphs instead of generating and compiling them again (seconds instead of minutes). A
    ``TORCHINDUCTOR_CACHE_DIR`` already set by the user wins over ``path``.
    """
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    # Inductor writes its own default into the variable on first use; only a user's value counts.
    user = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if user and os.path.abspath(user) == os.path.abspath(default_cache_dir()):
        user = None
    chosen = user or str(Path(path or default_compile_cache()).expanduser())
    Path(chosen).mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = chosen
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True
    inductor_config.autotune_local_cache = True
    return Path(chosen)


def dynamo_compiles() -> int:
    """Graphs Dynamo has compiled in this process so far (every bucket's first call and every recompile)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _raise_recompile_limit(buckets: int) -> None:
    # One graph per bucket; past Dynamo's limit it silently runs eager (DESIGN section 6).
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), buckets + 4))


# ---- the callable the runner uses ---------------------------------------------------------------


class OptimizedUNet:
    """``unet_fn`` for the runner: copies each call into its bucket's input tensors and runs the (compiled) UNet.

    Thread-confined like the runner. ``warm_seconds`` holds the start-up compile time per bucket;
    ``recompiles()`` the Dynamo compiles since the warm-up ended (0 is the invariant).
    """

    def __init__(
        self,
        models,
        *,
        buckets: Sequence[int],
        compile: bool,
        compile_mode: str,
        attention: str,
        pad: bool | None = None,
        compile_cache: str | os.PathLike | None = None,
        warm: bool = True,
    ):
        self.models = models
        self.buckets = tuple(sorted(buckets))
        self.attention = attention
        self.prepared = _prepare_unet(models, attention)
        self.channels_last = models.device.type == "cuda"
        self.compiled = bool(compile)
        self.compile_mode = compile_mode if self.compiled else None
        # Padding exists for the compiled graphs' fixed shapes; eager calls run at their true size.
        self.pad = self.compiled if pad is None else bool(pad)
        self.copy_outputs = self.compiled and compile_mode in CUDA_GRAPH_MODES and models.device.type == "cuda"
        # CUDA graphs are recorded per thread: run every compiled call on one thread of our own.
        self._graph_thread = (
            ThreadPoolExecutor(1, thread_name_prefix="masquerade-unet-graphs") if self.copy_outputs else None
        )
        self.warm_seconds: dict[int, float] = {}
        self.compile_cache: Path | None = None
        self._compiles_after_warm: int | None = None
        self._inputs: dict[int, tuple[torch.Tensor, ...]] = {}
        unet = models.unet

        def forward(sample, timesteps, text_embeds, pooled, time_ids, id_embeds, ip_scales):
            return unet_forward(unet, sample, timesteps, text_embeds, pooled, time_ids, id_embeds, ip_scales)

        self.eager_forward = forward  # the uncompiled call, for torch._dynamo.explain in tests
        self._forward = forward
        if self.pad:
            with torch.inference_mode():
                self._inputs = {size: self._allocate_inputs(size) for size in self.buckets}
        if self.compiled:
            self.compile_cache = configure_compile_cache(compile_cache)
            _raise_recompile_limit(len(self.buckets))
            mode = None if compile_mode == "default" else compile_mode
            self._forward = torch.compile(forward, mode=mode, dynamic=False, fullgraph=False)
            if warm:
                self.warm()

    def _allocate_inputs(self, size: int) -> tuple[torch.Tensor, ...]:
        """The bucket's input tensors, made once (inside inference mode, contiguous, channels-last on CUDA)."""
        inputs = tuple(
            torch.empty_like(t, memory_format=torch.contiguous_format) for t in example_inputs(self.models, size)
        )
        if self.channels_last:
            inputs = (inputs[0].contiguous(memory_format=torch.channels_last),) + inputs[1:]
        return inputs

    @torch.inference_mode()
    def warm(self, sizes: Sequence[int] | None = None) -> None:
        """Compile and run every bucket (or ``sizes``), largest first (it sizes the allocator's pool), full and padded."""
        for size in sorted(self.buckets if sizes is None else sizes, reverse=True):
            inputs = example_inputs(self.models, size)
            started = time.perf_counter()
            self(*inputs)
            if self.pad:
                self(*(t[: size - 1] for t in inputs))  # a padded call must hit the same graph
            if self.models.device.type == "cuda":
                torch.cuda.synchronize(self.models.device)
            self.warm_seconds[size] = time.perf_counter() - started
            log.info(
                "UNet bucket %d samples: %s and warm in %.1fs",
                size,
                f"compiled ({self.compile_mode})" if self.compiled else "eager",
                self.warm_seconds[size],
            )
        self._compiles_after_warm = dynamo_compiles()
        if self.compiled:
            log.info("torch.compile: %d buckets warm; inductor cache %s", len(self.warm_seconds), self.compile_cache)

    def serve_only_warm_buckets(self) -> None:
        """Drop the buckets ``warm`` has not run (the benchmark's time budget): calls pad to a warm one."""
        if max(self.buckets) not in self.warm_seconds:
            raise ValueError(f"the largest bucket {max(self.buckets)} is not warm")
        self.buckets = tuple(size for size in self.buckets if size in self.warm_seconds)

    def recompiles(self) -> int:
        """Dynamo compiles since the warm-up ended, counted over the whole process (0 before it)."""
        if self._compiles_after_warm is None:
            return 0
        return dynamo_compiles() - self._compiles_after_warm

    @torch.inference_mode()
    def __call__(self, sample, timesteps, text_embeds, pooled, time_ids, id_embeds, ip_scales) -> torch.Tensor:
        inputs = (sample, timesteps, text_embeds, pooled, time_ids, id_embeds, ip_scales)
        n = sample.shape[0]
        if not self.pad:
            if self.channels_last:
                inputs = (sample.contiguous(memory_format=torch.channels_last),) + inputs[1:]
            return self._forward(*inputs)
        static = self._inputs[bucket_for(n, self.buckets)]
        for target, source in zip(static, inputs):
            # Same tensors every call: no guard can see a new stride, dtype or dispatch key. The
            # padding repeats the last row (the UNet treats samples independently).
            target[:n].copy_(source)
            if n < target.shape[0]:
                target[n:].copy_(source[n - 1 : n])
        if self._graph_thread is not None:
            return self._graph_thread.submit(self._run_bucket, static, n).result()
        return self._run_bucket(static, n)

    @torch.inference_mode()  # inference mode is per thread: the graph thread enters it too
    def _run_bucket(self, static: tuple[torch.Tensor, ...], n: int) -> torch.Tensor:
        out = self._forward(*static)[:n]
        # CUDA-graph modes hand out the graph's own output memory, overwritten by the next replay.
        return out.clone() if self.copy_outputs else out


def resolve_compile(compile: bool | None, device: torch.device) -> bool:
    """``None`` (the default) compiles on CUDA and runs eager elsewhere; True or False is obeyed on any device."""
    return device.type == "cuda" if compile is None else bool(compile)


def optimized_unet_fn(
    models,
    *,
    max_batch: int,
    compile: bool | None = None,
    attention: str = "sdpa",
    buckets: Sequence[int] | None = None,
    compile_mode: str = DEFAULT_COMPILE_MODE,
    pad: bool | None = None,
    compile_cache: str | os.PathLike | None = None,
    warm: bool = True,
) -> OptimizedUNet:
    """Prepare ``models.unet`` once and return the runner's ``unet_fn``.

    Called at engine start-up, before the server reports SERVING: when compiling it compiles
    and warms every bucket (about a minute per bucket for SDXL on a cold cache; one log line
    per bucket). ``compile=None`` compiles on CUDA only. ``buckets`` defaults to
    ``bucket_sizes(max_batch)``. Raises AttentionBackendError for an ``attention`` backend that
    cannot run here.
    """
    if attention not in ATTENTION_BACKENDS:
        raise AttentionBackendError(f"--attention must be one of {ATTENTION_BACKENDS}, got {attention!r}")
    if compile_mode not in COMPILE_MODES:
        raise ValueError(f"--compile-mode must be one of {COMPILE_MODES}, got {compile_mode!r}")
    sizes = tuple(sorted(set(buckets))) if buckets is not None else bucket_sizes(max_batch)
    if any(size < 2 or size % 2 for size in sizes):
        raise ValueError(f"buckets must be even sample counts >= 2 (CFG pairs), got {sizes}")
    if max(sizes) < max_batch:
        raise ValueError(f"the largest bucket {max(sizes)} is below max_batch {max_batch}")
    return OptimizedUNet(
        models,
        buckets=sizes,
        compile=resolve_compile(compile, models.device),
        compile_mode=compile_mode,
        attention=attention,
        pad=pad,
        compile_cache=compile_cache,
        warm=warm,
    )
