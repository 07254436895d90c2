"""Shared fixtures for the face front end: real photos, decoded once per module."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from masquerade.face import DlibVerifier, FaceDetector, decode_image


def _t1_path() -> Path:
    spec = importlib.util.find_spec("insightface")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("insightface's sample image t1.jpg is not installed")
    return Path(spec.submodule_search_locations[0]) / "data" / "images" / "t1.jpg"


@pytest.fixture(scope="module")
def t1_bytes() -> bytes:
    return _t1_path().read_bytes()


@pytest.fixture(scope="module")
def t1_rgb(t1_bytes) -> np.ndarray:
    return decode_image(t1_bytes).rgb  # [886, 1280, 3]: six people around a poker table


@pytest.fixture(scope="module")
def astronaut_rgb() -> np.ndarray:
    skimage_data = pytest.importorskip("skimage.data")
    return np.ascontiguousarray(skimage_data.astronaut())  # [512, 512, 3], one face


@pytest.fixture(scope="module")
def detector() -> FaceDetector:
    return FaceDetector("hog", upsample=1)


@pytest.fixture(scope="module")
def t1_faces(detector, t1_rgb):
    return detector.detect(t1_rgb)


@pytest.fixture(scope="module")
def verifier() -> DlibVerifier:
    return DlibVerifier()
