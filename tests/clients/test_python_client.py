"""masquerade-client, the Python client as its own distribution: what it imports, what its build
produces, gRPC's retry policy, TLS + token, and its example's exit codes, against real servers."""

from __future__ import annotations

import asyncio
import io
import re
import subprocess
import sys
import threading
import time
import zipfile
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from PIL import Image

from masquerade_client import (
    AnonymizerClient,
    AsyncAnonymizerClient,
    InvalidArgument,
    RetryPolicy,
    Unauthenticated,
    Unavailable,
    build_request,
    pb2,
    pb2_grpc,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
CLIENT_DIR = REPO_ROOT / "clients" / "python"
EXAMPLE = [sys.executable, "-m", "masquerade_client.example"]
FORBIDDEN = ("torch", "diffusers", "dlib", "grpc_tools", "masquerade")


def test_import_needs_none_of_the_servers_packages():
    """Run in a fresh interpreter where importing any of them fails: the client still works."""
    program = f"""
import importlib.abc, sys
FORBIDDEN = {FORBIDDEN!r}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in FORBIDDEN:
            raise ImportError(f"blocked: {{name}}")
sys.meta_path.insert(0, Block())
import masquerade_client, masquerade_client.example
from masquerade_client import AnonymizerClient, AsyncAnonymizerClient, build_request
request = build_request(b"x", method="blur", steps=3, aligned=True)
with AnonymizerClient("127.0.0.1:1") as client:
    pass
loaded = sorted(m for m in sys.modules if m.split(".")[0] in FORBIDDEN)
print("loaded:", loaded)
assert not loaded, loaded
print("ok", request.method)
"""
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith(f"ok {pb2.BLUR}")


def test_build_generates_the_stubs_and_depends_only_on_grpc_and_protobuf(tmp_path):
    tracked = subprocess.run(
        ["git", "ls-files", "clients/python"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    assert not [path for path in tracked if "/v1/" in path or path.endswith("_pb2.py")], tracked
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            str(CLIENT_DIR),
            "-w",
            tmp_path,
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = tmp_path.glob("masquerade_client-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = next(archive.read(n).decode() for n in names if n.endswith(".dist-info/METADATA"))
    assert {"masquerade_client/v1/anonymizer_pb2.py", "masquerade_client/v1/anonymizer_pb2_grpc.py"} <= names
    assert not any(name.startswith("masquerade/") for name in names)
    requires = sorted(
        re.split(r"[<>=!~ ;]", line.split(":", 1)[1].strip())[0]
        for line in metadata.splitlines()
        if line.startswith("Requires-Dist:")
    )
    # googleapis-common-protos: google.rpc.Status and RetryInfo, to read the server's retry advice.
    assert requires == ["googleapis-common-protos", "grpcio", "grpcio-health-checking", "protobuf"]


class FlakyServer:
    """A stand-in for a restarting server: UNAVAILABLE to its first `failures` calls of each RPC,
    then it answers (the image back). Counts every call it sees."""

    def __init__(self, failures: int):
        self.failures = failures
        self.calls: dict[str, int] = {}
        self._lock = threading.Lock()

    def _attempt(self, rpc: str, context) -> None:
        with self._lock:
            self.calls[rpc] = self.calls.get(rpc, 0) + 1
            attempt = self.calls[rpc]
        if attempt <= self.failures:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"restarting (attempt {attempt})")

    @staticmethod
    def _response(request) -> pb2.AnonymizeResponse:
        with Image.open(io.BytesIO(request.image)) as image:
            width, height = image.size
        return pb2.AnonymizeResponse(
            request_id=request.request_id, image=request.image, complete=True, width=width, height=height
        )

    def __enter__(self) -> str:
        outer = self

        class Servicer(pb2_grpc.AnonymizerServicer):
            def Anonymize(self, request, context):
                outer._attempt("Anonymize", context)
                return outer._response(request)

            def AnonymizeStream(self, request, context):
                outer._attempt("AnonymizeStream", context)
                yield pb2.AnonymizeEvent(request_id=request.request_id, queued=pb2.Queued(position=0))
                yield pb2.AnonymizeEvent(request_id=request.request_id, result=outer._response(request))

            def AnonymizeBatch(self, request_iterator, context):
                outer._attempt("AnonymizeBatch", context)
                for request in request_iterator:
                    yield pb2.AnonymizeBatchResponse(request_id=request.request_id, result=outer._response(request))

        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        pb2_grpc.add_AnonymizerServicer_to_server(Servicer(), self._server)
        port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()
        return f"127.0.0.1:{port}"

    def __exit__(self, *exc_info) -> None:
        self._server.stop(grace=None)


def test_unavailable_is_retried_by_grpcs_policy_and_batch_is_not(face_png):
    image = face_png.read_bytes()
    flaky = FlakyServer(failures=2)
    with flaky as address, AnonymizerClient(address, timeout=20) as client:
        assert client.anonymize(image, method="blur").image == image
        events = [e.WhichOneof("event") for e in client.anonymize_stream(image, method="blur")]
        assert events == ["queued", "result"]
        with pytest.raises(Unavailable):
            list(client.anonymize_batch([build_request(image, request_id="b1")]))
    assert flaky.calls == {"Anonymize": 3, "AnonymizeStream": 3, "AnonymizeBatch": 1}


def test_retries_stop_after_the_policys_attempts(face_png):
    flaky = FlakyServer(failures=10)
    policy = RetryPolicy(max_attempts=3, initial_backoff_s=0.01, max_backoff_s=0.05)
    with flaky as address, AnonymizerClient(address, timeout=20, retry=policy) as client:
        started = time.monotonic()
        with pytest.raises(Unavailable, match="restarting"):
            client.anonymize(face_png.read_bytes(), method="blur")
        assert time.monotonic() - started < 5
    assert flaky.calls == {"Anonymize": 3}


def test_one_attempt_means_no_retry_and_the_policy_is_validated(face_png):
    flaky = FlakyServer(failures=1)
    with (
        flaky as address,
        AnonymizerClient(address, timeout=20, retry=RetryPolicy(max_attempts=1)) as client,
        pytest.raises(Unavailable),
    ):
        client.anonymize(face_png.read_bytes(), method="blur")
    assert flaky.calls == {"Anonymize": 1}
    with pytest.raises(ValueError, match="max_attempts=6"):
        RetryPolicy(max_attempts=6)


def test_client_over_mutual_tls_with_token(secure_server, face_png):
    c = secure_server.certificates
    tls = dict(ca_file=c.ca_cert, cert_file=c.client_cert, key_file=c.client_key)
    token = secure_server.token_file.read_text().strip()
    with AnonymizerClient(secure_server.address, token=token, timeout=60, **tls) as client:
        response = client.anonymize(face_png.read_bytes(), method="pixelate", aligned=True)
        assert response.complete and response.faces[0].method_applied == pb2.PIXELATE
        assert client.server_info().version
    with (
        AnonymizerClient(secure_server.address, token="not-the-token", timeout=60, **tls) as client,
        pytest.raises(Unauthenticated),
    ):
        client.server_info()

    async def run_async() -> str:
        async with AsyncAnonymizerClient(secure_server.address, token=token, timeout=60, **tls) as client:
            return (await client.server_info()).version

    assert asyncio.run(run_async())


def test_bad_client_options_name_the_option(tmp_path):
    with pytest.raises(ValueError, match="key_file"):
        AnonymizerClient("127.0.0.1:1", cert_file=tmp_path / "c.pem")
    with pytest.raises(ValueError, match="ca_file: cannot read"):
        AnonymizerClient("127.0.0.1:1", ca_file=tmp_path / "missing.pem")
    with pytest.raises(ValueError, match="token"):
        AnonymizerClient("127.0.0.1:1", token="two words")


def test_example_over_tls_with_token_and_its_exit_codes(secure_server, plain_server_address, face_png, tmp_path):
    c = secure_server.certificates
    tls = ["--tls-ca", str(c.ca_cert), "--tls-cert", str(c.client_cert), "--tls-key", str(c.client_key)]
    output = tmp_path / "out.png"
    ok = subprocess.run(
        [*EXAMPLE, "--server", secure_server.address, *tls, "--token-file", str(secure_server.token_file),
         "--method", "blur", "--aligned", str(face_png), str(output)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert "wrote" in ok.stdout and output.read_bytes().startswith(b"\x89PNG")

    no_token = subprocess.run(
        [*EXAMPLE, "--server", secure_server.address, *tls, str(face_png), str(tmp_path / "x.png")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert no_token.returncode == 1 and "UNAUTHENTICATED" in no_token.stderr, no_token.stderr

    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    invalid = subprocess.run(
        [*EXAMPLE, "--server", plain_server_address, "--method", "blur", str(text), str(tmp_path / "y.png")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert invalid.returncode == 3, invalid.stderr
    assert "INVALID_ARGUMENT" in invalid.stderr and "image" in invalid.stderr

    usage = subprocess.run([*EXAMPLE, str(face_png)], capture_output=True, text=True, timeout=60)
    assert usage.returncode == 2 and "output" in usage.stderr


def test_invalid_argument_is_raised_with_the_field(plain_server_address):
    with AnonymizerClient(plain_server_address, timeout=60) as client, pytest.raises(InvalidArgument, match="image"):
        client.anonymize(b"not an image", method="blur")
