"""Detector sessions and peak memory for N concurrent classical video calls in one process.

Each N runs in a fresh subprocess: N calls of anonymize_video at once on one 720p synthetic clip
(12 frames, two faces, blur, self-check every 4th frame, 4 detection workers asked), counting the
CenterFace sessions constructed (the caller's shared detector included) and the peak RSS.

    .venv/bin/python benchmarks/video_sessions.py [--calls 1 6]

Prints one line per N; writes benchmarks/results/video_sessions.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def _one(calls: int, folder: Path) -> dict:
    from masquerade.engine.request import Method
    from masquerade.face.detect import FaceDetector
    from masquerade.face.detectors import CenterFaceBackend
    from masquerade.video import VideoOptions, anonymize_video
    from masquerade.video.synthetic import ClipSpec, MovingFace, make_clip

    source = folder / "clip.mp4"
    faces = (MovingFace(0, 200, (100, 100), (6, 0)), MovingFace(3, 140, (800, 200), (-4, 2)))
    make_clip(source, ClipSpec(width=1280, height=720, frames=12, faces=faces, audio=False))
    made = []
    real_init = CenterFaceBackend.__init__

    def counting_init(self, *args, **kwargs):
        made.append(1)
        real_init(self, *args, **kwargs)

    CenterFaceBackend.__init__ = counting_init
    detector = FaceDetector("centerface")
    options = VideoOptions(method=Method.BLUR, self_check_every=4, detect_workers=4)

    async def run():
        await asyncio.gather(
            *(anonymize_video(source, folder / f"out{i}.mp4", options, detector=detector) for i in range(calls))
        )

    started = time.perf_counter()
    asyncio.run(run())
    return {
        "calls": calls,
        "sessions_made": len(made),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "seconds": round(time.perf_counter() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, nargs="+", default=[1, 6])
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        with tempfile.TemporaryDirectory() as folder:
            print(json.dumps(_one(args.child, Path(folder))))
        return
    runs = []
    for calls in args.calls:
        done = subprocess.run(
            [sys.executable, __file__, "--child", str(calls)], capture_output=True, text=True, check=True
        )
        run = json.loads(done.stdout.strip().splitlines()[-1])
        runs.append(run)
        print(
            f"{calls} concurrent calls: {run['sessions_made']} sessions made, "
            f"peak RSS {run['peak_rss_mb']} MB, {run['seconds']} s"
        )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "video_sessions.json").write_text(json.dumps({"runs": runs}, indent=2) + "\n")


if __name__ == "__main__":
    main()
