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
