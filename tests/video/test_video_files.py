"""Video files end to end on clips built here (PyAV): frames, timestamps, rotation, audio and
metadata survive as promised; every face is covered on every frame, including the frames the
detector alone misses; bad files get clear errors and leave nothing behind."""

from __future__ import annotations

import asyncio
from pathlib import Path

import av
import numpy as np
import pytest

from masquerade.engine.request import Method
from masquerade.face.detect import FaceDetector
from masquerade.face.selfcheck import iou
from masquerade.video import (
    EncodeOptions,
    TrackingOptions,
    VideoCancelled,
    VideoError,
    VideoLimits,
    VideoOptions,
    WindowedFaceTracker,
    anonymize_video,
)
from masquerade.video.synthetic import ClipSpec, MovingFace, make_clip, render_frame

METADATA = {
    "title": "family trip",
    "creation_time": "2024-05-01T10:00:00.000000Z",
    "location": "+48.8577+002.2950/",
    "comment": "shot on a phone",
}
# Face 0 walks right, face 1 drifts left and down. Hard frames: face 0 blurred (5, 6) and dark (10);
# face 1 blurred on the first two frames (so it is first *detected* at frame 2), soft (11) and blurred (12).
HARD_SPEC = ClipSpec(
    frames=24,
    faces=(MovingFace(0, 110, (20, 60), (4, 0)), MovingFace(3, 100, (200, 40), (-2, 1))),
    hard={
        0: {1: "blur"},
        1: {1: "blur"},
        5: {0: "blur"},
        6: {0: "blur"},
        10: {0: "dark"},
        11: {1: "soft"},
        12: {1: "blur"},
    },
    variable_rate=True,
    metadata=METADATA,
)


def _run(source: Path, target: Path, **options) -> object:
    return asyncio.run(anonymize_video(source, target, VideoOptions(**options), detector=_detector()))


_DETECTOR: list[FaceDetector] = []


def _detector() -> FaceDetector:
    if not _DETECTOR:
        _DETECTOR.append(FaceDetector("centerface"))
    return _DETECTOR[0]


def _decode(path: Path) -> tuple[list[np.ndarray], list[float], list[int]]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = list(container.decode(stream))
    return (
        [f.to_ndarray(format="rgb24") for f in frames],
        [float(f.pts * f.time_base) for f in frames],
        [int(f.rotation or 0) for f in frames],
    )


def _audio_packets(path: Path) -> list[bytes]:
    with av.open(str(path)) as container:
        return [bytes(p) for p in container.demux(container.streams.audio[0]) if p.dts is not None]


def _tags(path: Path) -> dict[str, str]:
    with av.open(str(path)) as container:
        tags = dict(container.metadata)
        for stream in container.streams:
            tags.update({f"{stream.type}:{k}": v for k, v in stream.metadata.items()})
    return tags


@pytest.fixture(scope="module")
def hard_clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("clips") / "walk.mp4"
    return path, make_clip(path, HARD_SPEC)


def test_output_keeps_frames_timestamps_size_rotation_and_audio_packets(tmp_path):
    source = tmp_path / "phone.mp4"
    spec = ClipSpec(
        frames=12, faces=(MovingFace(0, 100, (60, 40), (3, 0)),), variable_rate=True, rotation=90, metadata=METADATA
    )
    make_clip(source, spec)
    target = tmp_path / "out.mp4"
    report = _run(source, target, method=Method.BLUR)

    frames_in, times_in, _ = _decode(source)
    frames_out, times_out, rotations = _decode(target)
    assert len(frames_out) == len(frames_in) == 12 == report.frames
    assert times_out == pytest.approx(times_in, abs=1e-6)  # variable frame timing survives
    assert len(set(np.round(np.diff(times_in), 4))) == 2
    assert frames_out[0].shape == frames_in[0].shape == (240, 320, 3)
    assert set(rotations) == {90} and report.rotation == 90 and (report.width, report.height) == (240, 320)
    packets = _audio_packets(source)
    assert packets and _audio_packets(target) == packets  # copied packet for packet, byte for byte
    assert report.audio_packets_copied == len(packets)


def test_metadata_is_dropped_by_default_and_kept_without_location_on_request(tmp_path):
    source = tmp_path / "tagged.mp4"
    make_clip(source, ClipSpec(frames=4, metadata=METADATA))
    assert {"title", "creation_time", "location"} <= set(_tags(source))
    stripped, kept = tmp_path / "stripped.mp4", tmp_path / "kept.mkv"
    _run(source, stripped, method=Method.PIXELATE, tracking=TrackingOptions(look_ahead=0))
    tags = _tags(stripped)
    assert not any(word in key.lower() for key in tags for word in ("location", "creation_time", "title", "encoder"))
    assert "family trip" not in " ".join(tags.values()) and "phone" not in " ".join(tags.values())
    _run(source, kept, method=Method.PIXELATE, encode=EncodeOptions(keep_metadata=True))
    tags = _tags(kept)
    assert tags.get("title", tags.get("TITLE")) == "family trip" and "shot on a phone" in tags.values()
    assert not any("location" in key.lower() for key in tags)
    assert not any("+48.8577" in value for value in tags.values())


