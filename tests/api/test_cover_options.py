"""ClassicalParams.shape and .mosaic_size over gRPC and HTTP: honoured, unset = as before, bad values named."""

from __future__ import annotations

import io
from dataclasses import replace

import grpc
import numpy as np
import pytest
import requests
from PIL import Image

from masquerade.engine.engine import EngineConfig
from masquerade_client import InvalidArgument, build_request, pb2
from masquerade_client.video import video_start
from sample_images import t1_image_path


@pytest.fixture(scope="module")
def one_face() -> bytes:
    """The top-left 400x400 of t1.jpg: real faces, cheap to detect."""
    buffer = io.BytesIO()
    Image.open(t1_image_path()).convert("RGB").crop((0, 0, 400, 400)).save(buffer, "PNG")
    return buffer.getvalue()


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(np.int16)


def changed(before: bytes, after: bytes) -> np.ndarray:
    return np.abs(pixels(after) - pixels(before)).max(axis=2) > 0


def face_square(response: pb2.AnonymizeResponse) -> tuple[slice, slice]:
    """The middle half of the largest face's box (inside any cover shape)."""
    box = max((face.box for face in response.faces), key=lambda b: (b.x1 - b.x0) * (b.y1 - b.y0))
    w, h = box.x1 - box.x0, box.y1 - box.y0
    return slice(int(box.y0 + h / 4), int(box.y1 - h / 4)), slice(int(box.x0 + w / 4), int(box.x1 - w / 4))


def test_box_covers_the_ellipse_and_more_and_unset_is_the_ellipse(client, one_face):
    answers = {
        shape: client.anonymize(one_face, method="blur", shape=shape, output_format="png")
        for shape in (None, "ellipse", "box")
    }
    assert answers[None].image == answers["ellipse"].image  # unset: exactly today's covers
    ellipse, box = changed(one_face, answers["ellipse"].image), changed(one_face, answers["box"].image)
    assert ellipse.sum() > 500
    assert (ellipse & ~box).sum() <= 0.01 * ellipse.sum()  # the box holds the ellipse
    assert box.sum() > 1.15 * ellipse.sum()  # and its corners (a rectangle is 4/pi of its ellipse)


def test_mosaic_size_sets_the_squares_side(client, one_face):
    def colours(size):
        response = client.anonymize(one_face, method="pixelate", mosaic_size=size, output_format="png")
        assert {face.method_applied for face in response.faces} == {pb2.PIXELATE}
        rows, cols = face_square(response)
        patch = pixels(response.image)[rows, cols].reshape(-1, 3)
        return len(np.unique(patch, axis=0)), response.image

    fine, fine_image = colours(8)
    coarse, _ = colours(24)
    assert fine > 4 * coarse, (fine, coarse)  # (24 / 8)^2 = 9 times the squares
    assert client.anonymize(one_face, method="pixelate", output_format="png").image != fine_image


def test_a_mosaic_too_fine_to_hide_the_face_is_caught_by_the_self_check(client, one_face):
    response = client.anonymize(one_face, method="pixelate", mosaic_size=2)
    assert response.faces and all(face.status == pb2.FALLBACK for face in response.faces)
    assert all(face.method_applied != pb2.PIXELATE for face in response.faces)
    assert all("still recognisable after pixelate" in face.reason for face in response.faces)


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"method": "blur", "mosaic_size": 8}, "classical.mosaic_size"),  # pixelate only
        ({"method": "pixelate", "mosaic_size": 1}, "classical.mosaic_size"),
        ({"method": "pixelate", "mosaic_size": 5000}, "classical.mosaic_size"),
        ({"method": "blur", "shape": 7}, "classical.shape"),
    ],
)
def test_bad_cover_options_are_invalid_argument_naming_the_field(client, one_face, options, field):
    with pytest.raises(InvalidArgument) as error:
        client.anonymize(one_face, **options)
    assert field in str(error.value)


def test_video_calls_refuse_cover_options_they_cannot_honour_yet(server):
    start = video_start(method="blur", filename="clip.mp4", size_bytes=10)
    start.classical.shape = pb2.COVER_SHAPE_BOX
    with grpc.insecure_channel(server.address) as channel:
        stub = pb2_grpc_stub(channel)
        with pytest.raises(grpc.RpcError) as error:
            list(stub.AnonymizeVideo(iter([pb2.AnonymizeVideoRequest(start=start)]), timeout=60))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "classical.shape" in error.value.details()


def pb2_grpc_stub(channel):
    from masquerade_client.v1 import anonymizer_pb2_grpc

    return anonymizer_pb2_grpc.AnonymizerStub(channel)


def test_http_query_fields_are_the_grpc_fields(server, start_server_sharing_models, one_face):
    engine_config = EngineConfig(models="tiny", device="cpu", max_batch=8, max_queue=32)
    running = start_server_sharing_models(engine_config, configure=lambda config: replace(config, http_port=0))
    url = f"http://127.0.0.1:{running._state.http_port}/v1/anonymize"

    def post(query: str) -> requests.Response:
        return requests.post(
            f"{url}?{query}", data=one_face, headers={"Content-Type": "image/png", "Accept": "image/png"}, timeout=120
        )

    for query, options in (
        ("method=BLUR&classical.shape=COVER_SHAPE_BOX", {"method": "blur", "shape": "box"}),
        ("method=PIXELATE&classical.mosaic_size=12", {"method": "pixelate", "mosaic_size": 12}),
    ):
        reply = post(f"{query}&output.format=PNG")
        assert reply.status_code == 200, reply.text[:300]
        expected = running_client_result(running, one_face, options)
        assert pixels(reply.content).tolist() == pixels(expected).tolist(), query
    reply = post("method=BLUR&classical.mosaic_size=12")
    assert reply.status_code == 400 and reply.headers["content-type"] == "application/problem+json"
    assert reply.json()["field"] == "classical.mosaic_size"
    assert "PIXELATE only" in reply.json()["detail"]


def running_client_result(running, image: bytes, options: dict) -> bytes:
    from masquerade_client import AnonymizerClient

    with AnonymizerClient(running.address, timeout=120) as client:
        return client.anonymize_request(build_request(image, output_format="png", **options)).image
