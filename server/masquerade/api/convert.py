"""Proto <-> engine types.

Conversion only maps: the engine's request types check every range in their
constructors (``engine/request.py``), the engine checks its own limits at
admission, and the pixel layer checks what needs the bytes (decoding, the
pixel cap). The only errors raised here are for what has no engine name: an
enum value this server does not know, or an over-long client request id.
Every error names the request field it is about.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from typing import Protocol

from masquerade.api.protos import pb2
from masquerade.engine import request as et
from masquerade.engine.job_state import Priority

MAX_REQUEST_ID_CHARS = 256


def process_id() -> str:
    """This process's ``served_by`` ("<host>:<pid>"); a Ray Serve replica passes its own id instead."""
    return f"{socket.gethostname()}:{os.getpid()}"


METHOD_FROM_PROTO: dict[int, et.Method] = {
    pb2.REVERSE_PERSONALIZATION: et.Method.REVERSE_PERSONALIZATION,
    pb2.BLUR: et.Method.BLUR,
    pb2.PIXELATE: et.Method.PIXELATE,
    pb2.SOLID: et.Method.SOLID,
}
METHOD_TO_PROTO: dict[et.Method, int] = {v: k for k, v in METHOD_FROM_PROTO.items()}

FORMAT_FROM_PROTO: dict[int, str | None] = {
    pb2.IMAGE_FORMAT_UNSPECIFIED: None,
    pb2.JPEG: "jpeg",
    pb2.PNG: "png",
    pb2.WEBP: "webp",
}
FORMAT_TO_PROTO: dict[str, int] = {v: k for k, v in FORMAT_FROM_PROTO.items() if v is not None}

FACE_STATUS_TO_PROTO: dict[et.FaceStatus, int] = {
    et.FaceStatus.ANONYMIZED: pb2.ANONYMIZED,
    et.FaceStatus.FALLBACK: pb2.FALLBACK,
    et.FaceStatus.SKIPPED: pb2.SKIPPED,
}
NOISE_FROM_PROTO: dict[int, str] = {pb2.NOISE_MODE_PER_FACE: "per_face", pb2.NOISE_MODE_RESEARCH: "research"}
NOISE_TO_PROTO: dict[str, int] = {v: k for k, v in NOISE_FROM_PROTO.items()}
PHASE_TO_PROTO: dict[et.Phase, int] = {
    et.Phase.PREPROCESS: pb2.PREPROCESS,
    et.Phase.INVERSION: pb2.INVERSION,
    et.Phase.GENERATION: pb2.GENERATION,
    et.Phase.POSTPROCESS: pb2.POSTPROCESS,
}
PRIORITY_FROM_PROTO: dict[int, Priority] = {
    pb2.PRIORITY_INTERACTIVE: Priority.INTERACTIVE,
    pb2.PRIORITY_BULK: Priority.BULK,
}
PRIORITY_TO_PROTO: dict[Priority, int] = {v: k for k, v in PRIORITY_FROM_PROTO.items()}
SHAPE_FROM_PROTO: dict[int, str | None] = {
    pb2.COVER_SHAPE_UNSPECIFIED: None,
    pb2.COVER_SHAPE_ELLIPSE: "ellipse",
    pb2.COVER_SHAPE_BOX: "box",
}


class RequestDefaults(Protocol):
    """What conversion needs from the engine's EngineInfo: server-side defaults and limits."""

    defaults: et.ReversePersonalizationParams
    default_method: et.Method
    max_faces: int


# ---------------------------------------------------------------- proto -> engine


def method_from_proto(value: int, default: et.Method) -> et.Method:
    if value == pb2.METHOD_UNSPECIFIED:
        return default
    try:
        return METHOD_FROM_PROTO[value]
    except KeyError:
        raise et.InvalidRequestError("method", f"unknown value {value}; use one of {_names(pb2.Method)}") from None


def method_label(message: pb2.AnonymizeRequest) -> str:
    """Bounded metrics label for the requested method ("unspecified", "unknown", or the method)."""
    if message.method == pb2.METHOD_UNSPECIFIED:
        return "unspecified"
    method = METHOD_FROM_PROTO.get(message.method)
    return method.value if method else "unknown"


def _names(enum_type) -> str:
    return ", ".join(name for name in enum_type.keys() if not name.endswith("_UNSPECIFIED"))  # noqa: SIM118 (protobuf enum wrappers are not iterable)


