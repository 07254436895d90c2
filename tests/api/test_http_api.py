"""The HTTP/JSON API against the real server: same results as gRPC, RFC 9457 errors, SSE, tokens, TLS, OpenAPI.

One server with the HTTP port on, over the session's loaded tiny models (classical methods
run the real CenterFace detector on the real t1.jpg photo).
"""

from __future__ import annotations

import base64
import io
import json
import re
import ssl
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import grpc
import numpy as np
import pytest
import requests
from api_support import wait_until
from PIL import Image

from masquerade.api.http import schema
from masquerade.api.http.app import REPORT_HEADER, REPORT_SIZE_HEADER, decode_report_header
from masquerade.api.protos import pb2
from masquerade.engine.engine import Engine, EngineConfig
from masquerade_client import AnonymizerClient
from sample_images import t1_image_path
from server_support import BackgroundServer, loopback_config, secured, write_token_file

T1_FACES = 6


@pytest.fixture(scope="module")
def http_server(server):
    engine_config = EngineConfig(models="tiny", device="cpu", max_batch=8, max_queue=32)
    engine = Engine(engine_config, server.engine.models, "")
    running = BackgroundServer(replace(loopback_config(engine_config), http_port=0), engine).start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def base_url(http_server) -> str:
    return f"http://127.0.0.1:{http_server._state.http_port}"


@pytest.fixture(scope="module")
def t1_bytes() -> bytes:
    return t1_image_path().read_bytes()


