"""Classical covers: they change every face, nothing else, and defeat dlib's verifier."""

import numpy as np
import pytest

from masquerade.face import CLASSICAL_METHODS, SAME_PERSON_THRESHOLD, apply_classical, cover_region
from masquerade.face.align import ellipse_mask, face_ellipse_from_template, template_matrix
from masquerade.face.classical import FEATHER


def _masks(shape, faces):
    return [ellipse_mask(shape, face_ellipse_from_template(template_matrix(f.landmarks)), FEATHER) for f in faces]


@pytest.mark.parametrize("method", CLASSICAL_METHODS)
def test_cover_changes_every_face_and_nothing_beyond_its_mask(method, t1_rgb, t1_faces):
    out = t1_rgb
    for face in t1_faces:
        out = apply_classical(out, face, method)
    masks = _masks(t1_rgb.shape, t1_faces)
    outside = np.max(masks, axis=0) == 0
    np.testing.assert_array_equal(out[outside], t1_rgb[outside])
    for mask in masks:
        assert np.abs(out.astype(np.float32) - t1_rgb)[mask == 1].mean() > 8


@pytest.mark.parametrize("method", CLASSICAL_METHODS)
def test_box_only_cover_stays_inside_the_box(method, t1_rgb, t1_faces):
    x0, y0, x1, y1 = t1_faces[0].box
    out = cover_region(t1_rgb, (x0, y0, x1, y1), method)
    inside = np.zeros(t1_rgb.shape[:2], dtype=bool)
    inside[int(y0) : int(np.ceil(y1)), int(x0) : int(np.ceil(x1))] = True
    np.testing.assert_array_equal(out[~inside], t1_rgb[~inside])
    assert np.abs(out.astype(np.float32) - t1_rgb)[inside].mean() > 8
    # An aligned input is covered whole, right up to the image border.
    whole = cover_region(t1_rgb, (0, 0, t1_rgb.shape[1], t1_rgb.shape[0]), method)
    assert (np.abs(whole.astype(int) - t1_rgb).sum(-1) > 0).mean() > 0.9


def test_blur_at_default_strength_defeats_the_verifier(t1_rgb, t1_faces, verifier):
    blurred = t1_rgb
    for face in t1_faces:
        blurred = apply_classical(blurred, face, "blur")
    distances = [
        verifier.distance(verifier.descriptor_in_box(t1_rgb, f.box), verifier.descriptor_in_box(blurred, f.box))
        for f in t1_faces
    ]
    print("dlib distance original vs blur:", np.round(distances, 3))
    assert min(distances) > SAME_PERSON_THRESHOLD


def test_verifier_matches_a_face_with_itself(t1_rgb, t1_faces, verifier):
    face = t1_faces[0]
    from_landmarks = verifier.descriptor(t1_rgb, face.landmarks)
    in_box = verifier.descriptor_in_box(t1_rgb, face.box)
    assert from_landmarks.shape == (128,)
    assert verifier.distance(from_landmarks, in_box) < 0.1
    others = [verifier.distance(in_box, verifier.descriptor_in_box(t1_rgb, f.box)) for f in t1_faces[1:]]
    assert min(others) > 0.5  # six different people
    assert verifier.descriptor_in_box(t1_rgb, (-50, -50, -10, -10)) is None


@pytest.mark.parametrize("method", CLASSICAL_METHODS)
def test_a_cover_computed_on_its_window_equals_one_computed_on_the_whole_image(method, t1_rgb, t1_faces):
    """Covers evaluate their mask on its bounding box only (a whole-image mask is 48 MB at 12 Mpx):
    the pixels are exactly those of the whole-image mask, at the edges of the image too."""
    from masquerade.face.classical import DEFAULT_STYLE, _cover

    edge = np.ascontiguousarray(t1_rgb[:260, :420])  # faces cut by the image's border
    for rgb, face in [(t1_rgb, f) for f in t1_faces] + [(edge, f) for f in t1_faces[:2]]:
        for mask_scale in (1.0, 2.0):
            to_unit = face_ellipse_from_template(template_matrix(face.landmarks)) / mask_scale
            whole = ellipse_mask(rgb.shape, to_unit, FEATHER)
            width = 2.0 * np.hypot(*np.linalg.inv(np.vstack([to_unit * mask_scale, [0, 0, 1]]))[:2, 0])
            expected = _cover(rgb, whole, method, 1.0, width, DEFAULT_STYLE)
            assert np.array_equal(apply_classical(rgb, face, method, 1.0, mask_scale=mask_scale), expected)


@pytest.mark.parametrize("method", CLASSICAL_METHODS)
def test_a_cover_in_place_writes_the_same_pixels_into_the_given_array(method, t1_rgb, t1_faces):
    expected, working = t1_rgb, t1_rgb.copy()
    for face in t1_faces:  # overlapping covers read what the previous one wrote, as with copies
        expected = apply_classical(expected, face, method, 1.0)
        assert apply_classical(working, face, method, 1.0, in_place=True) is working
    assert np.array_equal(working, expected)
    box = t1_faces[0].box
    assert cover_region(working, box, method, in_place=True) is working
    assert np.array_equal(working, cover_region(expected, box, method))
