"""The video examples of the TypeScript, Go and C++ clients against a real server on loopback.

A whole file (AnonymizeVideo): a clip with a moving face and audio in, the anonymized clip out
(same frames, audio kept), progress lines, one line per track and the report; a file that is not a
video is INVALID_ARGUMENT (exit 3) and leaves no output. Live frames (AnonymizeFrames, TypeScript
and C++): images sent as one stream's frames with a small window come back in order, covered and
tracked; a stream refused by the per-client quota (RESOURCE_EXHAUSTED with RetryInfo) is reopened
after the server's delay with the frames it held; TLS with a client certificate and the token.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
import subprocess
import time
from pathlib import Path

import av
import pytest
from PIL import Image

from masquerade.video.synthetic import ClipSpec, MovingFace, make_clip

CLIENTS = Path(__file__).resolve().parents[2] / "clients"
VIDEO_EXAMPLES = {
    "typescript": ["node", str(CLIENTS / "typescript" / "dist" / "video-example.js")],
    "go": [str(CLIENTS / "go" / "build" / "bin" / "masquerade-video")],
    "cpp": [str(CLIENTS / "cpp" / "build" / "masquerade-video")],
}
FRAME_EXAMPLES = ("typescript", "cpp")  # the Go example sends files only
CLIP_FRAMES = 12

pytestmark = [pytest.mark.clients, pytest.mark.timeout(1800 + 300)]

REPORT_LINE = re.compile(r"^report frames=(\d+) tracks=(\d+) complete=(true|false) bytes=(\d+)$")
PROGRESS_LINE = re.compile(r"^progress frames=\d+/\d+ fps=\d+\.\d tracks=\d+$")
TRACK_LINE = re.compile(r"^track id=\d+ frames=\d+-\d+ detected=\d+ filled=\d+ method=[A-Z_]+ status=[A-Z_]+$")
FRAME_LINE = re.compile(
    r"^frame seq=(\d+) faces=(\d+) tracks=\[([0-9h,]*)\] detector_ran=(true|false) latency_ms=\d+\.\d bytes=(\d+)$"
)


def run_video_example(language: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*VIDEO_EXAMPLES[language], *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("video-clients") / "walk.mp4"
    make_clip(
        path,
        ClipSpec(frames=CLIP_FRAMES, fps=12, faces=(MovingFace(source=0, size=120, start=(20, 40), velocity=(6, 0)),)),
    )
    return path


@pytest.fixture(scope="module")
def frame_files(tmp_path_factory, clip) -> list[Path]:
    """The clip's first 6 frames as JPEG files: the frames a camera gateway would send."""
    folder = tmp_path_factory.mktemp("frames")
    paths = []
    with av.open(str(clip)) as container:
        for index, frame in enumerate(container.decode(video=0)):
            if index == 6:
                break
            paths.append(folder / f"frame{index:02d}.jpg")
            frame.to_image().save(paths[-1], quality=90)
    return paths


def _frames_and_audio(path: Path) -> tuple[int, int]:
    with av.open(str(path)) as container:
        frames = sum(1 for _ in container.decode(video=0))
    with av.open(str(path)) as container:
        audio = sum(1 for packet in container.demux(audio=0) if packet.size)
    return frames, audio


def assert_video_output(done: subprocess.CompletedProcess[str], clip: Path, output: Path) -> None:
    assert done.returncode == 0, f"exit {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    lines = done.stdout.splitlines()
    report = REPORT_LINE.match(lines[-1])
    assert report, done.stdout
    assert int(report.group(1)) == CLIP_FRAMES and int(report.group(2)) >= 1
    assert int(report.group(4)) == output.stat().st_size
    assert any(TRACK_LINE.match(line) for line in lines), done.stdout
    assert all(PROGRESS_LINE.match(line) or TRACK_LINE.match(line) for line in lines[:-1]), done.stdout
    assert _frames_and_audio(output) == _frames_and_audio(clip)
    assert not Path(f"{output}.partial").exists()


@pytest.mark.parametrize("language", sorted(VIDEO_EXAMPLES))
def test_video_example_anonymizes_a_clip(language, built_clients, plain_server_address, clip, tmp_path):
    output = tmp_path / "walk-anonymized.mp4"
    done = run_video_example(
        language, "--server", plain_server_address, "--method", "blur", "--detect-every", "2", str(clip), str(output)
    )
    assert_video_output(done, clip, output)


@pytest.mark.parametrize("language", sorted(VIDEO_EXAMPLES))
def test_video_example_refuses_a_file_that_is_not_a_video(language, built_clients, plain_server_address, tmp_path):
    not_a_video = tmp_path / "notes.mp4"
    not_a_video.write_text("this is not a video\n" * 100)
    output = tmp_path / "out.mp4"
    done = run_video_example(
        language, "--server", plain_server_address, "--method", "blur", str(not_a_video), str(output), timeout=120
    )
    assert done.returncode == 3, done.stderr
    assert re.search(r"^error: INVALID_ARGUMENT: \S", done.stderr, re.MULTILINE), done.stderr
    assert not output.exists() and not Path(f"{output}.partial").exists()