def params_from_proto(
    message: pb2.ReversePersonalizationParams, defaults: et.ReversePersonalizationParams
) -> et.ReversePersonalizationParams:
    """Set fields override the server's defaults; the engine type checks the ranges."""
    overrides = {
        name: getattr(message, name)
        for name in ("skip", "steps", "guidance_scale", "id_emb_scale", "ip_adapter_scale", "attribute_prompt", "seed")
        if message.HasField(name)
    }
    if message.noise != pb2.NOISE_MODE_UNSPECIFIED:
        if message.noise not in NOISE_FROM_PROTO:
            raise et.InvalidRequestError(
                "params.noise", f"unknown value {message.noise}; use one of {_names(pb2.NoiseMode)} or leave it unset"
            )
        overrides["noise"] = NOISE_FROM_PROTO[message.noise]
    return dataclasses.replace(defaults, **overrides)


def detection_from_proto(message: pb2.DetectionOptions, max_faces_limit: int) -> et.DetectionOptions:
    base = et.DetectionOptions(max_faces=max_faces_limit)
    overrides: dict = {"aligned": message.aligned}
    if message.HasField("score_threshold"):
        overrides["score_threshold"] = message.score_threshold
    if message.HasField("min_face_size"):
        overrides["min_face_size"] = message.min_face_size
    if message.HasField("max_faces"):
        overrides["max_faces"] = message.max_faces  # the engine checks it against its limit at admission
    if message.HasField("mask_scale"):
        overrides["mask_scale"] = message.mask_scale
    return dataclasses.replace(base, **overrides)


def output_from_proto(message: pb2.OutputOptions) -> et.OutputOptions:
    if message.format not in FORMAT_FROM_PROTO:
        raise et.InvalidRequestError(
            "output.format", f"unknown value {message.format}; use one of {_names(pb2.ImageFormat)} or leave it unset"
        )
    quality = message.quality if message.HasField("quality") else et.OutputOptions().quality
    return et.OutputOptions(format=FORMAT_FROM_PROTO[message.format], quality=quality)


def classical_strength_from_proto(message: pb2.ClassicalParams, *, covers: bool = False) -> float:
    """ClassicalParams.strength (1 when unset). Without ``covers`` (the video RPCs, whose covers are always
    ellipses sized by the face) a message that sets shape or mosaic_size is refused, never silently ignored."""
    if not covers:
        for name, is_set in (
            ("shape", message.shape != pb2.COVER_SHAPE_UNSPECIFIED),
            ("mosaic_size", message.HasField("mosaic_size")),
        ):
            if is_set:
                raise et.InvalidRequestError(
                    f"classical.{name}", "is not supported by the video RPCs yet (their covers are face ellipses)"
                )
    return message.strength if message.HasField("strength") else 1.0


def cover_from_proto(message: pb2.ClassicalParams) -> dict:
    """EngineRequest's ``cover_shape`` and ``mosaic_size`` from ClassicalParams; unset: None (the server's)."""
    if message.shape not in SHAPE_FROM_PROTO:
        raise et.InvalidRequestError(
            "classical.shape", f"unknown value {message.shape}; use one of {_names(pb2.CoverShape)} or leave it unset"
        )
    return {
        "cover_shape": SHAPE_FROM_PROTO[message.shape],
        "mosaic_size": message.mosaic_size if message.HasField("mosaic_size") else None,
    }


def priority_from_proto(value: int) -> Priority | None:
    """None for PRIORITY_UNSPECIFIED (the caller's default applies)."""
    if value == pb2.PRIORITY_UNSPECIFIED:
        return None
    if value not in PRIORITY_FROM_PROTO:
        raise et.InvalidRequestError("priority", f"unknown value {value}; use one of {_names(pb2.Priority)}")
    return PRIORITY_FROM_PROTO[value]


def estimated_waits_to_proto(waits: dict[Priority, float | None]) -> list[pb2.PriorityWait]:
    return [
        pb2.PriorityWait(priority=PRIORITY_TO_PROTO[priority], seconds=seconds or 0.0)
        for priority, seconds in sorted(waits.items())
    ]


def request_from_proto(message: pb2.AnonymizeRequest, info: RequestDefaults, *, request_id: str) -> et.EngineRequest:
    """Builds the engine's request; its types check the ranges. Raises InvalidRequestError."""
    if len(message.request_id) > MAX_REQUEST_ID_CHARS:
        raise et.InvalidRequestError("request_id", f"must be at most {MAX_REQUEST_ID_CHARS} characters")
    method = method_from_proto(message.method, info.default_method)
    params = params_from_proto(message.params, info.defaults)
    return et.EngineRequest(
        request_id=request_id,
        image=message.image,
        method=method,
        params=params,
        classical_strength=classical_strength_from_proto(message.classical, covers=True),
        **cover_from_proto(message.classical),
        detection=detection_from_proto(message.detection, info.max_faces),
        output=output_from_proto(message.output),
    )


# ---------------------------------------------------------------- engine -> proto


