"""The UNet as the step loop calls it on a GPU: fused weights, one attention backend, compiled per bucket.

``optimized_unet_fn`` returns a callable with ``UNetRunner``'s ``unet_fn``
signature. It folds the IP-Adapter-FaceID LoRA into the base weights, fuses the
attention projections (without dropping the IP-Adapter branch), picks the
attention kernel, and on CUDA pads every call to a batch-size bucket that was
compiled and warmed at start-up (DESIGN sections 2, 4 and 6). On CPU the same
structural changes apply but the call stays eager fp32, so the bucketing and
the fused processors are testable without a GPU.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

ATTENTION_BACKENDS = ("sdpa", "xformers")
# No CUDA graphs: the engine warms the buckets on the start-up thread but calls the
# UNet from its own worker thread, and inductor's CUDA-graph trees are thread-local
# (each thread would record its own graphs after "warm-up"); and at 1024^2 one UNet
# call is tens of milliseconds of GPU work, so the launch overhead CUDA graphs remove
# is already hidden behind the GPU. Max-autotune's GEMM/conv search is paid once per
# bucket at start-up (and cached on disk by inductor for the next start).
DEFAULT_COMPILE_MODE = "max-autotune-no-cudagraphs"
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs", "reduce-overhead", "max-autotune")
ID_EMBED_DIM = 512
TIME_IDS_DIM = 6

AttentionKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class AttentionBackendError(RuntimeError):
    """The attention backend asked for with ``--attention`` cannot run here."""


# ---- batch-size buckets (pure helpers) ---------------------------------------------------


def bucket_sizes(max_batch: int) -> tuple[int, ...]:
    """Powers of two from 2 up to ``max_batch`` (samples), plus ``max_batch`` itself rounded down to even.

    Samples come in CFG pairs, so every bucket is even.
    """
    if max_batch < 2:
        raise ValueError(f"max_batch must be at least 2 (one CFG pair), got {max_batch}")
    top = max_batch - max_batch % 2
    sizes = []
    size = 2
    while size < top:
        sizes.append(size)
        size *= 2
    sizes.append(top)
    return tuple(sizes)


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


# ---- attention kernels --------------------------------------------------------------------


def _sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """[B, heads, L, d] layout; FlashAttention / memory-efficient kernels on CUDA."""
    return F.scaled_dot_product_attention(query, key, value)


def attention_kernel(backend: str, device: torch.device) -> AttentionKernel:
    """The attention function for ``--attention``; raises AttentionBackendError when it cannot run."""
    if backend == "sdpa":
        return _sdpa
    if backend != "xformers":
        raise AttentionBackendError(f"--attention must be one of {ATTENTION_BACKENDS}, got {backend!r}")
    if device.type != "cuda":
        raise AttentionBackendError("--attention xformers needs a CUDA device; use --attention sdpa on CPU")
    try:
        import xformers.ops as xops
    except ImportError as error:
        raise AttentionBackendError(
            f"--attention xformers: xformers is not importable ({error}). Install the xformers wheel built for "
            f"torch {torch.__version__} (it pins one exact torch), or start with --attention sdpa"
        ) from error

    def xformers_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        # xformers wants [B, L, heads, d].
        out = xops.memory_efficient_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2))
        return out.transpose(1, 2)

    try:
        probe = torch.randn(1, 2, 16, 64, device=device, dtype=torch.float16)
        xformers_attention(probe, probe, probe)
        torch.cuda.synchronize(device)
    except Exception as error:
        raise AttentionBackendError(
            f"--attention xformers: xformers is installed but its attention kernel fails here ({error}); "
            "reinstall the wheel matching this torch and CUDA, or start with --attention sdpa"
        ) from error
    return xformers_attention


# ---- fused attention processors -------------------------------------------------------------


def _plain_attention(attn) -> bool:
    """True when an Attention module has none of the extras (norms, residual, rescale) our processors skip."""
    return (
        getattr(attn, "spatial_norm", None) is None
        and getattr(attn, "group_norm", None) is None
        and getattr(attn, "norm_q", None) is None
        and getattr(attn, "norm_k", None) is None
        and not getattr(attn, "norm_cross", False)
        and not getattr(attn, "residual_connection", False)
        and getattr(attn, "rescale_output_factor", 1.0) == 1.0
        and getattr(attn, "add_q_proj", None) is None
    )


def _fuse_linears(linears: Sequence[nn.Linear]) -> nn.Linear:
    """One Linear whose output is the concatenation of ``linears``' outputs.

    The originals' weights become views into the fused weight, so they stay valid
    (unfused processors still work) and nothing is stored twice.
    """
    first = linears[0]
    has_bias = first.bias is not None
    weight = torch.cat([lin.weight.detach() for lin in linears])
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        fused.weight.copy_(weight)
        if has_bias:
            fused.bias.copy_(torch.cat([lin.bias.detach() for lin in linears]))
    offset = 0
    for lin in linears:
        rows = lin.weight.shape[0]
        lin.weight = nn.Parameter(fused.weight[offset : offset + rows], requires_grad=False)
        if has_bias:
            lin.bias = nn.Parameter(fused.bias[offset : offset + rows], requires_grad=False)
        offset += rows
    fused.requires_grad_(False)
    return fused


def _heads(x: torch.Tensor, batch: int, heads: int) -> torch.Tensor:
    """[B, L, heads*d] -> [B, heads, L, d]."""
    return x.view(batch, -1, heads, x.shape[-1] // heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor, batch: int) -> torch.Tensor:
    """[B, heads, L, d] -> [B, L, heads*d]."""
    return x.transpose(1, 2).reshape(batch, x.shape[2], -1)


class FusedSelfAttnProcessor:
    """Self-attention with one QKV projection (``attn.to_qkv``) and a pluggable attention kernel."""

    def __init__(self, attend: AttentionKernel):
        self.attend = attend

    def __call__(
        self,
        attn,
        hidden_states,
        encoder_hidden_states=None,
        attention_mask=None,
        temb=None,
        ip_sample_scales=None,
        **_,
    ):
        if hidden_states.ndim != 3 or encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("FusedSelfAttnProcessor handles unmasked self-attention on [B, L, C] only")
        batch = hidden_states.shape[0]
        query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        out = self.attend(
            _heads(query, batch, attn.heads), _heads(key, batch, attn.heads), _heads(value, batch, attn.heads)
        )
        out = _merge_heads(out, batch).to(hidden_states.dtype)
        return attn.to_out[1](attn.to_out[0](out))


def _ip_adapter_base():
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    return IPAdapterAttnProcessor2_0


class _DeviceScales(list):
    """The processor's ``scale`` list that diffusers' ``set_ip_adapter_scale`` writes into, mirrored to a device tensor.

    ``set_ip_adapter_scale`` assigns ``processor.scale[i] = value`` in place; mirroring the value
    into a buffer keeps the number out of the compiled graph, so a new ``ip_adapter_scale``
    neither recompiles a bucket nor bakes a stale constant into it (DESIGN section 6).
    """

    def __init__(self, values, tensor: torch.Tensor):
        super().__init__(values)
        self._tensor = tensor

    def __setitem__(self, index, value):
        if not isinstance(value, (int, float)):
            raise TypeError(f"ip_adapter_scale must be a number per adapter, got {type(value).__name__}")
        super().__setitem__(index, value)
        with torch.no_grad():
            self._tensor[index].fill_(float(value))


def fused_ip_adapter_processor_class():
    """Build the class lazily so importing this module does not import diffusers."""
    base = _ip_adapter_base()

    class FusedIPAdapterAttnProcessor(base):
        """Cross-attention over text plus the IP-Adapter identity tokens, with fused K/V projections.

        Same math as diffusers' ``IPAdapterAttnProcessor2_0`` without masks:
        ``attn(q, K_text, V_text) + scale * attn(q, K_ip, V_ip)``, where ``scale`` is per sample
        when the UNet is called with ``cross_attention_kwargs={"ip_sample_scales": [B]}`` (the
        engine always does), else the adapter-wide value. It subclasses diffusers' processor so
        that ``pipe.set_ip_adapter_scale`` still finds and updates it; that value lives in a buffer.
        """

        def __init__(self, source, attend: AttentionKernel):
            nn.Module.__init__(self)  # the parent would allocate fresh projections we do not want
            self.hidden_size = source.hidden_size
            self.cross_attention_dim = source.cross_attention_dim
            self.num_tokens = list(source.num_tokens)
            self.attend = attend
            self.ip_kv = nn.ModuleList(
                _fuse_linears([to_k, to_v]) for to_k, to_v in zip(source.to_k_ip, source.to_v_ip)
            )
            weight = self.ip_kv[0].weight
            values = [float(s) for s in source.scale]
            self.register_buffer("scale_values", torch.tensor(values, device=weight.device, dtype=weight.dtype))
            self.scale = _DeviceScales(values, self.scale_values)

        def __call__(
            self,
            attn,
            hidden_states,
            encoder_hidden_states=None,
            attention_mask=None,
            temb=None,
            ip_sample_scales=None,
            **kwargs,
        ):
            if kwargs.get("ip_adapter_masks") is not None:
                raise ValueError("FusedIPAdapterAttnProcessor does not support ip_adapter_masks")
            if hidden_states.ndim != 3 or attention_mask is not None or not isinstance(encoder_hidden_states, tuple):
                raise ValueError("FusedIPAdapterAttnProcessor needs [B, L, C] states and (text, ip tokens) context")
            text, ip_tokens = encoder_hidden_states
            batch, heads = hidden_states.shape[0], attn.heads
            query = _heads(attn.to_q(hidden_states), batch, heads)
            key, value = attn.to_kv(text).chunk(2, dim=-1)
            out = self.attend(query, _heads(key, batch, heads), _heads(value, batch, heads))
            for index, (tokens, ip_kv) in enumerate(zip(ip_tokens, self.ip_kv)):
                # [B, images, tokens, D] -> [B, images * tokens, D]
                ip_key, ip_value = ip_kv(tokens.reshape(batch, -1, tokens.shape[-1])).chunk(2, dim=-1)
                ip_out = self.attend(query, _heads(ip_key, batch, heads), _heads(ip_value, batch, heads))
                if ip_sample_scales is not None:
                    # One scale per sample, so jobs with different ip_adapter_scale share a call.
                    scale = ip_sample_scales.to(ip_out.dtype).view(batch, 1, 1, 1)
                else:
                    scale = self.scale_values[index]
                out = out + scale * ip_out
            out = _merge_heads(out, batch).to(hidden_states.dtype)
            return attn.to_out[1](attn.to_out[0](out))

    return FusedIPAdapterAttnProcessor


# ---- one-time model surgery ---------------------------------------------------------------------


def fuse_faceid_lora(pipe) -> bool:
    """Fold the IP-Adapter-FaceID LoRA (loaded by diffusers as peft adapters ``faceid_*``) into the UNet.

    diffusers' ``load_ip_adapter`` attaches the FaceID LoRA as a peft adapter at weight 1.0;
    its forward then pays two extra small GEMMs per projection and peft's Python wrappers.
    ``fuse_lora`` + ``unload_lora_weights`` (the documented pair) leaves plain Linear layers
    with the LoRA merged. ``ip_adapter_scale`` does not touch the LoRA, so merging is exact.
    Returns whether anything was fused.
    """
    unet = pipe.unet
    if not getattr(unet, "peft_config", None):
        return False
    names = sorted(unet.peft_config)
    pipe.fuse_lora(components=["unet"], lora_scale=1.0, adapter_names=names)
    pipe.unload_lora_weights()
    log.info("fused the IP-Adapter-FaceID LoRA (%s) into the UNet weights", ", ".join(names))
    return True


def install_fused_attention(unet, attend: AttentionKernel) -> dict[str, int]:
    """Fuse Q/K/V of self-attention and K/V of cross-attention, and install our processors.

    diffusers' ``unet.fuse_qkv_projections()`` swaps *every* processor for
    ``FusedAttnProcessor2_0``, which drops the IP-Adapter identity branch (its
    ``to_k_ip``/``to_v_ip`` live in the processor it replaces), so it is not used here.
    Returns counts per processor kind; modules with features we do not handle keep theirs.
    """
    from diffusers.models.attention_processor import Attention

    ip_base = _ip_adapter_base()
    ip_processor = fused_ip_adapter_processor_class()
    counts = {"self": 0, "cross_ip": 0, "kept": 0}
    processors = {}
    for name, processor in unet.attn_processors.items():
        module = unet
        for part in name.removesuffix(".processor").split("."):
            module = getattr(module, part)
        assert isinstance(module, Attention), name
        if isinstance(processor, (FusedSelfAttnProcessor, ip_processor)):
            processors[name] = processor
            counts["self" if isinstance(processor, FusedSelfAttnProcessor) else "cross_ip"] += 1
            continue
        if not _plain_attention(module):
            processors[name] = processor
            counts["kept"] += 1
            continue
        if not module.is_cross_attention and type(processor).__name__ == "AttnProcessor2_0":
            if getattr(module, "to_qkv", None) is None:
                module.to_qkv = _fuse_linears([module.to_q, module.to_k, module.to_v])
            processors[name] = FusedSelfAttnProcessor(attend)
            counts["self"] += 1
        elif module.is_cross_attention and type(processor) is ip_base and getattr(processor, "num_tokens", None):
            if getattr(module, "to_kv", None) is None:
                module.to_kv = _fuse_linears([module.to_k, module.to_v])
            processors[name] = ip_processor(processor, attend)
            counts["cross_ip"] += 1
        else:
            processors[name] = processor
            counts["kept"] += 1
    unet.set_attn_processor(processors)
    return counts


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
    """Inputs of one UNet call of ``batch`` samples with the runner's shapes, dtype and device."""
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
        torch.tensor([models.face_size, models.face_size, 0, 0, models.face_size, models.face_size], dtype=dtype)
        .to(device)
        .expand(batch, TIME_IDS_DIM),  # time_ids
        randn(batch, 1, ID_EMBED_DIM),  # id_embeds
        torch.ones(batch, device=device, dtype=dtype),  # ip_scales
    )


