"""`masquerade anonymize`: anonymize image files and folders in-process (no server).

Exit codes: 0 every image written (or skipped with --skip-existing); 1 some image failed (the
others were written; the report says which); 2 nothing was done (bad command line, missing input,
output conflicts, method unavailable).
"""

from __future__ import annotations

import argparse
import asyncio
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
        "inputs", nargs="+", help="image files (JPEG, PNG, WebP), videos, or folders of them, searched recursively"
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
        help="auto: reverse_personalization when its model weights are present, otherwise blur (a line says why)",
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
        help="write a JSON list, one record per image: input, output, status (anonymized, skipped, failed), "
        "error, complete, no_faces, and one record per face",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no method line")


def run(args) -> int:
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

    plan = files.plan_files(args.inputs, args.output, overwrite=args.overwrite, skip_existing=args.skip_existing)
    method = Method(files.choose_method(args.method, model_source(args), quiet=args.quiet))
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
        models=model_source(args),
        device=args.device,
        max_batch=args.max_batch,
        max_queue=IMAGES_IN_FLIGHT,
        **detection_config(args),
    )
    if method is Method.REVERSE_PERSONALIZATION:
        from masquerade.cli import quiet_model_libraries

        quiet_model_libraries()
        engine = Engine.build(config)
    else:
        engine = _classical_engine(config)
    records: list[dict] = [files.skipped_record(job) for job in plan.skipped]
    failures = 0
    # Videos go through masquerade.video (cli/video.py), after the images.
    videos = [job for job in plan.jobs if files.is_video(job.source)]
    plan.jobs = [job for job in plan.jobs if not files.is_video(job.source)]
    if videos:
        from masquerade.cli.video import video_options

        options = video_options(args, method, params)

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
        if videos:
            from masquerade.cli.video import anonymize_videos

            video_records, video_failures = await anonymize_videos(videos, args, options, engine)
            records.extend(video_records)
            failures += video_failures
        await engine.shutdown(grace_seconds=1)

    if plan.jobs or videos:
        asyncio.run(run_all())
    order = {str(job.source): i for i, job in enumerate([*plan.skipped, *plan.jobs, *videos])}
    records.sort(key=lambda record: order[record["input"]])
    files.summarize(records)
    if args.report:
        files.write_report(args.report, records)
    if failures and len(plan.jobs) + len(videos) == 1 and videos:
        return files.EXIT_NOTHING_DONE  # the only input, a video, could not be read: nothing was done
    return files.EXIT_SOME_FAILED if failures else files.EXIT_OK


def _classical_engine(config):
    """Classical methods need no model weights: skip loading them."""
    from masquerade.engine.engine import Engine

    return Engine(config, None, "not loaded for a classical-method run")


def _format_for(path: Path) -> str | None:
    return {".jpg": "jpeg", ".jpeg": "jpeg", ".png": "png", ".webp": "webp"}.get(path.suffix.lower())