def _box(box: tuple[float, float, float, float]) -> pb2.Box:
    x0, y0, x1, y1 = (float(v) for v in box)
    return pb2.Box(x0=x0, y0=y0, x1=x1, y1=y1)


def face_to_proto(face: et.FaceRecord) -> pb2.FaceRecord:
    record = pb2.FaceRecord(
        index=face.index,
        box=_box(face.box),
        landmarks=[pb2.Point(x=float(x), y=float(y)) for x, y in face.landmarks.reshape(-1, 2)],
        score=float(face.score),
        method_applied=METHOD_TO_PROTO[face.method_applied],
        status=FACE_STATUS_TO_PROTO[face.status],
        reason=face.reason,
    )
    for name in ("identity_similarity_before", "identity_similarity_after", "verifier_distance"):
        value = getattr(face, name)
        if value is not None:
            setattr(record, name, float(value))
    return record


def result_to_proto(
    result: et.AnonymizeResult, *, request_id: str, served_by: str | None = None
) -> pb2.AnonymizeResponse:
    """``request_id`` is the client's id (the engine may know the request under another);
    ``served_by`` names the engine replica (default: this process, ``process_id()``)."""
    t = result.timings
    return pb2.AnonymizeResponse(
        request_id=request_id,
        image=result.image,
        format=FORMAT_TO_PROTO.get(result.format, pb2.IMAGE_FORMAT_UNSPECIFIED),
        faces=[face_to_proto(face) for face in result.faces],
        complete=result.complete,
        no_faces=result.no_faces,
        timings=pb2.Timings(
            queued_seconds=t.queued_seconds,
            preprocess_seconds=t.preprocess_seconds,
            inversion_seconds=t.inversion_seconds,
            generation_seconds=t.generation_seconds,
            postprocess_seconds=t.postprocess_seconds,
            total_seconds=t.total_seconds,
        ),
        model_versions=result.model_versions,
        width=result.width,
        height=result.height,
        residual_recognisable=result.residual_recognisable,
        served_by=served_by or process_id(),
    )


def event_to_proto(event: et.EngineEvent, *, request_id: str, served_by: str | None = None) -> pb2.AnonymizeEvent:
    """One stream event. FailedEvent has no proto: the servicer turns it into a status."""
    if isinstance(event, et.QueuedEvent):
        return pb2.AnonymizeEvent(request_id=request_id, queued=pb2.Queued(position=event.position))
    if isinstance(event, et.FacesFoundEvent):
        return pb2.AnonymizeEvent(
            request_id=request_id, faces_found=pb2.FacesFound(boxes=[_box(b) for b in event.boxes])
        )
    if isinstance(event, et.ProgressEvent):
        return pb2.AnonymizeEvent(
            request_id=request_id,
            progress=pb2.Progress(phase=PHASE_TO_PROTO[event.phase], step=event.step, total=event.total),
        )
    if isinstance(event, et.ResultEvent):
        return pb2.AnonymizeEvent(
            request_id=request_id,
            result=result_to_proto(event.result, request_id=request_id, served_by=served_by),
        )
    raise TypeError(f"no AnonymizeEvent for {type(event).__name__}")


def params_to_proto(params: et.ReversePersonalizationParams) -> pb2.ReversePersonalizationParams:
    return pb2.ReversePersonalizationParams(
        skip=params.skip,
        steps=params.steps,
        guidance_scale=params.guidance_scale,
        id_emb_scale=params.id_emb_scale,
        ip_adapter_scale=params.ip_adapter_scale,
        attribute_prompt=params.attribute_prompt,  # None leaves the field unset
        seed=params.seed,
        noise=NOISE_TO_PROTO[params.noise],
    )


def server_info_to_proto(
    info, *, max_receive_message_bytes: int, max_send_message_bytes: int, replicas: int = 1
) -> pb2.ServerInfo:
    """``info`` is the engine's EngineInfo; the message limits are the gRPC server's; ``replicas``
    the engine replicas behind it (1 for the single-process server)."""
    return pb2.ServerInfo(
        version=info.version,
        methods=[
            pb2.MethodAvailability(method=METHOD_TO_PROTO[method], available=available, reason=reason)
            for method, (available, reason) in info.methods.items()
        ],
        models=dict(info.models),
        limits=pb2.Limits(
            max_receive_message_bytes=max_receive_message_bytes,
            max_send_message_bytes=max_send_message_bytes,
            max_image_pixels=info.max_image_pixels,
            max_faces=info.max_faces,
            max_steps=info.max_steps,
            max_batch=info.max_batch,
            max_queue=info.max_queue,
        ),
        defaults=params_to_proto(info.defaults),
        default_method=METHOD_TO_PROTO[info.default_method],
        device=info.device,
        dtype=info.dtype,
        attention_backend=info.attention_backend,
        replicas=replicas,
    )
