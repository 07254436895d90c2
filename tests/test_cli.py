"""The `masquerade` command from the shell, as a user runs it."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from masquerade.cli import build_parser
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
    (record,) = json.loads((tmp_path / "r.json").read_text())
    assert record["input"] == "face.png" and record["output"] == "out.png" and record["status"] == "anonymized"
    assert record["complete"] is True and len(record["faces"]) == 1
    assert record["faces"][0]["method_applied"] == "reverse_personalization"
    assert Image.open(tmp_path / "out.png").size == (48, 48)


def test_blur_on_six_people_reports_every_face_with_a_receipt(tmp_path):
    shutil.copy(t1_image_path(), tmp_path / "t1.jpg")
    result = run("anonymize", "--method", "blur", "t1.jpg", "-o", "out.jpg", "--report", "r.json", "-q", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (record,) = json.loads((tmp_path / "r.json").read_text())
    assert record["complete"] is True
    assert len(record["faces"]) == 6
    for face in record["faces"]:
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
    assert (
        "TINY RANDOM" in result.stdout and "onnxruntime CPUExecutionProvider, 512-d unit embeddings ok" in result.stdout
    )


def test_fetch_offline_fails_at_once_and_says_what_is_missing(tmp_path):
    result = run("models", "fetch", "--to", str(tmp_path / "models"), cwd=tmp_path, timeout=60)
    assert result.returncode == 2
    assert "IP-Adapter-FaceID" in result.stderr and "w600k_r50.onnx" in result.stderr


def test_reverse_personalization_without_weights_says_how_to_get_them(tmp_path, monkeypatch):
    face = tmp_path / "face.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(face)
    monkeypatch.setenv("MASQUERADE_MODEL_DIR", str(tmp_path / "nothing-here"))
    result = run(
        "anonymize", "--method", "reverse_personalization", "--aligned", "face.png", "-o", "out.png", "-q", cwd=tmp_path
    )
    assert result.returncode == 2
    assert "models fetch" in result.stderr
    assert not (tmp_path / "out.png").exists()


# ---- anonymize: default method, folders, conflicts, report, --help ---------------------------
# In-process (`masquerade.cli.main`, which the console script runs): a subprocess per run would
# import torch again each time.


@pytest.fixture
def cli(monkeypatch, capsys, tmp_path):
    """Runs `masquerade ARGS...` in tmp_path; returns (exit code, stdout, stderr)."""
    from masquerade.cli import main

    monkeypatch.chdir(tmp_path)

    def invoke(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        try:
            code = main(list(args))
        except SystemExit as exit_:  # argparse
            code = exit_.code
        out, err = capsys.readouterr()
        return code, out, err

    return invoke


def write_face(path: Path, seed: int = 0, size: int = 40) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    return path


def test_default_method_without_weights_is_blur_and_says_why(tmp_path, cli, monkeypatch):
    write_face(tmp_path / "face.png")
    monkeypatch.setenv("MASQUERADE_MODEL_DIR", str(tmp_path / "no-weights-here"))
    code, _, err = cli("anonymize", "--aligned", "face.png", "-o", "out.png", "--report", "r.json")
    assert code == 0, err
    (line,) = [line for line in err.splitlines() if line.startswith("method:")]
    assert line.startswith("method: blur (no reverse-personalization weights in ") and "models fetch" in line
    (record,) = json.loads((tmp_path / "r.json").read_text())
    assert record["faces"][0]["method_applied"] == "blur"
    assert (tmp_path / "out.png").is_file()


def test_default_method_with_weights_is_reverse_personalization(tmp_path, cli, tiny_model_dir):
    write_face(tmp_path / "face.png")
    code, _, err = cli(
        "anonymize", "--model-dir", str(tiny_model_dir), "--aligned", "face.png", "-o", "o.png", "--steps", "2",
        "--report", "r.json",
    )  # fmt: skip
    assert code == 0, err
    assert f"method: reverse_personalization (weights in {tiny_model_dir})" in err
    assert json.loads((tmp_path / "r.json").read_text())[0]["faces"][0]["method_applied"] == "reverse_personalization"


def test_a_folder_keeps_relative_paths_and_the_report_has_one_record_per_image(tmp_path, cli):
    sources = [tmp_path / "in" / "a" / "face.png", tmp_path / "in" / "b" / "face.png", tmp_path / "in" / "top.jpg"]
    for seed, path in enumerate(sources):
        write_face(path, seed)
    (tmp_path / "in" / "notes.txt").write_text("not an image, not an input")
    result = cli("anonymize", "--method", "pixelate", "--aligned", "in", "-o", "out", "--report", "r.json", "-q")
    assert result[0] == 0, result[2]
    written = sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert written == ["a/face.png", "b/face.png", "top.jpg"]
    records = json.loads((tmp_path / "r.json").read_text())
    assert records[0]["reason"].startswith("not an image or video this reads (.txt files")
    assert [(r["input"], r["output"], r["status"]) for r in records] == [
        ("in/notes.txt", "out/notes.txt", "skipped"),  # listed and counted, never silently passed over
        ("in/a/face.png", "out/a/face.png", "anonymized"),
        ("in/b/face.png", "out/b/face.png", "anonymized"),
        ("in/top.jpg", "out/top.jpg", "anonymized"),
    ]
    assert all(r["faces"][0]["method_applied"] == "pixelate" for r in records[1:])
    assert "4 input(s): 3 anonymized, 1 skipped" in result[1]
    with Image.open(tmp_path / "out" / "a" / "face.png") as a, Image.open(tmp_path / "out" / "b" / "face.png") as b:
        assert np.asarray(a).tobytes() != np.asarray(b).tobytes()  # two outputs, not one written twice


def test_existing_outputs_stop_the_run_before_anything_is_written(tmp_path, cli):
    for seed, name in enumerate(["one.png", "two.png"]):
        write_face(tmp_path / "in" / name, seed)
    first = cli("anonymize", "--method", "blur", "--aligned", "in", "-o", "out", "-q")
    assert first[0] == 0, first[2]
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    write_face(tmp_path / "in" / "three.png", 7)  # a new input beside two whose outputs exist

    stopped = cli("anonymize", "--method", "solid", "--aligned", "in", "-o", "out", "-q")
    assert stopped[0] == 2
    assert "2 output(s) already exist" in stopped[2]
    assert "out/one.png" in stopped[2] and "out/two.png" in stopped[2] and "three" not in stopped[2]
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before  # not even three.png

    skipped = cli("anonymize", "--method", "solid", "--aligned", "in", "-o", "out", "--skip-existing", "--report", "r.json",
        "-q")  # fmt: skip
    assert skipped[0] == 0, skipped[2]
    assert (tmp_path / "out" / "one.png").read_bytes() == before["one.png"]
    assert (tmp_path / "out" / "three.png").is_file()
    statuses = {Path(r["input"]).name: r["status"] for r in json.loads((tmp_path / "r.json").read_text())}
    assert statuses == {"one.png": "skipped", "two.png": "skipped", "three.png": "anonymized"}

    replaced = cli("anonymize", "--method", "solid", "--aligned", "in", "-o", "out", "--overwrite", "-q")
    assert replaced[0] == 0, replaced[2]
    assert (tmp_path / "out" / "one.png").read_bytes() != before["one.png"]


def test_two_inputs_with_one_output_path_are_refused(tmp_path, cli):
    write_face(tmp_path / "a" / "face.png", 1)
    write_face(tmp_path / "b" / "face.png", 2)
    result = cli("anonymize", "--method", "blur", "--aligned", "a/face.png", "b/face.png", "-o", "out")
    assert result[0] == 2
    assert "the output of 2 inputs" in result[2] and "a/face.png" in result[2] and "b/face.png" in result[2]
    assert not (tmp_path / "out").exists()


def test_missing_input_is_named_and_nothing_is_written(tmp_path, cli):
    write_face(tmp_path / "face.png")
    result = cli("anonymize", "--method", "blur", "face.png", "nope.png", "-o", "out")
    assert result[0] == 2 and "nope.png: no such file or folder" in result[2]
    assert not (tmp_path / "out").exists()


def test_help_gives_every_anonymize_parameter_a_meaning_and_a_default():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    anonymize = sub.choices["anonymize"]
    text = anonymize.format_help()
    for action in anonymize._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{action.option_strings or action.dest} has no help"
        if action.option_strings and action.required is False:
            assert action.help.strip() and "%(default)" not in action.help
    assert isinstance(anonymize.formatter_class, type) and issubclass(
        anonymize.formatter_class, argparse.ArgumentDefaultsHelpFormatter
    )
    for flag, default in [("--guidance-scale", "-10.0"), ("--skip", "0.7"), ("--steps", "100"), ("--seed", "0")]:
        assert flag in text
        start = text.index(f"\n  {flag} {flag[2:].upper().replace('-', '_')}")
        assert f"(default: {default})" in " ".join(text[start : start + 400].split())


def test_a_failed_image_is_reported_and_the_others_are_written(tmp_path, cli):
    write_face(tmp_path / "in" / "good.png")
    (tmp_path / "in" / "bad.png").write_text("not an image")
    code, out, err = cli("anonymize", "--method", "blur", "--aligned", "in", "-o", "out", "--report", "r.json", "-q")
    assert code == 1
    assert "in/bad.png -> out/bad.png: FAILED: image:" in out
    records = {Path(r["input"]).name: r for r in json.loads((tmp_path / "r.json").read_text())}
    assert records["bad.png"]["status"] == "failed" and records["bad.png"]["error"].startswith("image:")
    assert records["good.png"]["status"] == "anonymized"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good.png"]


def test_writing_over_the_inputs_is_refused_even_with_overwrite(tmp_path, cli):
    source = write_face(tmp_path / "photos" / "a.png")
    before = source.read_bytes()
    code, _, err = cli("anonymize", "--method", "blur", "--aligned", "photos", "-o", "photos", "--overwrite")
    assert code == 2 and "would replace its own input" in err
    assert source.read_bytes() == before
