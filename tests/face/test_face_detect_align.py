"""Detection, the whole-face alignment and pasting a crop back."""

import face_recognition_models
import numpy as np

from masquerade.face import align_face, arcface_crop, arcface_five_points, face_region_mask, paste_back
from masquerade.face.align import ALIGNMENT_TEMPLATE, invert, template_five_points, transform_points, umeyama

CROP = 256


def _dlib_mean_shape() -> np.ndarray:
    """The predictor's initial shape: dlib's serialized ints are a length byte (sign in bit 7) + LE bytes."""
    data = open(face_recognition_models.pose_predictor_model_location(), "rb").read(4096)
    pos = 0

    def read_int():
        nonlocal pos
        head = data[pos]
        value = int.from_bytes(data[pos + 1 : pos + 1 + (head & 0x0F)], "little")
        pos += 1 + (head & 0x0F)
        return -value if head & 0x80 else value

    read_int()  # version
    rows, cols = abs(read_int()), abs(read_int())
    values = [read_int() * 2.0 ** read_int() for _ in range(rows * cols)]  # mantissa * 2^exponent
    return np.array(values).reshape(68, 2)


def test_alignment_template_is_dlibs_mean_shape():
    shape = _dlib_mean_shape()[17:68]
    shape = (shape - shape.min(0)) / (shape.max(0) - shape.min(0))
    expected = np.concatenate([shape[0:32], shape[54 - 17 : 55 - 17]])
    np.testing.assert_allclose(ALIGNMENT_TEMPLATE, expected, atol=1e-6)


def test_hog_finds_all_six_faces_in_t1_sorted_left_to_right(t1_faces, t1_rgb):
    assert len(t1_faces) == 6
    lefts = [face.box[0] for face in t1_faces]
    assert lefts == sorted(lefts)
    for face in t1_faces:
        assert face.landmarks.shape == (68, 2) and face.landmarks.dtype == np.float32
        x0, y0, x1, y1 = face.box
        assert 0 <= x0 < x1 <= t1_rgb.shape[1] and 0 <= y0 < y1 <= t1_rgb.shape[0]


def test_hog_finds_the_astronaut(detector, astronaut_rgb):
    # At upsample 1 dlib also fires weakly (score ~0.12) on the suit's patch; a threshold removes it.
    faces = detector.detect(astronaut_rgb, score_threshold=0.3)
    assert len(faces) == 1
    x0, y0, x1, y1 = faces[0].box
    assert 150 < (x0 + x1) / 2 < 290 and 60 < (y0 + y1) / 2 < 190


def test_umeyama_recovers_a_similarity():
    rng = np.random.default_rng(0)
    src = rng.normal(size=(20, 2))
    angle, scale, shift = 0.7, 2.5, np.array([3.0, -1.0])
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    matrix = umeyama(src, src @ (scale * rotation).T + shift)
    np.testing.assert_allclose(matrix[:, :2], scale * rotation, atol=1e-10)
    np.testing.assert_allclose(matrix[:, 2], shift, atol=1e-10)


def test_whole_face_crop_puts_the_face_in_the_canonical_place(t1_rgb, t1_faces):
    for face in t1_faces:
        aligned = align_face(t1_rgb, face.landmarks, CROP)
        assert aligned.crop.shape == (CROP, CROP, 3) and aligned.crop.dtype == np.uint8
        points = transform_points(aligned.matrix, face.landmarks)
        eyes = np.array([points[36:42].mean(0), points[42:48].mean(0)])
        # Eyes level and symmetric about the centre; brows ~0.30 S and chin ~0.92 S down (mean face).
        assert abs(eyes[0, 1] - eyes[1, 1]) < 0.03 * CROP
        assert abs(eyes.mean(0)[0] - CROP / 2) < 0.03 * CROP
        assert 0.25 * CROP < points[19, 1] < 0.4 * CROP and 0.8 * CROP < points[8, 1] < 0.97 * CROP


def test_align_then_paste_back_reproduces_the_face(t1_rgb, t1_faces):
    for face in t1_faces:
        aligned = align_face(t1_rgb, face.landmarks, CROP)
        restored = paste_back(t1_rgb, aligned.crop, aligned.matrix)
        mask = face_region_mask(t1_rgb.shape, aligned.matrix, CROP)
        error = np.abs(restored.astype(np.float32) - t1_rgb)[mask > 0]
        assert error.mean() < 2.0
        np.testing.assert_array_equal(restored[mask == 0], t1_rgb[mask == 0])


def test_paste_back_changes_only_the_feathered_face_region(t1_rgb, t1_faces):
    out = t1_rgb
    masks = []
    for face in t1_faces:
        aligned = align_face(out, face.landmarks, CROP)
        out = paste_back(out, 255 - aligned.crop, aligned.matrix)  # a crop that is clearly different
        masks.append(face_region_mask(t1_rgb.shape, aligned.matrix, CROP))
    outside = np.max(masks, axis=0) == 0
    np.testing.assert_array_equal(out[outside], t1_rgb[outside])
    for mask in masks:
        core = mask == 1
        assert np.abs(out.astype(np.float32) - t1_rgb)[core].mean() > 40


def test_arcface_crop_places_the_five_points(t1_rgb, t1_faces):
    five = arcface_five_points(t1_faces[0].landmarks)
    assert five.shape == (5, 2)
    crop = arcface_crop(t1_rgb, five)
    assert crop.shape == (112, 112, 3) and crop.dtype == np.uint8
    matrix = umeyama(five, np.array([[38.3, 51.7], [73.5, 51.5], [56.0, 71.7], [41.5, 92.4], [70.7, 92.2]]))
    placed = transform_points(matrix, five)
    assert np.abs(placed[:2, 1] - 51.6).max() < 4  # eyes land near the template's eye line
    assert np.allclose(transform_points(invert(matrix), placed), five, atol=1e-6)


def test_unknown_or_unavailable_detector_kinds_fail_clearly():
    import importlib.util

    import pytest

    from masquerade.face import DetectorUnavailableError, FaceDetector

    with pytest.raises(ValueError, match="detector kind"):
        FaceDetector("retina")
    if importlib.util.find_spec("face_alignment") is None:
        with pytest.raises(DetectorUnavailableError, match="face-alignment"):
            FaceDetector("sfd")


def test_template_five_points_match_an_aligned_real_face(t1_rgb, detector):
    """An already-aligned input without landmarks gets ArcFace points where real faces have them."""
    size = 256
    for face in detector.detect(t1_rgb):
        aligned = align_face(t1_rgb, face.landmarks, size)
        five = arcface_five_points(face.landmarks).astype(np.float64)
        five_in_crop = five @ aligned.matrix[:, :2].T + aligned.matrix[:, 2]
        error = np.abs(five_in_crop - template_five_points(size))
        # The template is the mean face; turned heads (t1 has several) sit a few percent off it.
        assert error.mean() < 0.04 * size and error.max() < 0.1 * size
