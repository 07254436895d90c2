"""The live path's per-server costs, through a real server on loopback: warmed before the first stream,
and no heap trim per frame (api/video_service.py)."""

from __future__ import annotations

import dataclasses
import time

import pytest
from video_rpc_support import Scene

from masquerade.api.video_service import VideoConfig
from masquerade.engine.engine import Engine, EngineConfig
from masquerade.face import detect
from masquerade_client import AnonymizerClient
from server_support import BackgroundServer, loopback_config


def _server(warm_live: bool) -> BackgroundServer:
    engine_config = EngineConfig(models="tiny", device="cpu", max_queue=8)
    config = dataclasses.replace(loopback_config(engine_config), video=VideoConfig(warm_live=warm_live))
    return BackgroundServer(config, Engine(engine_config, None, "test: no diffusion weights")).start()


def _predictor_loaded_per_thread(engine: Engine) -> list[bool]:
    futures = engine.on_every_pixel_thread(lambda: getattr(detect._thread_models, "shape_predictor", None) is not None)
    return [future.result(timeout=60) for future in futures]


@pytest.fixture(scope="module")
def warmed_server():
    server = _server(warm_live=True)
    yield server
    server.stop()


def test_a_warmed_server_loads_the_landmark_predictor_on_every_pixel_thread_before_any_stream(warmed_server):
    threads = warmed_server.engine.config.preprocess_threads + warmed_server.engine.config.interactive_threads
    deadline = time.monotonic() + 60
    while not all(loaded := _predictor_loaded_per_thread(warmed_server.engine)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert loaded == [True] * threads

    cold = _server(warm_live=False)  # the library default: nothing is loaded until a stream needs it
    try:
        assert _predictor_loaded_per_thread(cold.engine) == [False] * threads
    finally:
        cold.stop()


def test_live_frames_ask_for_no_heap_trim_and_the_stream_end_asks_for_one(warmed_server):
    memory = warmed_server.engine._memory
    asked: list[float] = []
    real = memory.request_trim
    memory.request_trim = lambda: (asked.append(time.monotonic()), real())[1]
    try:
        scene = Scene(frames=9)
        with AnonymizerClient(warmed_server.address, timeout=60) as client:
            results = list(client.stream_frames([scene.frame(i) for i in range(9)], method="blur", window=3))
            got_last = time.monotonic()
        assert [r.sequence for r in results] == list(range(9)) and all(r.faces for r in results)
        deadline = time.monotonic() + 10
        while not asked and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(asked) == 1, "one trim, when the stream ended"
        assert asked[0] >= got_last - 0.5  # not during the stream's frames (the last result left before it)
    finally:
        memory.request_trim = real