@pytest.fixture(scope="module")
def corner_bytes(t1_bytes) -> bytes:
    """The top-left 400x400 of t1.jpg, one face: cheap enough to send many times."""
    buffer = io.BytesIO()
    Image.open(io.BytesIO(t1_bytes)).crop((0, 0, 400, 400)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def grpc_blur(http_server, t1_bytes) -> pb2.AnonymizeResponse:
    with AnonymizerClient(http_server.address, timeout=120) as client:
        return client.anonymize(t1_bytes, method="blur", request_id="grpc")


def _post(base_url: str, query: str, body: bytes, **headers) -> requests.Response:
    return requests.post(
        f"{base_url}/v1/anonymize{query}", data=body, headers={"Content-Type": "image/jpeg", **headers}, timeout=120
    )


def _assert_problem(reply: requests.Response, status: int, field: str | None, code: str | None = None) -> dict:
    assert reply.status_code == status, reply.text[:500]
    assert reply.headers["content-type"] == "application/problem+json"
    body = reply.json()
    assert body["status"] == status and body["title"] and body["detail"]
    if field is not None:
        assert body.get("field") == field, body
    if code is not None:
        assert body.get("code") == code, body
    return body


def test_json_reply_is_the_grpc_reply(base_url, t1_bytes, grpc_blur):
    reply = _post(base_url, "?method=BLUR&request_id=http", t1_bytes, Accept="application/json")
    assert reply.status_code == 200, reply.text[:500]
    document = reply.json()
    schema.model_for(pb2.AnonymizeResponse.DESCRIPTOR).model_validate(document)  # the documented shape, exactly
    assert document["request_id"] == "http" and len(document["faces"]) == T1_FACES
    assert base64.b64decode(document["image"]) == grpc_blur.image  # blur is deterministic: the same bytes
    boxes = [[face["box"][k] for k in ("x0", "y0", "x1", "y1")] for face in document["faces"]]
    grpc_boxes = [[face.box.x0, face.box.y0, face.box.x1, face.box.y1] for face in grpc_blur.faces]
    assert np.allclose(boxes, grpc_boxes)
    assert {face["status"] for face in document["faces"]} == {"ANONYMIZED"}
    assert {face["method_applied"] for face in document["faces"]} == {"BLUR"}


def test_image_reply_carries_the_report(base_url, t1_bytes, corner_bytes, grpc_blur):
    reply = _post(base_url, "?method=BLUR", t1_bytes, Accept="image/*")
    assert reply.status_code == 200 and reply.headers["content-type"] == "image/jpeg"
    assert reply.content == grpc_blur.image
    # Six faces with landmarks do not fit a header: the reply says how large the JSON report is instead.
    assert REPORT_HEADER not in reply.headers and int(reply.headers[REPORT_SIZE_HEADER]) > 8192 * 3 // 4
    # A corner of the photo (a face or none) does: the report rides along, base64 JSON.
    reply = _post(base_url, "?method=PIXELATE", corner_bytes, Accept="image/png")
    assert reply.status_code == 200 and reply.headers["content-type"] == "image/png", reply.text
    report = decode_report_header(reply.headers[REPORT_HEADER])
    assert "image" not in report and report["format"] == "PNG"


def test_multipart_form_with_params_json(base_url, corner_bytes):
    params = {"method": "PIXELATE", "output": {"format": "PNG"}, "request_id": "form"}
    reply = requests.post(
        f"{base_url}/v1/anonymize",
        files={"image": ("corner.png", corner_bytes, "image/png"), "params": (None, json.dumps(params))},
        timeout=120,
    )
    assert reply.status_code == 200, reply.text[:500]
    document = reply.json()
    assert document["request_id"] == "form" and document["format"] == "PNG"
    assert {face["method_applied"] for face in document["faces"]} == {"PIXELATE"}
    # A query field sets what the params JSON left out.
    reply = requests.post(
        f"{base_url}/v1/anonymize?classical.strength=0.5",
        files={"image": ("corner.png", corner_bytes, "image/png"), "params": (None, json.dumps({"method": "SOLID"}))},
        timeout=120,
    )
    assert reply.status_code == 200 and reply.json()["faces"][0]["method_applied"] == "SOLID"


def test_concurrent_requests_get_the_grpc_result(base_url, http_server, corner_bytes):
    with AnonymizerClient(http_server.address, timeout=120) as client:
        expected = client.anonymize(corner_bytes, method="blur").image

    def one(index: int) -> tuple[int, bytes]:
        reply = _post(base_url, f"?method=BLUR&request_id=c{index}", corner_bytes, Accept="image/png")
        return reply.status_code, reply.content

    with ThreadPoolExecutor(max_workers=12) as pool:
        results = list(pool.map(one, range(12)))
    # A queue of 32 may refuse some with 429 (the expected error under load); every success is the gRPC result.
    assert all(status in (200, 429) for status, _ in results), [s for s, _ in results]
    successes = [body for status, body in results if status == 200]
    assert successes and all(body == expected for body in successes)


def test_errors_are_problem_documents_naming_the_field(base_url, t1_bytes):
    _assert_problem(_post(base_url, "?method=BLUR", b"not an image"), 400, "image", "INVALID_ARGUMENT")
    _assert_problem(_post(base_url, "?params.steps=many", t1_bytes), 400, "params.steps", "INVALID_ARGUMENT")
    _assert_problem(_post(base_url, "?method=SMUDGE", t1_bytes), 400, "method")
    _assert_problem(_post(base_url, "?param.steps=3", t1_bytes), 400, "param.steps")
    _assert_problem(_post(base_url, "?method=BLUR&classical.strength=-1", t1_bytes), 400, "classical.strength")
    _assert_problem(_post(base_url, "", b""), 400, "image")
    reply = requests.post(f"{base_url}/v1/anonymize", data=t1_bytes, headers={"Content-Type": "text/plain"}, timeout=30)
    _assert_problem(reply, 415, "Content-Type")
    bad_params = requests.post(
        f"{base_url}/v1/anonymize",
        files={"image": ("t1.jpg", t1_bytes, "image/jpeg"), "params": (None, '{"methd": "BLUR"}')},
        timeout=30,
    )
    assert "methd" in _assert_problem(bad_params, 400, "params")["detail"]
    _assert_problem(requests.get(f"{base_url}/v1/nothing", timeout=30), 404, None)


def test_body_limit_is_applied_before_the_body_is_read(base_url):
    limit = 64 * 1024 * 1024
    # Declared too large: answered from the headers (the client never sent a byte of it).
    with socket_to(base_url) as sock:
        sock.sendall(
            f"POST /v1/anonymize HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: {limit + 1}\r\n"
            "Expect: 100-continue\r\n\r\n".encode()
        )
        head = sock.recv(65536)
        assert head.startswith(b"HTTP/1.1 413") and b"application/problem+json" in head

    # Chunked with no length: counted as it arrives, refused once past the limit.
    def chunks():
        for _ in range(limit // (1 << 20) + 2):
            yield b"\0" * (1 << 20)

    reply = requests.post(f"{base_url}/v1/anonymize", data=chunks(), headers={"Content-Type": "image/png"}, timeout=60)
    _assert_problem(reply, 413, "body")


def socket_to(base_url: str):
    import socket

    host, port = base_url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def test_stream_sends_anonymize_stream_events(base_url, http_server, face_png):
    with AnonymizerClient(http_server.address, timeout=120) as client:
        grpc_events = list(
            client.anonymize_stream(face_png, method="reverse_personalization", aligned=True, steps=4, skip=0.0, seed=7)
        )
    reply = requests.post(
        f"{base_url}/v1/anonymize:stream?method=REVERSE_PERSONALIZATION&detection.aligned=true"
        "&params.steps=4&params.skip=0&params.seed=7&request_id=sse",
        data=face_png,
        headers={"Content-Type": "image/png"},
        stream=True,
        timeout=120,
    )
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/event-stream")
    events = []
    name = None
    for line in reply.iter_lines(decode_unicode=True):
        if line.startswith("event: "):
            name = line.removeprefix("event: ")
        elif line.startswith("data: "):
            events.append((name, json.loads(line.removeprefix("data: "))))
    names = [name for name, _ in events]
    assert names[0] == "queued" and names[-1] == "result" and "progress" in names, names
    assert [name for name in names if name != "progress"] == [
        e.WhichOneof("event") for e in grpc_events if e.WhichOneof("event") != "progress"
    ]
    event_model = schema.model_for(pb2.AnonymizeEvent.DESCRIPTOR)
    for name, data in events:
        event_model.model_validate(data)
        assert data["request_id"] == "sse" and name in data
    result = events[-1][1]["result"]
    assert base64.b64decode(result["image"]) == grpc_events[-1].result.image  # same seed: the same pixels
    # A refusal before the engine takes the request is an ordinary problem response...
    reply = requests.post(f"{base_url}/v1/anonymize:stream?params.steps=x", data=face_png, timeout=30)
    _assert_problem(reply, 400, "params.steps")
    # ... and one found while it runs (the engine decodes the image) ends the stream with an `error` event.
    reply = requests.post(
        f"{base_url}/v1/anonymize:stream", data=b"junk", headers={"Content-Type": "image/png"}, timeout=30
    )
    assert reply.status_code == 200
    error = reply.text.split("event: error\ndata: ", 1)[1].split("\n", 1)[0]
    assert json.loads(error)["field"] == "image" and json.loads(error)["status"] == 400


def test_info_is_get_server_info(base_url, http_server):
    reply = requests.get(f"{base_url}/v1/info", timeout=30)
    assert reply.status_code == 200
    document = reply.json()
    schema.model_for(pb2.ServerInfo.DESCRIPTOR).model_validate(document)
    with AnonymizerClient(http_server.address, timeout=30) as client:
        info = client.server_info()
    assert document == schema.to_json(info)


def test_openapi_document_is_the_protos(base_url):
    document = requests.get(f"{base_url}/openapi.json", timeout=30).json()
    proto_fields = {field.name: field for field in schema.request_query_fields()}
    expected = set()
    for descriptor in (pb2.AnonymizeRequest.DESCRIPTOR,):
        stack = [((), descriptor)]
        while stack:
            prefix, message = stack.pop()
            for field in message.fields:
                path = (*prefix, field.name)
                if path == ("image",):
                    continue
                if field.message_type is not None:
                    stack.append((path, field.message_type))
                else:
                    expected.add(".".join(path))
    assert set(proto_fields) == expected
    for path in ("/v1/anonymize", "/v1/anonymize:stream"):
        operation = document["paths"][path]["post"]
        parameters = {p["name"]: p for p in operation["parameters"] if p["in"] == "query"}
        assert set(parameters) == expected, path
        for name, field in proto_fields.items():
            if field.field.enum_type is not None:
                text = json.dumps(parameters[name]["schema"])
                assert all(value.name in text for value in field.field.enum_type.values), name
        assert set(operation["requestBody"]["content"]) == {"image/*", "multipart/form-data"}
    components = document["components"]["schemas"]
    for descriptor in (pb2.AnonymizeResponse.DESCRIPTOR, pb2.ServerInfo.DESCRIPTOR, pb2.FaceRecord.DESCRIPTOR):
        assert set(components[descriptor.name]["properties"]) == {f.name for f in descriptor.fields}, descriptor.name


def test_docs_pages_work_offline(base_url):
    for page in ("/docs", "/redoc", "/"):
        html = requests.get(f"{base_url}{page}", timeout=30).text
        urls = re.findall(r"""(?:src|href)=["']([^"']+)["']""", html) + re.findall(r"""url: ?['"]([^'"]+)""", html)
        assert urls, page
        for url in urls:
            assert not re.match(r"^(https?:)?//", url), f"{page} loads {url} from elsewhere"
            if url.startswith("/"):
                assert requests.get(f"{base_url}{url}", timeout=30).status_code == 200, url


def test_tokens_tls_and_client_certificates(server, certificates, tmp_path, corner_bytes):
    token_file = write_token_file(tmp_path, ["http-secret"])
    engine_config = EngineConfig(models="tiny", device="cpu", max_queue=8)
    config = secured(
        replace(loopback_config(engine_config), http_port=0), certificates, mutual_tls=True, token_file=token_file
    )
    running = BackgroundServer(config, Engine(engine_config, server.engine.models, "")).start()
    try:
        base = f"https://localhost:{running._state.http_port}"
        context = ssl.create_default_context(cafile=str(certificates.ca_cert))
        context.load_cert_chain(str(certificates.client_cert), str(certificates.client_key))
        session = requests.Session()
        session.trust_env = False  # a CA bundle named in the environment would override `verify`
        session.verify = str(certificates.ca_cert)
        session.cert = (str(certificates.client_cert), str(certificates.client_key))
        reply = session.get(f"{base}/v1/info", timeout=30)
        assert reply.status_code == 401 and reply.headers["WWW-Authenticate"].startswith("Bearer")
        _assert_problem(reply, 401, None, "UNAUTHENTICATED")
        reply = session.get(f"{base}/v1/info", headers={"Authorization": "Bearer wrong"}, timeout=30)
        assert reply.status_code == 401
        reply = session.post(
            f"{base}/v1/anonymize?method=BLUR",
            data=corner_bytes,
            headers={"Authorization": "Bearer http-secret", "Content-Type": "image/png"},
            timeout=120,
        )
        assert reply.status_code == 200 and reply.json()["faces"], reply.text[:500]
        assert session.get(f"{base}/", timeout=30).status_code == 200  # the page itself needs no token
        # Without a client certificate the server ends the handshake (TLS 1.3 tells the client only then);
        # plain HTTP is not spoken at all.
        with pytest.raises(requests.exceptions.ConnectionError):
            requests.get(f"{base}/v1/info", verify=str(certificates.ca_cert), timeout=30)
        with pytest.raises(requests.exceptions.ConnectionError):
            requests.get(f"http://127.0.0.1:{running._state.http_port}/v1/info", timeout=30)
        # A 60 MiB unauthenticated upload is refused from its headers.
        upload = urllib.request.Request(
            f"{base}/v1/anonymize", data=b"\0" * (60 << 20), headers={"Content-Type": "image/png"}, method="POST"
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(upload, context=context, timeout=60)
        assert refused.value.code == 401
    finally:
        running.stop()


def test_draining_server_answers_503_with_retry_after(server, t1_bytes):
    engine_config = EngineConfig(models="tiny", device="cpu", max_queue=8)
    config = replace(loopback_config(engine_config, drain_seconds=3.0), http_port=0)
    running = BackgroundServer(config, Engine(engine_config, server.engine.models, "")).start()
    base = f"http://127.0.0.1:{running._state.http_port}"
    try:
        assert requests.get(f"{base}/v1/info", timeout=30).status_code == 200
        stopper = threading.Thread(target=running.stop)
        stopper.start()
        wait_until(lambda: requests.get(f"{base}/v1/info", timeout=5).status_code == 503, timeout=2, what="503")
        reply = _post(base, "?method=BLUR", t1_bytes)
        _assert_problem(reply, 503, None, "UNAVAILABLE")
        assert int(reply.headers["Retry-After"]) >= 1
        stopper.join()
    finally:
        running.stop()


def test_grpc_and_http_share_one_access_log(base_url, t1_bytes, caplog):
    caplog.set_level("INFO", logger="masquerade.access")
    _post(base_url, "?method=BLUR&request_id=logged", b"junk")
    lines = [r for r in caplog.records if getattr(r, "access", None) and r.access["request_id"] == "logged"]
    assert len(lines) == 1
    access = lines[0].access
    assert access["rpc"] == "HTTP Anonymize" and access["code"] == "INVALID_ARGUMENT"
    assert access["peer"].startswith("ipv4:127.0.0.1:") and access["method"] == "blur"


def test_unavailable_method_is_422(server, t1_bytes):
    engine_config = EngineConfig(models="tiny", device="cpu", max_queue=8)
    engine = Engine(engine_config, None, "test: no diffusion weights")
    running = BackgroundServer(replace(loopback_config(engine_config), http_port=0), engine).start()
    try:
        reply = _post(f"http://127.0.0.1:{running._state.http_port}", "?method=REVERSE_PERSONALIZATION", t1_bytes)
        _assert_problem(reply, 422, None, "FAILED_PRECONDITION")
    finally:
        running.stop()


def test_grpc_status_mapping_is_complete():
    from masquerade.api.http.problems import HTTP_STATUS

    assert set(HTTP_STATUS) == set(grpc.StatusCode)
    assert HTTP_STATUS[grpc.StatusCode.RESOURCE_EXHAUSTED] == 429
    assert HTTP_STATUS[grpc.StatusCode.DEADLINE_EXCEEDED] == 504


def test_a_client_that_leaves_cancels_its_request(base_url, face_png, caplog):
    caplog.set_level("INFO", logger="masquerade.access")
    query = "method=REVERSE_PERSONALIZATION&detection.aligned=true&params.steps=100&params.skip=0&request_id=leaver"
    with socket_to(base_url) as sock:
        sock.sendall(
            f"POST /v1/anonymize?{query} HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
            f"Content-Length: {len(face_png)}\r\n\r\n".encode()
            + face_png
        )
        time.sleep(1.0)  # queued or running: then the client goes away

    def logged() -> list:
        return [r.access for r in caplog.records if getattr(r, "access", None) and r.access["request_id"] == "leaver"]

    wait_until(lambda: logged(), timeout=30, what="the access line of the request whose client left")
    assert logged()[0]["code"] == "CANCELLED"


def test_cors_only_for_the_origins_named(base_url):
    # Without --http-cors-origin, no page of another origin may read a reply.
    reply = requests.get(f"{base_url}/v1/info", headers={"Origin": "https://app.example"}, timeout=30)
    assert reply.status_code == 200 and "access-control-allow-origin" not in reply.headers
    engine_config = EngineConfig(models="tiny", device="cpu", max_queue=8)
    config = replace(loopback_config(engine_config), http_port=0, http_cors_origins=("https://app.example",))
    running = BackgroundServer(config, Engine(engine_config, None, "test: classical only")).start()
    base = f"http://127.0.0.1:{running._state.http_port}"
    try:
        preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
        allowed = requests.options(
            f"{base}/v1/anonymize", headers={"Origin": "https://app.example", **preflight}, timeout=30
        )
        assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == "https://app.example"
        refused = requests.options(
            f"{base}/v1/anonymize", headers={"Origin": "https://evil.example", **preflight}, timeout=30
        )
        assert "access-control-allow-origin" not in refused.headers
        reply = requests.get(f"{base}/v1/info", headers={"Origin": "https://app.example"}, timeout=30)
        assert reply.headers["access-control-allow-origin"] == "https://app.example"
    finally:
        running.stop()


def test_server_timeout_header_is_a_deadline(base_url, face_png):
    slow = "method=REVERSE_PERSONALIZATION&detection.aligned=true&params.steps=100&params.skip=0"
    reply = requests.post(
        f"{base_url}/v1/anonymize?{slow}",
        data=face_png,
        headers={"Content-Type": "image/png", "X-Server-Timeout": "0.5"},
        timeout=60,
    )
    _assert_problem(reply, 504, None, "DEADLINE_EXCEEDED")
    reply = requests.post(
        f"{base_url}/v1/anonymize:stream?{slow}",
        data=face_png,
        headers={"Content-Type": "image/png", "X-Server-Timeout": "0.5"},
        timeout=60,
    )
    if reply.status_code == 200:  # admitted, then cut off: the stream's last event says so
        error = json.loads(reply.text.split("event: error\ndata: ", 1)[1].split("\n", 1)[0])
        assert error["status"] == 504 and error["code"] == "DEADLINE_EXCEEDED"
    else:  # refused at admission (the measured step times say it cannot finish in time)
        _assert_problem(reply, 504, None, "DEADLINE_EXCEEDED")
    _assert_problem(
        requests.post(
            f"{base_url}/v1/anonymize", data=face_png, headers={"Content-Type": "image/png", "X-Server-Timeout": "soon"}
        ),
        400,
        "X-Server-Timeout",
    )


def test_openapi_documents_the_server_timeout_header_the_server_enforces(base_url, corner_bytes):
    document = requests.get(f"{base_url}/openapi.json", timeout=30).json()
    for path in ("/v1/anonymize", "/v1/anonymize:stream", "/v1/anonymize-video"):
        headers = [p for p in document["paths"][path]["post"]["parameters"] if p["in"] == "header"]
        assert [p["name"] for p in headers] == ["X-Server-Timeout"], path
    bounds = headers[0]["schema"]
    assert (bounds["type"], bounds["exclusiveMinimum"], bounds["maximum"]) == ("number", 0, 86400)
    for value, status in (("0", 400), (str(bounds["maximum"] + 1), 400), (str(bounds["maximum"]), 200)):
        reply = _post(base_url, "?method=BLUR", corner_bytes, **{"X-Server-Timeout": value})
        assert reply.status_code == status, (value, reply.text[:300])
