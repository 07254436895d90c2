"""`masquerade anonymize` on videos: one clip, videos in folders beside images, bad files, exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from masquerade.video.synthetic import ClipSpec, MovingFace, make_clip


@pytest.fixture
def cli(monkeypatch, capsys, tmp_path):
    """Runs `masquerade ARGS...` in-process in tmp_path; returns (exit code, stdout, stderr)."""
    from masquerade.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MASQUERADE_MODEL_DIR", str(tmp_path / "no-weights"))  # auto -> blur

    def invoke(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        try:
            code = main(list(args))
        except SystemExit as exit_:
            code = exit_.code
        out, err = capsys.readouterr()
        return code, out, err

    return invoke


def _clip(path: Path, frames: int = 6) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    make_clip(path, ClipSpec(frames=frames, faces=(MovingFace(2, 100, (100, 60), (2, 0)),)))
    return path


def _frames(path: Path) -> int:
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(container.streams.video[0]))


def test_one_clip_in_one_clip_out_with_a_report(tmp_path, cli):
    _clip(tmp_path / "clip.mp4")
    code, out, err = cli(
        "anonymize", "clip.mp4", "-o", "out.mkv", "--crf", "30", "--no-audio", "--report", "r.json", "--report-frames"
    )
    assert code == 0, err
    assert _frames(tmp_path / "out.mkv") == 6
    with av.open(str(tmp_path / "out.mkv")) as container:
        assert not container.streams.audio
    (record,) = json.loads((tmp_path / "r.json").read_text())
    assert record["kind"] == "video" and record["frames"] == 6 and record["crf"] == 30
    assert [t["frames_detected"] + t["frames_filled"] for t in record["tracks"]] == [6]
    assert len(record["frame_boxes"]) == 6
    assert "6 frames, 1 track(s)" in out


def test_videos_in_a_folder_beside_images_and_a_bad_one(tmp_path, cli):
    _clip(tmp_path / "in" / "a" / "walk.mov")
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(tmp_path / "in" / "still.png")
    (tmp_path / "in" / "broken.webm").write_bytes(b"\x1a\x45\xdf\xa3 not really a webm")
    code, out, err = cli("anonymize", "in", "-o", "out", "--report", "r.json", "-q")
    assert code == 1, err  # one input failed, the others were written
    assert _frames(tmp_path / "out" / "a" / "walk.mov") == 6
    assert (tmp_path / "out" / "still.png").is_file()
    assert not (tmp_path / "out" / "broken.webm").exists() and not list((tmp_path / "out").glob(".*partial"))
    records = {Path(r["input"]).name: r for r in json.loads((tmp_path / "r.json").read_text())}
    assert records["broken.webm"]["status"] == "failed" and "broken.webm" in records["broken.webm"]["error"]
    assert records["walk.mov"]["status"] == "anonymized"
    assert "broken.webm" in err


def test_a_bad_video_alone_exits_2_and_writes_nothing(tmp_path, cli):
    data = _clip(tmp_path / "clip.mp4").read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 3])
    code, _, err = cli("anonymize", "cut.mp4", "-o", "out.mp4")
    assert code == 2
    assert "cut.mp4" in err and "not a readable video" in err
    assert not (tmp_path / "out.mp4").exists() and not list(tmp_path.glob(".out.mp4*"))
