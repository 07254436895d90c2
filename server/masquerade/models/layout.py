"""Where each model of a set lives on disk, and where the real ones come from.

A model directory holds the three parts side by side::

    DIR/stable-diffusion-xl-base-1.0/   an SDXL pipeline folder (save_pretrained layout)
    DIR/IP-Adapter-FaceID/ip-adapter-faceid_sdxl.bin
    DIR/buffalo_l/w600k_r50.onnx
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

SDXL_REPO = "stabilityai/stable-diffusion-xl-base-1.0"
IP_ADAPTER_REPO = "h94/IP-Adapter-FaceID"
IP_ADAPTER_FILE = "ip-adapter-faceid_sdxl.bin"
ARCFACE_PACK = "buffalo_l"
ARCFACE_FILE = "w600k_r50.onnx"
# insightface publishes its model packs as release assets of its repository.
ARCFACE_PACK_URL = "https://github.com/deepinsight/insightface/releases/download/v0.7/buffalo_l.zip"

SDXL_DIRNAME = "stable-diffusion-xl-base-1.0"
IP_ADAPTER_DIRNAME = "IP-Adapter-FaceID"


def default_model_dir() -> Path:
    """``$MASQUERADE_MODEL_DIR``, else ``~/.cache/masquerade/models``."""
    env = os.environ.get("MASQUERADE_MODEL_DIR")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "masquerade" / "models"


def tiny_model_dir() -> Path:
    """Where ``--models tiny`` builds its set on first use."""
    return Path(os.environ.get("MASQUERADE_TINY_DIR", Path.home() / ".cache" / "masquerade" / "tiny-models"))


@dataclass(frozen=True)
class ModelLayout:
    root: Path

    @property
    def sdxl(self) -> Path:
        return self.root / SDXL_DIRNAME

    @property
    def ip_adapter(self) -> Path:
        return self.root / IP_ADAPTER_DIRNAME / IP_ADAPTER_FILE

    @property
    def arcface(self) -> Path:
        return self.root / ARCFACE_PACK / ARCFACE_FILE

    def missing_parts(self) -> list[str]:
        """Human-readable names of the parts absent from this directory."""
        missing = []
        if not (self.sdxl / "model_index.json").is_file():
            missing.append(f"SDXL pipeline folder ({self.sdxl}/model_index.json)")
        if not self.ip_adapter.is_file():
            missing.append(f"IP-Adapter-FaceID weights ({self.ip_adapter})")
        if not self.arcface.is_file():
            missing.append(f"ArcFace R50 ONNX ({self.arcface})")
        return missing
