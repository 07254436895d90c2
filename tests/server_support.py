"""Running the real server inside a test: a background thread, TLS certificates and token files made on the spot.

``BackgroundServer`` runs ``masquerade.api.server.serve`` on its own event loop;
``start_test_server`` is the one-call form other languages' client tests use.
Certificates are generated per test session (``make_certificates``), never committed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import ipaddress
import socket
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from masquerade.api.server import ServerConfig, ServingState, serve
from masquerade.engine.engine import Engine, EngineConfig


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class Certificates:
    """PEM files of a throw-away CA, a server certificate for localhost/127.0.0.1/::1, and a client certificate."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca_cert: Path  # a second CA that signed nothing here: trusting it must fail verification


def make_certificates(directory: Path) -> Certificates:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)

    def name(common_name: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])

    def write_key(key, path: Path) -> Path:
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        path.chmod(0o600)
        return path

    def write_cert(cert: x509.Certificate, path: Path) -> Path:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return path

    def make_ca(common_name: str):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name(common_name))
            .issuer_name(name(common_name))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        return key, cert

    def leaf(common_name: str, ca_key, ca_cert, usage, san: list[x509.GeneralName] | None):
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(common_name))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        )
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return key, builder.sign(ca_key, hashes.SHA256())

    ca_key, ca_cert = make_ca("masquerade test CA")
    _, other_ca = make_ca("masquerade unrelated CA")
    server_key, server_cert = leaf(
        "localhost",
        ca_key,
        ca_cert,
        ExtendedKeyUsageOID.SERVER_AUTH,
        [
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.IPAddress(ipaddress.ip_address("::1")),
        ],
    )
    client_key, client_cert = leaf("masquerade-test-client", ca_key, ca_cert, ExtendedKeyUsageOID.CLIENT_AUTH, None)
    return Certificates(
        ca_cert=write_cert(ca_cert, directory / "ca.pem"),
        server_cert=write_cert(server_cert, directory / "server.pem"),
        server_key=write_key(server_key, directory / "server.key"),
        client_cert=write_cert(client_cert, directory / "client.pem"),
        client_key=write_key(client_key, directory / "client.key"),
        other_ca_cert=write_cert(other_ca, directory / "other-ca.pem"),
    )


def write_token_file(directory: Path, tokens: Sequence[str]) -> Path:
    path = Path(directory) / "tokens.txt"
    path.write_text("# bearer tokens, one per line\n" + "".join(f"{token}\n" for token in tokens))
    path.chmod(0o600)
    return path


def secured(
    config: ServerConfig,
    certificates: Certificates | None = None,
    *,
    mutual_tls: bool = False,
    token_file: Path | None = None,
) -> ServerConfig:
    """``config`` with TLS (and mutual TLS) from ``certificates`` and bearer tokens from ``token_file``."""
    changes: dict = {}
    if certificates is not None:
        changes.update(tls_cert=str(certificates.server_cert), tls_key=str(certificates.server_key))
        if mutual_tls:
            changes["tls_client_ca"] = str(certificates.ca_cert)
    if token_file is not None:
        changes["auth_token_file"] = str(token_file)
    return dataclasses.replace(config, **changes)


class BackgroundServer:
    """``serve`` on its own event loop in a daemon thread.

    ``start()`` blocks until the engine is started and returns self; ``address`` is
    "127.0.0.1:PORT" (the test certificates name 127.0.0.1 and localhost); ``engine`` is the live engine.
    """

    def __init__(self, config: ServerConfig, engine: Engine | None = None):
        self.config = config
        self._engine = engine
        self._state: ServingState | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="masquerade-test-server", daemon=True)

    def _run(self) -> None:
        def on_started(state: ServingState) -> None:
            self._state = state
            self._started.set()

        try:
            asyncio.run(serve(self.config, self._engine, on_started=on_started, handle_signals=False))
        except BaseException as exc:
            self._error = exc
        finally:
            self._started.set()

    def start(self, timeout: float = 300.0) -> BackgroundServer:
        self._thread.start()
        if not self._started.wait(timeout):
            raise TimeoutError(f"test server did not start within {timeout}s")
        if self._state is None:
            raise RuntimeError(f"test server failed to start: {self._error!r}") from self._error
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self._state.port}"

    @property
    def port(self) -> int:
        return self._state.port

    @property
    def metrics_port(self) -> int:
        return self._state.metrics_port

    @property
    def engine(self) -> Engine:
        return self._state.engine

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def reload_tokens(self) -> bool:
        """What SIGHUP does to a real server."""
        return self._state.reload_tokens()

    def begin_stop(self) -> None:
        """Starts the drain and returns at once (a second call cuts the drain short)."""
        if self._state is not None and self._thread.is_alive():
            self._state.stop()

    def stop(self, timeout: float | None = None) -> None:
        """Graceful stop; waits for the thread (up to drain + grace + 30 s unless ``timeout`` says otherwise)."""
        self.begin_stop()
        limit = self.config.drain_seconds + self.config.grace_seconds + 30
        self._thread.join(limit if timeout is None else timeout)


def loopback_config(
    engine_config: EngineConfig, *, metrics: bool = False, grace_seconds: float = 2.0, drain_seconds: float = 0.0
) -> ServerConfig:
    """Loopback, a free gRPC port, no drain pause (tests that check the drain set one)."""
    return ServerConfig(
        host="127.0.0.1",
        port=0,
        metrics_port=free_port() if metrics else 0,
        drain_seconds=drain_seconds,
        grace_seconds=grace_seconds,
        engine=engine_config,
    )


def start_test_server(
    engine_config: EngineConfig,
    *,
    grace_seconds: float = 2.0,
    metrics: bool = False,
    certificates: Certificates | None = None,
    mutual_tls: bool = False,
    tokens: Sequence[str] = (),
) -> tuple[str, Callable[[], None]]:
    """Starts a server on 127.0.0.1 (free port) in a background thread; returns (address, stop).

    With ``certificates`` it serves TLS (mutual TLS with ``mutual_tls``); with ``tokens`` it
    requires ``authorization: Bearer <token>`` for every RPC but health.
    """
    token_file = write_token_file(Path(tempfile.mkdtemp(prefix="masquerade-tokens-")), tokens) if tokens else None
    config = secured(
        loopback_config(engine_config, metrics=metrics, grace_seconds=grace_seconds),
        certificates,
        mutual_tls=mutual_tls,
        token_file=token_file,
    )
    server = BackgroundServer(config).start()
    return server.address, server.stop
