"""Issue 12: detectors behind one interface, calibrated scores, five points, small faces, SCRFD's layout."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from masquerade.face.detect import FaceDetector, predictor_box
from masquerade.face.detectors import SCRFD_FILE, write_tiny_scrfd_onnx


@pytest.fixture(scope="module")
def centerface() -> FaceDetector:
    return FaceDetector("centerface")


def face_crops(detector: FaceDetector, rgb: np.ndarray) -> list[tuple[np.ndarray, float]]:
    """Square crops around each detected face, with the face's width as a fraction of the crop."""
    crops = []
    for face in detector.detect(rgb):
        x0, y0, x1, y1 = face.box
        side = 1.5 * max(x1 - x0, y1 - y0)
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        top, left = int(max(cy - side / 2, 0)), int(max(cx - side / 2, 0))
        crop = rgb[top : int(cy + side / 2), left : int(cx + side / 2)]
        crops.append((crop, (x1 - x0) / crop.shape[1]))
    return crops


def test_centerface_finds_every_face_of_t1_and_the_astronaut_only(centerface, t1_rgb, astronaut_rgb):
    faces = centerface.detect(t1_rgb)
    assert len(faces) == 6
    astronaut = centerface.detect(astronaut_rgb)
    assert len(astronaut) == 1  # not the suit's patch
    x0, y0, x1, y1 = astronaut[0].box
    assert 150 < (x0 + x1) / 2 < 290 and 60 < (y0 + y1) / 2 < 190
    for face in faces + astronaut:
        assert 0.5 <= face.score <= 1.0
        assert face.landmarks.shape == (68, 2) and face.five.shape == (5, 2)
        fx0, fy0, fx1, fy1 = face.box
        assert np.all(
            (face.five[:, 0] > fx0) & (face.five[:, 0] < fx1) & (face.five[:, 1] > fy0) & (face.five[:, 1] < fy1)
        )
        assert face.five[0, 0] < face.five[1, 0]  # eyes in image order: left of the picture first


def test_68_points_on_the_mapped_box_agree_with_dlibs_own_box(centerface, detector, t1_rgb):
    """The predictor was trained on HOG boxes; on the five-point box its points match that fit."""
    hog_faces = detector.detect(t1_rgb)
    for face in centerface.detect(t1_rgb):
        match = min(hog_faces, key=lambda h: np.abs(np.array(h.box) - np.array(face.box)).sum())
        eye_distance = np.linalg.norm(match.landmarks[36:42].mean(0) - match.landmarks[42:48].mean(0))
        error = np.linalg.norm(face.landmarks - match.landmarks, axis=1).mean()
        assert error < 0.08 * eye_distance
        box = predictor_box(face.box, face.five)
        assert abs((box[2] - box[0]) - (match.box[2] - match.box[0])) < 0.25 * (match.box[2] - match.box[0])


def test_every_kind_reports_scores_in_zero_one(detector, astronaut_rgb):
    faces = detector.detect(astronaut_rgb, score_threshold=0.0)  # hog, every candidate
    assert faces and all(0.0 <= f.score <= 1.0 for f in faces)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        detector.detect(astronaut_rgb, score_threshold=2.48)


def test_a_20_px_face_in_a_4000_px_photo_is_found(centerface, t1_rgb):
    crop, fraction = face_crops(centerface, t1_rgb)[0]
    side = int(round(22 / fraction))  # the face 22 px wide
    small = cv2.resize(crop, (side, side), interpolation=cv2.INTER_AREA)
    canvas = np.full((3000, 4000, 3), 90, np.uint8)
    canvas[:] = np.linspace(40, 200, 4000, dtype=np.uint8)[None, :, None]  # a plain gradient background
    canvas[1700 : 1700 + side, 2900 : 2900 + side] = small
    found = centerface.find(canvas)
    centres = [((b[0] + b[2]) / 2, (b[1] + b[3]) / 2) for b in found.boxes]
    assert any(abs(x - (2900 + side / 2)) < 15 and abs(y - (1700 + side / 2)) < 15 for x, y in centres), found.boxes
    assert len(found.boxes) <= 2


