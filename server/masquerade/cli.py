"""The `masquerade` command: anonymize files, manage model sets, serve over gRPC."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}
# Enough images in flight to fill the UNet calls; a whole folder at once would hold every
# face's N noisy latents in memory together.
IMAGES_IN_FLIGHT = 16
METHOD_NAMES = ("reverse_personalization", "blur", "pixelate", "solid")


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--model-dir", help="model set folder (see `masquerade models fetch`)")
    group.add_argument(
        "--models",
        choices=("default", "tiny"),
        default="default",
        help="default: real weights in $MASQUERADE_MODEL_DIR or ~/.cache/masquerade/models; tiny: random smoke models",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")


def _model_source(args) -> str:
    return args.model_dir or args.models


# ---- anonymize ------------------------------------------------------------------------


def _collect_inputs(paths: list[str]) -> list[Path]:
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES))
        elif path.is_file():
            found.append(path)
        else:
            raise SystemExit(f"error: input {raw} does not exist")
    if not found:
        raise SystemExit("error: no JPEG, PNG or WebP images in the inputs")
    return found


def _output_paths(inputs: list[Path], output: Path) -> list[Path]:
    if len(inputs) == 1 and output.suffix.lower() in IMAGE_SUFFIXES:
        return [output]
    output.mkdir(parents=True, exist_ok=True)
    return [output / path.name for path in inputs]


def _run_anonymize(args) -> int:
    from tqdm import tqdm

    from masquerade.engine.engine import Engine, EngineConfig
    from masquerade.engine.request import (
        DetectionOptions,
        EngineRequest,
        FailedEvent,
        Method,
        OutputOptions,
        ProgressEvent,
        ResultEvent,
        ReversePersonalizationParams,
    )

    inputs = _collect_inputs(args.inputs)
    outputs = _output_paths(inputs, Path(args.output))
    method = Method(args.method)
    params = ReversePersonalizationParams(
        skip=args.skip,
        steps=args.steps,
        guidance_scale=args.guidance_scale,
        id_emb_scale=args.id_scale,
        ip_adapter_scale=args.ip_adapter_scale,
        attribute_prompt=args.attribute_prompt,
        seed=args.seed,
    )
    config = EngineConfig(
        models=_model_source(args),
        device=args.device,
        max_batch=args.max_batch,
        max_queue=IMAGES_IN_FLIGHT,
        detector=args.detector,
    )
    engine = Engine.build(config) if method is Method.REVERSE_PERSONALIZATION else _classical_engine(config)
    report: list[dict] = []
    failures = 0

    async def run_all() -> None:
        nonlocal failures
        await engine.start()
        total_steps = len(inputs) * (2 * params.steps if method is Method.REVERSE_PERSONALIZATION else 1)
        with tqdm(total=total_steps, desc="anonymizing", unit="step", disable=args.quiet) as bar:
            progress: dict[str, int] = {}

            in_flight = asyncio.Semaphore(IMAGES_IN_FLIGHT)

            async def one(source: Path, target: Path) -> None:
                async with in_flight:
                    await anonymize_file(source, target)

            async def anonymize_file(source: Path, target: Path) -> None:
                nonlocal failures
                request = EngineRequest(
                    request_id=str(source),
                    image=source.read_bytes(),
                    method=method,
                    params=params,
                    classical_strength=args.strength,
                    detection=DetectionOptions(aligned=args.aligned, max_faces=config.max_faces),
                    output=OutputOptions(format=_format_for(target), quality=args.quality),
                )
                handle = engine.submit(request)
                async for event in handle:
                    if isinstance(event, ProgressEvent):
                        done = event.step + (event.total if event.phase.value == "generation" else 0)
                        scaled = int(2 * params.steps * done / max(2 * event.total, 1))
                        bar.update(max(scaled - progress.get(handle.request_id, 0), 0))
                        progress[handle.request_id] = max(scaled, progress.get(handle.request_id, 0))
                    elif isinstance(event, ResultEvent):
                        target.write_bytes(event.result.image)
                        report.append(
                            {
                                "input": str(source),
                                "output": str(target),
                                "complete": event.result.complete,
                                "no_faces": event.result.no_faces,
                                "faces": [face.to_json() for face in event.result.faces],
                            }
                        )
                        per_image = 2 * params.steps if method is Method.REVERSE_PERSONALIZATION else 1
                        bar.update(max(per_image - progress.get(handle.request_id, 0), 0))
                    elif isinstance(event, FailedEvent):
                        failures += 1
                        tqdm.write(f"error: {source}: {event.error}", file=sys.stderr)

            await asyncio.gather(*(one(source, target) for source, target in zip(inputs, outputs)))
        await engine.shutdown(grace_seconds=1)

    asyncio.run(run_all())
    for entry in report:
        faces = entry["faces"]
        summary = "no faces" if entry["no_faces"] else f"{len(faces)} face(s), complete={entry['complete']}"
        print(f"{entry['input']} -> {entry['output']}: {summary}")
    if args.report:
        Path(args.report).write_text(json.dumps(report if len(report) != 1 else report[0], indent=2))
    return 1 if failures else 0


def _classical_engine(config):
    """Classical methods need no model weights: skip loading them."""
    from masquerade.engine.engine import Engine

    return Engine(config, None, "not loaded for a classical-method run")


def _format_for(path: Path) -> str | None:
    return {".jpg": "jpeg", ".jpeg": "jpeg", ".png": "png", ".webp": "webp"}.get(path.suffix.lower())


# ---- models -------------------------------------------------------------------------------


def _run_models(args) -> int:
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

    from masquerade.models.loader import ModelLoadError, load_models

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


# ---- parser ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="masquerade", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    anonymize = sub.add_parser("anonymize", help="anonymize image files or folders")
    anonymize.add_argument("inputs", nargs="+", help="images or folders of images")
    anonymize.add_argument("-o", "--output", required=True, help="output image (one input) or folder")
    _add_model_arguments(anonymize)
    anonymize.add_argument("--method", choices=METHOD_NAMES, default="reverse_personalization")
    anonymize.add_argument("--aligned", action="store_true", help="inputs are already-aligned face crops")
    anonymize.add_argument("--attribute-prompt", default="", help='e.g. "an elderly woman"')
    anonymize.add_argument("--guidance-scale", type=float, default=-10.0)
    anonymize.add_argument("--skip", type=float, default=0.7)
    anonymize.add_argument("--steps", type=int, default=100)
    anonymize.add_argument("--id-scale", type=float, default=1.0, help="id_emb_scale; 0 reconstructs the input")
    anonymize.add_argument("--ip-adapter-scale", type=float, default=1.0)
    anonymize.add_argument("--seed", type=int, default=0)
    anonymize.add_argument("--strength", type=float, default=1.0, help="classical methods' strength")
    anonymize.add_argument("--detector", choices=("hog", "cnn", "sfd"), default="hog")
    anonymize.add_argument("--max-batch", type=int, default=16)
    anonymize.add_argument("--quality", type=int, default=95)
    anonymize.add_argument("--report", help="write one JSON record per face here")
    anonymize.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    anonymize.set_defaults(handler=_run_anonymize)

    models = sub.add_parser("models", help="fetch, build or check model sets")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    fetch = models_sub.add_parser("fetch", help="download the real model set")
    fetch.add_argument("--to", help="target folder (default: $MASQUERADE_MODEL_DIR or ~/.cache/masquerade/models)")
    tiny = models_sub.add_parser("make-tiny", help="write a tiny random model set in the real layout")
    tiny.add_argument("dir")
    tiny.add_argument("--seed", type=int, default=0)
    check = models_sub.add_parser("check", help="load a model set and report what it holds")
    check.add_argument("dir")
    check.add_argument("--device", default="cpu")
    models.set_defaults(handler=_run_models)

    try:
        from masquerade.api.cli import register
    except ImportError as error:  # grpc extras missing: say so instead of hiding `serve`
        serve = sub.add_parser("serve", help="serve over gRPC (unavailable: see error)")
        serve.set_defaults(handler=lambda _args, e=error: sys.exit(f"error: cannot serve: {e}"))
    else:
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    _quiet_third_party()
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as error:  # the user gets one line; -v gives the traceback
        from masquerade.engine.request import InvalidRequestError, MethodUnavailableError
        from masquerade.models.loader import ModelLoadError

        if args.verbose or not isinstance(
            error, (InvalidRequestError, MethodUnavailableError, ModelLoadError, ValueError)
        ):
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2


def _quiet_third_party() -> None:
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="diffusers")
    for name in ("diffusers", "transformers", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        diffusers_logging.set_verbosity_error()
        transformers_logging.set_verbosity_error()
        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()
    except ImportError:
        pass


if __name__ == "__main__":
    sys.exit(main())
