"""The classical video path's speed-ups change no result: the detector's arena policy, detection run
ahead on worker sessions, and the large-face level on every 4th detector run (tracking fills the rest)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import av
import numpy as np
import pytest

from masquerade.engine.request import Method
from masquerade.face.detect import FaceDetector
from masquerade.face.detectors import ARENA_KEEP_PIXELS, CenterFaceBackend
from masquerade.video import TrackingOptions, VideoOptions, WindowedFaceTracker, anonymize_video, tracking
from masquerade.video.synthetic import ClipSpec, MovingFace, make_clip

# 512x288: the short side reaches 256 px, so the detector has a half-scale level for large faces.
# Face 0 is large (180 px, kept from that level too), face 1 drifts; face 0 is blurred on frames 6-7.
SPEC = ClipSpec(
    width=512,
    height=288,
    frames=16,
    faces=(MovingFace(0, 180, (30, 40), (5, 0)), MovingFace(3, 110, (360, 60), (-3, 2))),
    hard={6: {0: "blur"}, 7: {0: "blur"}},
    audio=False,
)


def _rss_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096 / 2**20


class _RecordingDetector(FaceDetector):
    """A real CenterFace detector that notes, per call, whether the large-face level was asked for."""

    def __init__(self):
        super().__init__("centerface")
        self.large_faces: list[bool] = []

    def find(self, rgb, score_threshold=0.5, small_faces=True, levels_of=None, *, large_faces=True):
        self.large_faces.append(large_faces)
        return super().find(rgb, score_threshold, small_faces, levels_of, large_faces=large_faces)


def _uncovered(source: Path, target: Path, truth) -> list[tuple[int, int]]:
    with av.open(str(source)) as a, av.open(str(target)) as b:
        originals = [f.to_ndarray(format="rgb24") for f in a.decode(video=0)]
        outputs = [f.to_ndarray(format="rgb24") for f in b.decode(video=0)]
    left = []
    for index, boxes in enumerate(truth.boxes):
        for face, box in enumerate(boxes):
            x0, y0, x1, y1 = (int(v) for v in box)
            inner = (slice(y0 + (y1 - y0) // 4, y1 - (y1 - y0) // 4), slice(x0 + (x1 - x0) // 4, x1 - (x1 - x0) // 4))
            if np.abs(outputs[index][inner].astype(int) - originals[index][inner].astype(int)).mean() < 20:
                left.append((index, face))
    return left


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads RSS from /proc")
def test_arena_is_kept_for_inputs_up_to_the_limit_and_given_back_above_it():
    blob = np.zeros((736, 1280, 3), np.uint8)  # 942 080 px: under the 1 Mpx default
    assert blob.shape[0] * blob.shape[1] <= ARENA_KEEP_PIXELS
    grown = {}
    for keep in (0, ARENA_KEEP_PIXELS):  # one that gives everything back, and the default policy
        backend = CenterFaceBackend(intra_op_threads=1, arena_keep_pixels=keep)
        backend.find(np.zeros((64, 64, 3), np.uint8), 0.5)  # the session's one-time allocations
        before = _rss_mb()
        found = backend.find(blob, 0.5)
        grown[keep] = _rss_mb() - before
        assert len(found.boxes) == 0
        del backend
    # Kept: the 720p run's working memory stays reserved (~150 MB measured); given back: most of it.
    assert grown[ARENA_KEEP_PIXELS] > grown[0] + 60, grown


def test_large_face_level_runs_every_fourth_detector_run_only_when_the_look_ahead_spans_it():
    assert WindowedFaceTracker(None, TrackingOptions(look_ahead=24)).live.large_faces_every == 4
    assert WindowedFaceTracker(None, TrackingOptions(look_ahead=24, detect_every=8)).live.large_faces_every == 1
    assert WindowedFaceTracker(None, TrackingOptions(look_ahead=3)).live.large_faces_every == 1
    assert tracking.LiveFaceTracker(None).large_faces_every == 1  # live streams cannot fill backwards


def test_fast_paths_cover_the_same_faces_as_the_plain_path(tmp_path, monkeypatch):
    source = tmp_path / "two.mp4"
    truth = make_clip(source, SPEC)

    # Fast (default): detection ahead on worker sessions, large-face level on every 4th detector run.
    fast = asyncio.run(
        anonymize_video(
            source,
            tmp_path / "fast.mp4",
            VideoOptions(method=Method.SOLID, report_frames=True, self_check_every=0, detect_workers=2),
            detector=FaceDetector("centerface"),
        )
    )
    # Inline on the given detector (which records the levels asked for), first with the sampling ...
    recorder = _RecordingDetector()
    inline = asyncio.run(
        anonymize_video(
            source,
            tmp_path / "inline.mp4",
            VideoOptions(method=Method.SOLID, report_frames=True, self_check_every=0, detect_workers=0),
            detector=recorder,
        )
    )
    assert recorder.large_faces == [index % 4 == 0 for index in range(SPEC.frames)]
    # ... then with the large-face level on every frame: the plain path.
    monkeypatch.setattr(tracking, "LARGE_FACES_EVERY", 1)
    plain = asyncio.run(
        anonymize_video(
            source,
            tmp_path / "plain.mp4",
            VideoOptions(method=Method.SOLID, report_frames=True, self_check_every=0, detect_workers=0),
            detector=FaceDetector("centerface"),
        )
    )

    for target in ("fast.mp4", "inline.mp4", "plain.mp4"):
        assert _uncovered(source, tmp_path / target, truth) == [], target
    # The blurred frames are the tracker's to fill: the detector alone misses face 0 there.
    assert {face["source"] for face in plain.frame_boxes[6]["faces"] if face["track_id"] == 0} == {"interpolated"}

    def faces(report) -> list[list[tuple[int, str, np.ndarray]]]:
        return [
            sorted((f["track_id"], f["source"], np.array(f["box"])) for f in frame["faces"])
            for frame in report.frame_boxes
        ]

    reference = faces(plain)
    for report in (fast, inline):
        assert len(report.tracks) == len(plain.tracks) == 2
        for mine, theirs in zip(faces(report), reference, strict=True):
            assert [(t, s) for t, s, _ in mine] == [(t, s) for t, s, _ in theirs]
            for (_, _, box), (_, _, expected) in zip(mine, theirs):
                # Same faces; boxes within a few px (sessions of one thread or two round differently,
                # and a face seen by both levels merges their boxes).
                assert np.abs(box - expected).max() <= 0.05 * (expected[2] - expected[0]) + 2