def test_scrfd_runs_a_det_10g_layout_file_from_the_model_dir(tmp_path):
    """A tiny SCRFD with det_10g.onnx's input and nine outputs; its score follows brightness,
    so a white square on black is where the 'faces' must be decoded."""
    write_tiny_scrfd_onnx(tmp_path / "buffalo_l" / SCRFD_FILE)
    scrfd = FaceDetector("scrfd", model_dir=tmp_path)
    image = np.zeros((320, 352, 3), np.uint8)
    image[128:192, 96:160] = 255
    found = scrfd.find(image, 0.5)
    assert len(found.boxes) >= 1 and found.five.shape == (len(found.boxes), 5, 2)
    assert np.all((found.scores >= 0.5) & (found.scores <= 1.0))
    centres = (found.boxes[:, :2] + found.boxes[:, 2:]) / 2
    assert np.all((centres[:, 0] > 80) & (centres[:, 0] < 176) & (centres[:, 1] > 112) & (centres[:, 1] < 208))
    faces = scrfd.detect(image, 0.5)
    assert faces and all(f.landmarks.shape == (68, 2) for f in faces)
    assert scrfd.find(np.zeros((320, 352, 3), np.uint8), 0.5).boxes.shape == (0, 4)


def test_centerface_loads_the_graph_optimized_for_this_cpu_once_it_is_saved(tmp_path, monkeypatch, t1_rgb):
    """A first session optimizes CenterFace's graph and saves it beside the converted model; later
    sessions load that file without optimizing. Both find exactly the same faces; a damaged file is
    optimized again and replaced."""
    import onnxruntime

    from masquerade.face import detectors

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    plain = detectors.CenterFaceBackend(intra_op_threads=1)  # converts, optimizes, saves
    saved = list((tmp_path / "masquerade").glob("centerface-dynamic-*.optimized-ort*.onnx"))
    assert len(saved) == 1 and saved[0].stat().st_size > 1_000_000

    loaded_from = []
    real_session = onnxruntime.InferenceSession

    def recording(model, options=None, **kwargs):
        loaded_from.append((model if isinstance(model, str) else "bytes", options.graph_optimization_level))
        return real_session(model, options, **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", recording)
    again = detectors.CenterFaceBackend(intra_op_threads=1)
    assert loaded_from == [(str(saved[0]), onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL)]
    reference = detectors._ort_session(detectors.centerface_onnx_bytes(), intra_op_threads=1)  # not cached
    raw = detectors.CenterFaceBackend.__new__(detectors.CenterFaceBackend)
    raw.arena_keep_pixels, raw.session = detectors.ARENA_KEEP_PIXELS, reference
    raw.input_name = reference.get_inputs()[0].name
    found = [b.find(t1_rgb, 0.5) for b in (plain, again, raw)]
    assert len(found[0].boxes) == 6
    for other in found[1:]:
        np.testing.assert_allclose(other.boxes, found[0].boxes, atol=1e-4)
        np.testing.assert_allclose(other.scores, found[0].scores, atol=1e-6)

    saved[0].write_bytes(b"not a model")
    loaded_from.clear()
    detectors.CenterFaceBackend(intra_op_threads=1)
    assert [kind for kind, _ in loaded_from] == [str(saved[0]), "bytes"]  # tried, failed, optimized again
    assert saved[0].stat().st_size > 1_000_000


def test_a_cache_it_cannot_write_into_still_gives_a_working_centerface(tmp_path, monkeypatch, astronaut_rgb):
    """onnxruntime fails a session whose optimized file it cannot write: the session is made without it."""
    import os
    import threading

    from masquerade.face import detectors

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    _, cached_at = detectors.centerface_model()
    optimized = cached_at.with_name(f"{cached_at.stem}.optimized-{detectors._cpu_signature()}.onnx")
    # Where this thread would write it, a folder: the write fails as on a read-only cache.
    (optimized.parent / f".{optimized.name}.{os.getpid()}.{threading.get_ident()}.partial").mkdir()
    backend = detectors.CenterFaceBackend(intra_op_threads=1)
    assert len(backend.find(astronaut_rgb, 0.5).boxes) == 1
    assert not optimized.exists()
