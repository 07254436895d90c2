"""`masquerade anonymize`: anonymize image files and folders in-process (no server).

Exit codes: 0 every image written (or skipped with --skip-existing); 1 some image failed (the
others were written; the report says which); 2 nothing was done (bad command line, missing input,
output conflicts, method unavailable).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from masquerade.cli import files
from masquerade.cli.options import add_detection_arguments, add_model_arguments, detection_config, model_source

# Enough images in flight to fill the UNet calls; a whole folder at once would hold every
# face's N noisy latents in memory together.
IMAGES_IN_FLIGHT = 16


def register(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "anonymize",
        help="anonymize image files or folders",
        description="Anonymize every face in image files or folders. " + __doc__.split("\n\n", 1)[1],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_anonymize_arguments(parser)
    add_model_arguments(parser)
    parser.add_argument(
        "--attribute-prompt", default=None, help='e.g. "an elderly woman"; unset: none, "" encodes the empty prompt'
    )
    parser.add_argument(
        "--noise",
        choices=("per_face", "research"),
        default="per_face",
        help="per_face: a noise stream per face from (seed, face index); research: the research code's exact draws",
    )
    add_detection_arguments(parser)
    from masquerade.cli.video import add_video_arguments

    add_video_arguments(parser)
    parser.set_defaults(handler=run)
    return parser


def add_anonymize_arguments(parser: argparse.ArgumentParser) -> None:
    """The `anonymize` flags this module owns; defaults show in --help (ArgumentDefaultsHelpFormatter)."""
    parser.add_argument(
        "inputs",
        nargs="+",
        help="image files (JPEG, PNG, WebP, BMP, TIFF), videos, or folders of them, searched recursively",
    )
    parser.add_argument(
        "-o",
        "--output",
        required=True,
        help="the output image for one input file; otherwise a folder, where each output keeps its "
        "path relative to the input folder it came from",
    )
    conflicts = parser.add_mutually_exclusive_group()
    conflicts.add_argument("--overwrite", action="store_true", help="replace outputs that already exist")
    conflicts.add_argument(
        "--skip-existing",
        action="store_true",
        help="leave inputs whose output already exists alone (without either flag, existing outputs stop the "
        "run before anything is written)",
    )
    parser.add_argument(
        "--method",
        choices=("auto", *files.METHOD_NAMES),
        default="auto",
        help="auto: reverse_personalization when its model weights are present, otherwise blur (a line says why); "
        "mosaic is pixelate; image pastes --replace-with over each face",
    )
    covers = parser.add_argument_group("classical covers (command line only: the server's requests take a method)")
    covers.add_argument(
        "--shape", choices=("ellipse", "box"), default="ellipse", help="feathered face ellipse, or the box around it"
    )
    covers.add_argument(
        "--mosaic-size",
        type=int,
        default=None,
        metavar="PX",
        help="pixelate/mosaic: side of the squares in pixels (default: face width / 8, so any resolution looks alike)",
    )
    covers.add_argument(
        "--replace-with",
        metavar="FILE",
        help="--method image: this picture (its alpha respected, over the solid grey) replaces each face",
    )
    covers.add_argument(
        "--draw-boxes",
        action="store_true",
        help="do not cover: draw each detection's box, points and score (to check --threshold); NOT anonymized",
    )
    covers.add_argument(
        "--keep-metadata",
        action="store_true",
        help="keep EXIF, ICC and XMP except GPS/location fields and any embedded thumbnail or preview "
        "(without it, everything is stripped)",
    )
    covers.add_argument(
        "--no-self-check",
        action="store_true",
        help="skip the check of each output (detector around the covers and dlib descriptors of each face, "
        "re-covering what is still recognisable): faster on photos with faces, and `complete` then vouches "
        "only for the faces detected",
    )
    throughput = parser.add_argument_group("throughput (classical methods)")
    throughput.add_argument(
        "--jobs", type=int, default=None, metavar="N", help="files processed at once (default: the number of cores)"
    )
    throughput.add_argument(
        "--detect-scale",
        type=float,
        default=1.0,
        metavar="S",
        help="detect on copies scaled by S (0.05-1): faster, misses more of the smallest faces; covers stay full size",
    )
    parser.add_argument(
        "--aligned", action="store_true", help="each input is one already-aligned face crop: detection is skipped"
    )
    algorithm = parser.add_argument_group("reverse personalization")
    algorithm.add_argument(
        "--guidance-scale",
        type=float,
        default=-10.0,
        help="classifier-free guidance on the identity; negative pushes away from the person",
    )
    algorithm.add_argument(
        "--skip",
        type=float,
        default=0.7,
        help="fraction of the trajectory skipped: higher keeps more of the original (pose, light), lower changes more",
    )
    algorithm.add_argument("--steps", type=int, default=100, help="diffusion steps (inversion and generation each)")
    algorithm.add_argument(
        "--id-scale", type=float, default=1.0, help="id_emb_scale, weight of the identity embedding; 0 reconstructs"
    )
    algorithm.add_argument(
        "--ip-adapter-scale", type=float, default=1.0, help="strength of the IP-Adapter-FaceID branch"
    )
    algorithm.add_argument("--seed", type=int, default=0, help="seed of the inversion noise")
    parser.add_argument(
        "--strength", type=float, default=1.0, help="strength of the classical methods (blur radius, pixel size), 0-1"
    )
    parser.add_argument("--max-batch", type=int, default=16, help="samples per UNet call (a CFG pair is 2)")
    parser.add_argument("--quality", type=int, default=95, help="JPEG/WebP output quality, 1-100")
    parser.add_argument(
        "--report",
        metavar="FILE.json",
        help="write a JSON list, one record per input: input, output, status (anonymized, drawn, skipped, "
        "failed), reason (skipped), error (failed), complete, no_faces and one record per face (anonymized, drawn)",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no method line")


def run(args) -> int:
    from masquerade.engine.request import Method, ReversePersonalizationParams

    plan = files.plan_files(args.inputs, args.output, overwrite=args.overwrite, skip_existing=args.skip_existing)
    requested = files.choose_method(args.method, model_source(args), quiet=args.quiet)
    style = _cover_style(args, requested)
    method = Method({"mosaic": "pixelate", "image": "solid"}.get(requested, requested))
    if method.is_classical:
        _warn_unused_generative_flags(args, requested)
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
    records: list[dict] = [files.skipped_record(job) for job in plan.skipped]
    records += [files.skipped_record(job, reason) for job, reason in plan.ignored]
    failures = 0
    # Videos go through masquerade.video (cli/video.py), after the images.
    videos = [job for job in plan.jobs if files.is_video(job.source)]
    plan.jobs = [job for job in plan.jobs if not files.is_video(job.source)]
    if videos:
        from masquerade.cli.video import video_options

        options = video_options(args, method, params)
    # Classical images take the worker pool (cli/pipeline.py): no engine, no model weights, no torch.
    engine_images = [] if method.is_classical else plan.jobs
    if method.is_classical and plan.jobs:
        failures += _anonymize_classically(plan.jobs, args, method, style, records)
    if engine_images or videos:
        # The engine (asyncio, the scheduler, metrics) only for what needs it: a classical run on images
        # never imports it.
        failures += _run_on_engine(args, method, params, engine_images, videos, options if videos else None, records)
    inputs = [*plan.skipped, *(job for job, _ in plan.ignored), *plan.jobs, *videos]
    order = {str(job.source): i for i, job in enumerate(inputs)}
    records.sort(key=lambda record: order[record["input"]])
    files.summarize(records)
    if len(records) > 1:
        print(files.summary_line(records))
    if args.report:
        files.write_report(args.report, records)
    if failures and len(plan.jobs) + len(videos) == 1 and videos:
        return files.EXIT_NOTHING_DONE  # the only input, a video, could not be read: nothing was done
    return files.EXIT_SOME_FAILED if failures else files.EXIT_OK


def _run_on_engine(args, method, params, engine_images, videos, options, records: list[dict]) -> int:
    """Reverse personalization on images, and videos (any method), through the engine; returns the failures."""
    import asyncio

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
    )

    config = EngineConfig(
        models=model_source(args),
        device=args.device,
        max_batch=args.max_batch,
        max_queue=IMAGES_IN_FLIGHT,
        torch_threads=args.torch_threads,
        **detection_config(args),
    )
    failures = 0
    if method is Method.REVERSE_PERSONALIZATION:
        from masquerade.cli import quiet_model_libraries

        quiet_model_libraries()
        engine = Engine.build(config)
    else:
        engine = _classical_engine(config)

    async def run_all() -> None:
        nonlocal failures
        await engine.start()
        total_steps = len(engine_images) * 2 * params.steps
        with tqdm(total=total_steps, desc="anonymizing", unit="step", disable=args.quiet or not engine_images) as bar:
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

            await asyncio.gather(*(one(job.source, job.target) for job in engine_images))
        if videos:
            from masquerade.cli.video import anonymize_videos

            video_records, video_failures = await anonymize_videos(videos, args, options, engine)
            records.extend(video_records)
            failures += video_failures
        await engine.shutdown(grace_seconds=1)

    asyncio.run(run_all())
    return failures


GENERATIVE_FLAGS = {
    "attribute_prompt": "--attribute-prompt",
    "guidance_scale": "--guidance-scale",
    "skip": "--skip",
    "steps": "--steps",
    "id_scale": "--id-scale",
    "ip_adapter_scale": "--ip-adapter-scale",
    "seed": "--seed",
    "noise": "--noise",
}


def _warn_unused_generative_flags(args, method: str) -> None:
    """A prompt or guidance given to a classical run would otherwise be ignored without a word."""
    parser_defaults = {"attribute_prompt": None, "guidance_scale": -10.0, "skip": 0.7, "steps": 100}
    parser_defaults |= {"id_scale": 1.0, "ip_adapter_scale": 1.0, "seed": 0, "noise": "per_face"}
    given = [flag for dest, flag in GENERATIVE_FLAGS.items() if getattr(args, dest, None) != parser_defaults[dest]]
    if given:
        print(
            f"note: {', '.join(given)} only steer reverse_personalization; the {method} run ignores them",
            file=sys.stderr,
        )


def _cover_style(args, method: str):
    from masquerade.face.classical import CoverStyle

    replacement = None
    if method == "image":
        if not args.replace_with:
            raise files.PlanError("--method image needs --replace-with FILE (the picture put over each face)")
        replacement = _read_rgba(args.replace_with)
    elif args.replace_with:
        raise files.PlanError("--replace-with is for --method image")
    if args.mosaic_size is not None and method not in ("pixelate", "mosaic"):
        raise files.PlanError("--mosaic-size is for --method mosaic (or pixelate)")
    return CoverStyle(shape=args.shape, mosaic_size=args.mosaic_size, replacement=replacement)


def _read_rgba(path: str):
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGBA"), dtype=np.uint8)
    except (OSError, UnidentifiedImageError) as error:
        raise files.PlanError(f"--replace-with {path}: cannot read it as an image ({error})") from None


def _anonymize_classically(jobs, args, method, style, records: list[dict]) -> int:
    """Images through the worker pool; returns how many failed. Records are appended as files finish."""
    from masquerade.cli.pipeline import ClassicalRun, default_jobs, run_classical
    from masquerade.engine.front_end import DetectionDefaults

    run = ClassicalRun(
        method=method,
        strength=args.strength,
        detection=DetectionDefaults(
            detector=args.detector,
            threshold=args.threshold,
            min_face_size=args.min_face_size,
            max_faces=args.max_faces,
            mask_scale=args.mask_scale,
            self_check=not args.no_self_check,
        ).validated(),
        models=model_source(args),
        aligned=args.aligned,
        quality=args.quality,
        style=style,
        detect_scale=args.detect_scale,
        keep_metadata=args.keep_metadata,
        draw_boxes=args.draw_boxes,
    )
    if args.jobs is not None and args.jobs < 1:
        raise files.PlanError(f"--jobs must be at least 1, got {args.jobs}")
    if not 0.05 <= args.detect_scale <= 1.0:
        raise files.PlanError(f"--detect-scale must be in [0.05, 1], got {args.detect_scale}")
    failures = 0
    if args.quiet:  # tqdm's import (20 ms, importlib.metadata for its version) is a fifth of a blank file's run
        bar, write = _NoBar(), print
    else:
        from tqdm import tqdm

        tqdm.monitor_interval = 0  # no monitor thread: the pool forks only a single-threaded process
        bar, write = tqdm(total=len(jobs), desc="anonymizing", unit="image"), tqdm.write
    with bar:

        def done(job, result, error) -> None:
            nonlocal failures
            if error is not None:
                failures += 1
                records.append(files.failed_record(job, str(error)))
                write(f"error: {job.source}: {error}", file=sys.stderr)
            else:
                record = files.result_record(job, result)
                if args.draw_boxes:
                    record["status"] = "drawn"  # detections drawn, faces NOT covered
                records.append(record)
            bar.update(1)

        run_classical(jobs, run, args.jobs or default_jobs(), lambda job: _format_for(job.target), done)
    return failures


class _NoBar:
    """tqdm's interface where -q asks for no progress bar."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    def update(self, count: int = 1) -> None:
        return None


def _classical_engine(config):
    """Classical methods need no model weights: skip loading them."""
    from masquerade.engine.engine import Engine

    return Engine(config, None, "not loaded for a classical-method run")


def _format_for(path: Path) -> str | None:
    return files.OUTPUT_FORMATS.get(path.suffix.lower())
