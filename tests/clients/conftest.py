"""Servers for the client tests: the real server on tiny models, plaintext or mutual TLS + bearer token.

Certificates and token files are made per session by tests/server_support.py, never committed.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

TOKEN = "s3cret-token-for-client-tests"
CLIENTS = Path(__file__).resolve().parents[2] / "clients"
BUILD_TIMEOUT_S = 1800  # a fresh machine installs the Go and C++ toolchains and compiles gRPC stubs


@pytest.fixture(scope="session")
def built_clients() -> None:
    if os.environ.get("MASQUERADE_SKIP_CLIENTS") == "1":
        pytest.skip("MASQUERADE_SKIP_CLIENTS=1: the TypeScript, Go and C++ clients are not built or tested")
    build = subprocess.run(
        ["bash", str(CLIENTS / "build_all.sh")],
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_S,
    )
    if build.returncode != 0:
        pytest.fail(f"clients/build_all.sh exited {build.returncode}:\n{build.stdout[-4000:]}\n{build.stderr[-8000:]}")


@dataclass(frozen=True)
class SecureServer:
    """A server that requires a client certificate signed by ``certificates.ca_cert`` and the token."""

    address: str
    certificates: object  # server_support.Certificates
    token_file: Path  # the client's copy: the token alone on its line


@pytest.fixture(scope="session")
def plain_server_address() -> str:
    from masquerade.engine.engine import EngineConfig
    from server_support import start_test_server

    address, stop = start_test_server(EngineConfig(models="tiny", device="cpu"))
    yield address
    stop()


@pytest.fixture(scope="session")
def secure_server(tmp_path_factory) -> SecureServer:
    pytest.importorskip("cryptography")
    from masquerade.engine.engine import EngineConfig
    from server_support import make_certificates, start_test_server

    folder = tmp_path_factory.mktemp("tls")
    certificates = make_certificates(folder / "pki")
    address, stop = start_test_server(
        EngineConfig(models="tiny", device="cpu"),
        certificates=certificates,
        mutual_tls=True,
        tokens=["another-client-token", TOKEN],
    )
    token_file = folder / "client-token.txt"
    token_file.write_text(f"{TOKEN}\n")
    yield SecureServer(address, certificates, token_file)
    stop()


@pytest.fixture(scope="session")
def face_png(tmp_path_factory) -> Path:
    """An 'already aligned' face: any picture works with tiny models (detection is skipped)."""
    path = tmp_path_factory.mktemp("clients") / "face.png"
    rgb = np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)
    return path
