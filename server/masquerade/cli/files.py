"""Which files `masquerade anonymize` reads and writes, and the report it leaves.

Everything here runs before the engine starts, so a run that would replace an existing file
(without --overwrite), write two inputs to one output, or read a missing input stops having
written nothing, and says which files.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
# What each image suffix is written as (face/image_io.py encode_image).
OUTPUT_FORMATS = {
    ".jpg": "jpeg",
    ".jpeg": "jpeg",
    ".png": "png",
    ".webp": "webp",
    ".bmp": "bmp",
    ".tif": "tiff",
    ".tiff": "tiff",
}
# Image and video files we cannot write: `-o out.gif` is an error, not a folder named out.gif.
UNWRITABLE_SUFFIXES = (".gif", ".heic", ".heif", ".avif", ".jxl", ".jp2", ".ico", ".svg", ".psd", ".tga", ".raw")
VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi")  # masquerade.video.container reads and writes these
MEDIA_SUFFIXES = IMAGE_SUFFIXES + VIDEO_SUFFIXES
METHOD_NAMES = ("reverse_personalization", "blur", "pixelate", "mosaic", "solid", "image")

EXIT_OK = 0
EXIT_SOME_FAILED = 1
EXIT_NOTHING_DONE = 2


class PlanError(Exception):
    """The run cannot start; the message names the files. Exit code 2, nothing written."""


@dataclass(frozen=True)
class FileJob:
    source: Path
    target: Path


@dataclass
class Plan:
    jobs: list[FileJob]
    skipped: list[FileJob]  # targets that exist, left alone under --skip-existing
    # Files in the input folders that are not images or videos we read, with the reason: listed in
    # the report and counted in the summary line, never silently passed over.
    ignored: list[tuple[FileJob, str]] = field(default_factory=list)


def _images_under(folder: Path, exclude: Path | None) -> tuple[list[Path], list[tuple[Path, str]]]:
    found, ignored = [], []
    for path in sorted(folder.rglob("*")):
        if exclude is not None and path.resolve().is_relative_to(exclude):
            continue  # earlier outputs inside the input folder are not inputs
        if not path.is_file():
            continue
        if path.suffix.lower() in MEDIA_SUFFIXES:
            found.append(path)
        elif path.name.startswith(".") and path.name.endswith(".partial"):
            continue  # a stopped run's unfinished output (write_atomically)
        else:
            kind = f"{path.suffix.lower()} files" if path.suffix else "files without an extension"
            ignored.append((path, f"not an image or video this reads ({kind}; it reads {', '.join(MEDIA_SUFFIXES)})"))
    return found, ignored


def plan_files(inputs: list[str], output: str, *, overwrite: bool = False, skip_existing: bool = False) -> Plan:
    """Pairs every input image with its output path; raises PlanError naming every problem at once."""
    output_path = Path(output)
    single_file = (
        len(inputs) == 1
        and Path(inputs[0]).is_file()
        and output_path.suffix.lower() in MEDIA_SUFFIXES
        and not output_path.is_dir()
    )
    problems: list[str] = []
    pairs: list[FileJob] = []
    ignored: list[tuple[FileJob, str]] = []
    out_root = output_path.resolve()
    if output_path.suffix.lower() in UNWRITABLE_SUFFIXES and not output_path.is_dir():
        problems.append(
            f"-o {output}: cannot write {output_path.suffix} files; name a .jpg, .png, .webp, .bmp or .tif "
            "file (one input) or a folder"
        )
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            images, others = _images_under(path, exclude=out_root if out_root != path.resolve() else None)
            ignored.extend((FileJob(other, output_path / other.relative_to(path)), why) for other, why in others)
            if not images:
                problems.append(f"{raw}: no JPEG, PNG or WebP images or videos in this folder")
            pairs.extend(FileJob(image, output_path / image.relative_to(path)) for image in images)
        elif path.is_file():
            if path.suffix.lower() not in MEDIA_SUFFIXES:
                problems.append(
                    f"{raw}: not an image (.jpg, .jpeg, .png, .webp) or a video ({', '.join(VIDEO_SUFFIXES)})"
                )
            elif single_file and is_video(path) != is_video(output_path):
                problems.append(f"-o {output}: a {'video' if is_video(path) else 'image'} needs a file of its kind")
            pairs.append(FileJob(path, output_path if single_file else output_path / path.name))
        else:
            problems.append(f"{raw}: no such file or folder")
    several = len(inputs) > 1 or Path(inputs[0]).is_dir()  # a lone missing input is reported as missing
    if several and output_path.suffix.lower() in MEDIA_SUFFIXES and not output_path.is_dir():
        problems.append(f"-o {output}: several images (or a folder) need an output folder, not an image file name")
    if output_path.exists() and not output_path.is_dir() and not single_file:
        problems.append(f"-o {output}: exists and is not a folder")

    by_target: dict[Path, list[FileJob]] = {}
    for job in pairs:
        by_target.setdefault(job.target.resolve(), []).append(job)
    for target, jobs in by_target.items():
        if len(jobs) > 1:
            problems.append(f"{target}: the output of {len(jobs)} inputs ({', '.join(str(j.source) for j in jobs)})")
        if any(job.source.resolve() == target for job in jobs):
            problems.append(f"{target}: would replace its own input")
    if problems:
        raise PlanError("nothing was written:\n  " + "\n  ".join(problems))

    existing = [job for job in pairs if job.target.exists()]
    if existing and not overwrite and not skip_existing:
        names = "\n  ".join(str(job.target) for job in existing)
        raise PlanError(
            f"{len(existing)} output(s) already exist; nothing was written (use --overwrite to replace them "
            f"or --skip-existing to leave them):\n  {names}"
        )
    if skip_existing:
        return Plan([job for job in pairs if not job.target.exists()], existing, ignored)
    return Plan(pairs, [], ignored)


def is_video(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_SUFFIXES


def choose_method(requested: str | None, model_source: str, *, quiet: bool = False) -> str:
    """``requested``, or for "auto" the best method the weights allow, with one line on stderr saying why."""
    if requested not in (None, "auto"):
        return requested
    from masquerade.models.layout import ModelLayout, default_model_dir

    if model_source == "tiny":
        method, why = "reverse_personalization", "tiny random weights (--models tiny): the output is noise"
    else:
        root = default_model_dir() if model_source == "default" else Path(model_source).expanduser()
        missing = ModelLayout(root).missing_parts()
        if missing:
            method = "blur"
            why = (
                f"no reverse-personalization weights in {root} (missing {len(missing)} of 3 parts); "
                f"`masquerade models fetch --to {root}` gets them"
            )
        else:
            method, why = "reverse_personalization", f"weights in {root}"
    if not quiet:
        print(f"method: {method} ({why})", file=sys.stderr)
    return method


def skipped_record(job: FileJob, reason: str = "output exists") -> dict:
    return {"input": str(job.source), "output": str(job.target), "status": "skipped", "reason": reason}


def failed_record(job: FileJob, error: str) -> dict:
    return {"input": str(job.source), "output": str(job.target), "status": "failed", "error": error}


def result_record(job: FileJob, result) -> dict:
    return {
        "input": str(job.source),
        "output": str(job.target),
        "status": "anonymized",
        "complete": result.complete,
        "no_faces": result.no_faces,
        "faces": [face.to_json() for face in result.faces],
    }


def summary_line(records: list[dict]) -> str:
    """One line counting every input by what happened to it."""
    counts: dict[str, int] = {}
    for record in records:
        counts[record["status"]] = counts.get(record["status"], 0) + 1
    parts = [
        f"{counts[status]} {status}" for status in ("anonymized", "drawn", "skipped", "failed") if status in counts
    ]
    return f"{len(records)} input(s): " + ", ".join(parts)


def write_atomically(target: Path, data: bytes) -> None:
    """The output appears whole or not at all (a stopped run leaves no half-written image)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial")
    partial.write_bytes(data)
    os.replace(partial, target)


def summarize(records: list[dict]) -> None:
    for record in records:
        if record["status"] == "anonymized" and record.get("kind") == "video":
            what = f"{record['frames']} frames, {len(record['tracks'])} track(s), complete={record['complete']}"
        elif record["status"] == "anonymized":
            faces = record["faces"]
            what = "no faces" if record["no_faces"] else f"{len(faces)} face(s), complete={record['complete']}"
        elif record["status"] == "drawn":
            what = f"{len(record['faces'])} detection(s) drawn, NOT anonymized"
        elif record["status"] == "skipped":
            what = f"skipped ({record['reason']})"
        else:
            what = f"FAILED: {record['error']}"
        print(f"{record['input']} -> {record['output']}: {what}")


def write_report(path: str, records: list[dict]) -> None:
    Path(path).write_text(json.dumps(records, indent=2) + "\n")
