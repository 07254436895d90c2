"""A live stream keeps one track id per face whatever clock its client stamps frames with.

Regression: a first frame stamped 0.0 (a client counting from 0) was read as "no timestamp" and given
the server's monotonic clock, so the next frame went back by hours and every later detection started
a new track (ids 0, 1, 2, 3 for one face, held boxes piling up)."""

from __future__ import annotations

import dataclasses

import grpc
import numpy as np
import pytest

from masquerade.api.video_service import StreamClock
from masquerade.engine.engine import Engine, EngineConfig
from masquerade.video.synthetic import ClipSpec, MovingFace, make_clip
from masquerade_client import pb2, pb2_grpc
from server_support import BackgroundServer, loopback_config

FRAMES = 8


def test_the_stream_clock_keeps_one_timeline():
    clock = StreamClock()
    assert clock(0.0) == 0.0  # a client counting from 0, or one sending no stamps: the stream's start
    assert clock(1 / 12) == pytest.approx(1 / 12)  # the client's stamps from then on
    assert clock(0.0) == pytest.approx(1 / 12 + 1 / StreamClock.NOMINAL_FPS)  # unstamped: one nominal frame later
    unstamped = StreamClock()
    # However late or bunched the frames are read, unstamped frames keep an even spacing.
    assert [unstamped(0.0) for _ in range(4)] == pytest.approx([i / StreamClock.NOMINAL_FPS for i in range(4)])


@pytest.fixture(scope="module")
def server():
    engine_config = EngineConfig(models="tiny", device="cpu")
    config = dataclasses.replace(loopback_config(engine_config))
    running = BackgroundServer(config, Engine(engine_config, None, "test: classical methods only")).start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def frames(tmp_path_factory) -> list[np.ndarray]:
    import av

    path = tmp_path_factory.mktemp("live-ids") / "walk.mp4"
    make_clip(
        path, ClipSpec(frames=FRAMES, fps=12, faces=(MovingFace(source=0, size=120, start=(20, 40), velocity=(6, 0)),))
    )
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


@pytest.mark.parametrize("first_stamp", [0.0, 1000.0, None], ids=["from-zero", "epoch-like", "unstamped"])
def test_a_moving_face_keeps_one_track_id(server, frames, first_stamp):
    options = pb2.FrameStreamOptions(method=pb2.BLUR, window=2)
    options.tracking.detect_every = 2

    def requests():
        for index, rgb in enumerate(frames):
            message = pb2.FrameRequest(sequence=index, raw=pb2.RawFrame(rgb=rgb.tobytes()))
            message.raw.width, message.raw.height = rgb.shape[1], rgb.shape[0]
            if first_stamp is not None:
                message.timestamp = first_stamp + index / 12
            if index == 0:
                message.options.CopyFrom(options)
            yield message

    with grpc.insecure_channel(server.address) as channel:
        results = list(pb2_grpc.AnonymizerStub(channel).AnonymizeFrames(requests(), timeout=120))
    assert [r.sequence for r in results] == list(range(FRAMES))
    ids = [[face.track_id for face in r.faces] for r in results]
    assert ids == [[0]] * FRAMES, ids  # one face, one id, no stale held boxes beside it
    held = [r.faces[0].box.x0 for r in results if not r.detector_ran]
    assert held == sorted(held) and held[0] < held[-1], held  # held boxes move with the face
