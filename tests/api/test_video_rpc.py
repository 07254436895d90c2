"""AnonymizeVideo and AnonymizeFrames through a real server on loopback, with the real client.

The clips are built in the test (a real face moving over a background, an AAC track); the server's
spool is a folder of the test's own, so "no file left" is checked on the real folder.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import psutil
import pytest
from api_support import wait_until
from video_rpc_support import Scene, read_clip, region_changed, spool_files, write_clip

from masquerade.api.video_service import VideoConfig
from masquerade.engine.engine import Engine, EngineConfig
from masquerade_client import AnonymizerClient, InvalidArgument, pb2, pb2_grpc
from masquerade_client.errors import FailedPrecondition
from server_support import BackgroundServer, loopback_config

MAX_VIDEO_BYTES = 1_000_000
WINDOW_LIMIT = 8


@pytest.fixture(scope="module")
def spool_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("spool")


@pytest.fixture(scope="module")
def video_server(spool_root):
    """A classical-only server (no diffusion weights: blur, pixelate, solid) with a small spool."""
    engine_config = EngineConfig(models="tiny", device="cpu", max_queue=32)
    config = dataclasses.replace(
        loopback_config(engine_config, metrics=True),
        video=VideoConfig(
            spool_dir=str(spool_root),
            max_video_bytes=MAX_VIDEO_BYTES,
            chunk_bytes=4096,  # many output chunks, so a call can be caught mid-output
            max_frame_window=WINDOW_LIMIT,
            max_video_streams=8,
        ),
    )
    running = BackgroundServer(config, Engine(engine_config, None, "test: no diffusion weights")).start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def video_client(video_server):
    with AnonymizerClient(video_server.address, timeout=60) as client:
        client.wait_ready(timeout=30)
        yield client


@pytest.fixture(scope="module")
def scene() -> Scene:
    return Scene()


@pytest.fixture(scope="module")
def clip(tmp_path_factory, scene) -> Path:
    return write_clip(tmp_path_factory.mktemp("clips") / "walk.mp4", scene)


def _spool_empty(spool_root: Path) -> bool:
    return not spool_files(spool_root)


# ---------------------------------------------------------------- AnonymizeVideo


def test_video_round_trip_keeps_frames_and_audio_and_covers_the_face(video_client, clip, scene, spool_root):
    progress: list[pb2.VideoProgress] = []
    result = video_client.anonymize_video(clip, method="blur", on_progress=progress.append)

    out = clip.parent / "walk-anonymized.mp4"
    out.write_bytes(result.video)
    frames_in, audio_in = read_clip(clip)
    frames_out, audio_out = read_clip(out)
    assert len(frames_out) == len(frames_in) == scene.frames
    assert frames_out[0].shape == frames_in[0].shape
    assert audio_out == audio_in, "audio packets are copied, not re-encoded"
    for index, (before, after) in enumerate(zip(frames_in, frames_out)):
        assert region_changed(before, after, scene.box(index)), f"frame {index}: the face is not covered"

    assert result.summary.frames == scene.frames
    assert (result.summary.width, result.summary.height) == (scene.width, scene.height)
    assert result.summary.output_bytes == len(result.video)
    assert result.tracks and result.tracks[0].frames_detected > 0
    assert result.report["frames"] == scene.frames and result.report["tracks"]
    assert progress and progress[-1].frames_done <= scene.frames
    assert _spool_empty(spool_root)


def _stalling_upload(clip: Path, sent: threading.Event, release: threading.Event, *, chunks: int = 2):
    """Start, then a few chunks, then waits (a client mid-upload)."""
    data = clip.read_bytes()
    yield pb2.AnonymizeVideoRequest(start=pb2.VideoStart(filename="walk.mp4", method=pb2.BLUR))
    for i in range(chunks):
        yield pb2.AnonymizeVideoRequest(chunk=pb2.VideoChunk(offset=i * 1000, data=data[i * 1000 : (i + 1) * 1000]))
    sent.set()
    release.wait(30)


def test_cancel_mid_upload_leaves_no_spool_file(video_server, clip, spool_root):
    sent, release = threading.Event(), threading.Event()
    with grpc.insecure_channel(video_server.address) as channel:
        call = pb2_grpc.AnonymizerStub(channel).AnonymizeVideo(_stalling_upload(clip, sent, release), timeout=30)
        assert sent.wait(10)
        wait_until(lambda: spool_files(spool_root), what="the upload to reach the spool")
        call.cancel()
        release.set()
        with pytest.raises(grpc.RpcError) as raised:
            list(call)
        assert raised.value.code() is grpc.StatusCode.CANCELLED
    wait_until(lambda: _spool_empty(spool_root), what="the cancelled upload's file to go")


def test_deadline_mid_upload_leaves_no_spool_file(video_server, clip, spool_root):
    sent, release = threading.Event(), threading.Event()
    with grpc.insecure_channel(video_server.address) as channel:
        call = pb2_grpc.AnonymizerStub(channel).AnonymizeVideo(_stalling_upload(clip, sent, release), timeout=1.5)
        with pytest.raises(grpc.RpcError) as raised:
            list(call)
        assert raised.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        release.set()
    wait_until(lambda: _spool_empty(spool_root), what="the timed-out upload's file to go")


def test_cancel_and_deadline_mid_output_leave_no_spool_file(video_server, tmp_path, spool_root):
    # A larger output than the transport buffers hold: the server is still writing when the call ends.
    noisy = Scene(frames=12, face_height=140, noise=True)  # ~0.8 MB out at crf 0: past the transport's buffers
    clip = write_clip(tmp_path / "big.mp4", noisy, crf=40)
    upload = clip.read_bytes()
    assert len(upload) < MAX_VIDEO_BYTES

    def requests():
        yield pb2.AnonymizeVideoRequest(
            start=pb2.VideoStart(
                filename="big.mp4",
                method=pb2.BLUR,
                output=pb2.VideoOutputOptions(crf=0),
                tracking=pb2.TrackingOptions(detect_every=6),
            )
        )
        yield pb2.AnonymizeVideoRequest(chunk=pb2.VideoChunk(offset=0, data=upload))

    # No BDP probing: the client's receive window stays at 64 KiB, so a client that does not read
    # holds the server's writes back whatever the machine's speed.
    with grpc.insecure_channel(video_server.address, options=[("grpc.http2.bdp_probe", 0)]) as channel:
        stub = pb2_grpc.AnonymizerStub(channel)
        started = time.monotonic()
        call = stub.AnonymizeVideo(requests(), timeout=60)
        for response in call:
            if response.WhichOneof("event") == "output":
                assert response.output.offset == 0
                break
        to_first_output = time.monotonic() - started
        assert spool_files(spool_root), "mid-output, the output is still in the spool"
        call.cancel()
        wait_until(lambda: _spool_empty(spool_root), what="the cancelled call's files to go")

        # Again, but the client stops reading after the first output chunk until its deadline passes.
        deadline = 3 * to_first_output + 5.0  # room for processing to finish on a loaded machine
        call = stub.AnonymizeVideo(requests(), timeout=deadline)
        started = time.monotonic()
        first_output_at = None
        with pytest.raises(grpc.RpcError) as raised:
            for response in call:
                if response.WhichOneof("event") == "output" and first_output_at is None:
                    first_output_at = time.monotonic()
                    time.sleep(max(0.0, deadline + 0.5 - (first_output_at - started)))
        assert raised.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        assert first_output_at is not None, "the deadline hit before any output: the clip processed too slowly"
    wait_until(lambda: _spool_empty(spool_root), what="the timed-out call's files to go")


_KILLED_CLIENT = """
import sys, time
import grpc
from masquerade_client import pb2, pb2_grpc
data = open(sys.argv[2], "rb").read()
def requests():
    yield pb2.AnonymizeVideoRequest(start=pb2.VideoStart(filename="walk.mp4", method=pb2.BLUR))
    yield pb2.AnonymizeVideoRequest(chunk=pb2.VideoChunk(offset=0, data=data[:5000]))
    print("sent", flush=True)
    time.sleep(600)
