"""Cancellation reaches pixel work: inside a cancelled scope the decoder, the detector and the encoder stop."""

from __future__ import annotations

import io
import threading

import numpy as np
import pytest
from PIL import Image

from masquerade import cancellation
from masquerade.face.detect import FaceDetector
from masquerade.face.image_io import decode_image, encode_image


def png(side: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((side, side, 3), np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def test_pixel_work_stops_inside_a_cancelled_scope_and_runs_outside_one():
    flag = threading.Event()
    data = png(64)
    rgb = decode_image(data).rgb
    with cancellation.scope(flag):
        assert decode_image(data).rgb.shape == (64, 64, 3)  # not cancelled yet
        flag.set()
        with pytest.raises(cancellation.Cancelled):
            decode_image(data)
        with pytest.raises(cancellation.Cancelled):
            encode_image(rgb, "png")
        with pytest.raises(cancellation.Cancelled):
            FaceDetector("centerface").detect(rgb)
    assert encode_image(rgb, "png")  # the scope ended: this thread's work is not cancelled
    cancellation.check()  # outside any scope: nothing to check
