"""The TypeScript, Go and C++ clients, built from proto/ by clients/build_all.sh,
against a real server on tiny models (plaintext, and mutual TLS + bearer token): every example streams its events before the
result, writes a valid image, and maps gRPC failures to the documented exit codes
(3 for INVALID_ARGUMENT, 1 otherwise) with `error: <CODE_NAME>: <message>` on stderr;
with --batch, sends many images over one AnonymizeBatch stream, one line per response.

The first test pays the build (minutes on a fresh machine: apt-get, npm ci, C++);
set MASQUERADE_SKIP_CLIENTS=1 to skip them all.
"""

from __future__ import annotations

import io
import re
import subprocess
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[2]
CLIENTS = REPO_ROOT / "clients"
BUILD_TIMEOUT_S = 1800  # a fresh machine installs the Go and C++ toolchains and compiles gRPC stubs

EXAMPLES = {
    "typescript": ["node", str(CLIENTS / "typescript" / "dist" / "example.js")],
    "go": [str(CLIENTS / "go" / "build" / "bin" / "masquerade-anonymize")],
    "cpp": [str(CLIENTS / "cpp" / "build" / "masquerade-anonymize")],
}

pytestmark = [pytest.mark.clients, pytest.mark.timeout(BUILD_TIMEOUT_S + 300)]

EVENT_LINE = re.compile(r"^(queued position=\d+|faces_found n=\d+|progress phase=[A-Z_]+ step=\d+/\d+)$")
RESULT_LINE = re.compile(r"^result faces=(\d+) complete=(true|false) bytes=(\d+)$")
BATCH_RESULT_LINE = re.compile(r"^batch id=(\S+) faces=(\d+) complete=(true|false) bytes=(\d+)$")
BATCH_ERROR_LINE = re.compile(r"^batch id=(\S+) error=([A-Z_]+): (.+)$")


@pytest.fixture(scope="module")
def server_address(built_clients, plain_server_address) -> str:
    return plain_server_address


def run_example(language: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*EXAMPLES[language], *args], capture_output=True, text=True, timeout=timeout)


def assert_events_then_result(completed: subprocess.CompletedProcess[str], output: Path) -> None:
    assert completed.returncode == 0, (
        f"exit {completed.returncode}\nstdout:\n{completed.stdout}\nstderr:\n{completed.stderr}"
    )
    lines = completed.stdout.splitlines()
    assert lines and RESULT_LINE.match(lines[-1]), f"the last line is not the result:\n{completed.stdout}"
    events = lines[:-1]
    assert events, f"no queued/progress event before the result:\n{completed.stdout}"
    assert all(EVENT_LINE.match(line) for line in events), f"unexpected event lines:\n{completed.stdout}"
    image_bytes = int(RESULT_LINE.match(lines[-1]).group(3))
    assert output.stat().st_size == image_bytes
    with Image.open(output) as image:
        image.verify()


@pytest.mark.parametrize("language", sorted(EXAMPLES))
def test_example_streams_events_before_writing_the_result(language, server_address, face_png, tmp_path):
    output = tmp_path / "anonymized.png"
    completed = run_example(
        language,
        "--server",
        server_address,
        "--method",
        "reverse_personalization",
        "--aligned",
        "--steps",
        "3",
        str(face_png),
        str(output),
    )
    assert_events_then_result(completed, output)
    assert any(line.startswith("progress phase=") for line in completed.stdout.splitlines())
    assert RESULT_LINE.match(completed.stdout.splitlines()[-1]).group(1, 2) == ("1", "true")
    with Image.open(output) as image:
        assert image.size == (48, 48)


@pytest.mark.parametrize("language", sorted(EXAMPLES))
def test_classical_method_streams_and_writes_the_image(language, server_address, face_png, tmp_path):
    output = tmp_path / "pixelated.png"
    completed = run_example(
        language, "--server", server_address, "--method", "pixelate", "--aligned", str(face_png), str(output)
    )
    assert_events_then_result(completed, output)


