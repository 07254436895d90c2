"""Faces across frames: detections linked into tracks, and the frames where the detector missed a
tracked face covered anyway (docs/design.md section 7).

Association is roboflow `trackers`' ByteTrackTracker: a Kalman filter per track and IoU matching
in two stages, first the detections at or above the threshold, then lower-scored ones (down to
``low_score_ratio`` x threshold) that continue an existing track. A face darkened or blurred for
a few frames often still scores a little: the second stage keeps it covered as that person, while
a low score nowhere near a track is not taken for a face. Around the association, two fills:

- forward (live streams and files): a track the detector lost stays covered for ``track_hold``
  frames, its box moved by the track's Kalman motion;
- look-ahead (files only, ``WindowedFaceTracker``): a frame leaves only once ``look_ahead`` later
  frames have been seen. By then a gap between two detections of one track is interpolated, and a
  track first detected at frame t also covers the waiting frames before t (backfill), moved back
  along its first motion and grown a little for the uncertainty.

Memory: ``LiveFaceTracker`` holds no frames; ``WindowedFaceTracker`` holds at most
``look_ahead + 1`` frames, plus a few boxes per live track. Knows boxes and timestamps; the
pixel work (detector, 68 landmarks) goes through face/detect.py.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field, replace

import numpy as np

from masquerade.face.detect import DEFAULT_THRESHOLD, FaceDetector, landmarks_in_box, predictor_box
from masquerade.face.detectors import RawFaces

Box = tuple[float, float, float, float]
SOURCES = ("detected", "held", "interpolated", "backfilled")
BACKFILL_GROWTH_PER_FRAME = 0.01  # a backfilled box grows by this fraction of its size per frame back ...
BACKFILL_GROWTH_MAX = 0.25  # ... up to this much: its motion before the first detection is a guess
MIN_MATCH_IOU = 0.1
# Files: the detector's half-scale level for large faces (a third of the frame and up) runs on every
# N-th detector run only; the full-scale level, which finds the faces up to that size, runs on all.
# A large face seen only by that level is then detected every N runs and the look-ahead covers the
# runs between (interpolated between two detections, backfilled before the first), so it needs a
# look-ahead of at least N runs; live streams (no look-ahead) run it every time. Saves ~20 % CPU a frame.
LARGE_FACES_EVERY = 4


@dataclass(frozen=True)
class TrackingOptions:
    """How faces are followed between detections (CLI: --detect-every, --track-hold, --look-ahead)."""

    detect_every: int = 1  # run the detector on every K-th frame; the tracker moves the boxes between runs
    track_hold: int = 15  # frames a lost track stays covered (at least detect_every - 1)
    look_ahead: int = 24  # frames a file's frame waits for later detections (0: no backward fill)
    low_score_ratio: float = 0.5  # ByteTrack's second stage: scores down to this x threshold continue a track

    def __post_init__(self) -> None:
        from masquerade.errors import InvalidRequestError

        if not 1 <= int(self.detect_every) <= 300:
            raise InvalidRequestError("tracking.detect_every", f"must be in [1, 300], got {self.detect_every}")
        if not 0 <= int(self.track_hold) <= 600:
            raise InvalidRequestError("tracking.hold_frames", f"must be in [0, 600], got {self.track_hold}")
        if not 0 <= int(self.look_ahead) <= 300:
            raise InvalidRequestError("tracking.look_ahead_frames", f"must be in [0, 300], got {self.look_ahead}")
        if not (math.isfinite(self.low_score_ratio) and 0.0 < self.low_score_ratio <= 1.0):
            raise InvalidRequestError("tracking.low_score_ratio", f"must be in (0, 1], got {self.low_score_ratio}")

    @property
    def hold_frames(self) -> int:
        """A box must survive the frames between detector runs."""
        return max(int(self.track_hold), int(self.detect_every) - 1)


@dataclass
class TrackedFace:
    track_id: int  # stable along the clip or stream, from the track's first detection
    box: Box  # x0, y0, x1, y1 in the (upright) frame's pixels
    landmarks: np.ndarray = field(repr=False)  # [68, 2] float32 (moved along for filled frames), or [0, 2]
    score: float  # the detector's score; for a filled frame, that of the nearest detection
    source: str  # one of SOURCES

    @property
    def detected(self) -> bool:
        return self.source == "detected"


@dataclass
class FrameFaces:
    index: int
    timestamp: float  # seconds
    faces: list[TrackedFace]
    detector_ran: bool
    size: tuple[int, int] = (0, 0)  # width, height of the frame the boxes are in


@dataclass
class _Detection:
    index: int
    timestamp: float
    box: np.ndarray  # [4]
    landmarks: np.ndarray
    score: float


class TrackLinker:
    """ByteTrack association with ids from a track's first detection (the library names a track
    only once it is matched a second time; a face must be covered, and known, from its first frame)."""

    def __init__(self, threshold: float, frame_rate: float, lost_frames: int):
        from trackers import ByteTrackTracker

        frame_rate = frame_rate if frame_rate > 0 else 30.0
        self.frame_rate = frame_rate
        # lost_track_buffer counts 30 fps frames; with timestamps it becomes lost_track_buffer / 30 seconds.
        self._tracker = ByteTrackTracker(
            lost_track_buffer=max(int(math.ceil(lost_frames * 30.0 / frame_rate)), 1),
            frame_rate=frame_rate,
            track_activation_threshold=threshold,
            minimum_consecutive_frames=1,
            minimum_iou_threshold=MIN_MATCH_IOU,
            high_conf_det_threshold=threshold,
        )
        self._own: dict[object, int] = {}  # tracklet object -> our id
        self._next_id = 0

    def new_id(self) -> int:
        self._next_id += 1
        return self._next_id - 1

    def link(self, boxes: np.ndarray, scores: np.ndarray, timestamp: float) -> tuple[list[int | None], dict]:
        """Our track id per detection (None: a low score continuing no track), and every live track's
        Kalman box at ``timestamp`` with its velocity in px/s: {id: (box [4], velocity [4])}."""
        import supervision as sv

        count = len(boxes)
        detections = sv.Detections(
            xyxy=np.asarray(boxes, np.float32).reshape(-1, 4),
            confidence=np.asarray(scores, np.float32).reshape(-1),
            data={"index": np.arange(count)},
        )
        result = self._tracker.update(detections, timestamp=timestamp)
        tracklets = list(self._tracker.tracks)
        self._own = {t: i for t, i in self._own.items() if any(t is alive for alive in tracklets)}
        by_library_id = {t.tracker_id: t for t in tracklets if t.tracker_id != -1}
        spawned = [t for t in tracklets if t.tracker_id == -1 and t.time_since_update == 0]
        ids: list[int | None] = [None] * count
        indices = result.data.get("index", np.zeros(0, int)) if len(result) else np.zeros(0, int)
        for input_index, library_id in zip(indices, result.tracker_id):
            if library_id != -1:
                tracklet = by_library_id.get(int(library_id))
            else:  # a new tracklet starts exactly at the detection that spawned it
                tracklet = next((t for t in spawned if np.allclose(t.get_state_bbox(), boxes[input_index])), None)
            if tracklet is None:
                continue
            if tracklet not in self._own:
                self._own[tracklet] = self.new_id()
            ids[int(input_index)] = self._own[tracklet]
        motion = {}
        for tracklet, own_id in self._own.items():
            state = np.asarray(tracklet.state_estimator.kf.state, np.float64).reshape(-1)
            velocity = state[4:8] * self.frame_rate if state.size >= 8 else np.zeros(4)
            motion[own_id] = (np.asarray(tracklet.get_state_bbox(), np.float64).reshape(4), velocity)
        return ids, motion


class LiveFaceTracker:
    """Forward-only tracking for frames that arrive one by one (a live stream); holds no frames.

    Not thread-safe: one per stream, one ``track`` call at a time (in a worker thread: it runs the
    detector and the landmark predictor).
    """

    def __init__(
        self,
        detector: FaceDetector,
        options: TrackingOptions = TrackingOptions(),
        *,
        threshold: float = DEFAULT_THRESHOLD,
        frame_rate: float = 30.0,
        large_faces_every: int = 1,
    ):
        """``large_faces_every``: the detector's large-face level runs on every N-th detector run (see
        LARGE_FACES_EVERY); 1, on all of them, unless a look-ahead fills the runs between."""
        if int(large_faces_every) < 1:
            raise ValueError(f"large_faces_every must be at least 1, got {large_faces_every!r}")
        self.detector = detector
        self.options = options
        self.large_faces_every = int(large_faces_every)
        self.threshold = float(threshold)
        self.hold = options.hold_frames
        self._linker = TrackLinker(self.threshold, frame_rate, self.hold + options.look_ahead + options.detect_every)
        self._last: dict[int, _Detection] = {}  # track id -> its latest detection
        self._motion: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._motion_time = 0.0
        self._count = 0

    @property
    def tracks_seen(self) -> int:
        return self._linker._next_id

    @property
    def frames_seen(self) -> int:
        return self._count

    def runs_detector(self, index: int) -> bool:
        """Whether frame ``index`` (counted from 0 in ``track`` order) gets a detector run."""
        return index % self.options.detect_every == 0

    def find(self, rgb: np.ndarray, index: int, detector: FaceDetector | None = None) -> RawFaces:
        """The detector's raw faces for frame ``index``, as ``track`` would find them; thread-safe (reads only
        settings), so callers can run it ahead on other threads, with a detector of their own, and hand the
        result to ``track(found=...)``."""
        large_faces = (index // self.options.detect_every) % self.large_faces_every == 0
        return (detector or self.detector).find(
            rgb, self.threshold * self.options.low_score_ratio, large_faces=large_faces
        )

    def track(self, rgb: np.ndarray, timestamp: float, found: RawFaces | None = None) -> FrameFaces:
        """The next frame's tracked faces. ``found``: this frame's ``find`` result, computed ahead (else it
        runs here when the frame gets a detector run)."""
        index = self._count
        self._count += 1
        height, width = rgb.shape[:2]
        detector_ran = self.runs_detector(index)
        faces: list[TrackedFace] = []
        if detector_ran:
            faces = self._detect(rgb, index, timestamp, found if found is not None else self.find(rgb, index))
        detected = {face.track_id for face in faces}
        for track_id, last in list(self._last.items()):
            if track_id in detected:
                continue
            if index - last.index > self.hold:
                del self._last[track_id]
                continue
            if track_id in self._motion:
                box, velocity = self._motion[track_id]
                box = box + velocity * (timestamp - self._motion_time)
            else:
                box = last.box
            clipped = _clip(box, width, height)
            if clipped is not None:
                faces.append(TrackedFace(track_id, clipped, _moved(last.landmarks, last.box, box), last.score, "held"))
        return FrameFaces(index, timestamp, faces, detector_ran, (width, height))

    def _detect(self, rgb: np.ndarray, index: int, timestamp: float, raw: RawFaces) -> list[TrackedFace]:
        height, width = rgb.shape[:2]
        ids, motion = self._linker.link(raw.boxes, raw.scores, timestamp)
        self._motion, self._motion_time = motion, timestamp
        faces = []
        for i, track_id in enumerate(ids):
            score = float(raw.scores[i])
            if track_id is None:
                if score < self.threshold:
                    continue  # a weak detection that continues no track is not taken for a face
                track_id = self._linker.new_id()
            box = _clip(raw.boxes[i], width, height)
            if box is None:
                continue
            five = None if raw.five is None else raw.five[i]
            landmarks = landmarks_in_box(rgb, predictor_box(box, five))
            self._last[track_id] = _Detection(index, timestamp, np.asarray(box, np.float64), landmarks, score)
            faces.append(TrackedFace(track_id, box, landmarks, score, "detected"))
        return faces


class WindowedFaceTracker:
    """Tracking for files: frames wait ``look_ahead`` frames so misses before and between detections are
    covered too. ``push`` returns the frames (with their payload) whose window has passed, in order;
    ``flush`` returns the rest at the end of the clip. Holds at most look_ahead + 1 payloads."""

    def __init__(
        self,
        detector: FaceDetector,
        options: TrackingOptions = TrackingOptions(),
        *,
        threshold: float = DEFAULT_THRESHOLD,
        frame_rate: float = 30.0,
        large_faces_every: int | None = None,
    ):
        """``large_faces_every`` None: LARGE_FACES_EVERY when the look-ahead spans that many detector runs, else 1."""
        self.options = options
        if large_faces_every is None:
            spans = options.look_ahead >= LARGE_FACES_EVERY * options.detect_every
            large_faces_every = LARGE_FACES_EVERY if spans else 1
        self._live = LiveFaceTracker(
            detector, options, threshold=threshold, frame_rate=frame_rate, large_faces_every=large_faces_every
        )
        self._window: deque[tuple[object, FrameFaces]] = deque()
        self._detections: dict[int, deque[_Detection]] = {}  # per track: the last one released + those waiting
        self.latest: FrameFaces | None = None  # the frame pushed last, as tracked forward (its detections final)

    @property
    def tracks_seen(self) -> int:
        return self._live.tracks_seen

    @property
    def frames_held(self) -> int:
        return len(self._window)

    @property
    def live(self) -> LiveFaceTracker:
        """The forward tracker inside (``runs_detector`` and ``find`` for detection run ahead)."""
        return self._live

    def push(
        self, payload, rgb: np.ndarray, timestamp: float, found: RawFaces | None = None
    ) -> list[tuple[object, FrameFaces]]:
        """``found``: this frame's ``live.find`` result computed ahead, if any (see LiveFaceTracker.track)."""
        frame = self._live.track(rgb, timestamp, found)
        self.latest = frame
        for face in frame.faces:
            if face.detected:
                self._detections.setdefault(face.track_id, deque()).append(
                    _Detection(frame.index, timestamp, np.asarray(face.box, np.float64), face.landmarks, face.score)
                )
        self._window.append((payload, frame))
        released = []
        while len(self._window) > self.options.look_ahead:
            released.append(self._release())
        return released

    def flush(self) -> list[tuple[object, FrameFaces]]:
        released = []
        while self._window:
            released.append(self._release())
        return released

    def _release(self) -> tuple[object, FrameFaces]:
        payload, frame = self._window.popleft()
        width, height = frame.size
        present = {face.track_id for face in frame.faces if face.detected}
        filled: dict[int, TrackedFace] = {}
        for track_id, detections in list(self._detections.items()):
            # Keep only the latest detection at or before this frame, and the later ones.
            while len(detections) >= 2 and detections[1].index <= frame.index:
                detections.popleft()
            if track_id in present:
                continue
            before = detections[0] if detections[0].index < frame.index else None
            after = next((d for d in detections if d.index > frame.index), None)
            if after is None:
                if before is not None and frame.index - before.index > self._live.hold + self.options.look_ahead:
                    del self._detections[track_id]  # ended: nothing later can refer back to it
                continue
            if before is not None:
                face = _interpolated(track_id, before, after, frame.timestamp)
            else:
                face = _backfilled(track_id, detections, frame)
            clipped = _clip(face.box, width, height)
            if clipped is not None:
                filled[track_id] = replace(face, box=clipped)
        faces = [face for face in frame.faces if face.track_id not in filled]
        faces += [filled[track_id] for track_id in sorted(filled)]
        return payload, replace(frame, faces=faces)


