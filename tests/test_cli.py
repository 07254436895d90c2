"""The `masquerade` command from the shell, as a user runs it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from sample_images import t1_image_path

MASQUERADE = [sys.executable, "-m", "masquerade.cli"]


def run(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*MASQUERADE, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_make_tiny_then_anonymize_an_aligned_face(tmp_path, tiny_model_dir):
    face = tmp_path / "face.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(face)
    made = run("models", "make-tiny", "tiny", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    assert "noise" in made.stdout
    result = run(
        "anonymize",
        "--model-dir",
        "tiny",
        "--aligned",
        "face.png",
        "-o",
        "out.png",
        "--steps",
        "4",
        "--report",
        "r.json",
        "-q",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["complete"] is True and len(report["faces"]) == 1
    assert report["faces"][0]["method_applied"] == "reverse_personalization"
    assert Image.open(tmp_path / "out.png").size == (48, 48)


def test_blur_on_six_people_reports_every_face_with_a_receipt(tmp_path):
    shutil.copy(t1_image_path(), tmp_path / "t1.jpg")
    result = run("anonymize", "--method", "blur", "t1.jpg", "-o", "out.jpg", "--report", "r.json", "-q", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["complete"] is True
    assert len(report["faces"]) == 6
    for face in report["faces"]:
        assert face["status"] == "anonymized" and face["method_applied"] == "blur"
        assert face["verifier_distance"] > 0.6  # dlib: same person below 0.6


def test_check_names_the_missing_part(tmp_path, tiny_model_dir):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "IP-Adapter-FaceID" / "ip-adapter-faceid_sdxl.bin").unlink()
    result = run("models", "check", str(broken), cwd=tmp_path)
    assert result.returncode != 0
    assert "ip_adapter" in result.stderr and "Traceback" not in result.stderr


def test_check_reports_a_good_set(tmp_path, tiny_model_dir):
    result = run("models", "check", str(tiny_model_dir), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "TINY RANDOM" in result.stdout and "onnxruntime CPUExecutionProvider, 512-d unit embeddings ok" in result.stdout


def test_fetch_offline_fails_at_once_and_says_what_is_missing(tmp_path):
    result = run("models", "fetch", "--to", str(tmp_path / "models"), cwd=tmp_path, timeout=60)
    assert result.returncode == 2
    assert "IP-Adapter-FaceID" in result.stderr and "w600k_r50.onnx" in result.stderr


def test_reverse_personalization_without_weights_says_how_to_get_them(tmp_path, monkeypatch):
    face = tmp_path / "face.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(face)
    monkeypatch.setenv("MASQUERADE_MODEL_DIR", str(tmp_path / "nothing-here"))
    result = run("anonymize", "--aligned", "face.png", "-o", "out.png", "-q", cwd=tmp_path)
    assert result.returncode != 0
    assert "models fetch" in result.stderr
