"""Issue 9, face part: detection under concurrency equals detection alone, at bounded cost.

Through the real gRPC server on loopback (classical methods, no diffusion weights) and
the real CLI on a folder. Before the fix, one dlib detector shared by the preprocess
threads segfaulted or returned garbage counts within seconds.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import pytest
from PIL import Image

from masquerade.engine.engine import Engine, EngineConfig
from masquerade.face.detect import FaceDetector
from masquerade_client import AnonymizerClient
from server_support import BackgroundServer, loopback_config


def _jpeg(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, "JPEG", quality=92)
    return buffer.getvalue()


def _scaled(rgb: np.ndarray, factor: float) -> np.ndarray:
    return cv2.resize(rgb, None, fx=factor, fy=factor, interpolation=cv2.INTER_AREA if factor < 1 else cv2.INTER_CUBIC)


@pytest.fixture(scope="module")
def mixed_photos(t1_rgb, astronaut_rgb) -> list[bytes]:
    """Four sizes of real photos with faces: 768, 640, 512 and 384 px wide (small: the machine has 2 cores)."""
    return [
        _jpeg(_scaled(t1_rgb, 0.6)),
        _jpeg(_scaled(t1_rgb, 0.5)),
        _jpeg(astronaut_rgb),
        _jpeg(_scaled(astronaut_rgb, 0.75)),
    ]


@pytest.fixture(scope="module")
def classical_server():
    config = EngineConfig(models="default", device="cpu", max_queue=64, preprocess_threads=4)
    running = BackgroundServer(loopback_config(config), Engine(config, None, "test: classical only")).start()
    yield running
    running.stop()


def _summary(response) -> tuple:
    return (
        len(response.faces),
        tuple(tuple(round(v) for v in (f.box.x0, f.box.y0, f.box.x1, f.box.y1)) for f in response.faces),
    )


def test_32_concurrent_requests_of_mixed_sizes_match_the_serial_run(classical_server, mixed_photos):
    with AnonymizerClient(classical_server.address, timeout=300) as client:
        client.wait_ready(timeout=30)
        serial = [_summary(client.anonymize(photo, method="blur")) for photo in mixed_photos]
        assert [count for count, _ in serial] == [6, 6, 1, 1]

        jobs = [mixed_photos[i % len(mixed_photos)] for i in range(32)]
        with ThreadPoolExecutor(32) as pool:
            responses = list(pool.map(lambda photo: client.anonymize(photo, method="blur"), jobs))
    for i, response in enumerate(responses):
        assert response.complete and response.residual_recognisable == 0
        assert _summary(response) == serial[i % len(mixed_photos)], f"request {i} differs from its serial run"


def test_the_cli_on_a_folder_of_mixed_sizes_gives_the_same_result_twice(tmp_path, t1_rgb, astronaut_rgb):
    folder = tmp_path / "photos"
    folder.mkdir()
    photos = {
        "t1.jpg": t1_rgb,
        "t1_small.jpg": _scaled(t1_rgb, 0.5),
        "t1_large.png": _scaled(t1_rgb, 1.3),
        "astronaut.png": astronaut_rgb,
        "astronaut_small.jpg": _scaled(astronaut_rgb, 0.7),
        "astronaut_large.jpg": _scaled(astronaut_rgb, 1.8),
    }
    for name, rgb in photos.items():
        Image.fromarray(rgb).save(folder / name)
    runs = []
    for attempt in range(2):
        out = tmp_path / f"out{attempt}"
        report = tmp_path / f"report{attempt}.json"
        completed = subprocess.run(
            [sys.executable, "-m", "masquerade.cli", "anonymize", "--method", "blur", str(folder), "-o", str(out)]
            + ["--report", str(report), "-q"],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert completed.returncode == 0, f"exit {completed.returncode}\n{completed.stderr[-3000:]}"
        entries = {entry["input"].rsplit("/", 1)[-1]: entry for entry in json.loads(report.read_text())}
        runs.append((entries, {name: (out / name).read_bytes() for name in photos}))
    (first, first_images), (second, second_images) = runs
    assert sorted(first) == sorted(photos)
    counts = {name: len(entry["faces"]) for name, entry in first.items()}
    assert counts == {name: 6 if name.startswith("t1") else 1 for name in photos}
    for name in photos:
        assert first[name]["complete"] is True
        assert [f["box"] for f in first[name]["faces"]] == [f["box"] for f in second[name]["faces"]]
        assert first_images[name] == second_images[name], f"{name}: the two runs wrote different images"


class _SizeSpy:
    """Wraps a backend to record the image sizes it is given (the real backend still runs)."""

    def __init__(self, backend):
        self.backend = backend
        self.native_min_face = backend.native_min_face
        self.shapes: list[tuple[int, int]] = []

    def find(self, rgb, min_score):
        self.shapes.append(rgb.shape[:2])
        return self.backend.find(rgb, min_score)


def test_detection_on_a_huge_blank_image_runs_on_bounded_copies():
    """A 6300x6300 all-zero image used to cost 48 s and 1.2 GB in dlib; now the detector
    sees a <= 2048 px copy plus 1024 px tiles of a copy of at most 16 Mpx."""
    detector = FaceDetector("centerface")
    spy = _SizeSpy(detector.backend)
    detector.backend = spy
    started = time.perf_counter()
    assert detector.detect(np.zeros((6300, 6300, 3), np.uint8)) == []
    elapsed = time.perf_counter() - started
    assert max(max(shape) for shape in spy.shapes) <= 2048
    # The 2048 px copy, its half for large faces, and tiles (overlapping by 128 px) of a 16 Mpx copy.
    assert sum(h * w for h, w in spy.shapes) <= 2048**2 + 1024**2 + 1.35 * 16_000_000
    assert all(max(shape) <= 1024 for shape in spy.shapes[1:])
    assert elapsed < 90, f"{elapsed:.1f} s"  # ~3 s on an idle 2-core VM; 48 s before, in dlib
