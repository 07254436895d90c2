"""TLS, mutual TLS and bearer tokens on a real server (loopback, certificates generated for the session).

Raw gRPC channels here, so the server's behaviour is checked independently of the clients' wrappers.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from masquerade.api.access_log import ACCESS_LOGGER
from masquerade.api.protos import pb2, pb2_grpc
from masquerade.api.security import SecurityConfigError, is_loopback
from masquerade.api.server import serve
from masquerade.engine.engine import EngineConfig
from masquerade_client import build_request
from server_support import loopback_config, secured, write_token_file

TOKEN = "s3cret-token-for-tests"
OTHER_TOKEN = "a-second-valid-token"


def _tls_channel(address: str, ca, cert=None, key=None) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes(),
        private_key=key.read_bytes() if key else None,
        certificate_chain=cert.read_bytes() if cert else None,
    )
    return grpc.secure_channel(address, credentials)


def _bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def _health(channel: grpc.Channel) -> str:
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def _info_code(channel: grpc.Channel, metadata=()) -> grpc.StatusCode:
    try:
        pb2_grpc.AnonymizerStub(channel).GetServerInfo(pb2.GetServerInfoRequest(), metadata=metadata, timeout=5)
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


@pytest.fixture
def tls_token_server(start_server_sharing_models, certificates, tmp_path):
    token_file = write_token_file(tmp_path, [TOKEN])
    server = start_server_sharing_models(
        EngineConfig(models="tiny", device="cpu"),
        configure=lambda config: secured(config, certificates, token_file=token_file),
    )
    server.token_file = token_file
    return server


def _assert_connection_refused(channel: grpc.Channel) -> None:
    """The TLS handshake fails, so even health (which needs no token) cannot be reached."""
    with channel, pytest.raises(grpc.RpcError) as caught:
        _health(channel)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def test_plaintext_client_cannot_talk_to_a_tls_server(tls_token_server, certificates):
    _assert_connection_refused(grpc.insecure_channel(tls_token_server.address))
    with _tls_channel(tls_token_server.address, certificates.ca_cert) as channel:
        assert _health(channel) == "SERVING"


def test_client_trusting_another_ca_is_refused(tls_token_server, certificates):
    _assert_connection_refused(_tls_channel(tls_token_server.address, certificates.other_ca_cert))


def test_health_answers_without_a_token(tls_token_server, certificates):
    with _tls_channel(tls_token_server.address, certificates.ca_cert) as channel:
        assert _health(channel) == "SERVING"


@pytest.mark.parametrize(
    "metadata",
    [
        (),
        _bearer("wrong-token"),
        _bearer(TOKEN + "x"),
        _bearer(TOKEN[:-1]),
        (("authorization", TOKEN),),  # no scheme
        (("authorization", f"Basic {TOKEN}"),),
        (("x-api-key", TOKEN),),
    ],
    ids=["missing", "wrong", "longer", "prefix", "no-scheme", "basic", "other-header"],
)
def test_missing_or_wrong_token_is_unauthenticated(tls_token_server, certificates, metadata):
    with _tls_channel(tls_token_server.address, certificates.ca_cert) as channel:
        assert _info_code(channel, metadata) == grpc.StatusCode.UNAUTHENTICATED


def test_right_token_is_served_by_every_rpc(tls_token_server, certificates, face_png):
    request = build_request(face_png, aligned=True, method="blur", request_id="tls-1")
    with _tls_channel(tls_token_server.address, certificates.ca_cert) as channel:
        stub = pb2_grpc.AnonymizerStub(channel)
        assert _info_code(channel, _bearer(TOKEN)) == grpc.StatusCode.OK
        assert _info_code(channel, (("authorization", f"bearer {TOKEN}"),)) == grpc.StatusCode.OK  # RFC 6750
        response = stub.Anonymize(request, metadata=_bearer(TOKEN), timeout=60)
        assert response.request_id == "tls-1" and response.faces[0].method_applied == pb2.BLUR
        events = list(stub.AnonymizeStream(request, metadata=_bearer(TOKEN), timeout=60))
        assert events[-1].WhichOneof("event") == "result"
        batch = list(stub.AnonymizeBatch(iter([request]), metadata=_bearer(TOKEN), timeout=60))
        assert [b.WhichOneof("outcome") for b in batch] == ["result"]
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.AnonymizeStream(request, timeout=60))
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_reflection_needs_a_token(tls_token_server, certificates):
    list_services = reflection_pb2.ServerReflectionRequest(list_services="")
    with _tls_channel(tls_token_server.address, certificates.ca_cert) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.ServerReflectionInfo(iter([list_services]), timeout=5))
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        replies = list(stub.ServerReflectionInfo(iter([list_services]), metadata=_bearer(TOKEN), timeout=5))
    assert replies[0].list_services_response.service


def test_reloaded_token_file_takes_effect_and_a_broken_one_is_ignored(tls_token_server, certificates):
    with _tls_channel(tls_token_server.address, certificates.ca_cert) as channel:
        write_token_file(tls_token_server.token_file.parent, [OTHER_TOKEN])
        assert tls_token_server.reload_tokens()
        assert _info_code(channel, _bearer(OTHER_TOKEN)) == grpc.StatusCode.OK
        assert _info_code(channel, _bearer(TOKEN)) == grpc.StatusCode.UNAUTHENTICATED
        tls_token_server.token_file.write_text("# every token revoked by mistake\n")
        assert not tls_token_server.reload_tokens()  # an empty file would lock everyone out: keep the old set
        assert _info_code(channel, _bearer(OTHER_TOKEN)) == grpc.StatusCode.OK


@pytest.fixture
def mutual_tls_server(start_server_sharing_models, certificates):
    return start_server_sharing_models(
        EngineConfig(models="tiny", device="cpu"),
        configure=lambda config: secured(config, certificates, mutual_tls=True),
    )


def test_mutual_tls_refuses_a_client_without_a_certificate(mutual_tls_server, certificates):
    _assert_connection_refused(_tls_channel(mutual_tls_server.address, certificates.ca_cert))


def test_mutual_tls_serves_a_client_with_a_certificate_and_logs_its_name(mutual_tls_server, certificates, caplog):
    caplog.set_level(logging.INFO, logger=ACCESS_LOGGER)
    with _tls_channel(
        mutual_tls_server.address, certificates.ca_cert, certificates.client_cert, certificates.client_key
    ) as channel:
        assert _health(channel) == "SERVING"
        assert _info_code(channel) == grpc.StatusCode.OK  # no token file: the certificate is the identity
    lines = [r.access for r in caplog.records if r.name == ACCESS_LOGGER and r.access["rpc"] == "GetServerInfo"]
    assert lines and lines[-1]["client"] == "masquerade-test-client" and lines[-1]["code"] == "OK"


def test_unreadable_tls_or_token_file_names_the_flag(tiny_engine_config, certificates, tmp_path):
    base = loopback_config(tiny_engine_config)
    spaced = tmp_path / "spaced"
    spaced.mkdir()
    cases = [
        ("--tls-key is missing", replace(base, tls_cert=str(certificates.server_cert))),
        (
            "--tls-cert .*missing.pem",
            replace(base, tls_cert=str(tmp_path / "missing.pem"), tls_key=str(certificates.server_key)),
        ),
        ("--tls-client-ca needs --tls-cert", replace(base, tls_client_ca=str(certificates.ca_cert))),
        ("--auth-token-file .*no token", replace(base, auth_token_file=str(write_token_file(tmp_path, [])))),
        ("--auth-token-file .*line 2", replace(base, auth_token_file=str(write_token_file(spaced, ["two words"])))),
    ]
    for message, config in cases:
        with pytest.raises(SecurityConfigError, match=message):
            asyncio.run(serve(config, handle_signals=False))


@pytest.mark.parametrize(
    "host, loopback",
    [
        ("127.0.0.1", True),
        ("127.3.2.1", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("[::]", False),
        ("10.0.0.5", False),
        ("gpu-host", False),  # a name may resolve to anything: warn
    ],
)
def test_only_loopback_addresses_count_as_private(host, loopback):
    assert is_loopback(host) is loopback
