"""Server-free pieces: code generation, status mapping, progress throttling, request conversion."""

from __future__ import annotations

import asyncio
import os
import shutil

import grpc
import pytest

from masquerade.api import codegen, convert
from masquerade.api.errors import status_for
from masquerade.api.protos import pb2
from masquerade.api.servicer import ProgressThrottle
from masquerade.engine import request as et
from masquerade_client import build_request


def test_codegen_regenerates_missing_or_stale_modules(tmp_path):
    proto_root = tmp_path / "proto"
    shutil.copytree(codegen.PROTO_ROOT, proto_root)
    out = tmp_path / "v1"
    assert codegen.ensure_generated(proto_root, out) is True
    assert sorted(p.name for p in out.iterdir()) == sorted(codegen.GENERATED_FILES)
    assert "from masquerade.v1 import anonymizer_pb2" in (out / "anonymizer_pb2_grpc.py").read_text()
    assert codegen.ensure_generated(proto_root, out) is False  # fresh: nothing to do
    proto = proto_root / codegen.PROTO_FILE
    later = (out / "anonymizer_pb2.py").stat().st_mtime + 10
    os.utime(proto, (later, later))
    assert codegen.ensure_generated(proto_root, out) is True  # the proto changed
    assert not [p for p in out.iterdir() if p.name.startswith(".codegen-")]  # temp dir cleaned up


@pytest.mark.parametrize(
    "error, code",
    [
        (et.InvalidRequestError("params.steps", "bad"), grpc.StatusCode.INVALID_ARGUMENT),
        (et.QueueFullError("full"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (et.MethodUnavailableError("no weights"), grpc.StatusCode.FAILED_PRECONDITION),
        (asyncio.CancelledError(), grpc.StatusCode.CANCELLED),
        (TimeoutError(), grpc.StatusCode.DEADLINE_EXCEEDED),
        (ZeroDivisionError("secret detail"), grpc.StatusCode.INTERNAL),
    ],
)
def test_each_exception_maps_to_one_status(error, code):
    got, message = status_for(error)
    assert got == code
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        assert message.startswith("params.steps")
    if code == grpc.StatusCode.INTERNAL:
        assert "secret detail" not in message  # internals stay in the server log


def test_progress_throttle_limits_rate_and_always_sends_the_last():
    throttle = ProgressThrottle(min_interval_s=0.1)
    sent = []
    for i in range(1, 11):  # ten steps within 45 ms
        sent += throttle.offer(et.ProgressEvent("r", et.Phase.GENERATION, i, 20), now=i * 0.005)
    assert [e.step for e in sent] == [1]
    sent += throttle.offer(et.ProgressEvent("r", et.Phase.GENERATION, 11, 20), now=0.2)
    sent += throttle.offer(et.ProgressEvent("r", et.Phase.GENERATION, 12, 20), now=0.21)  # held back
    result = et.QueuedEvent("r", 0)  # any non-progress event flushes the held-back one first
    sent += throttle.offer(result, now=0.22)
    assert [getattr(e, "step", None) for e in sent] == [1, 11, 12, None]


class _Info:
    defaults = et.ReversePersonalizationParams()
    default_method = et.Method.REVERSE_PERSONALIZATION
    max_faces = 8


def test_unset_params_take_server_defaults_and_set_ones_override():
    message = build_request(b"img", steps=7, attribute_prompt="an old man", output_format="png", quality=80)
    request = convert.request_from_proto(message, _Info(), request_id="x")
    assert request.params == et.ReversePersonalizationParams(steps=7, attribute_prompt="an old man")
    assert request.method is et.Method.REVERSE_PERSONALIZATION
    assert request.output == et.OutputOptions(format="png", quality=80)
    assert request.detection.max_faces == 8


@pytest.mark.parametrize(
    "options, field_name",
    [
        ({"method": 42}, "method"),
        ({"output_format": 9}, "output.format"),
        ({"quality": 0}, "output.quality"),
        ({"strength": float("inf")}, "classical.strength"),
        ({"skip": 1.0}, "params.skip"),
    ],
)
def test_wire_level_errors_name_the_field(options, field_name):
    with pytest.raises(et.InvalidRequestError) as caught:
        convert.request_from_proto(build_request(b"img", **options), _Info(), request_id="x")
    assert caught.value.field == field_name


def test_missing_image_is_named():
    with pytest.raises(et.InvalidRequestError, match="^image"):
        convert.request_from_proto(pb2.AnonymizeRequest(), _Info(), request_id="x")
