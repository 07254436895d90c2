"""Video files, measured: fps per method and resolution, coverage with and without tracking, deface
side by side on the same clips in the same run, and peak memory over clip length.

Clips are built on the spot (masquerade.video.synthetic): three real faces (insightface's t1.jpg)
moving over a textured background, one of them walking out of the frame, with hard frames where a
face is blurred (the detector finds nothing), softened (it scores under the threshold) or dark
with sensor noise, and a 440 Hz sine-wave audio track.

- fps: `anonymize_video` wall time (decode, detect, track, cover, encode, audio copy) per method at
  720p and 1080p; deface (its own venv, benchmarks/deface_env.py) on the same clip, same run.
- coverage: the fraction of (frame, face) pairs whose face is covered, judged on the pixels: both
  tools replace faces with a solid colour (ours grey, deface's black) and a pair counts as covered
  when >= 80 % of the face's inner pixels that differ from that colour in the input show it in the
  output. Ours with tracking (default), ours per frame (no hold, no look-ahead, no low-score
  continuation), and deface (its default threshold 0.2 and mask scale 1.3).
- memory: peak RSS of a child process anonymizing a clip and one 10x as long (same content).

    .venv/bin/python benchmarks/video.py              # full run (several minutes on 2 cores)
    .venv/bin/python benchmarks/video.py --quick      # short clips, no 1080p, no deface: a smoke run

Prints a table; writes benchmarks/results/video.json and video.png.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"
SOLID_GREY = 128  # masquerade.face.classical.SOLID_COLOUR
DEFACE_SOLID = 0  # deface fills a solid box black
TARGETS = {"coverage_tracked": 0.99, "blur_720p_fps_vs_deface": 1.0, "memory_10x_ratio": 1.2}


def clip_spec(width: int, height: int, seconds: float, fps: int = 24):
    """Three faces at sizes proportional to the frame; about 8 % of (frame, face) pairs are hard."""
    from masquerade.video.synthetic import ClipSpec, MovingFace

    frames = int(seconds * fps)
    unit = height / 720
    faces = (
        MovingFace(0, int(200 * unit), (0.05 * width, 0.25 * height), (2.5 * unit, 0.2 * unit)),
        MovingFace(3, int(170 * unit), (0.55 * width, 0.1 * height), (-1.5 * unit, 0.8 * unit)),
        # Walks right and out of the frame over the clip.
        MovingFace(5, int(150 * unit), (0.70 * width, 0.55 * height), (0.45 * width / max(frames, 1), 0.0)),
    )
    rng = np.random.default_rng(7)
    hard: dict[int, dict[int, str]] = {}
    for start in range(6, frames - 3, 12):  # short runs of hard frames, as in real footage
        face, kind, length = int(rng.integers(0, 3)), str(rng.choice(["blur", "soft", "dark"])), int(rng.integers(1, 4))
        for index in range(start, min(start + length, frames)):
            hard.setdefault(index, {})[face] = kind
    return ClipSpec(width=width, height=height, frames=frames, fps=fps, faces=faces, hard=hard, audio=True)


def _cpu_seconds(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def decode(path: Path) -> list[np.ndarray]:
    import av

    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(container.streams.video[0])]


def coverage(source: Path, output: Path, truth, fill: int) -> dict:
    """Pairs covered, judged on pixels (see the module doc)."""
    originals, outputs = decode(source), decode(output)
    if len(outputs) != len(originals):
        return {"covered": 0, "pairs": 0, "fraction": None, "frames_out": len(outputs), "frames_in": len(originals)}
    covered = pairs = hard_pairs = hard_covered = 0
    for index, boxes in enumerate(truth.boxes):
        for face, box in enumerate(boxes):
            if box is None:
                continue
            x0, y0, x1, y1 = box
            w, h = x1 - x0, y1 - y0
            region = (slice(int(y0 + h / 4), int(y1 - h / 4)), slice(int(x0 + w / 4), int(x1 - w / 4)))
            before = originals[index][region].astype(int)
            after = outputs[index][region].astype(int)
            informative = np.abs(before - fill).max(-1) >= 24
            if informative.sum() < 0.1 * informative.size:
                continue  # the face already looks like the fill colour: nothing to judge
            shows_fill = np.abs(after - fill).max(-1) < 16
            ok = shows_fill[informative].mean() >= 0.8
            pairs += 1
            covered += ok
            if face in truth.hard[index]:
                hard_pairs += 1
                hard_covered += ok
    return {
        "covered": int(covered),
        "pairs": int(pairs),
        "fraction": round(covered / pairs, 4) if pairs else None,
        "hard_pairs": int(hard_pairs),
        "hard_covered": int(hard_covered),
    }


def run_ours(source: Path, target: Path, method: str, tracked: bool = True, **extra) -> dict:
    from masquerade.engine.request import Method
    from masquerade.face.detect import FaceDetector
    from masquerade.video import TrackingOptions, VideoOptions, anonymize_video

    tracking = TrackingOptions() if tracked else TrackingOptions(track_hold=0, look_ahead=0, low_score_ratio=1.0)
    options = VideoOptions(method=Method(method), tracking=tracking, **extra)
    detector = FaceDetector("centerface")
    started, cpu_started = time.perf_counter(), _cpu_seconds(resource.RUSAGE_SELF)
    report = asyncio.run(anonymize_video(source, target, options, detector=detector))
    seconds = time.perf_counter() - started
    cpu = _cpu_seconds(resource.RUSAGE_SELF) - cpu_started
    return {
        "frames": report.frames,
        "seconds": round(seconds, 2),
        "fps": round(report.frames / seconds, 2),
        "cpu_ms_per_frame": round(1000 * cpu / report.frames, 1),
        "tracks": len(report.tracks),
        "frames_filled": sum(t.frames_filled for t in report.tracks),
        "flicker": report.flicker,
        "residual_recognisable": report.residual_recognisable,
        "audio_packets_copied": report.audio_packets_copied,
    }


def deface_startup_seconds(command: list[str]) -> tuple[float, float]:
    """deface's import time and CPU time (onnxruntime, OpenCV, imageio): subtracted from its run, as ours
    excludes its own."""
    started, cpu_started = time.perf_counter(), _cpu_seconds(resource.RUSAGE_CHILDREN)
    subprocess.run([*command, "--version"], capture_output=True, timeout=600)
    return time.perf_counter() - started, _cpu_seconds(resource.RUSAGE_CHILDREN) - cpu_started


def run_deface(command: list[str], source: Path, target: Path, replace: str, startup=(0.0, 0.0)) -> dict:
    started, cpu_started = time.perf_counter(), _cpu_seconds(resource.RUSAGE_CHILDREN)
    done = subprocess.run(
        [*command, str(source), "-o", str(target), "--replacewith", replace, "--keep-audio"],
        capture_output=True,
        text=True,
        timeout=3600,
    )
    seconds = time.perf_counter() - started - startup[0]
    cpu = _cpu_seconds(resource.RUSAGE_CHILDREN) - cpu_started - startup[1]
    if done.returncode != 0:
        return {"error": done.stderr[-2000:]}
    frames = len(decode(target))
    return {
        "frames": frames,
        "seconds": round(seconds, 2),
        "startup_seconds_excluded": round(startup[0], 2),
        "fps": round(frames / seconds, 2),
        "cpu_ms_per_frame": round(1000 * cpu / frames, 1),
    }


def deface_command() -> tuple[list[str] | None, str]:
    """deface in its own venv (benchmarks/deface_env.py's when present), or None and why not."""
    sys.path.insert(0, str(Path(__file__).parent))
    try:
        try:
            import deface_env

            return list(deface_env.deface_command()), ""
        except ImportError:
            return _own_deface_venv(), ""
    except Exception as error:  # offline, pip failure: the rest of the benchmark still runs
        return None, f"deface could not be installed: {error}"


def _own_deface_venv() -> list[str]:
    """deface 1.5.0 with its own dependencies (GUI OpenCV, imageio-ffmpeg) in a venv beside the results,
    never in the project's venv (where its OpenCV would clash with the headless build)."""
    venv = Path(__file__).parent / ".deface-venv"
    executable = venv / "bin" / "deface"
    if not executable.exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        subprocess.run([*pip, "deface==1.5.0", "onnxruntime"], check=True, timeout=1800)
    return [str(executable)]


def peak_memory_mb(source: Path, target: Path) -> float:
    """Peak RSS of a fresh process anonymizing ``source`` with blur (its own interpreter: nothing shared)."""
    done = subprocess.run(
        [sys.executable, __file__, "--child-memory", str(source), str(target)],
        capture_output=True,
        text=True,
        timeout=3600,
    )
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    return float(json.loads(done.stdout.strip().splitlines()[-1])["peak_rss_mb"])


def _child_memory(source: str, target: str) -> None:
    run_ours(Path(source), Path(target), "blur")
    print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 s clips at 480p and 720p, no deface, short memory run")
    parser.add_argument("--seconds", type=float, default=4.0, help="clip length for fps and coverage")
    parser.add_argument("--no-deface", action="store_true")
    parser.add_argument(
        "--parts", nargs="+", choices=("fps", "memory"), default=["fps", "memory"], help="which measurements to run"
    )
    parser.add_argument("--memory-seconds", type=float, default=2.0, help="the short clip of the memory check")
    parser.add_argument("--memory-height", type=int, default=720, help="frame height of the memory check (16:9)")
    parser.add_argument("--child-memory", nargs=2, metavar=("SOURCE", "TARGET"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_memory:
        _child_memory(*args.child_memory)
        return

    from masquerade.video.synthetic import make_clip

    seconds = 2.0 if args.quick else args.seconds
    resolutions = [(854, 480), (1280, 720)] if args.quick else [(1280, 720), (1920, 1080)]
    skip_deface = args.quick or args.no_deface or "fps" not in args.parts
    deface, deface_note = (None, "not run") if skip_deface else deface_command()
    results: dict = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "commit": _git_commit(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "clip_seconds": seconds,
        "targets": TARGETS,
        "runs": [],
        "deface": deface_note or "installed in its own venv (benchmarks/deface_env.py)",
    }
    with tempfile.TemporaryDirectory(prefix="masquerade-video-bench-") as tmp:
        work = Path(tmp)
        for width, height in resolutions if "fps" in args.parts else []:
            label = f"{height}p"
            source = work / f"clip_{label}.mp4"
            truth = make_clip(source, clip_spec(width, height, seconds))
            pairs_total = sum(box is not None for boxes in truth.boxes for box in boxes)
            # Ours and deface alternate on the same clip, so a change in the machine's load hits both alike.
            plan = [("masquerade", "blur")]
            if height == 720 or args.quick:
                plan += [("deface", "blur"), ("masquerade", "solid"), ("deface", "solid")]
                plan += [("masquerade (per frame, no tracking)", "solid"), ("masquerade", "pixelate")]
            startup = deface_startup_seconds(deface) if deface is not None else (0.0, 0.0)
            for tool, method in plan:
                out = (
                    work / f"{tool.split(' ')[0]}_{method}_{'tracked' if tool == 'masquerade' else 'other'}_{label}.mp4"
                )
                if tool == "deface":
                    if deface is None:
                        continue
                    measured = run_deface(deface, source, out, method, startup)
                else:
                    measured = run_ours(source, out, method, tracked=tool == "masquerade")
                run = {"tool": tool, "method": method, "resolution": label, **measured}
                if method == "solid" and "error" not in run:
                    run["coverage"] = coverage(source, out, truth, DEFACE_SOLID if tool == "deface" else SOLID_GREY)
                results["runs"].append(run)
                print(_line(run), flush=True)
            results.setdefault("pairs", {})[label] = pairs_total

        # Memory over clip length: the same content, 1x and 10x as long (720p, blur).
        short_seconds = 1.0 if args.quick else args.memory_seconds
        memory_size = (args.memory_height * 16 // 9 // 2 * 2, args.memory_height)
        memory = {}
        for factor in (1, 10) if "memory" in args.parts else []:
            source = work / f"memory_{factor}x.mp4"
            make_clip(source, clip_spec(*memory_size, short_seconds * factor))
            memory[f"{factor}x"] = round(peak_memory_mb(source, work / f"memory_{factor}x_out.mp4"), 1)
            source.unlink()
        if memory:
            memory["ratio"] = round(memory["10x"] / memory["1x"], 3)
            memory["seconds_1x"] = short_seconds
            memory["size"] = f"{memory_size[0]}x{memory_size[1]}"
            results["memory"] = memory
            print(
                f"peak RSS: {memory['1x']} MB for {short_seconds:g} s, {memory['10x']} MB for 10x: {memory['ratio']}x"
            )

    _summarize(results)
    RESULTS.mkdir(exist_ok=True)
    name = ("video_quick" if args.quick else "video") + ("" if len(args.parts) == 2 else "_" + args.parts[0])
    (RESULTS / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    _plot(results, RESULTS / f"{name}.png")
    print(f"wrote {RESULTS / (name + '.json')} and {name}.png")


def _line(run: dict) -> str:
    if "error" in run:
        return f"{run['tool']:38s} {run['method']:9s} {run['resolution']:6s} FAILED: {run['error'][-300:]}"
    text = f"{run['tool']:38s} {run['method']:9s} {run['resolution']:6s} {run['fps']:6.2f} fps"
    text += f" {run['cpu_ms_per_frame']:7.1f} CPU-ms/frame"
    if "coverage" in run and run["coverage"].get("fraction") is not None:
        c = run["coverage"]
        text += (
            f"  coverage {c['fraction']:.4f} ({c['covered']}/{c['pairs']}; hard {c['hard_covered']}/{c['hard_pairs']})"
        )
    return text


def _summarize(results: dict) -> None:
    runs = results["runs"]

    def find(tool, method, resolution="720p"):
        return next(
            (r for r in runs if r["tool"] == tool and r["method"] == method and r["resolution"] == resolution), None
        )

    ours, theirs = find("masquerade", "blur"), find("deface", "blur")
    if ours and theirs and "fps" in theirs:
        results["blur_720p_fps_vs_deface"] = round(ours["fps"] / theirs["fps"], 3)
        results["blur_720p_cpu_vs_deface"] = round(theirs["cpu_ms_per_frame"] / ours["cpu_ms_per_frame"], 3)
        print(
            f"blur 720p: {ours['fps']} fps vs deface {theirs['fps']} fps: {results['blur_720p_fps_vs_deface']}x; "
            f"CPU per frame {ours['cpu_ms_per_frame']} vs {theirs['cpu_ms_per_frame']} ms: "
            f"{results['blur_720p_cpu_vs_deface']}x"
        )


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in results["runs"] if "fps" in r]
    if not runs:
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = [
        f"{r['tool'].split(' ')[0]}{' per-frame' if 'per frame' in r['tool'] else ''}\n{r['method']} {r['resolution']}"
        for r in runs
    ]
    colours = ["tab:orange" if r["tool"] == "deface" else "tab:blue" for r in runs]
    left.bar(range(len(runs)), [r["fps"] for r in runs], color=colours)
    left.set_xticks(range(len(runs)), labels, fontsize=7)
    left.set_ylabel("frames per second")
    left.set_title("throughput (same clips, same run)")
    covered = [r for r in runs if r.get("coverage", {}).get("fraction") is not None]
    right.bar(
        range(len(covered)),
        [r["coverage"]["fraction"] for r in covered],
        color=["tab:orange" if r["tool"] == "deface" else "tab:blue" for r in covered],
    )
    right.set_xticks(range(len(covered)), [r["tool"].replace(" (", "\n(") for r in covered], fontsize=7)
    right.axhline(TARGETS["coverage_tracked"], color="grey", linestyle="--", linewidth=1)
    right.set_ylim(min([0.8] + [r["coverage"]["fraction"] - 0.02 for r in covered]), 1.0)
    right.set_ylabel("(frame, face) pairs covered")
    right.set_title("coverage on clips with hard frames (720p)")
    fig.suptitle(f"video files, {results['machine']['cpus']} CPUs, commit {results['commit']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
