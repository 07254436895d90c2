"""Attention for the prepared UNet: the kernel behind ``--attention`` and the fused processors.

``install_fused_attention`` fuses Q/K/V (self-attention) and K/V (cross-attention)
projections and installs processors that take a per-sample IP-Adapter scale,
without dropping IP-Adapter-FaceID's identity branch (DESIGN section 2);
``fuse_faceid_lora`` folds the FaceID LoRA into the base weights. Used by
``masquerade.models.optimize``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

ATTENTION_BACKENDS = ("sdpa", "xformers")

AttentionKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class AttentionBackendError(RuntimeError):
    """The attention backend asked for with ``--attention`` cannot run here."""


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
