"""dlib's face-descriptor network rebuilt in onnxruntime equals dlib's own, on real faces."""

import dlib
import face_recognition_models
import numpy as np
import pytest

from masquerade.face import dlib_net
from masquerade.face.detect import load_shape_predictor, shape_to_array
from masquerade.face.dlib_net import (
    CHIP_PADDING,
    CHIP_SIZE,
    DescriptorNet,
    UnsupportedDlibModelError,
    read_dlib_net,
    shared_descriptor_net,
)
from masquerade.face.verify import DlibVerifier

MODEL = face_recognition_models.face_recognition_model_location()


@pytest.fixture(scope="module")
def net() -> DescriptorNet:
    return DescriptorNet(MODEL)


@pytest.fixture(scope="module")
def dlib_recognizer():
    return dlib.face_recognition_model_v1(MODEL)


def _shapes(rgb, detector):
    predictor = load_shape_predictor()
    return [predictor(rgb, rect) for rect in detector(rgb, 1)]


def test_the_file_is_read_whole_into_the_documented_architecture():
    net = read_dlib_net(open(MODEL, "rb").read())
    kinds = [layer.kind for layer in net.layers]
    assert net.input_size == (150, 150) and kinds[:4] == ["con", "affine", "relu", "max_pool"]
    assert kinds[-2:] == ["avg_pool", "fc"] and net.layers[-1].shape == {"inputs": 256, "outputs": 128}
    # dnn_face_recognition_ex: 3 + 4 + 3 + 3 + 1 residual blocks, four of them downsampling.
    assert kinds.count("add_prev") == 14 and kinds.count("con") == 1 + 2 * 14
    assert sum(layer.kind == "avg_pool" and layer.shape["kernel"] == (2, 2) for layer in net.layers) == 4


def test_descriptors_equal_dlibs_on_every_face_of_two_real_photos(net, dlib_recognizer, t1_rgb, astronaut_rgb):
    hog = dlib.get_frontal_face_detector()
    compared = 0
    for rgb in (t1_rgb, astronaut_rgb):
        shapes = _shapes(rgb, hog)
        chips = np.stack([dlib.get_face_chip(rgb, s, size=CHIP_SIZE, padding=CHIP_PADDING) for s in shapes])
        ours = net.describe(chips)  # batched: every face in one run
        for shape, descriptor in zip(shapes, ours):
            reference = np.asarray(dlib_recognizer.compute_face_descriptor(rgb, shape))
            assert np.abs(descriptor - reference).max() < 1e-5
            compared += 1
    assert compared >= 7  # six at the poker table, one astronaut


def test_the_verifier_uses_the_rebuilt_net_and_agrees_with_dlib(dlib_recognizer, t1_rgb, monkeypatch):
    shape = _shapes(t1_rgb, dlib.get_frontal_face_detector())[0]
    landmarks = shape_to_array(shape)
    ours = DlibVerifier().descriptor(t1_rgb, landmarks)
    assert shared_descriptor_net(MODEL) is not None
    monkeypatch.setenv("MASQUERADE_DESCRIPTOR", "dlib")
    assert shared_descriptor_net(MODEL) is None
    theirs = DlibVerifier().descriptor(t1_rgb, landmarks)
    assert np.abs(ours - theirs).max() < 1e-5 and np.linalg.norm(ours) > 0.5


@pytest.mark.parametrize("damage", ["truncated", "not_a_net", "unknown_layer"])
def test_a_file_it_cannot_rebuild_is_refused_and_dlib_is_used(damage, tmp_path, monkeypatch, caplog):
    data = open(MODEL, "rb").read()
    if damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "not_a_net":
        data = b"\x01\x01\x01\x05hello" + data[40:200]
    else:
        data = data.replace(b"\x01\x05con_4", b"\x01\x05con_9", 1)
    with pytest.raises(UnsupportedDlibModelError):
        read_dlib_net(data)
    damaged = tmp_path / f"{damage}.dat"
    damaged.write_bytes(data)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(dlib_net, "_shared", {})
    with caplog.at_level("WARNING"):
        assert shared_descriptor_net(damaged) is None
    assert "runs in dlib" in caplog.text


def test_the_conversion_is_cached_per_model_file(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first = dlib_net.descriptor_model_bytes(MODEL)
    cached = list((tmp_path / "masquerade").glob("dlib-descriptor-*.onnx"))
    assert len(cached) == 1 and cached[0].read_bytes() == first
    monkeypatch.setattr(dlib_net, "read_dlib_net", lambda data: pytest.fail("converted again"))
    assert dlib_net.descriptor_model_bytes(MODEL) == first


def test_several_faces_are_described_in_one_run_as_each_alone(t1_rgb, monkeypatch):
    shapes = _shapes(t1_rgb, dlib.get_frontal_face_detector())
    landmarks = [shape_to_array(shape) for shape in shapes]
    verifier = DlibVerifier()
    together = verifier.descriptors(t1_rgb, landmarks)
    alone = [verifier.descriptor(t1_rgb, points) for points in landmarks]
    assert len(together) == len(alone) == 6
    assert max(float(np.abs(a - b).max()) for a, b in zip(together, alone)) < 1e-5
    monkeypatch.setenv("MASQUERADE_DESCRIPTOR", "dlib")  # dlib's own, one face at a time
    in_dlib = verifier.descriptors(t1_rgb, landmarks)
    assert max(float(np.abs(a - b).max()) for a, b in zip(together, in_dlib)) < 1e-5
    assert verifier.descriptors(t1_rgb, []) == []
