"""The four RPCs end to end: real server, real engine on tiny models, the Python clients."""

from __future__ import annotations

import asyncio
import subprocess
import sys

from masquerade.api.protos import pb2
from masquerade_client import AsyncAnonymizerClient, build_request
from masquerade_client.errors import InvalidArgument, error_for_code_number


def test_anonymize_returns_the_image_and_one_record_per_face(client, face_png):
    response = client.anonymize(face_png, aligned=True, steps=3, request_id="unary-1", output_format="png")
    assert response.request_id == "unary-1"
    assert response.format == pb2.PNG and response.image.startswith(b"\x89PNG")
    assert (response.width, response.height) == (48, 48)
    assert len(response.faces) == 1 and response.complete and not response.no_faces
    face = response.faces[0]
    assert face.method_applied == pb2.REVERSE_PERSONALIZATION and face.status == pb2.ANONYMIZED
    assert response.timings.total_seconds > 0
    assert response.model_versions


def test_anonymize_classical_method(client, face_png):
    response = client.anonymize(face_png, aligned=True, method="pixelate")
    assert response.faces[0].method_applied == pb2.PIXELATE


def test_stream_sends_queued_faces_progress_then_one_result(client, face_png):
    events = list(client.anonymize_stream(face_png, aligned=True, steps=6, request_id="stream-1"))
    kinds = [event.WhichOneof("event") for event in events]
    assert kinds[0] == "queued" and kinds[1] == "faces_found" and kinds[-1] == "result"
    assert kinds.count("result") == 1 and "progress" in kinds
    assert all(event.request_id == "stream-1" for event in events)
    progress = [event.progress for event in events if event.HasField("progress")]
    last = progress[-1]
    assert last.phase == pb2.GENERATION and last.step == last.total == 6  # the last step is never dropped


def test_batch_answers_every_request_id_and_a_bad_one_does_not_end_the_stream(client, face_png):
    requests = [build_request(face_png, aligned=True, steps=3, request_id=f"rp-{i}") for i in range(3)]
    requests.append(build_request(face_png, aligned=True, method="blur", request_id="blur-0"))
    requests.append(build_request(b"not an image", aligned=True, method="blur", request_id="bad-0"))
    requests.append(build_request(face_png, aligned=True, steps=0, request_id="bad-steps"))
    responses = {r.request_id: r for r in client.anonymize_batch(requests)}
    assert set(responses) == {r.request_id for r in requests}
    for request_id in ("rp-0", "rp-1", "rp-2", "blur-0"):
        assert responses[request_id].WhichOneof("outcome") == "result"
        assert responses[request_id].result.request_id == request_id
    for request_id, field_name in (("bad-0", "image"), ("bad-steps", "params.steps")):
        error = responses[request_id].error
        assert isinstance(error_for_code_number(error.code, error.message), InvalidArgument)
        assert error.message.startswith(field_name)


def test_batch_requires_request_ids(client, face_png):
    responses = list(client.anonymize_batch([build_request(face_png, aligned=True, method="blur")]))
    assert len(responses) == 1 and "request_id" in responses[0].error.message


def test_server_info_reports_methods_limits_and_defaults(client, tiny_engine_config):
    info = client.server_info()
    assert {m.method: m.available for m in info.methods}[pb2.REVERSE_PERSONALIZATION]
    assert info.default_method == pb2.REVERSE_PERSONALIZATION
    assert info.limits.max_receive_message_bytes == 64 * 1024 * 1024
    assert info.limits.max_image_pixels == tiny_engine_config.max_image_pixels
    assert info.limits.max_batch == 16 and info.limits.max_steps == 1000
    assert info.defaults.steps == 100 and abs(info.defaults.skip - 0.7) < 1e-6
    assert info.models and info.device == "cpu"


def test_async_client_unary_and_stream(server, face_png):
    async def run():
        async with AsyncAnonymizerClient(server.address, timeout=60) as aclient:
            await aclient.wait_ready(timeout=10)
            response = await aclient.anonymize(face_png, aligned=True, method="solid", request_id="async-1")
            kinds = [e.WhichOneof("event") async for e in aclient.anonymize_stream(face_png, aligned=True, steps=2)]
            batch = [build_request(face_png, aligned=True, method="blur", request_id=f"ab-{i}") for i in range(3)]
            answered = {r.request_id async for r in aclient.anonymize_batch(batch)}
            return response, kinds, answered

    response, kinds, answered = asyncio.run(run())
    assert answered == {"ab-0", "ab-1", "ab-2"}
    assert response.request_id == "async-1" and response.faces[0].method_applied == pb2.SOLID
    assert kinds[-1] == "result"


def test_example_cli_streams_and_writes_the_result(server, face_png, tmp_path):
    source, output = tmp_path / "face.png", tmp_path / "out.png"
    source.write_bytes(face_png)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "masquerade_client.example",
            "--server",
            server.address,
            str(source),
            "-o",
            str(output),
            "--aligned",
            "--steps",
            "3",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "generation" in done.stdout and "wrote" in done.stdout
    assert output.read_bytes().startswith(b"\x89PNG")
