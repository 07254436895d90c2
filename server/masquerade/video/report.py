"""The per-video report: one record per track, flicker inside tracks, the sampled self-check, and
(on request) every frame's boxes. Built frame by frame as frames leave the pipeline; holds per
track a few numbers and two 24x24 patches, never frames."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import cv2
import numpy as np

from masquerade.video.frames import FaceOutcome
from masquerade.video.tracking import FrameFaces, TrackedFace

FLICKER_PATCH = 24  # px: a face box is compared frame to frame at this size, in grey levels


@dataclass
class TrackRecord:
    track_id: int
    first_frame: int
    last_frame: int
    frames_detected: int = 0  # frames where the detector found the face
    frames_filled: int = 0  # frames covered by tracking (held, interpolated, backfilled) where it did not
    method_applied: str = ""
    status: str = "anonymized"  # the worst over the track's frames: anonymized < fallback < skipped
    reason: str = ""
    seed: int | None = None  # reverse personalization: the track's noise seed
    flicker: float | None = None  # mean |change| of the face region from frame to frame, output, 0-255
    input_flicker: float | None = None  # the same measured on the input (motion, lighting)
    _fallback_frames: int = field(default=0, repr=False)
    _flicker_sum: float = field(default=0.0, repr=False)
    _input_flicker_sum: float = field(default=0.0, repr=False)
    _flicker_pairs: int = field(default=0, repr=False)

    def to_json(self) -> dict:
        record = {k: v for k, v in asdict(self).items() if not k.startswith("_")}
        for key in ("flicker", "input_flicker"):
            if record[key] is not None:
                record[key] = round(record[key], 3)
        return record


_STATUS_ORDER = {"anonymized": 0, "fallback": 1, "skipped": 2}


class ReportBuilder:
    def __init__(self, report_frames: bool = False):
        self.tracks: dict[int, TrackRecord] = {}
        self.frames: list[dict] | None = [] if report_frames else None
        self._patches: dict[int, tuple[int, np.ndarray, np.ndarray]] = {}  # track -> (frame index, input, output)
        self.residual_recognisable = 0
        self.frames_checked = 0
        self.faces_checked = 0
        self.uncovered_found = 0

    def add(
        self, frame: FrameFaces, outcomes: list[FaceOutcome], original: np.ndarray, output: np.ndarray, seeds=None
    ) -> None:
        by_track = {outcome.track_id: outcome for outcome in outcomes}
        for face in frame.faces:
            outcome = by_track.get(face.track_id)
            record = self.tracks.get(face.track_id)
            if record is None:
                record = self.tracks[face.track_id] = TrackRecord(face.track_id, frame.index, frame.index)
                if seeds is not None:
                    record.seed = seeds.get(face.track_id)
            record.last_frame = frame.index
            if face.detected:
                record.frames_detected += 1
            else:
                record.frames_filled += 1
            if outcome is not None:
                self._apply_outcome(record, outcome)
            self._flicker(record, face, frame.index, original, output)
        if self.frames is not None:
            self.frames.append(
                {
                    "frame": frame.index,
                    "timestamp": round(frame.timestamp, 6),
                    "detector_ran": frame.detector_ran,
                    "faces": [
                        {
                            "track_id": face.track_id,
                            "box": [round(v, 1) for v in face.box],
                            "score": round(face.score, 4),
                            "source": face.source,
                            **(
                                {"method_applied": by_track[face.track_id].method_applied}
                                if face.track_id in by_track
                                else {}
                            ),
                        }
                        for face in frame.faces
                    ],
                }
            )

    def _apply_outcome(self, record: TrackRecord, outcome: FaceOutcome) -> None:
        if not record.method_applied:
            record.method_applied = outcome.method_applied
        if outcome.status == "fallback":
            record._fallback_frames += 1
        if _STATUS_ORDER[outcome.status] > _STATUS_ORDER[record.status]:
            record.status = outcome.status
            record.reason = outcome.reason

    def _flicker(self, record: TrackRecord, face: TrackedFace, index: int, original, output) -> None:
        x0, y0, x1, y1 = (int(round(v)) for v in face.box)
        if x1 - x0 < 2 or y1 - y0 < 2:
            return
        size = (FLICKER_PATCH, FLICKER_PATCH)
        patch_in = cv2.resize(cv2.cvtColor(original[y0:y1, x0:x1], cv2.COLOR_RGB2GRAY), size).astype(np.float32)
        patch_out = cv2.resize(cv2.cvtColor(output[y0:y1, x0:x1], cv2.COLOR_RGB2GRAY), size).astype(np.float32)
        previous = self._patches.get(record.track_id)
        if previous is not None and previous[0] == index - 1:
            record._flicker_sum += float(np.abs(patch_out - previous[2]).mean())
            record._input_flicker_sum += float(np.abs(patch_in - previous[1]).mean())
            record._flicker_pairs += 1
            record.flicker = record._flicker_sum / record._flicker_pairs
            record.input_flicker = record._input_flicker_sum / record._flicker_pairs
        self._patches[record.track_id] = (index, patch_in, patch_out)

    def finish_tracks(self) -> list[TrackRecord]:
        for record in self.tracks.values():
            if record._fallback_frames and record.status == "fallback":
                record.reason = f"{record._fallback_frames} frame(s) covered classically: {record.reason}"
        return [self.tracks[key] for key in sorted(self.tracks)]

    def flicker_summary(self) -> dict:
        pairs = sum(r._flicker_pairs for r in self.tracks.values())
        if not pairs:
            return {"pairs": 0, "output": None, "input": None}
        output = sum(r._flicker_sum for r in self.tracks.values()) / pairs
        source = sum(r._input_flicker_sum for r in self.tracks.values()) / pairs
        return {"pairs": pairs, "output": round(output, 3), "input": round(source, 3)}
