"""Detector memory is bounded by the process, not by the number of calls: concurrent videos share a
fixed set of detection (and self-check) threads, each with one one-thread CenterFace session, and
their results are those of the same videos run one at a time."""

from __future__ import annotations

import asyncio

import numpy as np

from masquerade.engine.request import Method
from masquerade.face.detect import FaceDetector
from masquerade.face.detectors import CenterFaceBackend
from masquerade.video import VideoOptions, anonymize_video, pipeline
from masquerade.video.synthetic import ClipSpec, MovingFace, make_clip

SPEC = ClipSpec(
    width=320,
    height=192,
    frames=12,
    faces=(MovingFace(0, 90, (30, 40), (4, 0)), MovingFace(3, 70, (220, 50), (-3, 2))),
    audio=False,
)
CALLS = 4


def _faces(report) -> list[list[tuple[int, str, tuple[float, ...]]]]:
    return [
        sorted((f["track_id"], f["source"], tuple(f["box"])) for f in frame["faces"]) for frame in report.frame_boxes
    ]


def test_concurrent_videos_share_a_bounded_set_of_sessions_and_match_one_at_a_time(tmp_path, monkeypatch):
    source = tmp_path / "two.mp4"
    make_clip(source, SPEC)
    detector = FaceDetector("centerface")  # the server's shared detector, made before counting
    detect_threads = pipeline.DetectorThreads(2, "test-video-detect")
    check_threads = pipeline.DetectorThreads(1, "test-video-check")
    monkeypatch.setattr(pipeline, "_DETECT_THREADS", detect_threads)
    monkeypatch.setattr(pipeline, "_CHECK_THREADS", check_threads)
    made = []
    real_init = CenterFaceBackend.__init__

    def counting_init(self, *args, **kwargs):
        made.append(kwargs.get("intra_op_threads", args[0] if args else None))
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(CenterFaceBackend, "__init__", counting_init)
    # Each call asks for more workers than the shared threads hold; self-checks on (every 4th frame).
    options = VideoOptions(method=Method.SOLID, report_frames=True, self_check_every=4, detect_workers=4)

    alone = asyncio.run(anonymize_video(source, tmp_path / "alone.mp4", options, detector=detector))
    assert len(made) == 3 and set(made) == {1}, made  # two detection sessions and the checker's, no more

    async def together():
        return await asyncio.gather(
            *(anonymize_video(source, tmp_path / f"call{i}.mp4", options, detector=detector) for i in range(CALLS))
        )

    reports = asyncio.run(together())
    # The concurrent calls made no session at all: they queued on the same threads' sessions.
    assert len(made) == 3, made
    assert detect_threads.sessions_made == 2 and check_threads.sessions_made == 1

    expected = _faces(alone)
    assert len(alone.tracks) == 2 and alone.frames_checked > 0
    output = (tmp_path / "alone.mp4").read_bytes()
    for index, report in enumerate(reports):
        assert _faces(report) == expected, index
        assert (report.frames_checked, report.residual_recognisable, report.uncovered_found) == (
            alone.frames_checked,
            alone.residual_recognisable,
            alone.uncovered_found,
        )
        assert (tmp_path / f"call{index}.mp4").read_bytes() == output, index


def test_arena_keep_grows_to_the_largest_frame_served_and_stays_bounded():
    threads = pipeline.DetectorThreads(1, "test-video-arena")
    detector = FaceDetector("centerface")

    def keep(pixels: int) -> int:
        return threads.submit(lambda: threads.detector(detector, pixels).backend.arena_keep_pixels).result()

    base = keep(0)
    assert keep(1920 * 1088) == max(base, 1920 * 1088)
    assert keep(640 * 384) == max(base, 1920 * 1088)  # a smaller frame after: kept for the largest
    assert keep(4096 * 2176) == max(base, pipeline.VIDEO_ARENA_KEEP_LIMIT)  # never above the limit
    assert threads.sessions_made == 1
    # Other settings replace the thread's session: still one per thread.
    other = FaceDetector("centerface", detect_scale=0.5)
    assert threads.submit(lambda: threads.detector(other).detect_scale).result() == 0.5
    assert threads.sessions_made == 2
    assert np.isfinite(base)
