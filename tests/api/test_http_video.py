"""POST /v1/anonymize-video through a real server on loopback: the HTTP face of AnonymizeVideo.

The clip is built in the test (a real face moving over a background, an AAC track); the server's spool
is a folder of the test's own, so "no file left" is checked on the real folder after every path.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
from api_support import wait_until
from video_rpc_support import Scene, read_clip, region_changed, spool_files, write_clip

from masquerade.api.http.app import REPORT_HEADER, VIDEO_PATH, decode_report_header
from masquerade.api.protos import pb2
from masquerade.api.video_service import VideoConfig
from masquerade.engine.engine import Engine, EngineConfig
from server_support import BackgroundServer, loopback_config

MAX_VIDEO_BYTES = 1_000_000


@pytest.fixture(scope="module")
def spool_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("http-spool")


@pytest.fixture(scope="module")
def base_url(spool_root) -> str:
    """A classical-only server (no diffusion weights) with the HTTP port on and a small spool."""
    engine_config = EngineConfig(models="tiny", device="cpu", max_queue=32)
    config = dataclasses.replace(
        loopback_config(engine_config),
        http_port=0,
        video=VideoConfig(spool_dir=str(spool_root), max_video_bytes=MAX_VIDEO_BYTES, chunk_bytes=4096),
    )
    running = BackgroundServer(config, Engine(engine_config, None, "test: no diffusion weights")).start()
    yield f"http://127.0.0.1:{running._state.http_port}"
    running.stop()


@pytest.fixture(scope="module")
def scene() -> Scene:
    return Scene()


@pytest.fixture(scope="module")
def clip(tmp_path_factory, scene) -> Path:
    return write_clip(tmp_path_factory.mktemp("http-clips") / "walk.mp4", scene)


def _post(base_url: str, body, query: str = "?method=BLUR", **headers) -> requests.Response:
    return requests.post(
        f"{base_url}{VIDEO_PATH}{query}", data=body, headers={"Content-Type": "video/mp4", **headers}, timeout=120
    )


def _assert_problem(reply: requests.Response, status: int, field: str | None) -> dict:
    assert reply.status_code == status, reply.text[:500]
    assert reply.headers["content-type"] == "application/problem+json"
    document = reply.json()
    assert document["status"] == status and document["detail"]
    if field is not None:
        assert document.get("field") == field, document
    return document


def _assert_anonymized(video: bytes, clip: Path, scene: Scene, path: Path) -> None:
    path.write_bytes(video)
    frames_in, audio_in = read_clip(clip)
    frames_out, audio_out = read_clip(path)
    assert len(frames_out) == len(frames_in) == scene.frames
    assert audio_out == audio_in, "audio packets are copied, not re-encoded"
    for index, (before, after) in enumerate(zip(frames_in, frames_out)):
        assert region_changed(before, after, scene.box(index)), f"frame {index}: the face is not covered"


def test_round_trip_as_video_and_as_json_concurrently(base_url, clip, scene, spool_root, tmp_path):
    data = clip.read_bytes()
    with ThreadPoolExecutor(2) as pool:
        as_video = pool.submit(_post, base_url, data, "?method=BLUR&request_id=v1", Accept="video/*")
        as_json = pool.submit(_post, base_url, data, "?method=PIXELATE&request_id=j1", Accept="application/json")
        video_reply, json_reply = as_video.result(), as_json.result()

    assert video_reply.status_code == 200, video_reply.text[:500]
    assert video_reply.headers["content-type"] == "video/mp4"
    header = decode_report_header(video_reply.headers[REPORT_HEADER])
    assert header["request_id"] == "v1"
    report = header["report"]
    assert report["frames"] == scene.frames and (report["width"], report["height"]) == (scene.width, scene.height)
    assert int(report["output_bytes"]) == len(video_reply.content)
    assert report["tracks"] and report["tracks"][0]["method_applied"] == "BLUR"
    assert json.loads(report["report_json"])["input"] == "video.mp4"  # named from the Content-Type, never the spool
    _assert_anonymized(video_reply.content, clip, scene, tmp_path / "blurred.mp4")

    assert json_reply.status_code == 200, json_reply.text[:500]
    document = json_reply.json()
    assert document["request_id"] == "j1" and document["media_type"] == "video/mp4"
    assert document["report"]["tracks"][0]["method_applied"] == "PIXELATE"
    video = base64.b64decode(document["video"], validate=True)
    assert int(document["report"]["output_bytes"]) == len(video)
    _assert_anonymized(video, clip, scene, tmp_path / "pixelated.mp4")
    wait_until(lambda: not spool_files(spool_root), what="the spool to empty")


def test_oversize_bodies_are_413_and_leave_no_spool_file(base_url, clip, spool_root):
    host, port = base_url.removeprefix("http://").split(":")
    # Declared too large: answered from the headers alone, before a byte of the body.
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            f"POST {VIDEO_PATH} HTTP/1.1\r\nHost: x\r\nContent-Type: video/mp4\r\n"
            f"Content-Length: {MAX_VIDEO_BYTES + 1}\r\nExpect: 100-continue\r\n\r\n".encode()
        )
        assert sock.recv(65536).startswith(b"HTTP/1.1 413")

    # Chunked with no length: the upload reaches the spool and is refused once past the limit, then deleted.
    data = clip.read_bytes()

    def chunks():
        sent = 0
        while sent <= MAX_VIDEO_BYTES:
            yield data
            sent += len(data)

    document = _assert_problem(_post(base_url, chunks()), 413, "body")
    assert str(MAX_VIDEO_BYTES) in document["detail"]
    wait_until(lambda: not spool_files(spool_root), what="the spool to empty")


def test_bad_requests_are_problems_naming_the_field(base_url, clip, spool_root):
    noise = np.random.default_rng(0).bytes(50_000)
    document = _assert_problem(_post(base_url, noise), 400, "video")
    assert "video.mp4" in document["detail"]
    _assert_problem(_post(base_url, clip.read_bytes(), "?method=BLUR&filename=walk.txt"), 400, "filename")
    _assert_problem(_post(base_url, clip.read_bytes(), "?tracking.detect_every=0"), 400, None)
    _assert_problem(_post(base_url, clip.read_bytes(), "?methd=BLUR"), 400, "methd")
    _assert_problem(_post(base_url, b""), 400, "body")
    _assert_problem(_post(base_url, clip.read_bytes(), **{"Content-Type": "image/png"}), 415, "Content-Type")
    wait_until(lambda: not spool_files(spool_root), what="the spool to empty")


def test_a_client_that_leaves_mid_upload_frees_its_spool_files(base_url, clip, spool_root):
    host, port = base_url.removeprefix("http://").split(":")
    data = clip.read_bytes()
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            f"POST {VIDEO_PATH}?method=BLUR HTTP/1.1\r\nHost: x\r\nContent-Type: video/mp4\r\n"
            f"Content-Length: {len(data)}\r\n\r\n".encode()
            + data[: len(data) // 2]
        )
        wait_until(lambda: spool_files(spool_root), what="the upload to reach the spool")
    wait_until(lambda: not spool_files(spool_root), what="the spool to empty after the client left")
    assert _post(base_url, clip.read_bytes()).status_code == 200, "the server serves the next call"


def test_openapi_lists_video_starts_fields(base_url):
    document = requests.get(f"{base_url}/openapi.json", timeout=30).json()
    operation = document["paths"][VIDEO_PATH]["post"]
    parameters = {parameter["name"]: parameter for parameter in operation["parameters"] if parameter["in"] == "query"}
    expected, stack = set(), [((), pb2.VideoStart.DESCRIPTOR)]
    while stack:  # every scalar leaf of VideoStart, walked here from the descriptor
        prefix, message = stack.pop()
        for field in message.fields:
            if field.message_type is not None:
                stack.append(((*prefix, field.name), field.message_type))
            else:
                expected.add(".".join((*prefix, field.name)))
    assert set(parameters) == expected
    assert all(value.name in json.dumps(parameters["method"]["schema"]) for value in pb2.Method.DESCRIPTOR.values)
    assert set(operation["requestBody"]["content"]) == {"video/*", "application/octet-stream"}
    report = document["components"]["schemas"]["VideoReport"]
    assert set(report["properties"]) == {field.name for field in pb2.VideoReport.DESCRIPTOR.fields}


def test_a_client_that_leaves_mid_processing_cancels_the_pipeline(base_url, tmp_path, spool_root, caplog):
    caplog.set_level("INFO", logger="masquerade.access")
    long_clip = write_clip(tmp_path / "long.mp4", Scene(width=480, height=360, frames=96), audio=False)
    data = long_clip.read_bytes()
    host, port = base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            f"POST {VIDEO_PATH}?method=BLUR&request_id=leaver&tracking.detect_every=1 HTTP/1.1\r\nHost: x\r\n"
            f"Content-Type: video/mp4\r\nContent-Length: {len(data)}\r\n\r\n".encode()
            + data
        )
        wait_until(lambda: spool_files(spool_root), what="the upload to reach the spool")
        time.sleep(1.0)  # the upload is done and the pipeline under way (it needs several seconds for this clip)

    def logged() -> list:
        return [r.access for r in caplog.records if getattr(r, "access", None) and r.access["request_id"] == "leaver"]

    wait_until(lambda: logged(), timeout=30, what="the access line of the call whose client left")
    assert logged()[0]["code"] == "CANCELLED"
    wait_until(lambda: not spool_files(spool_root), what="the spool to empty after the client left")


def _sse(text: str) -> list[tuple[str, str]]:
    """(event, data) pairs of a text/event-stream body."""
    events = []
    for block in text.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "event" in fields:
            events.append((fields["event"], fields.get("data", "")))
    return events


def test_progress_as_server_sent_events_then_the_result(base_url, clip, scene, spool_root, tmp_path):
    reply = _post(base_url, clip.read_bytes(), "?method=BLUR&request_id=s1", Accept="text/event-stream")
    assert reply.status_code == 200, reply.text[:500]
    assert reply.headers["content-type"].startswith("text/event-stream")
    events = _sse(reply.text)
    kinds = [kind for kind, _ in events]
    assert kinds[-1] == "result" and set(kinds[:-1]) == {"progress"}, kinds
    done = [json.loads(data).get("frames_done", 0) for _, data in events[:-1]]
    assert done == sorted(done) and 0 < done[-1] <= scene.frames
    document = json.loads(events[-1][1])
    assert document["request_id"] == "s1" and document["media_type"] == "video/mp4"
    video = base64.b64decode(document["video"], validate=True)
    assert int(document["report"]["output_bytes"]) == len(video)
    _assert_anonymized(video, clip, scene, tmp_path / "streamed.mp4")
    wait_until(lambda: not spool_files(spool_root), what="the spool to empty")


def test_sse_errors_before_the_stream_are_problems_and_after_it_error_events(base_url, clip, spool_root):
    data = clip.read_bytes()
    early = _post(base_url, data, "?method=BLUR&classical.strength=99", Accept="text/event-stream")
    _assert_problem(early, 400, "classical.strength")
    late = _post(base_url, data[: len(data) // 3], "?method=BLUR", Accept="text/event-stream")  # truncated file
    if late.status_code == 200:  # the upload was read, then decoding failed: the stream says so
        kind, problem = _sse(late.text)[-1]
        assert kind == "error" and json.loads(problem)["status"] == 400, late.text[-500:]
    else:
        _assert_problem(late, 400, None)
    wait_until(lambda: not spool_files(spool_root), what="the spool to empty")