def assert_frames_in_order(done: subprocess.CompletedProcess[str], frame_files: list[Path], outdir: Path) -> None:
    assert done.returncode == 0, f"exit {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    lines = [FRAME_LINE.match(line) for line in done.stdout.splitlines()]
    assert all(lines) and len(lines) == len(frame_files), done.stdout
    assert [int(m.group(1)) for m in lines] == list(range(len(frame_files)))  # every frame, in the order sent
    assert all(int(m.group(2)) >= 1 for m in lines), done.stdout  # the moving face, on every frame
    assert {m.group(3) for m in lines} == {"0"}, done.stdout  # one face, one track id over the stream
    for source, m in zip(frame_files, lines, strict=True):
        written = outdir / source.name
        assert written.stat().st_size == int(m.group(5))
        with Image.open(written) as covered, Image.open(source) as original:
            assert covered.size == original.size
            assert covered.tobytes() != original.tobytes()  # the face was covered


@pytest.mark.parametrize("language", FRAME_EXAMPLES)
def test_live_frames_come_back_in_order_covered_and_tracked(
    language, built_clients, plain_server_address, frame_files, tmp_path
):
    outdir = tmp_path / "covered"
    done = run_video_example(
        language,
        "--frames",
        "--window",
        "2",
        "--server",
        plain_server_address,
        "--method",
        "pixelate",
        *map(str, frame_files),
        str(outdir),
        timeout=120,
    )
    assert_frames_in_order(done, frame_files, outdir)
    first = FRAME_LINE.match(done.stdout.splitlines()[0])
    assert first.group(4) == "true"  # the detector runs on a stream's first frame


@pytest.fixture(scope="module")
def rate_limited_video_server():
    """Classical methods only, one request per 2 s (burst 1): a one-frame stream uses the whole bucket."""
    from masquerade.api.quota import ClientPolicy
    from masquerade.engine.engine import Engine, EngineConfig
    from server_support import BackgroundServer, loopback_config

    engine_config = EngineConfig(models="tiny", device="cpu")
    config = dataclasses.replace(loopback_config(engine_config), quotas=ClientPolicy(requests_per_second=0.5, burst=1))
    server = BackgroundServer(config, Engine(engine_config, None, "test: classical methods only")).start()
    yield server.address
    server.stop()


@pytest.mark.parametrize("language", FRAME_EXAMPLES)
def test_a_stream_refused_by_the_quota_is_reopened_after_the_retry_info_delay(
    language, built_clients, rate_limited_video_server, frame_files, tmp_path
):
    address = rate_limited_video_server
    one_frame = frame_files[:1]
    started = time.monotonic()
    first = run_video_example(language, "--frames", "--server", address, str(one_frame[0]), str(tmp_path / "a"))
    assert_frames_in_order(first, one_frame, tmp_path / "a")
    # Refused at once (the bucket is empty), reopened after the RetryInfo delay with the frame it held.
    second = run_video_example(language, "--frames", "--server", address, str(one_frame[0]), str(tmp_path / "b"))
    assert_frames_in_order(second, one_frame, tmp_path / "b")
    assert time.monotonic() - started >= 1.95  # one request per 2 s: admitted 2 s after the first


@pytest.mark.parametrize("language", FRAME_EXAMPLES)
def test_video_over_tls_with_client_certificate_and_token(language, built_clients, secure_server, clip, tmp_path):
    c = secure_server.certificates
    tls = ["--tls-ca", str(c.ca_cert), "--tls-cert", str(c.client_cert), "--tls-key", str(c.client_key)]
    output = tmp_path / "out.mp4"
    done = run_video_example(
        language,
        "--server",
        secure_server.address,
        *tls,
        "--token-file",
        str(secure_server.token_file),
        "--method",
        "solid",
        str(clip),
        str(output),
    )
    assert_video_output(done, clip, output)
    refused = run_video_example(language, "--server", secure_server.address, *tls, str(clip), str(tmp_path / "no.mp4"))
    assert refused.returncode == 1, refused.stderr
    assert re.search(r"^error: UNAUTHENTICATED: ", refused.stderr, re.MULTILINE), refused.stderr
    assert not (tmp_path / "no.mp4").exists()


@pytest.mark.parametrize(
    "program", ["clients/go/build/bin/masquerade-video", "node", "clients/cpp/build/masquerade-video"]
)
def test_readme_video_lines_run_as_written(program, built_clients, plain_server_address, clip, tmp_path):
    from readme_support import code_blocks, section

    (line,) = [
        line
        for block in code_blocks(section("Video over gRPC"), "bash")
        for line in block.splitlines()
        if line.startswith(program + " ") and "clip.mp4" in line
    ]
    table = {"127.0.0.1:50051": plain_server_address, "clip.mp4": str(clip)}
    argv = [table.get(arg, arg) for arg in shlex.split(line)]
    argv[-1] = str(tmp_path / argv[-1])
    done = subprocess.run(argv, cwd=CLIENTS.parent, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1].startswith(f"report frames={CLIP_FRAMES} ")
