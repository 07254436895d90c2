"""`masquerade models`: fetch the real model set, write a tiny random one, or check one."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers) -> argparse.ArgumentParser:
    models = subparsers.add_parser("models", help="fetch, build or check model sets")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    fetch = models_sub.add_parser("fetch", help="download the real model set")
    fetch.add_argument("--to", help="target folder (default: $MASQUERADE_MODEL_DIR or ~/.cache/masquerade/models)")
    tiny = models_sub.add_parser("make-tiny", help="write a tiny random model set in the real layout")
    tiny.add_argument("dir")
    tiny.add_argument("--seed", type=int, default=0)
    check = models_sub.add_parser("check", help="load a model set and report what it holds")
    check.add_argument("dir")
    check.add_argument("--device", default="cpu")
    models.set_defaults(handler=run)
    return models


def run(args) -> int:
    if args.models_command == "make-tiny":
        from masquerade.models.tiny import make_tiny

        layout = make_tiny(Path(args.dir), seed=args.seed)
        print(f"wrote a tiny RANDOM model set to {layout.root} (real on-disk layout; its output is noise)")
        return 0
    if args.models_command == "fetch":
        from masquerade.models.fetch import OfflineError, fetch_models
        from masquerade.models.layout import default_model_dir

        target = Path(args.to) if args.to else default_model_dir()
        try:
            sizes = fetch_models(target)
        except OfflineError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        for part, size in sizes.items():
            print(f"{part:12s} {size / 2**30:8.2f} GiB")
        print(f"model set ready in {target}")
        return 0
    return _check_models(args)


def _check_models(args) -> int:
    import time

    import numpy as np

    from masquerade.cli import quiet_model_libraries
    from masquerade.models.loader import ModelLoadError, load_models

    quiet_model_libraries()

    try:
        bundle = load_models(args.dir, device=args.device)
    except ModelLoadError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1

    def millions(module) -> str:
        return f"{sum(p.numel() for p in module.parameters()) / 1e6:.2f}M params"

    pipe = bundle.pipe
    print(f"model set {args.dir}{' (TINY RANDOM: output is noise)' if bundle.is_tiny else ''}")
    print(
        f"  sdxl        UNet {millions(pipe.unet)}, VAE {millions(pipe.vae)}, text encoders "
        f"{millions(pipe.text_encoder)} + {millions(pipe.text_encoder_2)}; face size {bundle.face_size}"
    )
    print(
        f"  ip_adapter  {bundle.versions['ip_adapter']}: {type(pipe.unet.encoder_hid_proj.image_projection_layers[0]).__name__}"
    )
    crops = np.random.default_rng(0).uniform(0, 255, (2, 3, 112, 112)).astype(np.float32)
    started = time.perf_counter()
    embeddings = bundle.arcface(crops).numpy()  # [2, 512]
    elapsed_ms = (time.perf_counter() - started) * 1e3
    norms = np.linalg.norm(embeddings, axis=1)
    healthy = embeddings.shape == (2, 512) and bool(np.isfinite(embeddings).all() and np.allclose(norms, 1, atol=1e-4))
    print(
        f"  arcface     {bundle.versions['arcface']}: onnxruntime {', '.join(bundle.arcface.providers)}, "
        f"{embeddings.shape[1]}-d unit embeddings {'ok' if healthy else 'BROKEN'}, batch of 2 in {elapsed_ms:.0f} ms"
    )
    print(f"  device {bundle.device}, dtype {str(bundle.dtype).removeprefix('torch.')}")
    return 0 if healthy else 1
