"""Load the diffusion, identity-branch and identity-encoder models from real files.

The same code loads the user's real weights and the tiny random set of
``masquerade.models.tiny``; each part that is missing or does not match gets a
``ModelLoadError`` naming the part and the file.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from masquerade.models.layout import (
    IP_ADAPTER_FILE,
    IP_ADAPTER_REPO,
    SDXL_REPO,
    ModelLayout,
)

log = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """A model part could not be loaded; ``part`` names which one."""

    def __init__(self, part: str, message: str):
        super().__init__(f"{part}: {message}")
        self.part = part


@dataclass
class ModelBundle:
    """Everything the engine needs, on one device and dtype."""

    pipe: object = field(repr=False)  # diffusers StableDiffusionXLPipeline with IP-Adapter-FaceID loaded
    arcface: object = field(repr=False)  # masquerade.models.arcface.ArcFaceEncoder (onnxruntime)
    device: torch.device
    dtype: torch.dtype
    face_size: int  # S: side of the aligned face crop (1024 for SDXL)
    versions: dict[str, str]
    is_tiny: bool = False
    attention_backend: str = "sdpa"

    @property
    def unet(self):
        return self.pipe.unet

    @property
    def vae(self):
        return self.pipe.vae

    @property
    def latent_channels(self) -> int:
        return self.pipe.unet.config.in_channels

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.pipe.vae.config.block_out_channels) - 1)

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self.pipe.scheduler.alphas_cumprod


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device", f"{device!r} requested but CUDA is not available; use --device cpu")
    return resolved


def _load_sdxl(source: str | Path, dtype: torch.dtype):
    from diffusers import StableDiffusionXLPipeline

    source_str = str(source)
    is_local = Path(source_str).exists()
    if is_local and not (Path(source_str) / "model_index.json").is_file():
        raise ModelLoadError("sdxl", f"{source_str} is not an SDXL pipeline folder (no model_index.json)")
    kwargs = {"torch_dtype": dtype}
    if not is_local:
        kwargs["local_files_only"] = True  # repo ids resolve in the Hugging Face cache; `models fetch` fills it
    try:
        pipe = StableDiffusionXLPipeline.from_pretrained(source_str, **kwargs)
    except (OSError, ValueError, KeyError) as error:
        raise ModelLoadError("sdxl", f"cannot load an SDXL pipeline from {source_str}: {error}") from error
    if pipe.unet.config.addition_embed_type != "text_time":
        raise ModelLoadError("sdxl", f"{source_str}: UNet is not SDXL-style (addition_embed_type must be text_time)")
    return pipe


def _load_ip_adapter(pipe, source: str | Path | dict) -> None:
    """Load IP-Adapter-FaceID from a file, a folder holding it, a Hugging Face repo id, or a state dict in memory."""
    if isinstance(source, dict):  # the benchmark's random weights: no 2 GB save and reload
        folder, weight_name, where = source, "", "an in-memory state dict"
    else:
        source_path = Path(source)
        if source_path.is_file():
            folder, weight_name = str(source_path.parent), source_path.name
        elif source_path.is_dir():
            folder, weight_name = str(source_path), IP_ADAPTER_FILE
            if not (source_path / weight_name).is_file():
                raise ModelLoadError("ip_adapter", f"{source_path} has no {IP_ADAPTER_FILE}")
        else:
            folder, weight_name = str(source), IP_ADAPTER_FILE  # a repo id in the Hugging Face cache
        where = f"{folder}/{weight_name}"
    try:
        pipe.load_ip_adapter(
            folder,
            subfolder="",
            weight_name=weight_name,
            image_encoder_folder=None,
            local_files_only=True,
        )
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise ModelLoadError(
            "ip_adapter",
            f"cannot load IP-Adapter-FaceID from {where} into this UNet "
            f"(is it the SDXL version, and does it match the SDXL weights?): {error}",
        ) from error
    projection = pipe.unet.encoder_hid_proj.image_projection_layers[0]
    if type(projection).__name__ != "IPAdapterFaceIDImageProjection":
        raise ModelLoadError(
            "ip_adapter",
            f"{where} is an IP-Adapter of kind {type(projection).__name__}, not IP-Adapter-FaceID",
        )


def load_models(
    model_dir: str | Path | None = None,
    *,
    sdxl: str | Path | None = None,
    ip_adapter: str | Path | None = None,
    arcface: str | Path | None = None,
    device: str = "auto",
    dtype: torch.dtype | None = None,
    attention: str = "sdpa",
) -> ModelBundle:
    """Load a model set. Parts default to their place under ``model_dir``.

    ``dtype`` defaults to fp16 on CUDA and fp32 on CPU (CPU half kernels are slow
    or missing). The VAE stays in fp32 when its config asks to upcast, since
    SDXL's VAE overflows in fp16 (DESIGN section 6).
    """
    from masquerade.models.arcface import load_arcface
    from masquerade.models.tiny import TINY_MARKER

    started = time.perf_counter()
    resolved_device = resolve_device(device)
    if dtype is None:
        dtype = torch.float16 if resolved_device.type == "cuda" else torch.float32
    layout = ModelLayout(Path(model_dir)) if model_dir is not None else None
    if layout is not None and not layout.root.is_dir():
        raise ModelLoadError(
            "model_dir", f"{layout.root} does not exist; run `masquerade models fetch --to {layout.root}`"
        )
    sdxl_source = sdxl or (layout.sdxl if layout else SDXL_REPO)
    ip_source = ip_adapter or (layout.ip_adapter if layout else IP_ADAPTER_REPO)
    arcface_source = arcface or (layout.arcface if layout else None)
    if arcface_source is None:
        raise ModelLoadError("arcface", "no ArcFace file given; pass a model dir or the path of w600k_r50.onnx")
    if not Path(arcface_source).is_file():
        raise ModelLoadError("arcface", f"{arcface_source} not found (insightface buffalo_l pack, w600k_r50.onnx)")

    pipe = _load_sdxl(sdxl_source, dtype)
    _load_ip_adapter(pipe, ip_source)
    if pipe.vae.config.get("force_upcast", True):
        pipe.vae.to(dtype=torch.float32)
    pipe.to(resolved_device)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        module.eval().requires_grad_(False)
    try:
        encoder = load_arcface(arcface_source, device=str(resolved_device), dtype=dtype)
    except (OSError, ValueError) as error:
        raise ModelLoadError("arcface", str(error)) from error

    face_size = pipe.unet.config.sample_size * 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    is_tiny = layout is not None and (layout.root / TINY_MARKER).is_file()
    bundle = ModelBundle(
        pipe=pipe,
        arcface=encoder,
        device=resolved_device,
        dtype=dtype,
        face_size=face_size,
        versions={
            "sdxl": str(sdxl_source) + (" (tiny random)" if is_tiny else ""),
            "ip_adapter": str(ip_source),
            "arcface": str(arcface_source),
        },
        is_tiny=is_tiny,
        attention_backend=attention,
    )
    log.info(
        "loaded models in %.1fs: face size %d, device %s, dtype %s%s",
        time.perf_counter() - started,
        face_size,
        resolved_device,
        str(dtype).removeprefix("torch."),
        " (TINY RANDOM: output is noise)" if is_tiny else "",
    )
    return bundle