def _interpolated(track_id: int, before: _Detection, after: _Detection, timestamp: float) -> TrackedFace:
    span = max(after.timestamp - before.timestamp, 1e-9)
    weight = min(max((timestamp - before.timestamp) / span, 0.0), 1.0)
    box = (1 - weight) * before.box + weight * after.box
    if before.landmarks.shape == after.landmarks.shape == (68, 2):
        landmarks = ((1 - weight) * before.landmarks + weight * after.landmarks).astype(np.float32)
    else:
        landmarks = _moved(before.landmarks, before.box, box)
    score = min(before.score, after.score)
    return TrackedFace(track_id, tuple(float(v) for v in box), landmarks, score, "interpolated")


def _backfilled(track_id: int, detections: deque[_Detection], frame: FrameFaces) -> TrackedFace:
    first = detections[0]
    velocity = np.zeros(4)
    if len(detections) >= 2:
        second = detections[1]
        velocity = (second.box - first.box) / max(second.timestamp - first.timestamp, 1e-9)
    box = first.box + velocity * (frame.timestamp - first.timestamp)
    frames_back = max(first.index - frame.index, 0)
    grow = min(BACKFILL_GROWTH_PER_FRAME * frames_back, BACKFILL_GROWTH_MAX)
    size = np.array([box[2] - box[0], box[3] - box[1]] * 2)
    box = box + grow * size * np.array([-1, -1, 1, 1])
    return TrackedFace(
        track_id, tuple(float(v) for v in box), _moved(first.landmarks, first.box, box), first.score, "backfilled"
    )


def _moved(landmarks: np.ndarray, source: np.ndarray, target) -> np.ndarray:
    """Landmarks carried from one box to another (shift and per-axis scale)."""
    if landmarks.shape != (68, 2):
        return landmarks
    source, target = np.asarray(source, np.float64), np.asarray(target, np.float64)
    scale = (target[2:] - target[:2]) / np.maximum(source[2:] - source[:2], 1e-6)
    return ((landmarks - source[:2]) * scale + target[:2]).astype(np.float32)


def _clip(box, width: int, height: int) -> Box | None:
    x0, y0, x1, y1 = (float(v) for v in box)
    x0, x1 = min(max(x0, 0.0), float(width)), min(max(x1, 0.0), float(width))
    y0, y1 = min(max(y0, 0.0), float(height)), min(max(y1, 0.0), float(height))
    if x1 - x0 < 1 or y1 - y0 < 1:
        return None
    return (x0, y0, x1, y1)
