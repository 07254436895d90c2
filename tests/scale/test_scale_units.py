"""The new wire fields on the single-process server, the scale-out flags, and Ray's failures as gRPC codes."""

from __future__ import annotations

import asyncio
import io
import os
import socket

import grpc
import numpy as np
import pytest
from PIL import Image

from masquerade.api import convert
from masquerade.api.protos import pb2
from masquerade.engine.engine import Engine, EngineConfig
from masquerade.engine.request import DetectionOptions, EngineRequest, Method, ResultEvent


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def test_new_fields_keep_old_numbers_free():
    assert pb2.AnonymizeResponse.DESCRIPTOR.fields_by_name["served_by"].number == 12
    info_fields = pb2.ServerInfo.DESCRIPTOR.fields_by_name
    # Fields 30 and up are a later block (priorities: estimated_waits, default_priority).
    others = [f.number for name, f in info_fields.items() if name != "replicas" and f.number < 30]
    assert info_fields["replicas"].number == max(others) + 1


def test_single_process_server_reports_one_replica_and_its_own_id():
    """A real engine (classical methods: no weights) run to a result, converted as the servicer does."""
    engine = Engine(EngineConfig(max_queue=4), None, "test: no diffusion weights")

    async def run() -> ResultEvent:
        await engine.start()
        try:
            request = EngineRequest(
                request_id="one",
                image=_png(),
                method=Method.BLUR,
                detection=DetectionOptions(aligned=True, max_faces=engine.config.max_faces),
            )
            async for event in engine.submit(request):
                if isinstance(event, ResultEvent):
                    return event
            raise AssertionError("no result")
        finally:
            await engine.shutdown(1)

    result = asyncio.run(run())
    proto = convert.result_to_proto(result.result, request_id="one")
    assert proto.served_by == f"{socket.gethostname()}:{os.getpid()}"
    streamed = convert.event_to_proto(result, request_id="one")
    assert streamed.result.served_by == proto.served_by
    named = convert.event_to_proto(result, request_id="one", served_by="abc@host:1")
    assert named.result.served_by == "abc@host:1"
    info = convert.server_info_to_proto(
        engine.info(), max_receive_message_bytes=1 << 20, max_send_message_bytes=1 << 20
    )
    assert info.replicas == 1


def _serve_args(*extra: str):
    from masquerade.cli import build_parser

    return build_parser().parse_args(["serve", "--models", "tiny", *extra])


def test_ray_flags_select_the_scaled_server_and_validate():
    from masquerade.cli.serve import scale_config_from_args

    assert scale_config_from_args(_serve_args()) is None
    fixed = scale_config_from_args(_serve_args("--ray-replicas", "3", "--ray-address", "auto"))
    assert (fixed.replicas, fixed.address, fixed.autoscaling) == (3, "auto", False)
    scaled = scale_config_from_args(_serve_args("--ray-min-replicas", "1", "--ray-max-replicas", "4"))
    assert (scaled.replicas, scaled.min_replicas, scaled.max_replicas, scaled.autoscaling) == (1, 1, 4, True)
    for bad in (
        ("--ray-replicas", "0"),
        ("--ray-min-replicas", "3", "--ray-max-replicas", "2"),
        ("--ray-replicas", "5", "--ray-max-replicas", "4"),
        ("--ray-replicas", "1", "--ray-target-ongoing-requests", "0"),
    ):
        with pytest.raises(ValueError, match="--ray-"):
            scale_config_from_args(_serve_args(*bad))


def test_cli_refuses_bad_ray_flags_with_exit_code_2(capsys):
    from masquerade.cli import main

    assert main(["serve", "--models", "tiny", "--ray-min-replicas", "3", "--ray-max-replicas", "2"]) == 2
    assert "--ray-min-replicas" in capsys.readouterr().err


def test_engine_deployment_options_match_the_engine_queue():
    from masquerade.scale.app import engine_deployment_options
    from masquerade.scale.config import ScaleConfig

    engine = EngineConfig(max_queue=24, max_batch=12)
    fixed = engine_deployment_options(engine, ScaleConfig(replicas=2), gpus_per_replica=1.0, grace_seconds=10)
    assert fixed["max_ongoing_requests"] == 24 and fixed["num_replicas"] == 2
    assert fixed["ray_actor_options"]["num_gpus"] == 1.0
    assert fixed["graceful_shutdown_timeout_s"] > 10
    scaled = engine_deployment_options(
        engine, ScaleConfig(replicas=2, min_replicas=1, max_replicas=6).validated(), gpus_per_replica=0, grace_seconds=5
    )
    assert "num_replicas" not in scaled
    assert scaled["autoscaling_config"] == {
        "min_replicas": 1,
        "initial_replicas": 2,
        "max_replicas": 6,
        "target_ongoing_requests": 6.0,  # max_batch / 2: the CFG pairs that fill one UNet call
    }


def test_replica_device_follows_the_gpu_ray_assigned():
    from masquerade.scale.replica import replica_device

    assert replica_device("auto", [3]) == "cuda"
    assert replica_device("auto", []) == "cpu"
    assert replica_device("cuda:5", [5]) == "cuda"  # Ray narrowed CUDA_VISIBLE_DEVICES to that GPU
    assert replica_device("cpu", [0]) == "cpu"


def test_ray_failures_become_the_documented_status_codes():
    pytest.importorskip("ray.serve", reason="the [ray] extra is not installed")
    from ray import exceptions as ray_errors
    from ray.serve import exceptions as serve_errors

    from masquerade.engine.request import InvalidRequestError
    from masquerade.scale.frontend import RemoteStatus, _decode, ray_status

    code, details = ray_status(ray_errors.ActorDiedError())
    assert code == grpc.StatusCode.UNAVAILABLE and "retry" in details
    code, _ = ray_status(serve_errors.BackPressureError(num_queued_requests=5, max_queued_requests=4))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert ray_status(serve_errors.RequestCancelledError("x"))[0] == grpc.StatusCode.CANCELLED
    assert ray_status(InvalidRequestError("params.skip", "bad"))[0] == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(RemoteStatus) as caught:
        _decode(("error", grpc.StatusCode.FAILED_PRECONDITION.value[0], "no weights"))
    assert ray_status(caught.value) == (grpc.StatusCode.FAILED_PRECONDITION, "no weights")
    event = pb2.AnonymizeEvent(request_id="r", queued=pb2.Queued(position=2))
    assert _decode(("event", event.SerializeToString())) == event