def test_every_face_is_covered_on_every_frame_including_detector_misses(tmp_path, hard_clip):
    source, truth = hard_clip
    detector = _detector()
    originals, _, _ = _decode(source)

    # The detector alone, at the threshold, misses the face on every hard frame (that is the point).
    misses = 0
    for index, hard in enumerate(truth.hard):
        if not hard:
            continue
        found = detector.detect(originals[index], 0.5)
        for face in hard:
            assert not any(iou(f.box, truth.boxes[index][face]) > 0.2 for f in found), (index, face)
            misses += 1
    assert misses == 7

    def uncovered(target: Path) -> list[tuple[int, int]]:
        outputs, _, _ = _decode(target)
        left = []
        for index, boxes in enumerate(truth.boxes):
            for face, box in enumerate(boxes):
                x0, y0, x1, y1 = (int(v) for v in box)
                # The face's inner part (eyes to mouth): solid grey replaces it whatever it looked like.
                inner = (
                    slice(y0 + (y1 - y0) // 4, y1 - (y1 - y0) // 4),
                    slice(x0 + (x1 - x0) // 4, x1 - (x1 - x0) // 4),
                )
                change = np.abs(outputs[index][inner].astype(int) - originals[index][inner].astype(int)).mean()
                if change < 20:
                    left.append((index, face))
        return left

    report = _run(source, tmp_path / "tracked.mp4", method=Method.SOLID, report_frames=True, self_check_every=0)
    assert uncovered(tmp_path / "tracked.mp4") == []
    assert len(report.tracks) == 2
    assert sum(t.frames_detected for t in report.tracks) + sum(t.frames_filled for t in report.tracks) == 48
    sources = {face["source"] for frame in report.frame_boxes for face in frame["faces"]}
    assert {"detected", "interpolated", "backfilled"} <= sources

    # Per-frame detection alone (no hold, no look-ahead, no low-score continuation) leaves faces bare.
    per_frame = TrackingOptions(track_hold=0, look_ahead=0, low_score_ratio=1.0)
    _run(source, tmp_path / "untracked.mp4", method=Method.SOLID, tracking=per_frame, self_check_every=0)
    assert len(uncovered(tmp_path / "untracked.mp4")) >= 6


def test_window_holds_at_most_look_ahead_frames():
    spec = ClipSpec(frames=20, faces=(MovingFace(1, 100, (40, 40), (5, 0)),), hard={8: {0: "blur"}}, audio=False)
    from masquerade.video.synthetic import background

    base = background(spec.width, spec.height, 0)
    rng = np.random.default_rng(0)
    tracker = WindowedFaceTracker(_detector(), TrackingOptions(look_ahead=4), frame_rate=spec.fps)
    released, most_held = [], 0
    for index in range(spec.frames):
        rgb, _ = render_frame(spec, index, base, rng)
        released += tracker.push(index, rgb, index / spec.fps)
        most_held = max(most_held, tracker.frames_held)
    released += tracker.flush()
    assert most_held == 4  # the look-ahead window, whatever the clip's length
    assert [payload for payload, _ in released] == list(range(20))
    assert [face.source for face in released[8][1].faces] == ["interpolated"]


@pytest.mark.parametrize(
    "name, content, problem",
    [
        ("empty.mp4", b"", "is empty"),
        ("noise.mp4", bytes(range(256)) * 64, "not a readable video"),
        ("truncated.mp4", None, "not a readable video"),
        ("song.mkv", "audio-only", "has no video stream"),
    ],
)
def test_bad_files_get_a_clear_error_and_leave_no_output(tmp_path, hard_clip, name, content, problem):
    source = tmp_path / name
    if content is None:
        data = hard_clip[0].read_bytes()
        source.write_bytes(data[: len(data) // 2])
    elif content == "audio-only":
        make_clip(source, ClipSpec(frames=0, audio=True))
    else:
        source.write_bytes(content)
    target = tmp_path / "out" / "clip.mp4"
    with pytest.raises(VideoError, match=problem) as raised:
        _run(source, target)
    assert name in str(raised.value)
    assert not target.exists() and not list(tmp_path.glob("out/.*partial*"))


def test_limits_refuse_before_decoding(tmp_path, hard_clip):
    source, _ = hard_clip
    with pytest.raises(VideoError, match=r"320x240 = 76800 pixels, over the limit of 10000"):
        _run(source, tmp_path / "a.mp4", limits=VideoLimits(max_pixels=10_000))
    with pytest.raises(VideoError, match=r"over the limit of 0.5 s"):
        _run(source, tmp_path / "b.mp4", limits=VideoLimits(max_seconds=0.5))
    assert not list(tmp_path.iterdir())


def test_cancel_stops_and_leaves_no_output(tmp_path, hard_clip):
    source, _ = hard_clip
    polls = []

    def cancelled() -> bool:
        polls.append(1)
        return len(polls) > 3

    with pytest.raises(VideoCancelled):
        asyncio.run(
            anonymize_video(source, tmp_path / "c.mp4", VideoOptions(), detector=_detector(), cancelled=cancelled)
        )
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "suffix, codec, audio",
    [(".mov", "h264", True), (".mkv", "vp9", True), (".webm", "vp9", False), (".avi", "h264", True)],
)
def test_every_container_round_trips(tmp_path, suffix, codec, audio):
    source, target = tmp_path / "in.mp4", tmp_path / f"out{suffix}"
    make_clip(source, ClipSpec(frames=4, width=160, height=96))
    report = _run(source, target, encode=EncodeOptions(codec=codec, audio=audio), self_check_every=0)
    frames, _, _ = _decode(target)
    assert len(frames) == report.frames == 4 and frames[0].shape == (96, 160, 3)
    assert (_audio_packets(target) == _audio_packets(source)) if audio else report.audio_packets_copied == 0


def test_audio_a_container_cannot_hold_is_refused_by_name(tmp_path):
    source = tmp_path / "in.mp4"
    make_clip(source, ClipSpec(frames=2, width=160, height=96))
    with pytest.raises(VideoError, match="aac audio cannot be copied into a .webm file.*--no-audio"):
        _run(source, tmp_path / "out.webm", encode=EncodeOptions(codec="vp9"))
    assert not list(tmp_path.glob("*out*"))
