"""The `masquerade` command: anonymize files, manage model sets, serve over gRPC."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

# Enough images in flight to fill the UNet calls; a whole folder at once would hold every
# face's N noisy latents in memory together.
IMAGES_IN_FLIGHT = 16


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


def add_detection_arguments(parser: argparse.ArgumentParser) -> None:
    """Detection flags shared by `anonymize` and `serve` (EngineConfig fields; requests may override)."""
    parser.add_argument(
        "--detector",
        choices=("centerface", "scrfd", "hog", "cnn"),
        default="centerface",
        help="centerface: offline ONNX (default); scrfd: buffalo_l's det_10g.onnx in the model dir; hog/cnn: dlib",
    )
    parser.add_argument("--threshold", type=float, default=0.5, help="detector score threshold, 0-1 (calibrated)")
    parser.add_argument(
        "--min-face-size", type=int, default=16, help="faces smaller than this (px) are covered classically"
    )
    parser.add_argument(
        "--max-faces",
        type=int,
        default=16,
        help="faces per image that take the generative path; the rest are covered classically (never refused)",
    )
    parser.add_argument(
        "--mask-scale", type=float, default=1.0, help="size of the classical covers' ellipse relative to the face"
    )


def detection_config(args) -> dict:
    """The EngineConfig fields `add_detection_arguments` sets."""
    return {
        "detector": args.detector,
        "detection_threshold": args.threshold,
        "min_face_size": args.min_face_size,
        "max_faces": args.max_faces,
        "mask_scale": args.mask_scale,
    }


# ---- anonymize ------------------------------------------------------------------------


def _run_anonymize(args) -> int:
    from tqdm import tqdm

    from masquerade import cli_anonymize as files
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

    plan = files.plan_files(args.inputs, args.output, overwrite=args.overwrite, skip_existing=args.skip_existing)
    method = Method(files.choose_method(args.method, _model_source(args), quiet=args.quiet))
    params = ReversePersonalizationParams(
        skip=args.skip,
        steps=args.steps,
        guidance_scale=args.guidance_scale,
        id_emb_scale=args.id_scale,
        ip_adapter_scale=args.ip_adapter_scale,
        attribute_prompt=args.attribute_prompt,
        seed=args.seed,
        noise=args.noise,
    )
    config = EngineConfig(
        models=_model_source(args),
        device=args.device,
        max_batch=args.max_batch,
        max_queue=IMAGES_IN_FLIGHT,
        **detection_config(args),
    )
    engine = Engine.build(config) if method is Method.REVERSE_PERSONALIZATION else _classical_engine(config)
    records: list[dict] = [files.skipped_record(job) for job in plan.skipped]
    failures = 0

    async def run_all() -> None:
        nonlocal failures
        await engine.start()
        total_steps = len(plan.jobs) * (2 * params.steps if method is Method.REVERSE_PERSONALIZATION else 1)
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
                    detection=DetectionOptions(aligned=args.aligned),
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
                        files.write_atomically(target, event.result.image)
                        records.append(files.result_record(files.FileJob(source, target), event.result))
                        per_image = 2 * params.steps if method is Method.REVERSE_PERSONALIZATION else 1
                        bar.update(max(per_image - progress.get(handle.request_id, 0), 0))
                    elif isinstance(event, FailedEvent):
                        failures += 1
                        records.append(files.failed_record(files.FileJob(source, target), str(event.error)))
                        tqdm.write(f"error: {source}: {event.error}", file=sys.stderr)

            await asyncio.gather(*(one(job.source, job.target) for job in plan.jobs))
        await engine.shutdown(grace_seconds=1)

    if plan.jobs:
        asyncio.run(run_all())
    order = {str(job.source): i for i, job in enumerate([*plan.skipped, *plan.jobs])}
    records.sort(key=lambda record: order[record["input"]])
    files.summarize(records)
    if args.report:
        files.write_report(args.report, records)
    return files.EXIT_SOME_FAILED if failures else files.EXIT_OK


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

    from masquerade.cli_anonymize import __doc__ as anonymize_doc
    from masquerade.cli_anonymize import add_anonymize_arguments

    anonymize = sub.add_parser(
        "anonymize",
        help="anonymize image files or folders",
        description="Anonymize every face in image files or folders. " + anonymize_doc.split("\n\n", 2)[2],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_anonymize_arguments(anonymize)
    _add_model_arguments(anonymize)
    anonymize.add_argument(
        "--attribute-prompt", default=None, help='e.g. "an elderly woman"; unset: none, "" encodes the empty prompt'
    )
    anonymize.add_argument(
        "--noise",
        choices=("per_face", "research"),
        default="per_face",
        help="per_face: a noise stream per face from (seed, face index); research: the research code's exact draws",
    )
    add_detection_arguments(anonymize)
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
        from masquerade.cli_anonymize import PlanError
        from masquerade.engine.request import InvalidRequestError, MethodUnavailableError
        from masquerade.models.loader import ModelLoadError

        if args.verbose or not isinstance(
            error, (InvalidRequestError, MethodUnavailableError, ModelLoadError, PlanError, ValueError)
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
