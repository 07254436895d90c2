"""`masquerade anonymize` on video files: the video flags, and the run over the planned video jobs.

Videos run one at a time after the images (each already keeps the machine busy: decode, detection
and encode in threads, or its frames' faces batched through the engine), with a progress bar in
frames (fps and ETA). A video that fails leaves no output; its record says why.
"""

from __future__ import annotations

import argparse
import sys

from masquerade.cli import files


def add_video_arguments(parser: argparse.ArgumentParser) -> None:
    from masquerade.cli.options import add_video_limit_arguments
    from masquerade.video.container import ENCODERS
    from masquerade.video.tracking import TrackingOptions

    defaults = TrackingOptions()
    video = parser.add_argument_group("video (.mp4, .mov, .mkv, .webm, .avi)")
    video.add_argument(
        "--codec",
        choices=("auto", *ENCODERS),
        default="auto",
        help="output video codec; auto: h264, or vp9 for .webm",
    )
    video.add_argument("--crf", type=int, default=None, help="encoder constant rate factor (lower: better, larger)")
    video.add_argument("--no-audio", action="store_true", help="drop the audio (by default copied packet for packet)")
    if not any("--keep-metadata" in action.option_strings for action in parser._actions):
        video.add_argument(
            "--keep-metadata",
            action="store_true",
            help="keep container/stream metadata (title, device, creation time) except location; dropped by default",
        )
    video.add_argument(
        "--detect-every", type=int, default=defaults.detect_every, help="run the detector on every K-th frame"
    )
    video.add_argument(
        "--track-hold",
        type=int,
        default=defaults.track_hold,
        help="frames a tracked face stays covered after the detector loses it",
    )
    video.add_argument(
        "--look-ahead",
        type=int,
        default=defaults.look_ahead,
        help="frames looked ahead, so a face first found at frame t is also covered before t (0: off)",
    )
    video.add_argument("--report-frames", action="store_true", help="add every frame's boxes to the --report")
    add_video_limit_arguments(video)  # shared with `serve`


def video_options(args, method, params):
    from masquerade.video import EncodeOptions, TrackingOptions, VideoLimits, VideoOptions

    return VideoOptions(
        method=method,
        params=params,
        classical_strength=args.strength,
        mask_scale=args.mask_scale,
        detector=args.detector,
        threshold=args.threshold,
        max_faces=args.max_faces,
        tracking=TrackingOptions(
            detect_every=args.detect_every, track_hold=args.track_hold, look_ahead=args.look_ahead
        ),
        encode=EncodeOptions(
            codec=args.codec if args.codec != "auto" else "h264",
            crf=args.crf,
            audio=not args.no_audio,
            keep_metadata=getattr(args, "keep_metadata", False),
        ),
        limits=VideoLimits(max_seconds=args.max_video_seconds, max_pixels=args.max_video_pixels),
        report_frames=args.report_frames,
    )


async def anonymize_videos(jobs: list[files.FileJob], args, options, engine) -> tuple[list[dict], int]:
    """Each video in turn; returns (records, failures)."""
    from dataclasses import replace

    from tqdm import tqdm

    from masquerade.engine.request import Method
    from masquerade.errors import InvalidRequestError, MethodUnavailableError
    from masquerade.video import anonymize_video, probe_video

    records, failures = [], 0
    for job in jobs:
        job_options = options
        if args.codec == "auto" and job.target.suffix.lower() == ".webm":
            job_options = replace(options, encode=replace(options.encode, codec="vp9"))
        try:
            total = probe_video(job.source, options.limits).frames or None
            with tqdm(total=total, desc=job.source.name, unit="frame", disable=args.quiet, leave=False) as bar:

                def progress(done: int, _total: int, tracks: int, bar=bar) -> None:
                    bar.update(done - bar.n)
                    bar.set_postfix(tracks=tracks, refresh=False)

                report = await anonymize_video(
                    job.source,
                    job.target,
                    job_options,
                    engine=engine if options.method is Method.REVERSE_PERSONALIZATION else None,
                    detector=engine.front_end.detector,
                    progress=progress,
                )
            records.append(report.to_json())
        except (InvalidRequestError, MethodUnavailableError) as error:
            failures += 1
            records.append(files.failed_record(job, str(error)))
            tqdm.write(f"error: {job.source}: {error}", file=sys.stderr)
    return records, failures
