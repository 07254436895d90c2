"""Tiny random models written in exactly the on-disk layout of the real set.

Used by the tests, the `--models tiny` smoke profile and `masquerade models
make-tiny`. Everything is built offline (the CLIP tokenizer too) and loads
through the same code as the real weights. Their output is noise: they exist to
exercise every loading path and to check invariants that hold for any weights.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from masquerade.models.layout import ARCFACE_FILE, IP_ADAPTER_FILE, ModelLayout

log = logging.getLogger(__name__)

TINY_MARKER = "TINY_RANDOM_MODELS.txt"

# SDXL base 1.0's training schedule; the tiny set and the full-size benchmark share it.
SDXL_SCHEDULER_CONFIG = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    steps_offset=1,
    timestep_spacing="leading",
    prediction_type="epsilon",
)

# SDXL's tokenizer is byte-level BPE; a vocabulary of single characters (with and
# without the end-of-word suffix) plus a few merges tokenizes any text.
_TOKENIZER_CHARS = [chr(c) for c in range(33, 127)]


def _write_tiny_clip_tokenizer(folder: Path) -> None:
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in _TOKENIZER_CHARS:
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    merges = ["#version: 0.2", "t h", "th e</w>", "a n", "o l", "ol d</w>"]
    for merge in merges[1:]:
        merged = merge.replace(" ", "")
        vocab.setdefault(merged, len(vocab))
    vocab_file = folder / "vocab.json"
    merges_file = folder / "merges.txt"
    vocab_file.write_text(json.dumps(vocab))
    merges_file.write_text("\n".join(merges) + "\n")
    # Loading from the written files (rather than the constructor, whose arguments
    # differ across transformers versions) also proves the files are complete.
    tokenizer = CLIPTokenizer.from_pretrained(str(folder), model_max_length=77, pad_token="<|endoftext|>")
    tokenizer.save_pretrained(str(folder))


def _tiny_sdxl_pipeline(seed: int):
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(seed)
    # Shapes follow SDXL's structure at toy width: two text encoders whose hidden
    # sizes concatenate to the UNet's cross-attention width, a pooled projection
    # feeding the "text_time" additional embedding, 4 latent channels.
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,  # 6 time ids x 8 + pooled 32
        cross_attention_dim=64,
        norm_num_groups=8,
    )
    scheduler = EulerDiscreteScheduler(**SDXL_SCHEDULER_CONFIG)
    vae = AutoencoderKL(
        block_out_channels=(16, 32),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
        scaling_factor=0.13025,
        force_upcast=True,
    )
    text_config = dict(
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_size=32,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=len(_TOKENIZER_CHARS) * 2 + 2 + 5,
        hidden_act="gelu",
        projection_dim=32,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_config))
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=None,
        tokenizer_2=None,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
    ), CLIPTokenizer


def ip_adapter_faceid_state_dict(unet, *, seed: int = 0, lora_rank: int = 4, num_tokens: int = 4) -> dict:
    """A random IP-Adapter-FaceID state dict with the real file's key structure.

    The real `ip-adapter-faceid_sdxl.bin` holds ``image_proj`` (an MLP from the
    512-d ArcFace embedding to ``num_tokens`` cross-attention tokens, then a
    LayerNorm) and ``ip_adapter``: for every attention processor index ``i`` the
    LoRA of the FaceID training (``i.to_{q,k,v,out}_lora.{down,up}``), and for the
    cross-attention ones (odd ``i``) the identity key/value projections
    ``i.to_{k,v}_ip``.
    """
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * 0.05

    cross_dim = unet.config.cross_attention_dim
    hidden_proj = 1024  # the real file's MLP width (mult 2 over 512)
    image_proj = {
        "proj.0.weight": rand(hidden_proj, 512),
        "proj.0.bias": rand(hidden_proj),
        "proj.2.weight": rand(cross_dim * num_tokens, hidden_proj),
        "proj.2.bias": rand(cross_dim * num_tokens),
        "norm.weight": torch.ones(cross_dim) + rand(cross_dim),
        "norm.bias": rand(cross_dim),
    }
    ip_adapter = {}
    for index, (name, _processor) in enumerate(unet.attn_processors.items()):
        block = _attention_module(unet, name)
        hidden = block.to_q.in_features
        is_cross = name.endswith("attn2.processor")
        kv_in = cross_dim if is_cross else hidden
        for proj, in_dim in (("to_q", hidden), ("to_k", kv_in), ("to_v", kv_in), ("to_out", hidden)):
            ip_adapter[f"{index}.{proj}_lora.down.weight"] = rand(lora_rank, in_dim)
            ip_adapter[f"{index}.{proj}_lora.up.weight"] = rand(hidden, lora_rank)
        if is_cross:
            ip_adapter[f"{index}.to_k_ip.weight"] = rand(hidden, cross_dim)
            ip_adapter[f"{index}.to_v_ip.weight"] = rand(hidden, cross_dim)
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


def _attention_module(unet, processor_name: str):
    module = unet
    for part in processor_name.removesuffix(".processor").split("."):
        module = getattr(module, part)
    return module


def built_tiny_model_dir() -> Path:
    """The tiny set's folder (``layout.tiny_model_dir``), written on first use."""
    from masquerade.models.layout import tiny_model_dir

    root = tiny_model_dir()
    if not (root / TINY_MARKER).is_file():
        make_tiny(root)
    return root


def make_tiny(root: str | Path, *, seed: int = 0) -> ModelLayout:
    """Write a tiny random model set under ``root`` and return its layout."""
    from masquerade.models.arcface import write_tiny_arcface_onnx

    layout = ModelLayout(Path(root))
    layout.root.mkdir(parents=True, exist_ok=True)
    pipe, tokenizer_cls = _tiny_sdxl_pipeline(seed)
    pipe.save_pretrained(str(layout.sdxl))
    for sub in ("tokenizer", "tokenizer_2"):
        _write_tiny_clip_tokenizer(layout.sdxl / sub)
    # save_pretrained records a null tokenizer; point model_index.json at the real class.
    index_path = layout.sdxl / "model_index.json"
    index = json.loads(index_path.read_text())
    index["tokenizer"] = ["transformers", "CLIPTokenizer"]
    index["tokenizer_2"] = ["transformers", "CLIPTokenizer"]
    index_path.write_text(json.dumps(index, indent=2))

    layout.ip_adapter.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ip_adapter_faceid_state_dict(pipe.unet, seed=seed), layout.ip_adapter)

    layout.arcface.parent.mkdir(parents=True, exist_ok=True)
    write_tiny_arcface_onnx(layout.arcface, seed=seed)

    (layout.root / TINY_MARKER).write_text(
        "Tiny RANDOM models in the real on-disk layout, written by `masquerade models make-tiny`.\n"
        "They exercise every loading path; their output is noise, not anonymized faces.\n"
        f"Files: {layout.sdxl.name}/, {IP_ADAPTER_FILE}, {ARCFACE_FILE}\n"
    )
    log.info("wrote tiny random model set to %s (its output is noise)", layout.root)
    return layout
