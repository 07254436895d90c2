"""Detection, the whole-face alignment and pasting a crop back."""

import cv2
import face_recognition_models
import numpy as np

from masquerade.face import align_face, arcface_crop, arcface_five_points, face_region_mask, paste_back
from masquerade.face.align import (
    ALIGNMENT_TEMPLATE,
    invert,
    square_mask,
    template_five_points,
    transform_points,
    umeyama,
)

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


def test_alignment_template_is_deepfacelabs_mean_face():
    """33 points (landmarks 17..48 and 54), mirror-symmetric, and a similarity of dlib's own mean shape."""
    assert ALIGNMENT_TEMPLATE.shape == (33, 2)
    axis = ALIGNMENT_TEMPLATE[13, 0]  # nose tip
    mirror = {0: 9, 1: 8, 2: 7, 3: 6, 4: 5, 14: 18, 15: 17, 19: 28, 20: 27, 21: 26, 22: 25, 23: 30, 24: 29, 31: 32}
    for a, b in mirror.items():
        mirrored = [2 * axis - ALIGNMENT_TEMPLATE[b, 0], ALIGNMENT_TEMPLATE[b, 1]]
        np.testing.assert_allclose(ALIGNMENT_TEMPLATE[a], mirrored, atol=1e-6)
    shape = _dlib_mean_shape()
    points = np.concatenate([shape[17:49], shape[54:55]])
    fitted = transform_points(umeyama(points, ALIGNMENT_TEMPLATE), points)
    assert np.abs(fitted - ALIGNMENT_TEMPLATE).max() < 0.005


def _research_whole_face_matrix(landmarks: np.ndarray, size: int) -> np.ndarray:
    """DESIGN section 1 step 1 built the way the research extractor builds it: the template square's
    corners in image space, its diagonals grown by the padding, the centre moved towards the forehead,
    then the affine map of three of the new corners onto the crop's corners."""
    to_template = umeyama(np.concatenate([landmarks[17:49], landmarks[54:55]]), ALIGNMENT_TEMPLATE)
    corners = transform_points(invert(to_template), np.array([[0, 0], [1, 0], [1, 1], [0, 1], [0.5, 0.5]]))
    centre = corners[4]
    down_diagonal = (corners[2] - corners[0]) / np.linalg.norm(corners[2] - corners[0])
    up_diagonal = (corners[1] - corners[3]) / np.linalg.norm(corners[1] - corners[3])
    reach = np.linalg.norm(corners[0] - corners[2]) * (0.40 * np.sqrt(2.0) + 0.5)
    centre = centre + (corners[0] - corners[3]) * 0.07
    source = np.float32([centre - down_diagonal * reach, centre + up_diagonal * reach, centre + down_diagonal * reach])
    return cv2.getAffineTransform(source, np.float32([[0, 0], [size, 0], [size, size]]))


def test_whole_face_crop_matches_the_research_geometry(t1_rgb, t1_faces):
    size = 1024
    for face in t1_faces:
        aligned = align_face(t1_rgb, face.landmarks, size)
        expected = _research_whole_face_matrix(face.landmarks.astype(np.float64), size)
        # Same map to well under a pixel over the whole crop (the research rounds its corners to float32).
        probe = np.array([[0.0, 0.0], [size, 0.0], [0.0, size], [size, size]])
        within = transform_points(aligned.matrix, transform_points(invert(expected), probe))
        assert np.abs(within - probe).max() < 0.05
        # Bilinear, white border: the crop equals OpenCV's default-interpolation warp.
        bilinear = cv2.warpAffine(t1_rgb, aligned.matrix, (size, size), borderValue=(255, 255, 255))
        np.testing.assert_array_equal(aligned.crop, bilinear)


def test_hog_finds_all_six_faces_in_t1_sorted_left_to_right(t1_faces, t1_rgb):
    assert len(t1_faces) == 6
    lefts = [face.box[0] for face in t1_faces]
    assert lefts == sorted(lefts)
    for face in t1_faces:
        assert face.landmarks.shape == (68, 2) and face.landmarks.dtype == np.float32
        x0, y0, x1, y1 = face.box
        assert 0 <= x0 < x1 <= t1_rgb.shape[1] and 0 <= y0 < y1 <= t1_rgb.shape[0]


def test_hog_finds_the_astronaut(detector, astronaut_rgb):
    # At upsample 1 dlib also fires weakly (calibrated ~0.56, margin 0.12) on the suit's patch.
    faces = detector.detect(astronaut_rgb, score_threshold=0.65)
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
        mask = square_mask(t1_rgb.shape, aligned.matrix, CROP)
        # Two bilinear warps blur a little; the white border lies outside the image.
        error = np.abs(restored.astype(np.float32) - t1_rgb)[mask > 0]
        assert error.mean() < 4.0
        np.testing.assert_array_equal(restored[mask == 0], t1_rgb[mask == 0])


