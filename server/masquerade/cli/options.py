"""Flags shared by more than one sub-command (`anonymize` and `serve`): model set, detection, video limits."""

from __future__ import annotations

import argparse


def non_negative_int(text: str) -> int:
    """An argparse type: a whole number >= 0 (argparse names the flag in its error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def positive_int(text: str) -> int:
    """An argparse type: a whole number >= 1."""
    value = non_negative_int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--model-dir", metavar="DIR", help="model set folder (see `masquerade models fetch`)")
    group.add_argument(
        "--models",
        choices=("default", "tiny"),
        default="default",
        help="default: real weights in $MASQUERADE_MODEL_DIR or ~/.cache/masquerade/models (classical methods only "
        "when absent); tiny: random smoke models",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument(
        "--torch-threads",
        type=positive_int,
        default=None,
        help="on CPU: threads of each torch op (default: the cores shared among the threads calling torch, "
        "or OMP_NUM_THREADS); big models on many cores run faster with all of them",
    )


def model_source(args: argparse.Namespace) -> str:
    """EngineConfig.models: a folder, "default" or "tiny"."""
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


def detection_config(args: argparse.Namespace) -> dict:
    """The EngineConfig fields `add_detection_arguments` sets."""
    return {
        "detector": args.detector,
        "detection_threshold": args.threshold,
        "min_face_size": args.min_face_size,
        "max_faces": args.max_faces,
        "mask_scale": args.mask_scale,
    }


def add_video_limit_arguments(group: argparse._ArgumentGroup) -> None:
    """--max-video-seconds and --max-video-pixels: one VideoLimits for `anonymize` on files and for `serve`."""
    from masquerade.video.container import VideoLimits

    limits = VideoLimits()
    group.add_argument(
        "--max-video-seconds", type=float, default=limits.max_seconds, help="longer clips are refused, seconds"
    )
    group.add_argument(
        "--max-video-pixels",
        type=int,
        default=limits.max_pixels,
        help="videos (and live frames) with larger frames, width x height, are refused",
    )
