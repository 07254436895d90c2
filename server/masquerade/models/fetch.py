"""`masquerade models fetch`: download the real model set into the on-disk layout.

Offline it fails at once, listing what is missing and where to get it, rather
than hanging on timeouts.
"""

from __future__ import annotations

import shutil
import socket
import tempfile
import urllib.request
import zipfile
from pathlib import Path

from tqdm import tqdm

from masquerade.models.layout import (
    ARCFACE_FILE,
    ARCFACE_PACK_URL,
    IP_ADAPTER_FILE,
    IP_ADAPTER_REPO,
    SDXL_REPO,
    ModelLayout,
)

# Only what the pipeline loads: fp16 safetensors of each component plus configs and tokenizers.
SDXL_PATTERNS = [
    "model_index.json",
    "*/config.json",
    "scheduler/scheduler_config.json",
    "tokenizer*/*",
    "unet/diffusion_pytorch_model.fp16.safetensors",
    "vae/diffusion_pytorch_model.fp16.safetensors",
    "text_encoder/model.fp16.safetensors",
    "text_encoder_2/model.fp16.safetensors",
]


class OfflineError(RuntimeError):
    pass


def _reachable(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _instructions(layout: ModelLayout) -> str:
    return "\n".join(
        [
            f"  SDXL base 1.0   -> {layout.sdxl}/  (huggingface repo {SDXL_REPO}, fp16 safetensors + configs)",
            f"  IP-Adapter-FaceID -> {layout.ip_adapter}  (huggingface repo {IP_ADAPTER_REPO}, file {IP_ADAPTER_FILE})",
            f"  ArcFace R50     -> {layout.arcface}  (insightface buffalo_l pack: {ARCFACE_PACK_URL}, file {ARCFACE_FILE})",
        ]
    )


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def fetch_models(target: Path) -> dict[str, int]:
    """Download the missing parts into ``target``; return the size in bytes of each part."""
    layout = ModelLayout(target)
    missing = layout.missing_parts()
    if missing and not (_reachable("huggingface.co") and _reachable("github.com")):
        raise OfflineError(
            "cannot reach huggingface.co / github.com, and these parts are missing:\n  - "
            + "\n  - ".join(missing)
            + "\nDownload them on a connected machine into this layout and copy the folder over:\n"
            + _instructions(layout)
        )
    from huggingface_hub import hf_hub_download, snapshot_download

    target.mkdir(parents=True, exist_ok=True)
    if not (layout.sdxl / "model_index.json").is_file():
        snapshot_download(SDXL_REPO, local_dir=layout.sdxl, allow_patterns=SDXL_PATTERNS)
        _rename_fp16_variants(layout.sdxl)
    if not layout.ip_adapter.is_file():
        hf_hub_download(IP_ADAPTER_REPO, IP_ADAPTER_FILE, local_dir=layout.ip_adapter.parent)
    if not layout.arcface.is_file():
        _fetch_arcface(layout.arcface)
    return {"sdxl": _size(layout.sdxl), "ip_adapter": _size(layout.ip_adapter), "arcface": _size(layout.arcface)}


def _rename_fp16_variants(folder: Path) -> None:
    """Store the fp16 files under the default names so loading needs no `variant` argument."""
    for path in folder.rglob("*.fp16.safetensors"):
        path.rename(path.with_name(path.name.replace(".fp16.safetensors", ".safetensors")))


def _fetch_arcface(destination: Path) -> None:
    destination.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        archive = Path(scratch) / "buffalo_l.zip"
        with urllib.request.urlopen(ARCFACE_PACK_URL, timeout=30) as response, open(archive, "wb") as out:
            total = int(response.headers.get("Content-Length", 0)) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc="buffalo_l.zip") as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    bar.update(len(chunk))
        with zipfile.ZipFile(archive) as pack:
            member = next((n for n in pack.namelist() if n.endswith(ARCFACE_FILE)), None)
            if member is None:
                raise RuntimeError(f"{ARCFACE_PACK_URL} has no {ARCFACE_FILE}")
            with pack.open(member) as source, open(destination, "wb") as out:
                shutil.copyfileobj(source, out)
