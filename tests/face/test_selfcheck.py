"""Issue 12: the self-check on every result, crowds never refused, the new default detector everywhere."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys

import cv2
import numpy as np
import pytest
from PIL import Image

from masquerade.engine.engine import Engine, EngineConfig
from masquerade.engine.front_end import DetectionDefaults, FaceFrontEnd
from masquerade.engine.request import (
    DetectionOptions,
    EngineRequest,
    FaceStatus,
    Method,
    ResultEvent,
    ReversePersonalizationParams,
)
from masquerade.face.detect import FaceDetector
from masquerade.face.selfcheck import SelfCheck


def png(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, "PNG")
    return buffer.getvalue()


def test_the_astronauts_patch_is_not_the_same_person(detector, astronaut_rgb):
    """HOG fires on the suit's NASA patch; the descriptor embeds it (two crops of one badge are
    always close), so the self-check compares only regions a second detector confirms as faces."""
    faces = detector.detect(astronaut_rgb, score_threshold=0.5)
    patch = [f for f in faces if f.box[1] > 300]
    real = [f for f in faces if f.box[1] < 200]
    assert len(patch) == 1 and len(real) == 1
    check = SelfCheck(detector)
    assert not check.is_face(astronaut_rgb, patch[0].box)
    assert check.is_face(astronaut_rgb, real[0].box)
    entries = [(f.box, f.landmarks) for f in (patch[0], real[0])]
    originals = check.describe_originals(astronaut_rgb, entries)
    assert originals[0] is None and originals[1] is not None
    # The output left untouched: only the real face is still "the same person".
    verdict = check.inspect(astronaut_rgb, entries, originals, 0.5)
    assert verdict.recognisable == [1] and 0 not in verdict.distances

    front_end = FaceFrontEnd(detector=DetectionDefaults("hog"), max_image_pixels=10**8)
    request = EngineRequest(request_id="patch", image=png(astronaut_rgb), method=Method.BLUR)
    prepared = front_end.prepare(request)
    front_end.finish(request, prepared, {})
    by_top = sorted(prepared.records, key=lambda r: r.box[1])
    assert by_top[-1].verifier_distance is None and by_top[-1].status is FaceStatus.ANONYMIZED
    assert by_top[0].verifier_distance > 0.6 and prepared.residual_recognisable == 0


def test_a_weak_blur_is_caught_by_the_self_check_and_covered_again(t1_rgb, astronaut_rgb):
    front_end = FaceFrontEnd(max_image_pixels=10**8)
    image = np.concatenate([cv2.resize(t1_rgb, (740, 512), interpolation=cv2.INTER_AREA), astronaut_rgb], axis=1)
    request = EngineRequest(request_id="weak", image=png(image), method=Method.BLUR, classical_strength=0.05)
    prepared = front_end.prepare(request)
    front_end.finish(request, prepared, {})
    assert len(prepared.records) == 7
    recovered = [r for r in prepared.records if r.status is FaceStatus.FALLBACK]
    assert recovered, "a 0.05 blur leaves faces recognisable; the self-check must catch them"
    for record in recovered:
        assert record.reason.startswith("still recognisable after blur")
        assert record.method_applied in (Method.BLUR, Method.SOLID)
        assert record.verifier_distance >= 0.6
    assert prepared.residual_recognisable == 0


def crowd(t1_rgb, astronaut_rgb, count: int = 40) -> np.ndarray:
    """``count`` real faces (t1's six and the astronaut, repeated) ~70 px wide on a grey wall."""
    detector = FaceDetector("centerface")
    crops = []
    for rgb in (t1_rgb, astronaut_rgb):
        for face in detector.detect(rgb):
            x0, y0, x1, y1 = face.box
            side = 1.6 * max(x1 - x0, y1 - y0)
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            crop = rgb[int(max(cy - side / 2, 0)) : int(cy + side / 2), int(max(cx - side / 2, 0)) : int(cx + side / 2)]
            crops.append(cv2.resize(crop, (112, 112), interpolation=cv2.INTER_AREA))
    columns, cell = 8, 128
    canvas = np.full((cell * -(-count // columns), cell * columns, 3), 128, np.uint8)
    for index in range(count):
        row, column = divmod(index, columns)
        canvas[row * cell + 8 : row * cell + 120, column * cell + 8 : column * cell + 120] = crops[index % len(crops)]
    return canvas


def test_a_40_face_crowd_is_covered_16_generatively_and_the_rest_classically(tiny_models, t1_rgb, astronaut_rgb):
    engine = Engine(EngineConfig(models="tiny", device="cpu", max_batch=16), tiny_models)
    request = EngineRequest(
        request_id="crowd", image=png(crowd(t1_rgb, astronaut_rgb)), params=ReversePersonalizationParams(steps=2)
    )

    async def main():
        await engine.start()
        try:
            async for event in engine.submit(request):
                pass
            return event
        finally:
            await engine.shutdown(grace_seconds=5)

    event = asyncio.run(main())
    assert isinstance(event, ResultEvent), event
    result = event.result
    original = [f for f in result.faces if "self-check on the output" not in f.reason]
    assert len(original) == 40
    generated = [f for f in original if f.method_applied is Method.REVERSE_PERSONALIZATION]
    assert len(generated) == 16 and all(f.status is FaceStatus.ANONYMIZED for f in generated)
    rest = [f for f in original if f not in generated]
    assert all(f.status is FaceStatus.FALLBACK and f.reason for f in rest)
    assert sum("beyond max_faces=16" in f.reason for f in rest) >= 20
    assert result.complete and result.residual_recognisable == 0


def test_the_folder_cli_and_the_server_default_to_centerface(tmp_path, t1_rgb):
    from masquerade.cli import build_parser
    from masquerade.cli.serve import config_from_args

    config = config_from_args(build_parser().parse_args(["serve", "--port", "0"]))
    assert config.engine.detector == "centerface" and config.engine.max_faces == 16
    assert Engine(config.engine, None, "test").front_end.detector.kind == "centerface"

    # Faces 23-29 px wide: HOG (the old default) finds 3 of the 6, CenterFace all.
    small = cv2.resize(t1_rgb, None, fx=0.25, fy=0.25, interpolation=cv2.INTER_AREA)
    assert len(FaceDetector("hog").detect(small)) < 6
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(small).save(folder / "small.png")
    completed = subprocess.run(
        [sys.executable, "-m", "masquerade.cli", "anonymize", "--method", "blur", str(folder)]
        + ["-o", str(tmp_path / "out"), "--report", str(tmp_path / "r.json"), "-q"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads((tmp_path / "r.json").read_text())
    report = report[0] if isinstance(report, list) else report  # a folder's report is a list
    assert len(report["faces"]) == 6 and report["complete"] is True


@pytest.mark.parametrize("value", [-0.1, 1.5])
def test_a_threshold_outside_zero_one_is_refused_naming_the_field(value):
    from masquerade.engine.request import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="detection.score_threshold"):
        DetectionOptions(score_threshold=value)