def test_paste_back_writes_the_whole_square_feathered_only_at_its_border(t1_rgb, t1_faces):
    face = t1_faces[2]
    aligned = align_face(t1_rgb, face.landmarks, CROP)
    out = paste_back(t1_rgb, 255 - aligned.crop, aligned.matrix)  # a crop that is clearly different
    mask = square_mask(t1_rgb.shape, aligned.matrix, CROP)
    ellipse = face_region_mask(t1_rgb.shape, aligned.matrix, CROP)
    changed = np.abs(out.astype(np.float32) - t1_rgb).mean(-1)
    # Hair, ears and background of the square come from the crop, not only the face ellipse.
    assert changed[(mask == 1) & (ellipse == 0)].mean() > 40
    assert changed[mask == 1].mean() > 40
    # The soft edge is a thin band: 5% of the crop side on each side.
    assert 0.1 < ((mask > 0) & (mask < 1)).sum() / (mask > 0).sum() < 0.25
    np.testing.assert_array_equal(out[mask == 0], t1_rgb[mask == 0])


def test_paste_back_never_writes_a_neighbours_face(t1_rgb, t1_faces):
    """Each face's ellipse changes only by its own crop, whatever the order of the pastes."""
    out = t1_rgb
    squares, ellipses = [], []
    for index, face in enumerate(t1_faces):
        aligned = align_face(t1_rgb, face.landmarks, CROP)
        others = [other.landmarks for k, other in enumerate(t1_faces) if k != index]
        out = paste_back(out, 255 - aligned.crop, aligned.matrix, protect=others)
        squares.append(square_mask(t1_rgb.shape, aligned.matrix, CROP))
        ellipses.append(face_region_mask(t1_rgb.shape, aligned.matrix, CROP))
    outside = np.max(squares, axis=0) == 0
    np.testing.assert_array_equal(out[outside], t1_rgb[outside])
    for ellipse in ellipses:
        # The ellipse's core holds this face's inverted crop, not a neighbour's copy (which would
        # have been inverted twice, i.e. be close to the original).
        assert np.abs(out.astype(np.float32) - t1_rgb)[ellipse == 1].mean() > 40


def test_protection_keeps_a_close_neighbours_face(t1_rgb, t1_faces):
    face = t1_faces[2]
    aligned = align_face(t1_rgb, face.landmarks, CROP)
    width = face.box[2] - face.box[0]
    neighbour = face.landmarks + np.float32([1.1 * width, 0.0])  # a face just beside this one
    own_ellipse = face_region_mask(t1_rgb.shape, aligned.matrix, CROP)
    shift = np.float32([[1, 0, 1.1 * width], [0, 1, 0]])  # the same ellipse, where the neighbour is
    neighbour_core = cv2.warpAffine(own_ellipse, shift, t1_rgb.shape[1::-1], flags=cv2.INTER_NEAREST) == 1
    own_core = own_ellipse == 1
    unprotected = paste_back(t1_rgb, 255 - aligned.crop, aligned.matrix)
    protected = paste_back(t1_rgb, 255 - aligned.crop, aligned.matrix, protect=[neighbour])
    reached = neighbour_core & (square_mask(t1_rgb.shape, aligned.matrix, CROP) == 1)
    assert reached.sum() > 1000  # the square does reach into the neighbour's face
    assert np.abs(unprotected.astype(np.float32) - t1_rgb)[reached].mean() > 40
    np.testing.assert_array_equal(protected[neighbour_core], t1_rgb[neighbour_core])
    np.testing.assert_array_equal(protected[own_core], unprotected[own_core])


def test_colour_matching_is_off_by_default(t1_rgb, t1_faces):
    aligned = align_face(t1_rgb, t1_faces[0].landmarks, CROP)
    darker = (aligned.crop.astype(np.int16) - 20).clip(0, 255).astype(np.uint8)  # e.g. an attribute edit of skin tone
    mask = square_mask(t1_rgb.shape, aligned.matrix, CROP)
    plain = paste_back(t1_rgb, darker, aligned.matrix).astype(np.float32)
    matched = paste_back(t1_rgb, darker, aligned.matrix, colour_match=True).astype(np.float32)
    core = mask == 1
    assert (t1_rgb[core] - plain[core]).mean() > 15  # the edit survives
    assert (t1_rgb[core] - matched[core]).mean() < 5  # the option takes it back out


def test_arcface_crop_places_the_five_points(t1_rgb, t1_faces):
    five = arcface_five_points(t1_faces[0].landmarks)
    assert five.shape == (5, 2)
    crop = arcface_crop(t1_rgb, five)
    assert crop.shape == (112, 112, 3) and crop.dtype == np.uint8
    matrix = umeyama(five, np.array([[38.3, 51.7], [73.5, 51.5], [56.0, 71.7], [41.5, 92.4], [70.7, 92.2]]))
    placed = transform_points(matrix, five)
    assert np.abs(placed[:2, 1] - 51.6).max() < 4  # eyes land near the template's eye line
    assert np.allclose(transform_points(invert(matrix), placed), five, atol=1e-6)


def test_unknown_or_unavailable_detector_kinds_fail_clearly(tmp_path):
    import pytest

    from masquerade.face import DetectorUnavailableError, FaceDetector

    with pytest.raises(ValueError, match="detector kind"):
        FaceDetector("retina")
    with pytest.raises(DetectorUnavailableError, match="det_10g.onnx"):
        FaceDetector("scrfd", model_dir=tmp_path)


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
