"""The Go video example (clients/go/cmd/masquerade-video) against a real server: a clip with a
moving face and audio in, the anonymized clip out (same frames, audio kept), one line per track;
a file that is not a video is INVALID_ARGUMENT (exit 3) and leaves no output."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import av
import pytest

from masquerade.video.synthetic import ClipSpec, MovingFace, make_clip

CLIENTS = Path(__file__).resolve().parents[2] / "clients"
GO_VIDEO = CLIENTS / "go" / "build" / "bin" / "masquerade-video"

pytestmark = [pytest.mark.clients, pytest.mark.timeout(1800 + 300)]


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("go-video") / "walk.mp4"
    make_clip(
        path, ClipSpec(frames=12, fps=12, faces=(MovingFace(source=0, size=120, start=(20, 40), velocity=(6, 0)),))
    )
    return path


def _frames_and_audio(path: Path) -> tuple[int, int]:
    with av.open(str(path)) as container:
        frames = sum(1 for _ in container.decode(video=0))
    with av.open(str(path)) as container:
        audio = sum(1 for packet in container.demux(audio=0) if packet.size)
    return frames, audio


def test_go_video_example_anonymizes_a_clip(built_clients, plain_server_address, clip, tmp_path):
    output = tmp_path / "walk-anonymized.mp4"
    done = subprocess.run(
        [str(GO_VIDEO), "--server", plain_server_address, "--method", "blur", str(clip), str(output)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    report = re.match(r"^report frames=(\d+) tracks=(\d+) complete=(true|false) bytes=(\d+)$", lines[-1])
    assert report, done.stdout
    assert int(report.group(1)) == 12 and int(report.group(2)) >= 1
    assert int(report.group(4)) == output.stat().st_size
    assert any(line.startswith("track id=") for line in lines)
    assert _frames_and_audio(output) == _frames_and_audio(clip)
    assert not Path(f"{output}.partial").exists()


def test_go_video_example_refuses_a_file_that_is_not_a_video(built_clients, plain_server_address, tmp_path):
    not_a_video = tmp_path / "notes.mp4"
    not_a_video.write_text("this is not a video\n" * 100)
    output = tmp_path / "out.mp4"
    done = subprocess.run(
        [str(GO_VIDEO), "--server", plain_server_address, "--method", "blur", str(not_a_video), str(output)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 3, done.stderr
    assert re.search(r"^error: INVALID_ARGUMENT: \S", done.stderr, re.MULTILINE), done.stderr
    assert not output.exists() and not Path(f"{output}.partial").exists()


def test_readme_go_video_line_runs_as_written(built_clients, plain_server_address, clip, tmp_path):
    import shlex

    from readme_support import code_blocks, section

    (line,) = [
        line
        for block in code_blocks(section("Video over gRPC"), "bash")
        for line in block.splitlines()
        if line.startswith("clients/go/build/bin/masquerade-video ")
    ]
    table = {"127.0.0.1:50051": plain_server_address, "clip.mp4": str(clip)}
    argv = [table.get(arg, arg) for arg in shlex.split(line)]
    argv[-1] = str(tmp_path / argv[-1])
    done = subprocess.run(argv, cwd=CLIENTS.parent, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1].startswith("report frames=12 ")
