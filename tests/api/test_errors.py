"""Status codes: bad input names its field, overload, missing models, deadlines and cancels free slots."""

from __future__ import annotations

import time

import pytest
from api_support import MAX_FACES, wait_until

from masquerade.api.protos import pb2
from masquerade.engine.engine import EngineConfig
from masquerade_client import (
    AnonymizerClient,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
    RetryPolicy,
    Unavailable,
    build_request,
)
from server_support import free_port

# A long job for the tiny models: ~1000 UNet calls, so it is surely still running when cancelled.
SLOW = dict(aligned=True, skip=0.0, steps=500)


@pytest.mark.parametrize(
    "case, field_name",
    [
        ("not_an_image", "image"),
        ("empty", "image"),
        ("over_pixel_cap", "image"),
        ("unknown_method", "method"),
        ("unknown_output_format", "output.format"),
        ("steps_0", "params.steps"),
        ("steps_10000", "params.steps"),
        ("skip_1", "params.skip"),
        ("guidance_nan", "params.guidance_scale"),
        ("max_faces_over_limit", "detection.max_faces"),
    ],
)
def test_bad_input_is_invalid_argument_naming_the_field(client, face_png, oversized_png, case, field_name):
    image, options = {
        "not_an_image": (b"GIF? no, just text", {}),
        "empty": (b"", {}),
        "over_pixel_cap": (oversized_png, {"method": "blur"}),
        "unknown_method": (face_png, {"method": 77}),
        "unknown_output_format": (face_png, {"output_format": 12}),
        "steps_0": (face_png, {"steps": 0}),
        "steps_10000": (face_png, {"steps": 10000}),
        "skip_1": (face_png, {"skip": 1.0}),
        "guidance_nan": (face_png, {"guidance_scale": float("nan")}),
        "max_faces_over_limit": (face_png, {"max_faces": MAX_FACES + 1}),
    }[case]
    with pytest.raises(InvalidArgument) as caught:
        client.anonymize(image, **options)
    assert caught.value.details.startswith(field_name), caught.value.details


def test_stream_reports_bad_input_as_status(client):
    with pytest.raises(InvalidArgument, match="image"):
        list(client.anonymize_stream(b"", aligned=True))


def test_reverse_personalization_without_weights_is_failed_precondition(start_server_sharing_models, face_png):
    classical = start_server_sharing_models(EngineConfig(models="default", device="cpu"), models=False)
    with AnonymizerClient(classical.address, timeout=30) as c:
        c.wait_ready(timeout=10)
        info = c.server_info()
        availability = {m.method: m for m in info.methods}
        assert not availability[pb2.REVERSE_PERSONALIZATION].available
        assert availability[pb2.REVERSE_PERSONALIZATION].reason
        assert info.default_method == pb2.BLUR
        with pytest.raises(FailedPrecondition, match="REVERSE_PERSONALIZATION"):
            c.anonymize(face_png, aligned=True, method="reverse_personalization")
        unspecified = c.anonymize(face_png, aligned=True)  # the server's default method
        assert unspecified.faces[0].method_applied == pb2.BLUR


def test_full_queue_is_resource_exhausted(start_server_sharing_models, face_png):
    small = start_server_sharing_models(EngineConfig(models="tiny", device="cpu", max_queue=1, max_batch=4))
    with AnonymizerClient(small.address, timeout=60) as c:
        c.wait_ready(timeout=10)
        holder = c.anonymize_stream(face_png, request_id="holder", **SLOW)
        assert next(holder).WhichOneof("event") == "queued"
        with pytest.raises(ResourceExhausted, match="queue"):
            c.anonymize(face_png, aligned=True, method="blur")
        holder.close()  # cancels the call
        wait_until(lambda: small.engine.queue_depth == 0, what="the cancelled request to leave the queue")
        assert c.anonymize(face_png, aligned=True, method="blur").faces


def _wait_for_running_job(server) -> None:
    wait_until(lambda: server.engine.active_jobs > 0, what="the job to reach the step scheduler")


def test_client_cancel_frees_the_jobs_slots(server, client, face_png):
    stream = client.anonymize_stream(face_png, request_id="to-cancel", **SLOW)
    for event in stream:
        if event.WhichOneof("event") == "progress":
            break
    _wait_for_running_job(server)
    stream.close()
    wait_until(lambda: server.engine.active_jobs == 0 and server.engine.queue_depth == 0, what="slots to be freed")


def test_deadline_is_deadline_exceeded_and_frees_the_jobs_slots(server, client, face_png):
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        client.anonymize(face_png, timeout=1.5, request_id="too-slow", **SLOW)
    assert time.monotonic() - started < 5
    wait_until(lambda: server.engine.active_jobs == 0 and server.engine.queue_depth == 0, what="slots to be freed")


def test_unreachable_server_is_unavailable_after_bounded_retries():
    with AnonymizerClient(f"127.0.0.1:{free_port()}", retry=RetryPolicy(max_attempts=3, initial_backoff_s=0.01)) as c:
        started = time.monotonic()
        with pytest.raises(Unavailable):
            c.server_info(timeout=5)
        with pytest.raises(Unavailable, match="not SERVING"):
            c.wait_ready(timeout=0.3)
        assert time.monotonic() - started < 5


def test_cancelled_batch_stream_frees_every_jobs_slots(server, client, face_png):
    requests = [build_request(face_png, request_id=f"slow-{i}", **SLOW) for i in range(2)]
    responses = client.anonymize_batch(requests)
    wait_until(lambda: server.engine.active_jobs == 2, what="both jobs to reach the step scheduler")
    responses.close()  # cancels the whole stream
    wait_until(lambda: server.engine.active_jobs == 0 and server.engine.queue_depth == 0, what="slots to be freed")


def test_stream_deadline_frees_the_jobs_slots(server, client, face_png):
    with pytest.raises(DeadlineExceeded):
        for _ in client.anonymize_stream(face_png, timeout=1.0, **SLOW):
            pass
    wait_until(lambda: server.engine.active_jobs == 0 and server.engine.queue_depth == 0, what="slots to be freed")