@pytest.mark.parametrize("language", sorted(EXAMPLES))
def test_text_file_is_invalid_argument(language, server_address, tmp_path):
    not_an_image = tmp_path / "notes.txt"
    not_an_image.write_text("this is not an image\n")
    completed = run_example(
        language, "--server", server_address, "--method", "blur", str(not_an_image), str(tmp_path / "out.png")
    )
    assert completed.returncode == 3, completed.stderr
    assert re.search(r"^error: INVALID_ARGUMENT: \S", completed.stderr, re.MULTILINE), completed.stderr
    assert not (tmp_path / "out.png").exists()


@pytest.mark.parametrize("language", sorted(EXAMPLES))
def test_batch_answers_every_image_and_a_bad_one_does_not_end_the_stream(language, server_address, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    faces = []
    for seed, name in enumerate(["alice.png", "bob.png", "carol.png"]):
        rgb = np.random.default_rng(seed + 1).integers(0, 256, (40 + 8 * seed, 48, 3), dtype=np.uint8)
        Image.fromarray(rgb).save(inputs / name)
        faces.append(inputs / name)
    not_an_image = inputs / "notes.txt"
    not_an_image.write_text("this is not an image\n")
    outdir = tmp_path / "out"
    # The bad one in the middle: the requests after it must still be answered.
    batch = [faces[0], not_an_image, faces[1], faces[2]]

    completed = run_example(
        language,
        "--batch",
        "--server",
        server_address,
        "--method",
        "pixelate",
        "--aligned",
        *map(str, batch),
        str(outdir),
    )

    report = f"exit {completed.returncode}\nstdout:\n{completed.stdout}\nstderr:\n{completed.stderr}"
    assert completed.returncode == 3, report
    lines = completed.stdout.splitlines()
    assert len(lines) == 4, report
    results = {m.group(1): m for m in map(BATCH_RESULT_LINE.match, lines) if m}
    errors = {m.group(1): m for m in map(BATCH_ERROR_LINE.match, lines) if m}
    assert len(results) + len(errors) == 4, f"unexpected lines:\n{report}"
    assert sorted([*results, *errors]) == sorted(path.name for path in batch), report
    assert set(errors) == {"notes.txt"}, report
    assert errors["notes.txt"].group(2) == "INVALID_ARGUMENT", report
    assert sorted(path.name for path in outdir.iterdir()) == sorted(face.name for face in faces)
    for face in faces:
        written = outdir / face.name
        assert written.stat().st_size == int(results[face.name].group(4))
        assert results[face.name].group(2, 3) == ("1", "true"), report
        with Image.open(written) as image:
            image.verify()
        with Image.open(written) as image, Image.open(face) as original:
            assert image.size == original.size


@pytest.mark.parametrize("language", sorted(EXAMPLES))
def test_batch_of_good_images_exits_0(language, server_address, face_png, tmp_path):
    second = tmp_path / "second.png"
    Image.open(face_png).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(second)
    completed = run_example(
        language,
        "--batch",
        "--server",
        server_address,
        "--method",
        "blur",
        "--aligned",
        str(face_png),
        str(second),
        str(tmp_path / "out"),
    )
    assert completed.returncode == 0, completed.stderr
    lines = completed.stdout.splitlines()
    assert sorted(BATCH_RESULT_LINE.match(line).group(1) for line in lines) == sorted([face_png.name, second.name])


@pytest.mark.parametrize("language", sorted(EXAMPLES))
def test_batch_deadline_is_deadline_exceeded(language, server_address, face_png, tmp_path):
    completed = run_example(
        language,
        "--batch",
        "--server",
        server_address,
        "--aligned",
        "--steps",
        "250",
        "--timeout",
        "0.3",
        str(face_png),
        str(tmp_path / "out"),
    )
    assert completed.returncode == 1, completed.stderr
    # Either the stream's deadline ends the call, or (once the server has measured its step times)
    # admission refuses the request at once and says so in the request's own batch entry.
    stream_ended = re.search(r"^error: DEADLINE_EXCEEDED: ", completed.stderr, re.MULTILINE)
    entry_refused = re.search(r"^batch id=\S+ error=DEADLINE_EXCEEDED: ", completed.stdout, re.MULTILINE)
    assert stream_ended or entry_refused, (completed.stdout, completed.stderr)
    assert not (tmp_path / "out" / face_png.name).exists()


@pytest.mark.parametrize("language", sorted(EXAMPLES))
def test_deadline_is_deadline_exceeded(language, server_address, face_png, tmp_path):
    completed = run_example(
        language,
        "--server",
        server_address,
        "--aligned",
        "--steps",
        "250",
        "--timeout",
        "0.3",
        str(face_png),
        str(tmp_path / "out.png"),
    )
    assert completed.returncode == 1, completed.stderr
    assert re.search(r"^error: DEADLINE_EXCEEDED: ", completed.stderr, re.MULTILINE), completed.stderr


@pytest.mark.parametrize("language", sorted(EXAMPLES))
def test_unreachable_server_is_unavailable_after_bounded_retries(language, built_clients, face_png, tmp_path):
    with socket_bound_but_closed() as address:
        completed = run_example(
            language, "--server", address, "--timeout", "20", str(face_png), str(tmp_path / "out.png")
        )
    assert completed.returncode == 1, completed.stderr
    assert re.search(r"^error: UNAVAILABLE: ", completed.stderr, re.MULTILINE), completed.stderr


@pytest.mark.parametrize("language", sorted(EXAMPLES))
def test_unavailable_is_retried_before_any_event(language, built_clients, face_png, tmp_path):
    with flaky_server(failures=2) as (address, calls):
        output = tmp_path / "out.png"
        completed = run_example(language, "--server", address, "--method", "blur", str(face_png), str(output))
    assert_events_then_result(completed, output)
    assert calls() == 3


@pytest.fixture(scope="module")
def rate_limited_server_address():
    """A real server (classical methods only: no model to load) allowing one request per 2 s, burst 1."""
    import dataclasses

    from masquerade.api.quota import ClientPolicy
    from masquerade.engine.engine import Engine, EngineConfig
    from server_support import BackgroundServer, loopback_config

    engine_config = EngineConfig(device="cpu")
    config = dataclasses.replace(loopback_config(engine_config), quotas=ClientPolicy(requests_per_second=0.5, burst=1))
    server = BackgroundServer(config, Engine(engine_config, None, "test: classical methods only")).start()
    yield server.address
    server.stop()


@pytest.mark.parametrize("language", sorted(EXAMPLES))
def test_over_quota_is_retried_after_the_retry_info_delay(
    language, built_clients, rate_limited_server_address, face_png, tmp_path
):
    """The second call is refused RESOURCE_EXHAUSTED with RetryInfo; the client waits the delay and succeeds."""
    address = rate_limited_server_address
    started = time.monotonic()
    first = run_example(language, "--server", address, "--method", "blur", str(face_png), str(tmp_path / "1.png"))
    assert_events_then_result(first, tmp_path / "1.png")
    second = run_example(language, "--server", address, "--method", "blur", str(face_png), str(tmp_path / "2.png"))
    assert_events_then_result(second, tmp_path / "2.png")
    # One request per 2 s: the second was admitted 2 s after the first, however long each run took to start.
    assert time.monotonic() - started >= 1.95


def tls_flags(secure) -> list[str]:
    c = secure.certificates
    return ["--tls-ca", str(c.ca_cert), "--tls-cert", str(c.client_cert), "--tls-key", str(c.client_key)]


@pytest.mark.parametrize("language", sorted(EXAMPLES))
def test_tls_and_token_server_is_called_with_the_ca_client_certificate_and_token(
    language, built_clients, secure_server, face_png, tmp_path
):
    output = tmp_path / "out.png"
    completed = run_example(
        language,
        "--server",
        secure_server.address,
        *tls_flags(secure_server),
        "--token-file",
        str(secure_server.token_file),
        "--method",
        "blur",
        "--aligned",
        str(face_png),
        str(output),
    )
    assert_events_then_result(completed, output)

    # The same call without the token is refused: the token really travels.
    refused = run_example(
        language,
        "--server",
        secure_server.address,
        *tls_flags(secure_server),
        "--method",
        "blur",
        str(face_png),
        str(tmp_path / "refused.png"),
    )
    assert refused.returncode == 1, refused.stderr
    assert re.search(r"^error: UNAUTHENTICATED: ", refused.stderr, re.MULTILINE), refused.stderr
    assert not (tmp_path / "refused.png").exists()


@pytest.mark.parametrize("language", sorted(EXAMPLES))
def test_batch_over_tls_with_token(language, built_clients, secure_server, face_png, tmp_path):
    completed = run_example(
        language,
        "--batch",
        "--server",
        secure_server.address,
        *tls_flags(secure_server),
        "--token-file",
        str(secure_server.token_file),
        "--method",
        "pixelate",
        "--aligned",
        str(face_png),
        str(tmp_path / "out"),
    )
    assert completed.returncode == 0, completed.stderr
    assert BATCH_RESULT_LINE.match(completed.stdout.strip()), completed.stdout
    assert (tmp_path / "out" / face_png.name).is_file()


@pytest.mark.parametrize("language", sorted(EXAMPLES))
def test_half_a_client_key_pair_is_a_usage_error(language, built_clients, secure_server, face_png, tmp_path):
    cert = str(secure_server.certificates.client_cert)
    completed = run_example(language, "--server", "127.0.0.1:1", "--tls-cert", cert, str(face_png), str(tmp_path / "o"))
    assert completed.returncode == 2, completed.stderr
    assert "--tls-key" in completed.stderr


class socket_bound_but_closed:
    """A loopback address nobody listens on (bound, never listening, so no one else takes the port)."""

    def __enter__(self) -> str:
        import socket

        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{self._sock.getsockname()[1]}"

    def __exit__(self, *exc_info) -> None:
        self._sock.close()


class flaky_server:
    """A fake Anonymizer that answers UNAVAILABLE to its first `failures` streams, then
    streams queued + result (the input image back) — what a restarting server looks like."""

    def __init__(self, failures: int):
        self.failures = failures

    def __enter__(self):
        from masquerade_client import pb2, pb2_grpc

        lock, count = threading.Lock(), [0]
        failures = self.failures

        class FlakyAnonymizer(pb2_grpc.AnonymizerServicer):
            def AnonymizeStream(self, request, context):
                with lock:
                    count[0] += 1
                    attempt = count[0]
                if attempt <= failures:
                    context.abort(grpc.StatusCode.UNAVAILABLE, f"fake: restarting (attempt {attempt})")
                yield pb2.AnonymizeEvent(request_id=request.request_id, queued=pb2.Queued(position=0))
                with Image.open(io.BytesIO(request.image)) as image:
                    width, height = image.size
                yield pb2.AnonymizeEvent(
                    request_id=request.request_id,
                    result=pb2.AnonymizeResponse(
                        request_id=request.request_id,
                        image=request.image,
                        format=pb2.PNG,
                        complete=True,
                        width=width,
                        height=height,
                    ),
                )

        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        pb2_grpc.add_AnonymizerServicer_to_server(FlakyAnonymizer(), self._server)
        port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()

        def calls() -> int:
            with lock:
                return count[0]

        return f"127.0.0.1:{port}", calls

    def __exit__(self, *exc_info) -> None:
        self._server.stop(grace=None)