channel = grpc.insecure_channel(sys.argv[1])
for _ in pb2_grpc.AnonymizerStub(channel).AnonymizeVideo(requests()):
    pass
"""


def test_a_killed_client_leaves_no_spool_file(video_server, clip, spool_root):
    process = subprocess.Popen(
        [sys.executable, "-c", _KILLED_CLIENT, video_server.address, str(clip)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout.readline().strip() == "sent"
        wait_until(lambda: spool_files(spool_root), what="the upload to reach the spool")
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait(10)
    wait_until(lambda: _spool_empty(spool_root), timeout=15, what="the killed client's upload to go")


def test_video_bad_first_message_chunk_order_size_and_corrupt_file(video_client, video_server, clip, spool_root):
    data = clip.read_bytes()
    with grpc.insecure_channel(video_server.address) as channel:
        stub = pb2_grpc.AnonymizerStub(channel)

        def run(messages) -> grpc.RpcError:
            with pytest.raises(grpc.RpcError) as raised:
                list(stub.AnonymizeVideo(iter(messages), timeout=30))
            return raised.value

        error = run([pb2.AnonymizeVideoRequest(chunk=pb2.VideoChunk(offset=0, data=data))])
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT and "start" in error.details()

        start = pb2.AnonymizeVideoRequest(start=pb2.VideoStart(filename="walk.mp4", method=pb2.BLUR))
        error = run(
            [
                start,
                pb2.AnonymizeVideoRequest(chunk=pb2.VideoChunk(offset=0, data=data[:1000])),
                pb2.AnonymizeVideoRequest(chunk=pb2.VideoChunk(offset=2000, data=data[2000:3000])),
            ]
        )
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "chunk.offset" in error.details() and "1000" in error.details()

        error = run([start, start])
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT and "start" in error.details()

    with pytest.raises(InvalidArgument, match="limit of 1000000 bytes"):
        video_client.anonymize_video(b"\0" * (MAX_VIDEO_BYTES + 1), method="blur")  # refused from size_bytes
    too_big = (data * (MAX_VIDEO_BYTES // len(data) + 2))[: MAX_VIDEO_BYTES + 5000]
    with grpc.insecure_channel(video_server.address) as channel:
        chunks = [start] + [
            pb2.AnonymizeVideoRequest(chunk=pb2.VideoChunk(offset=i, data=too_big[i : i + 100_000]))
            for i in range(0, len(too_big), 100_000)
        ]
        with pytest.raises(grpc.RpcError) as raised:
            list(pb2_grpc.AnonymizerStub(channel).AnonymizeVideo(iter(chunks), timeout=30))
        assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT and "1000000" in raised.value.details()

    with pytest.raises(InvalidArgument, match="walk.mp4"):
        video_client.anonymize_video(data[: len(data) // 3], filename="walk.mp4", method="blur")  # truncated
    with pytest.raises(InvalidArgument, match="video"):
        video_client.anonymize_video(np.random.default_rng(0).bytes(50_000), filename="noise.mp4", method="blur")
    with pytest.raises(InvalidArgument, match="filename"):
        video_client.anonymize_video(data, filename="walk.gif", method="blur")
    with pytest.raises(FailedPrecondition, match="REVERSE_PERSONALIZATION"):
        video_client.anonymize_video(data, method="reverse_personalization")
    wait_until(lambda: _spool_empty(spool_root), what="the refused uploads' files to go")


# ---------------------------------------------------------------- AnonymizeFrames


def test_live_frames_come_back_in_order_covered_and_tracked(video_client, scene):
    frames = [scene.frame(i) for i in range(scene.frames)]
    results = list(video_client.stream_frames(frames, method="blur", window=3, detect_every=3))

    assert [r.sequence for r in results] == list(range(scene.frames))
    assert [r.detector_ran for r in results[:6]] == [True, False, False, True, False, False]
    for index, (frame, result) in enumerate(zip(frames, results)):
        assert result.error is None
        assert result.image.shape == frame.shape and result.image.dtype == np.uint8
        assert region_changed(frame, result.image, scene.box(index)), f"frame {index}: the face is not covered"
        assert len(result.faces) == 1, f"frame {index}: {result.faces}"
        assert result.faces[0].detected == result.detector_ran
        assert result.latency_seconds > 0
    assert len({r.faces[0].track_id for r in results}) == 1, "one person, one track"


def test_a_client_that_stops_reading_stops_being_served_and_memory_stays_flat(video_server):
    """Large raw frames offered without end; the client never reads: the server reads at most its
    window plus what the transport buffers hold, and its memory does not grow with what is offered."""
    pulled = 0
    rng = np.random.default_rng(1)
    frame = rng.integers(0, 256, (720, 1280, 3), dtype=np.uint8)  # 2.7 MB raw
    raw = pb2.RawFrame(rgb=frame.tobytes(), width=1280, height=720)

    def frames():
        nonlocal pulled
        options = pb2.FrameStreamOptions(method=pb2.BLUR, window=2, tracking=pb2.TrackingOptions(detect_every=300))
        for sequence in range(400):  # 1 GB if it were all taken in
            pulled += 1
            yield pb2.FrameRequest(options=options if sequence == 0 else None, sequence=sequence, raw=raw)

    process = psutil.Process()
    rss_before = process.memory_info().rss
    with grpc.insecure_channel(
        video_server.address, options=[("grpc.max_receive_message_length", 16 << 20)]
    ) as channel:
        call = pb2_grpc.AnonymizerStub(channel).AnonymizeFrames(frames(), timeout=60)
        first = next(call)  # the stream works; after this, nothing more is read
        assert first.sequence == 0
        time.sleep(2.0)
        settled = pulled
        time.sleep(2.0)
        assert pulled == settled, (
            f"the server kept taking frames from a client that does not read ({settled} -> {pulled})"
        )
        assert pulled <= 2 + 30, f"{pulled} frames taken in with a window of 2"
        rss_growth = process.memory_info().rss - rss_before
        assert rss_growth < 150e6, f"memory grew {rss_growth / 1e6:.0f} MB"
        call.cancel()


def test_four_concurrent_streams_each_get_every_frame_in_order(video_server):
    streams = 4
    scenes = [Scene(frames=15, face_height=100 + 8 * i) for i in range(streams)]
    outcomes: dict[int, list] = {}
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            with AnonymizerClient(video_server.address, timeout=120) as client:
                frames = [scenes[i].frame(k) for k in range(scenes[i].frames)]
                outcomes[i] = [(r.sequence, r) for r in client.stream_frames(frames, method="pixelate", window=4)]
        except BaseException as error:  # reported below, with the stream it came from
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(streams)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    assert not errors, errors
    for i in range(streams):
        sequences = [sequence for sequence, _ in outcomes[i]]
        assert sequences == list(range(scenes[i].frames)), f"stream {i} lost or reordered frames: {sequences}"
        for k, (_, result) in enumerate(outcomes[i]):
            assert region_changed(scenes[i].frame(k), result.image, scenes[i].box(k)), f"stream {i} frame {k}"


def test_frames_bad_first_message_window_sequence_and_a_corrupt_frame(video_server, video_client, scene):
    frame = scene.frame(0)
    raw = pb2.RawFrame(rgb=frame.tobytes(), width=scene.width, height=scene.height)
    with grpc.insecure_channel(video_server.address) as channel:
        stub = pb2_grpc.AnonymizerStub(channel)

        def run(messages):
            call = stub.AnonymizeFrames(iter(messages), timeout=30)
            answered = []
            with pytest.raises(grpc.RpcError) as raised:
                for result in call:
                    answered.append(result)
            return raised.value, answered

        error, _ = run([pb2.FrameRequest(sequence=0, raw=raw)])
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT and "options" in error.details()

        options = pb2.FrameStreamOptions(method=pb2.BLUR, window=WINDOW_LIMIT + 1)
        error, _ = run([pb2.FrameRequest(options=options, sequence=0, raw=raw)])
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT and "window" in error.details()

        options = pb2.FrameStreamOptions(method=pb2.BLUR, tracking=pb2.TrackingOptions(look_ahead_frames=5))
        error, _ = run([pb2.FrameRequest(options=options, sequence=0, raw=raw)])
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT and "look_ahead" in error.details()

        options = pb2.FrameStreamOptions(method=pb2.BLUR)
        error, answered = run(
            [
                pb2.FrameRequest(options=options, sequence=5, raw=raw),
                pb2.FrameRequest(sequence=6, raw=raw),
                pb2.FrameRequest(sequence=6, raw=raw),
            ]
        )
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT and "sequence" in error.details()
        assert [r.sequence for r in answered] == [5, 6], "frames before the bad one are still answered"

        short = pb2.RawFrame(rgb=frame.tobytes()[:-3], width=scene.width, height=scene.height)
        results = list(
            stub.AnonymizeFrames(
                iter(
                    [
                        pb2.FrameRequest(options=options, sequence=0, raw=raw),
                        pb2.FrameRequest(sequence=1, encoded=b"\xff\xd8 not a jpeg"),
                        pb2.FrameRequest(sequence=2, raw=short),
                        pb2.FrameRequest(sequence=3, raw=raw),
                    ]
                ),
                timeout=30,
            )
        )
        assert [r.sequence for r in results] == [0, 1, 2, 3]
        assert results[1].error.code == 3 and not results[1].WhichOneof("pixels")
        assert results[2].error.code == 3 and "raw.rgb" in results[2].error.message
        assert results[3].WhichOneof("pixels") == "raw"

    with pytest.raises(FailedPrecondition):
        list(video_client.stream_frames([frame], method="reverse_personalization"))


def test_video_limits_and_metrics_are_reported(video_client, video_server):
    limits = video_client.server_info().limits
    assert limits.max_video_bytes == MAX_VIDEO_BYTES and limits.max_frame_window == WINDOW_LIMIT
    from api_support import http_get

    status, body = http_get(video_server.metrics_port, "/metrics")
    assert status == 200
    for name in (
        "masquerade_video_frames_total",
        "masquerade_frame_latency_seconds_bucket",
        "masquerade_active_video_streams",
        "masquerade_video_spool_bytes",
    ):
        assert name in body, name


def test_stream_slots_are_bounded(video_server, scene):
    """More video calls than --max-video-streams: the extra one is RESOURCE_EXHAUSTED, not queued."""
    release = threading.Event()
    raw = pb2.RawFrame(rgb=scene.frame(0).tobytes(), width=scene.width, height=scene.height)
    calls = []

    def holding():
        yield pb2.FrameRequest(options=pb2.FrameStreamOptions(method=pb2.BLUR), sequence=0, raw=raw)
        release.wait(30)

    with grpc.insecure_channel(video_server.address) as channel:
        stub = pb2_grpc.AnonymizerStub(channel)
        try:
            for _ in range(8):
                call = stub.AnonymizeFrames(holding(), timeout=30)
                next(call)  # its slot is taken once it answers
                calls.append(call)
            with pytest.raises(grpc.RpcError) as raised:
                list(stub.AnonymizeFrames(holding(), timeout=30))
            assert raised.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        finally:
            release.set()
            for call in calls:
                call.cancel()


def test_a_drain_ends_live_streams_with_unavailable(spool_root, scene):
    """A live stream has no end of its own: when the server drains it ends the stream (UNAVAILABLE,
    which clients retry elsewhere) after answering the frames it took in."""
    engine_config = EngineConfig(models="tiny", device="cpu")
    config = dataclasses.replace(
        loopback_config(engine_config, drain_seconds=5.0), video=VideoConfig(spool_dir=str(spool_root))
    )
    running = BackgroundServer(config, Engine(engine_config, None, "test: no diffusion weights")).start()
    raw = pb2.RawFrame(rgb=scene.frame(0).tobytes(), width=scene.width, height=scene.height)
    go_on = threading.Event()

    def frames():
        yield pb2.FrameRequest(options=pb2.FrameStreamOptions(method=pb2.BLUR, window=1), sequence=0, raw=raw)
        go_on.wait(10)
        for sequence in range(1, 50):
            yield pb2.FrameRequest(sequence=sequence, raw=raw)
            time.sleep(0.05)

    try:
        with grpc.insecure_channel(running.address) as channel:
            call = pb2_grpc.AnonymizerStub(channel).AnonymizeFrames(frames(), timeout=30)
            assert next(call).sequence == 0
            running.begin_stop()
            go_on.set()
            with pytest.raises(grpc.RpcError) as raised:
                for _ in call:
                    pass
            assert raised.value.code() is grpc.StatusCode.UNAVAILABLE and "draining" in raised.value.details()
    finally:
        running.stop()


def test_readme_video_block_runs_as_written(video_server, clip, tmp_path):
    from readme_support import code_blocks, section

    (block,) = code_blocks(section("Video over gRPC"), "python")
    assert '"127.0.0.1:50051"' in block
    (tmp_path / "clip.mp4").write_bytes(clip.read_bytes())
    program = block.replace('"127.0.0.1:50051"', repr(video_server.address))
    done = subprocess.run([sys.executable, "-c", program], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("1 tracks, complete:"), done.stdout
    assert len(lines) == 31 and lines[-1].startswith("29 (480, 640, 3) []"), done.stdout
    assert (tmp_path / "clip-anonymized.mp4").stat().st_size > 0


def test_reverse_personalization_on_live_frames_and_a_file_through_the_engine(client, scene, tmp_path):
    """On the tiny models: the stream's faces go through the engine's step batching, one identity per track."""
    frames = [scene.frame(i) for i in range(3)]
    results = list(client.stream_frames(frames, method="reverse_personalization", steps=2, window=3))
    assert [r.sequence for r in results] == [0, 1, 2]
    for index, (frame, result) in enumerate(zip(frames, results)):
        assert result.error is None and len(result.faces) == 1, result
        face = result.faces[0]
        assert face.method_applied == pb2.REVERSE_PERSONALIZATION and face.status == pb2.ANONYMIZED, face
        assert region_changed(frame, result.image, scene.box(index)), f"frame {index}: the face is not covered"
    assert len({r.faces[0].track_id for r in results}) == 1

    short = write_clip(tmp_path / "short.mp4", Scene(frames=4))
    result = client.anonymize_video(short, method="reverse_personalization", steps=2, detect_every=2)
    assert result.summary.frames == 4
    (track,) = result.tracks
    assert track.method_applied == pb2.REVERSE_PERSONALIZATION and track.status == pb2.ANONYMIZED
    assert result.report["tracks"][0]["seed"] is not None


def test_live_720p_frames_are_detected_on_the_bounded_copy(video_client):
    """--live-detect-max-side (960 by default) still finds a 110 px face in a 1280x720 frame."""
    wide = Scene(width=1280, height=720, frames=2, face_height=110)
    results = list(video_client.stream_frames([wide.frame(0), wide.frame(1)], method="solid", detect_every=1))
    for index, result in enumerate(results):
        assert [face.detected for face in result.faces] == [True], result.faces
        assert region_changed(wide.frame(index), result.image, wide.box(index))


def test_spool_budget_is_shared_and_returned_and_dead_servers_folders_are_swept(tmp_path):
    from masquerade.api.video_spool import SpoolFullError, VideoSpool
    from masquerade.errors import InvalidRequestError

    stale = tmp_path / "pid999999999-abc"  # no such process
    (stale / "video-1").mkdir(parents=True)
    (stale / "video-1" / "clip.mp4").write_bytes(b"left by a killed server")
    spool = VideoSpool(tmp_path, max_file_bytes=100, max_total_bytes=150)
    assert not stale.exists()

    first, second = spool.entry(), spool.entry()
    first.open_input("a.mp4")
    second.open_input("../../etc/b.mp4")
    assert second.input_path.parent == second.directory  # the client's name never leaves the folder
    first.append(b"x" * 100)
    with pytest.raises(InvalidRequestError):
        first.append(b"x")  # over the per-file limit
    with pytest.raises(SpoolFullError):
        second.append(b"y" * 60)  # 160 > 150 over both calls
    (first.directory / ".a.mp4.partial").write_bytes(b"z" * 60)
    with pytest.raises(SpoolFullError):
        first.charge_output()  # the encoder's partial output counts too
    first.close()
    assert not first.directory.exists() and spool.used_bytes == 0
    second.append(b"y" * 60)
    assert spool.used_bytes == 60
    second.close()
    spool.close()
    assert spool.used_bytes == 0 and not spool.directory.exists()


def test_async_client_video_calls(video_server, clip, scene):
    import asyncio

    from masquerade_client import AsyncAnonymizerClient

    async def camera():
        for index in range(4):
            await asyncio.sleep(0.01)  # frames arrive as a camera delivers them
            yield scene.frame(index)

    async def run():
        async with AsyncAnonymizerClient(video_server.address, timeout=60) as client:
            results = [r async for r in client.stream_frames(camera(), method="blur", window=2)]
            video = await client.anonymize_video(clip, method="pixelate")
        return results, video

    results, video = asyncio.run(run())
    assert [r.sequence for r in results] == [0, 1, 2, 3]
    assert all(region_changed(scene.frame(i), r.image, scene.box(i)) for i, r in enumerate(results))
    assert video.summary.frames == scene.frames and len(video.video) == video.summary.output_bytes