class OptimizedUNet:
    """``unet_fn`` for the runner: pads each call to its bucket and runs the (compiled) UNet.

    Thread-confined like the runner. ``warm_seconds`` holds the start-up compile time per bucket.
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
    ):
        self.models = models
        self.buckets = tuple(sorted(buckets))
        self.attention = attention
        self.prepared = _prepare_unet(models, attention)
        self.channels_last = models.device.type == "cuda"
        self.compiled = bool(compile) and models.device.type == "cuda"
        self.compile_mode = compile_mode if self.compiled else None
        # Padding exists for the compiled graphs' fixed shapes; eager calls run at their true size.
        self.pad = self.compiled if pad is None else bool(pad)
        self.warm_seconds: dict[int, float] = {}
        unet = models.unet

        def forward(sample, timesteps, text_embeds, pooled, time_ids, id_embeds, ip_scales):
            return unet_forward(unet, sample, timesteps, text_embeds, pooled, time_ids, id_embeds, ip_scales)

        self.eager_forward = forward  # the uncompiled call, for torch._dynamo.explain in tests
        self._forward = forward
        if compile and not self.compiled:
            log.info("torch.compile skipped: the UNet runs on %s (compile is CUDA only); eager", models.device)
        if self.compiled:
            self._raise_recompile_limit(len(self.buckets))
            mode = None if compile_mode == "default" else compile_mode
            self._forward = torch.compile(forward, mode=mode, dynamic=False, fullgraph=False)
            self.warm()

    @staticmethod
    def _raise_recompile_limit(buckets: int) -> None:
        # One graph per bucket; past Dynamo's limit it silently runs eager (DESIGN section 6).
        config = torch._dynamo.config
        name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
        setattr(config, name, max(getattr(config, name), buckets + 4))

    @torch.inference_mode()
    def warm(self) -> None:
        """Compile and run every bucket once, largest first (it sizes the allocator's pool)."""
        for size in sorted(self.buckets, reverse=True):
            inputs = example_inputs(self.models, size)
            started = time.perf_counter()
            self(*inputs)
            if self.models.device.type == "cuda":
                torch.cuda.synchronize(self.models.device)
            self.warm_seconds[size] = time.perf_counter() - started
            log.info(
                "UNet bucket %d samples: %s and warm in %.1fs",
                size,
                f"compiled ({self.compile_mode})" if self.compiled else "eager",
                self.warm_seconds[size],
            )

    def __call__(self, sample, timesteps, text_embeds, pooled, time_ids, id_embeds, ip_scales) -> torch.Tensor:
        inputs = (sample, timesteps, text_embeds, pooled, time_ids, id_embeds, ip_scales)
        n = sample.shape[0]
        if self.pad:
            inputs, n = pad_to_bucket(inputs, self.buckets)
        if self.channels_last:
            inputs = (inputs[0].contiguous(memory_format=torch.channels_last),) + tuple(inputs[1:])
        return self._forward(*inputs)[:n]


def optimized_unet_fn(
    models,
    *,
    max_batch: int,
    compile: bool,
    attention: str = "sdpa",
    buckets: Sequence[int] | None = None,
    compile_mode: str = DEFAULT_COMPILE_MODE,
    pad: bool | None = None,
) -> OptimizedUNet:
    """Prepare ``models.unet`` once and return the runner's ``unet_fn``.

    Called at engine start-up, before the server reports SERVING: with ``compile`` on CUDA
    it compiles and warms every bucket (minutes for SDXL; one log line per bucket).
    ``buckets`` defaults to powers of two from 2 to ``max_batch``. Raises
    AttentionBackendError for an ``attention`` backend that cannot run here.
    """
    if attention not in ATTENTION_BACKENDS:
        raise AttentionBackendError(f"--attention must be one of {ATTENTION_BACKENDS}, got {attention!r}")
    if compile_mode not in COMPILE_MODES:
        raise ValueError(f"compile_mode must be one of {COMPILE_MODES}, got {compile_mode!r}")
    sizes = tuple(buckets) if buckets is not None else bucket_sizes(max_batch)
    if any(size < 2 or size % 2 for size in sizes):
        raise ValueError(f"buckets must be even sample counts >= 2 (CFG pairs), got {sizes}")
    if max(sizes) < max_batch:
        raise ValueError(f"the largest bucket {max(sizes)} is below max_batch {max_batch}")
    return OptimizedUNet(
        models, buckets=sizes, compile=compile, compile_mode=compile_mode, attention=attention, pad=pad
    )
