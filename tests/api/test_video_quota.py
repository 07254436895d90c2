"""Video against the per-client requests-per-second quota (api/quota.py): live frames count one
request each, a video file its decoded frames. Through a real server on loopback with the real client;
each test has its own token, so its own bucket."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from video_rpc_support import Scene, write_clip

from masquerade.api.quota import ClientPolicy, QuotaBook
from masquerade.engine.engine import Engine, EngineConfig
from masquerade.errors import QuotaExceededError
from masquerade_client import AnonymizerClient, RetryPolicy
from masquerade_client.errors import ResourceExhausted
from server_support import BackgroundServer, loopback_config, secured, write_token_file

RATE = 0.2  # one request per 5 s: no test here runs long enough to earn one back by accident
BURST = 2
CLIP_FRAMES = 12
NO_RETRY = RetryPolicy(retry_info_attempts=1)


def test_charge_goes_below_zero_and_the_debt_is_not_forgotten():
    now = [0.0]
    book = QuotaBook(clock=lambda: now[0])
    policy = ClientPolicy(requests_per_second=2.0, burst=2)
    book.admit("a", policy)
    book.charge("a", policy, 9)  # 1 left, 9 charged: 8 owed
    with pytest.raises(QuotaExceededError) as refused:
        book.admit("a", policy)
    assert refused.value.retry_after_s == pytest.approx(4.5)  # (1 + 8) / 2
    now[0] += 120.0  # idle for two minutes: paid back and forgotten, never forgiven while owing
    book._forget_idle(now[0])
    book.admit("a", policy)
    book.charge("b", ClientPolicy(), 100)  # no rate: nothing to charge


@pytest.fixture(scope="module")
def quota_server(tmp_path_factory):
    """Classical methods only; every token gets RATE requests per second, BURST deep."""
    folder = tmp_path_factory.mktemp("video-quota")
    token_file = write_token_file(folder, ["live-token", "file-token"])
    engine_config = EngineConfig(models="tiny", device="cpu")
    config = dataclasses.replace(
        secured(loopback_config(engine_config), None, token_file=token_file),
        quotas=ClientPolicy(requests_per_second=RATE, burst=BURST),
    )
    server = BackgroundServer(config, Engine(engine_config, None, "test: classical methods only")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return write_clip(tmp_path_factory.mktemp("clips") / "walk.mp4", Scene(frames=CLIP_FRAMES), audio=False)


def test_live_frames_count_one_request_each_and_the_stream_ends_with_retry_info(quota_server):
    scene = Scene(frames=5)
    answered = []
    with (
        AnonymizerClient(quota_server.address, token="live-token", timeout=60, retry=NO_RETRY) as client,
        pytest.raises(ResourceExhausted) as refused,
    ):
        for frame in client.stream_frames((scene.frame(i) for i in range(5)), method="blur", window=4):
            answered.append(frame.sequence)
    # The stream's admission paid for frame 0, the bucket's second request for frame 1; frame 2 was over.
    assert answered == [0, 1]
    assert "requests per second" in str(refused.value)
    assert refused.value.retry_delay is not None and 0 < refused.value.retry_delay <= 1 / RATE


def test_a_video_file_counts_its_decoded_frames(quota_server, clip):
    with AnonymizerClient(quota_server.address, token="file-token", timeout=120, retry=NO_RETRY) as client:
        result = client.anonymize_video(clip, method="blur")
        assert result.summary.frames == CLIP_FRAMES
        # Admitted as one request; the 11 frames after the first were charged as they were decoded, so the
        # next call waits for about 11 requests' worth of refill, not the 1 / RATE an image would leave.
        with pytest.raises(ResourceExhausted) as refused:
            client.anonymize_video(clip, method="blur")
    delay = refused.value.retry_delay
    assert delay is not None and 2 / RATE < delay <= CLIP_FRAMES / RATE, delay
