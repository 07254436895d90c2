"""Priorities, per-client quotas and honest admission, end to end on a real server with the tiny models.

Tokens carry the settings (one token file line each, as operators write them): a bulk-only
pipeline token, an interactive product token, a token with a requests-per-second quota and one
with a faces-in-flight quota.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from api_support import wait_until
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from masquerade import metrics
from masquerade.engine.engine import EngineConfig
from masquerade.engine.job_state import Priority
from masquerade_client import AnonymizerClient, AsyncAnonymizerClient, RetryPolicy, build_request, pb2, pb2_grpc
from masquerade_client.errors import DeadlineExceeded, ResourceExhausted
from sample_images import t1_image_path
from server_support import secured

TOKEN_LINES = [
    "pipeline-token name=pipeline priority=bulk max-priority=bulk",
    "product-token name=product priority=interactive",
    "limited-token name=limited rps=1 burst=1",
    "faces-token name=one-face faces=1",
    "plain-token",  # a bare token line, as before: the server's defaults
]


@pytest.fixture
def priority_server(start_server_sharing_models, tiny_engine_config, tmp_path):
    token_file = tmp_path / "tokens.txt"
    token_file.write_text("\n".join(TOKEN_LINES) + "\n")
    # Two CFG pairs per call, so a backlog of bulk faces fills every call.
    engine_config = EngineConfig(**{**tiny_engine_config.__dict__, "max_batch": 4, "max_queue": 32})
    return start_server_sharing_models(engine_config, configure=lambda config: secured(config, token_file=token_file))


def _metadata(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def test_an_interactive_request_overtakes_a_bulk_backlog(priority_server, face_png):
    finished: dict[str, float] = {}
    priorities: dict[str, int] = {}

    async def run() -> None:
        # One client for both kinds of work: only the priority tells them apart.
        async with AsyncAnonymizerClient(priority_server.address, token="plain-token", timeout=300) as client:

            async def one(name: str, priority: str) -> None:
                response = await client.anonymize(face_png, aligned=True, steps=12, request_id=name, priority=priority)
                finished[name] = time.monotonic()
                priorities[name] = response.priority

            backlog = [asyncio.create_task(one(f"bulk-{i}", "bulk")) for i in range(6)]
            await asyncio.to_thread(
                wait_until, lambda: priority_server.engine.active_jobs >= 4, 60, "the bulk backlog diffusing"
            )
            await one("interactive", "interactive")
            await asyncio.gather(*backlog)

    asyncio.run(run())
    bulk_done = sorted(finished[f"bulk-{i}"] for i in range(6))
    # Admitted last, finished before most of the backlog admitted before it (oldest-first would finish it last).
    assert finished["interactive"] < bulk_done[3], (finished["interactive"], bulk_done)
    assert priorities["interactive"] == pb2.PRIORITY_INTERACTIVE
    assert {priorities[f"bulk-{i}"] for i in range(6)} == {pb2.PRIORITY_BULK}


def test_a_token_s_default_and_ceiling_decide_the_priority_and_the_response_says_which(priority_server, face_png):
    def ran_at(token: str, **options) -> int:
        with AnonymizerClient(priority_server.address, token=token, timeout=60) as client:
            return client.anonymize(face_png, aligned=True, method="blur", **options).priority

    assert ran_at("pipeline-token") == pb2.PRIORITY_BULK  # its default
    assert ran_at("pipeline-token", priority="interactive") == pb2.PRIORITY_BULK  # capped by its ceiling
    assert ran_at("product-token") == pb2.PRIORITY_INTERACTIVE
    assert ran_at("product-token", priority="bulk") == pb2.PRIORITY_BULK  # asking for less is always allowed
    assert ran_at("plain-token") == pb2.PRIORITY_INTERACTIVE  # the server's default (--default-priority)


def test_over_quota_is_resource_exhausted_with_retry_info_and_the_client_waits_for_it(priority_server, face_png):
    request = build_request(face_png, aligned=True, method="blur")
    refusals_before = metrics.QUOTA_REFUSALS.labels(client="limited")._value.get()
    with grpc.insecure_channel(priority_server.address) as channel:
        stub = pb2_grpc.AnonymizerStub(channel)
        stub.Anonymize(request, metadata=_metadata("limited-token"), timeout=60)  # the bucket's one request
        with pytest.raises(grpc.RpcError) as refused:
            stub.Anonymize(request, metadata=_metadata("limited-token"), timeout=60)
        assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "quota of 1 requests per second" in refused.value.details()
        status = rpc_status.from_call(refused.value)
        retry_info = error_details_pb2.RetryInfo()
        assert status.details[0].Unpack(retry_info)
        delay = retry_info.retry_delay.ToNanoseconds() / 1e9
        assert 0 < delay <= 1.0  # when the bucket holds a request again: 1 s after the first, less its time
        stub.Anonymize(request, metadata=_metadata("plain-token"), timeout=60)  # other clients are not affected
    assert metrics.QUOTA_REFUSALS.labels(client="limited")._value.get() == refusals_before + 1

    # The Python client waits the server's delay and sends again: both calls succeed, >= 1 s apart.
    with AnonymizerClient(priority_server.address, token="limited-token", timeout=60) as client:
        time.sleep(1.0)  # a full bucket again
        started = time.monotonic()
        client.anonymize_request(request)
        assert client.anonymize_request(request).faces
        assert time.monotonic() - started >= 0.95  # the second was admitted a second after the first
    # Told not to retry, it raises at once with the advice.
    no_retry = RetryPolicy(retry_info_attempts=1)
    with AnonymizerClient(priority_server.address, token="limited-token", timeout=60, retry=no_retry) as client:
        time.sleep(1.0)
        client.anonymize_request(request)
        with pytest.raises(ResourceExhausted) as error:
            client.anonymize_request(request)
        assert error.value.retry_delay is not None and 0 < error.value.retry_delay <= 1.0


def test_a_client_at_its_faces_quota_is_refused_until_its_face_is_answered(priority_server, face_png):
    with AnonymizerClient(priority_server.address, token="faces-token", timeout=120) as client:
        events = client.anonymize_stream(face_png, aligned=True, steps=60)
        kinds = []
        for event in events:  # wait until its one face is detected and counted
            kinds.append(event.WhichOneof("event"))
            if kinds[-1] == "faces_found":
                break
        no_retry = RetryPolicy(retry_info_attempts=1)
        with AnonymizerClient(priority_server.address, token="faces-token", timeout=60, retry=no_retry) as second:
            with pytest.raises(ResourceExhausted, match="1 faces in flight") as refused:
                second.anonymize(face_png, aligned=True, method="blur")
            assert refused.value.retry_delay is not None and refused.value.retry_delay > 0
        assert [event.WhichOneof("event") for event in events][-1] == "result"
        client.anonymize(face_png, aligned=True, method="blur")  # answered: the quota is free again


def test_a_request_that_cannot_meet_its_deadline_is_refused_at_once(priority_server, face_png):
    async def run() -> tuple[float, float]:
        async with AsyncAnonymizerClient(priority_server.address, token="plain-token", timeout=300) as client:
            await client.anonymize(face_png, aligned=True, steps=4)  # the engine measures its step times
            backlog = [
                asyncio.create_task(client.anonymize(face_png, aligned=True, steps=40, priority="bulk"))
                for _ in range(6)
            ]
            await asyncio.to_thread(
                wait_until, lambda: priority_server.engine.active_jobs >= 4, 60, "the bulk backlog diffusing"
            )
            info = await client.server_info()
            waits = {wait.priority: wait.seconds for wait in info.estimated_waits}
            started = time.monotonic()
            with pytest.raises(DeadlineExceeded, match="refused at once"):
                await client.anonymize(face_png, aligned=True, steps=40, priority="bulk", timeout=0.5)
            refused_after = time.monotonic() - started
            # Interactive work goes ahead of the backlog: a deadline it can meet is accepted and met.
            response = await client.anonymize(face_png, aligned=True, steps=4, priority="interactive", timeout=60)
            assert response.priority == pb2.PRIORITY_INTERACTIVE
            await asyncio.gather(*backlog)
            return refused_after, waits

    refused_after, waits = asyncio.run(run())
    assert refused_after < 0.4  # an answer, not the deadline running out
    assert waits[pb2.PRIORITY_BULK] > waits[pb2.PRIORITY_INTERACTIVE] > 0


def _group_photo() -> bytes:
    """insightface's t1.jpg (six people), downscaled under this test server's 1 Mpx limit."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    with Image.open(t1_image_path()) as image:
        image.convert("RGB").resize((image.width * 3 // 4, image.height * 3 // 4)).save(buffer, "JPEG", quality=92)
    return buffer.getvalue()


def test_a_request_whose_detected_faces_cannot_meet_its_deadline_is_refused_after_detection(priority_server, face_png):
    """At arrival a photo counts as one face; once detection has found several, admission checks again with
    their count and refuses before any diffusion step of theirs."""
    engine = priority_server.engine
    with AnonymizerClient(priority_server.address, token="product-token", timeout=300) as client:
        client.anonymize(face_png, aligned=True, steps=4)  # the engine measures its step times
        photo = _group_photo()
        faces = len(client.anonymize(photo, method="blur").faces)
        assert faces >= 4
        one = engine.estimate_seconds(Priority.INTERACTIVE, steps=10, generative=True)
        many = engine.estimate_seconds(Priority.INTERACTIVE, steps=10, generative=True, faces=faces, preprocessed=True)
        assert many > 2.5 * one  # two CFG pairs a call: their rows take calls of their own
        deadline = (one * many) ** 0.5  # well past one face's estimate, well short of theirs
        steps_before = dict(engine.scheduler.rows_served)
        with pytest.raises(DeadlineExceeded, match=r"refused after detection: its \d+ faces"):
            client.anonymize(photo, steps=10, timeout=deadline)
        assert engine.scheduler.rows_served == steps_before, "no diffusion step was spent on it"
