"""The HTTP/JSON API (FastAPI): the Anonymizer service for callers without gRPC, and the web page.

Every request goes through the gRPC servicer's own pieces: the query fields or the ``params``
JSON become an AnonymizeRequest proto (``schema``), which ``convert.request_from_proto``
validates and the engine runs, exactly as for gRPC. Errors come from ``api.errors.status_for``
and are only translated to HTTP statuses (``problems``). The gate in front of the routes
answers bad tokens and a draining server from the headers alone, before any body byte is read;
the body size is capped by FastAPI before it is read, and a body that stops arriving times out.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import inspect
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import resources
from typing import Annotated, Any

import grpc
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.sse import format_sse_event
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from google.protobuf import json_format
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import ClientDisconnect

from masquerade import metrics
from masquerade.api import convert, security
from masquerade.api.access_log import AccessRecord
from masquerade.api.errors import engine_failure, status_for
from masquerade.api.http import schema
from masquerade.api.http.problems import PROBLEM_MEDIA_TYPE, problem, problem_for_status
from masquerade.api.http.transport import CLIENT_NAME_SCOPE_KEY
from masquerade.api.protos import pb2
from masquerade.api.servicer import AnonymizerServicer, ProgressThrottle
from masquerade.engine import request as et
from masquerade.errors import InvalidRequestError, RetryLaterError

log = logging.getLogger(__name__)

API_PREFIX = "/v1/"
REPORT_HEADER = "X-Masquerade-Report"
REPORT_SIZE_HEADER = "X-Masquerade-Report-Size"
MAX_REPORT_HEADER_CHARS = 8192
"""Larger reports are left out of the image response (proxies cap header sizes): ask for JSON instead."""

IMAGE_MEDIA_TYPES = {pb2.JPEG: "image/jpeg", pb2.PNG: "image/png", pb2.WEBP: "image/webp"}
VIDEO_PATH = "/v1/anonymize-video"
VIDEO_MEDIA_TYPES = {
    ".mp4": "video/mp4",
    ".mov": "video/quicktime",
    ".mkv": "video/x-matroska",
    ".webm": "video/webm",
    ".avi": "video/x-msvideo",
}
SUFFIX_FOR_VIDEO_MEDIA_TYPE = {
    **{media: suffix for suffix, media in VIDEO_MEDIA_TYPES.items()},
    "video/matroska": ".mkv",
    "video/avi": ".avi",
    "video/msvideo": ".avi",
}
_VIDEO_FIELD_NAMES = {"chunk": "body", "chunk.offset": "body"}
"""AnonymizeVideo's gRPC-only field names in errors, as the HTTP request names them (VideoStart's fields are
query fields without the ``start.`` prefix)."""
FORMAT_FOR_MEDIA_TYPE = {media: fmt for fmt, media in IMAGE_MEDIA_TYPES.items()}
WEB_ROOT = resources.files("masquerade.api.http") / "web"
PAGE_POLICY = (
    "default-src 'self'; img-src 'self' blob: data:; connect-src 'self'; style-src 'self'; script-src 'self'; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)


@dataclass(frozen=True)
class ApiLimits:
    max_body_bytes: int
    """The largest request body (the image plus form overhead); the gRPC max receive message size."""
    body_timeout_s: float = 30.0
    """A request body must keep arriving: at most this long between two chunks."""
    max_video_bytes: int | None = None
    """The largest body of POST /v1/anonymize-video (``--max-video-bytes``); None: the servicer's video limit."""

    def body_limit(self, path: str) -> int:
        if path == VIDEO_PATH and self.max_video_bytes is not None:
            return self.max_video_bytes
        return self.max_body_bytes


class BodyTimeoutError(Exception):
    """The client stopped sending its request body."""


class BodyTooLargeError(Exception):
    """The request body is past ``ApiLimits.max_body_bytes``; raised before the byte that crosses it is kept."""


class _Gate:
    """ASGI middleware for /v1/: bad tokens -> 401, draining -> 503 and a declared Content-Length past the limit
    -> 413, all from the headers alone; then the body is counted (413) and timed (408) as it arrives.

    Sets the caller's principal (``security.current_principal``) for the request, as gRPC's gate does.
    """

    def __init__(self, app, *, tokens: security.TokenStore | None, draining: Callable[[], bool], limits: ApiLimits):
        self.app = app
        self.tokens = tokens
        self.draining = draining
        self.limits = limits

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(API_PREFIX):
            await self.app(scope, receive, send)
            return
        rpc = _rpc_name(scope)
        if self.tokens is not None:
            presented = security.bearer_token(_header_pairs(scope))
            principal = self.tokens.lookup(presented) if presented is not None else None
            if principal is None:
                metrics.AUTH_FAILURES.labels(reason="missing" if presented is None else "invalid").inc()
                why = "no 'Authorization: Bearer <token>' header" if presented is None else "the token is not valid"
                _record(scope, rpc).finish(grpc.StatusCode.UNAUTHENTICATED)
                response = problem_for_status(
                    grpc.StatusCode.UNAUTHENTICATED, f"{why}; send a token listed in the server's token file"
                )
                response.headers["WWW-Authenticate"] = 'Bearer realm="masquerade"'
                await self._refuse(response, scope, receive, send)
                return
        else:
            principal = None
        if self.draining():
            _record(scope, rpc).finish(grpc.StatusCode.UNAVAILABLE)
            response = problem_for_status(
                grpc.StatusCode.UNAVAILABLE, "the server is draining for shutdown; retry on another replica"
            )
            await self._refuse(response, scope, receive, send)
            return
        max_bytes = self.limits.body_limit(scope["path"])
        declared = _content_length(scope)
        if declared is not None and declared > max_bytes:
            _record(scope, rpc).finish(grpc.StatusCode.INVALID_ARGUMENT)
            await _too_large(max_bytes)(scope, receive, send)
            return

        body_done = False
        received = 0
        timeout_s = self.limits.body_timeout_s

        async def receive_in_time():
            nonlocal body_done, received
            if body_done:
                return await receive()  # after the body: only a disconnect is left to wait for
            try:
                async with asyncio.timeout(timeout_s):
                    message = await receive()
            except TimeoutError:
                raise BodyTimeoutError(f"no request body bytes for {timeout_s:g}s") from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > max_bytes:
                    raise BodyTooLargeError()
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        with security.principal_scope(principal):
            await self.app(scope, receive_in_time, send)

    async def _refuse(self, response: Response, scope, receive, send) -> None:
        """Answers at once, then reads and drops whatever body the client is still sending (never keeping it).

        Closing with unread bytes in flight makes the kernel reset the connection, and a client still
        sending would lose the answer. A client that asked ``Expect: 100-continue`` sends no body at all.
        """
        if any(k == b"expect" and v.lower() == b"100-continue" for k, v in scope.get("headers", ())):
            await response(scope, receive, send)
            return
        await send({"type": "http.response.start", "status": response.status_code, "headers": response.raw_headers})
        await send({"type": "http.response.body", "body": response.body, "more_body": True})
        dropped = 0
        try:
            while dropped <= self.limits.body_limit(scope["path"]):
                async with asyncio.timeout(self.limits.body_timeout_s):
                    message = await receive()
                if message["type"] != "http.request":
                    break
                dropped += len(message.get("body", b""))
                if not message.get("more_body", False):
                    break
        except TimeoutError:
            pass
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def _content_length(scope) -> int | None:
    for key, value in scope.get("headers", ()):
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _too_large(max_bytes: int) -> Response:
    # No "Connection: close": a client still sending would see a reset instead of this answer. The rest of the
    # body is read and dropped by uvicorn (never kept), or not sent at all by a client that asked 100-continue.
    return problem(413, f"body: larger than the server's limit of {max_bytes} bytes", field="body")


def _header_pairs(scope) -> list[tuple[str, str]]:
    return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope.get("headers", ())]


_RPC_FOR_PATH = {
    "/v1/anonymize": "HTTP Anonymize",
    "/v1/anonymize:stream": "HTTP AnonymizeStream",
    "/v1/info": "HTTP GetServerInfo",
    VIDEO_PATH: "HTTP AnonymizeVideo",
}


def _rpc_name(scope) -> str:
    return _RPC_FOR_PATH.get(scope["path"], "HTTP other")


def _peer(scope) -> str:
    client = scope.get("client")
    if not client:
        return ""
    host, port = client[0], client[1]
    return f"ipv6:[{host}]:{port}" if ":" in host else f"ipv4:{host}:{port}"


def _record(scope, rpc: str, message: pb2.AnonymizeRequest | None = None) -> AccessRecord:
    """An access-log record in gRPC's form: the same log and metrics, with "HTTP <rpc>" as the rpc."""
    fields: dict[str, Any] = {}
    if message is not None:
        fields = {"request_id": message.request_id[:128], "method": convert.method_label(message)}
    return AccessRecord(rpc=rpc, peer=_peer(scope), client=scope.get(CLIENT_NAME_SCOPE_KEY, ""), **fields)


# ---------------------------------------------------------------- request parsing


def _query_dependency(fields: tuple[schema.QueryField, ...], message: str) -> Callable[..., Any]:
    """A FastAPI dependency whose parameters are the proto's query fields (so the OpenAPI document lists them)."""
    parameters = [
        inspect.Parameter(
            f"field_{index}",
            inspect.Parameter.KEYWORD_ONLY,
            default=None,
            annotation=Annotated[
                field.annotation | None,
                Query(alias=field.name, description=f"{message}.{field.name} (see the proto)"),
            ],
        )
        for index, field in enumerate(fields)
    ]

    async def query_fields(**values: Any) -> dict[str, Any]:
        return {fields[int(key.split("_")[1])].name: value for key, value in values.items() if value is not None}

    query_fields.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    return query_fields


QueryFields = Annotated[dict[str, Any], Depends(_query_dependency(schema.request_query_fields(), "AnonymizeRequest"))]
_KNOWN_QUERY = frozenset(field.name for field in schema.request_query_fields())
VideoQueryFields = Annotated[dict[str, Any], Depends(_query_dependency(schema.video_query_fields(), "VideoStart"))]
_KNOWN_VIDEO_QUERY = frozenset(field.name for field in schema.video_query_fields())


class _UnsupportedMediaType(Exception):
    pass


PROGRESS_EVENTS_HELD = 16
"""Video progress events waiting for a slow SSE reader; an older one is dropped for a newer (each is cumulative)."""

TIMEOUT_HEADER = "X-Server-Timeout"
"""Seconds the caller will wait (Google's HTTP convention for an RPC deadline): admission refuses work that cannot
finish in time, and a request still running then is cancelled and answered 504, like a gRPC deadline."""


TIMEOUT_PARAMETER = {
    "name": TIMEOUT_HEADER,
    "in": "header",
    "required": False,
    "description": "Seconds the caller will wait, as a gRPC deadline: a request that cannot finish in time is "
    "refused at once, and one still running then is cancelled; both are answered 504 (DEADLINE_EXCEEDED).",
    "schema": {"type": "number", "exclusiveMinimum": 0, "maximum": 86400},
}
"""The OpenAPI parameter of TIMEOUT_HEADER (read by _HttpCall, not by FastAPI, so one check gives one error)."""


class _HttpCall:
    """What the servicer reads from a gRPC call's context, taken from an HTTP request: its deadline and the name
    on its client certificate (so quotas per certificate and honest admission apply to HTTP callers too)."""

    def __init__(self, request: Request):
        self.deadline: float | None = None
        value = request.headers.get(TIMEOUT_HEADER)
        if value is not None:
            try:
                seconds = float(value)
            except ValueError:
                seconds = float("nan")
            if not (0 < seconds <= 86400):
                raise InvalidRequestError(TIMEOUT_HEADER, f"must be a number of seconds in (0, 86400], got {value!r}")
            self.deadline = time.monotonic() + seconds
        self.client_name = request.scope.get(CLIENT_NAME_SCOPE_KEY, "")

    def time_remaining(self) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    def auth_context(self) -> dict:
        return {"x509_common_name": [self.client_name.encode()]} if self.client_name else {}


async def _read_request(request: Request, query: dict[str, Any], max_body_bytes: int) -> pb2.AnonymizeRequest:
    """The AnonymizeRequest of an HTTP request: raw image body or multipart (image + params JSON), plus query fields."""
    unknown = sorted(set(request.query_params) - _KNOWN_QUERY)
    if unknown:
        raise InvalidRequestError(unknown[0], "unknown query field; the fields are the proto's (see /openapi.json)")
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    message = pb2.AnonymizeRequest()
    if content_type == "multipart/form-data":
        try:
            form = await request.form(max_files=1, max_fields=1, max_part_size=1024 * 1024)
        except MultiPartException as exc:
            raise InvalidRequestError("body", f"malformed multipart form: {exc.message}") from None
        unexpected = sorted(set(form.keys()) - {"image", "params"})
        if unexpected:
            raise InvalidRequestError(unexpected[0], "unknown form part; send 'image' and optionally 'params'")
        image = form.get("image")
        if not isinstance(image, UploadFile):
            raise InvalidRequestError("image", "the multipart form needs a file part named 'image'")
        message.image = await image.read()
        params = form.get("params")
        if params is not None:
            text = (await params.read()).decode("utf-8", "replace") if isinstance(params, UploadFile) else params
            _parse_params_json(text, message)
    elif content_type.startswith("image/") or content_type == "application/octet-stream":
        message.image = await request.body()
    else:
        raise _UnsupportedMediaType(
            f"Content-Type {content_type or '(none)'!r}: send the image bytes as image/* "
            "(parameters as query fields) or a multipart/form-data form with an 'image' part"
        )
    if query:
        try:
            schema.request_from_query(query, into=message)
        except json_format.ParseError as exc:
            raise InvalidRequestError("query", str(exc)) from None
    if not message.image:
        raise InvalidRequestError("image", "the request carries no image bytes")
    return message


def _read_video_start(request: Request, query: dict[str, Any]) -> pb2.VideoStart:
    """The VideoStart of POST /v1/anonymize-video: its query fields; the file's name from Content-Type when unset."""
    unknown = sorted(set(request.query_params) - _KNOWN_VIDEO_QUERY)
    if unknown:
        raise InvalidRequestError(unknown[0], "unknown query field; the fields are VideoStart's (see /openapi.json)")
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if not (content_type.startswith("video/") or content_type == "application/octet-stream"):
        raise _UnsupportedMediaType(
            f"Content-Type {content_type or '(none)'!r}: send the video file's bytes as video/* or "
            "application/octet-stream (options as query fields)"
        )
    start = pb2.VideoStart()
    if query:
        try:
            schema.request_from_query(query, into=start)
        except json_format.ParseError as exc:
            raise InvalidRequestError("query", str(exc)) from None
    if not start.filename:  # the container of the output; the content decides how the input is read
        start.filename = "video" + SUFFIX_FOR_VIDEO_MEDIA_TYPE.get(content_type, ".mp4")
    return start


def _accepted_media(request: Request) -> Iterator[tuple[str, float]]:
    """The Accept header's (media type in lower case, quality) pairs; a malformed q= counts as 0."""
    for item in request.headers.get("accept", "").split(","):
        media, *options = (part.strip() for part in item.split(";"))
        quality = 1.0
        for option in options:
            if option.startswith("q="):
                try:
                    quality = float(option[2:])
                except ValueError:
                    quality = 0.0
        yield media.lower(), quality


def _video_reply_kind(request: Request) -> str:
    """ "video" (the file itself), "json" (the report with the video in base64) or "events" (Server-Sent Events:
    progress while the video is processed, then that JSON as the last event), as the Accept header prefers."""
    best = {"video": -1.0, "json": -1.0, "events": -1.0}
    for media, quality in _accepted_media(request):
        if media == "application/json":
            kind = "json"
        elif media == "text/event-stream":
            kind = "events"
        elif media.startswith("video/") or media in ("*/*", "application/octet-stream"):
            kind = "video"
        else:
            continue
        best[kind] = max(best[kind], quality)
    kind = max(("events", "json"), key=best.__getitem__)
    return kind if best[kind] > 0 and best[kind] > best["video"] else "video"


def _parse_params_json(text: str, message: pb2.AnonymizeRequest) -> None:
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidRequestError("params", f"not valid JSON ({exc.msg} at character {exc.pos})") from None
    if not isinstance(document, dict):
        raise InvalidRequestError("params", "must be a JSON object of AnonymizeRequest fields")
    if "image" in document:
        raise InvalidRequestError("params.image", "send the image as the 'image' part, not inside params")
    try:
        json_format.ParseDict(document, message)
    except json_format.ParseError as exc:
        raise InvalidRequestError("params", str(exc)) from None


def _accept(request: Request) -> tuple[bool, int | None]:
    """(whether the client prefers an image to JSON, the output format an exact image type asks for)."""
    best_image, best_json, exact = -1.0, -1.0, None
    for media, quality in _accepted_media(request):
        if media.startswith("image/"):
            best_image = max(best_image, quality)
            if media in FORMAT_FOR_MEDIA_TYPE and exact is None and quality > 0:
                exact = FORMAT_FOR_MEDIA_TYPE[media]
        elif media in ("application/json", "application/*", "*/*"):
            best_json = max(best_json, quality)
    wants_image = best_image > 0 and best_image > best_json
    return wants_image, exact if wants_image else None


# ---------------------------------------------------------------- responses


def _report_json(response: pb2.AnonymizeResponse) -> bytes:
    report = pb2.AnonymizeResponse()
    report.CopyFrom(response)
    report.ClearField("image")
    document = schema.to_json(report)
    del document["image"]  # the body holds it
    return json.dumps(document, separators=(",", ":")).encode("utf-8")


def _image_response(response: pb2.AnonymizeResponse) -> Response:
    report = base64.b64encode(_report_json(response)).decode("ascii")
    headers = {}
    if len(report) <= MAX_REPORT_HEADER_CHARS:
        headers[REPORT_HEADER] = report
    else:
        headers[REPORT_SIZE_HEADER] = str(len(_report_json(response)))
    media_type = IMAGE_MEDIA_TYPES.get(response.format, "application/octet-stream")
    return Response(response.image, media_type=media_type, headers=headers)


def _failure(
    exc: BaseException, record: AccessRecord, request_id: str = "", field_names: dict[str, str] | None = None
) -> Response:
    code, details = status_for(exc, request_id=request_id)
    record.finish(code)
    field = exc.field if isinstance(exc, InvalidRequestError) else None
    if field is not None and field_names is not None:
        field = field_names.get(field, field.removeprefix("start."))
    return problem_for_status(
        code,
        details,
        request_id=request_id,
        retry_after_s=exc.retry_after_s if isinstance(exc, RetryLaterError) else None,
        field=field,
    )


async def _until_disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _SpooledVideoResponse(StreamingResponse):
    """Streams a video call's output from the spool, then frees the call (its slot and files) however the sending
    ended: all sent, the client gone, or the server stopping."""

    def __init__(self, content, *, release: Callable[[], None], **kwargs):
        super().__init__(content, **kwargs)
        self._release = release

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with contextlib.suppress(Exception):
                await self.body_iterator.aclose()  # closes the output file before its folder goes
            self._release()


async def _file_chunks(path, chunk_bytes: int, encode: Callable[[bytes], bytes] | None = None):
    with open(path, "rb") as file:
        while data := await asyncio.to_thread(file.read, chunk_bytes):
            yield encode(data) if encode is not None else data


def _video_json_ends(document: dict, media_type: str) -> tuple[bytes, bytes]:
    """What goes before and after the base64 video in the JSON reply: {...report, "media_type", "video": "...."}."""
    head = json.dumps({**document, "media_type": media_type}, separators=(",", ":"))[:-1].encode("utf-8")
    return head + b',"video":"', b'"}'


async def _video_json(head: bytes, tail: bytes, output_path, chunk_bytes: int):
    three = max(3, chunk_bytes - chunk_bytes % 3)  # whole base64 quanta per chunk: no padding mid-string
    yield head
    async for encoded in _file_chunks(output_path, three, base64.b64encode):
        yield encoded
    yield tail


def _video_events(work: asyncio.Future, progress: asyncio.Queue, entry, start, record, chunk_bytes: int):
    """The SSE body of a video call whose upload is read: a `progress` event (VideoProgress JSON) as the work goes
    on, then one `result` event (the JSON reply: report, media_type, video in base64) or one `error` event (a
    problem document). The client leaving (or the stream closing) cancels the work."""

    async def events():
        try:
            while not work.done():
                getter = asyncio.ensure_future(progress.get())
                await asyncio.wait((work, getter), return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield format_sse_event(event="progress", data_str=json.dumps(schema.to_json(getter.result())))
                else:
                    getter.cancel()
            try:
                report = work.result()
            except Exception as exc:
                failure = _failure(exc, record, start.request_id, _VIDEO_FIELD_NAMES)
                yield format_sse_event(event="error", data_str=failure.body.decode("utf-8"))
                return
            record.finish(grpc.StatusCode.OK)
            document = schema.to_json(pb2.AnonymizeVideoResponse(request_id=start.request_id, report=report))
            media_type = VIDEO_MEDIA_TYPES.get(entry.output_path.suffix.lower(), "application/octet-stream")
            head, tail = _video_json_ends(document, media_type)
            yield b"event: result\ndata: "
            async for part in _video_json(head, tail, entry.output_path, chunk_bytes):
                yield part
            yield b"\n\n"
        finally:
            if not work.done():  # the client left: stop the pipeline for it
                work.cancel()
                await asyncio.gather(work, return_exceptions=True)
                record.finish(grpc.StatusCode.CANCELLED)

    return events()


def _video_response(
    report: pb2.VideoReport, output_path, request_id: str, *, as_json: bool, chunk_bytes: int, release
) -> Response:
    """The output video with the report in a header (base64 JSON, when small), or a JSON document with the report
    and the video in base64: streamed from the spool either way, never held whole in memory."""
    media_type = VIDEO_MEDIA_TYPES.get(output_path.suffix.lower(), "application/octet-stream")
    size = output_path.stat().st_size
    document = schema.to_json(pb2.AnonymizeVideoResponse(request_id=request_id, report=report))
    if as_json:
        head, tail = _video_json_ends(document, media_type)
        length = len(head) + 4 * ((size + 2) // 3) + len(tail)
        return _SpooledVideoResponse(
            _video_json(head, tail, output_path, chunk_bytes),
            release=release,
            media_type="application/json",
            headers={"Content-Length": str(length)},
        )
    headers = {"Content-Length": str(size)}
    encoded_report = base64.b64encode(json.dumps(document, separators=(",", ":")).encode("utf-8")).decode("ascii")
    if len(encoded_report) <= MAX_REPORT_HEADER_CHARS:
        headers[REPORT_HEADER] = encoded_report
    else:
        headers[REPORT_SIZE_HEADER] = str(len(json.dumps(document, separators=(",", ":")).encode("utf-8")))
    return _SpooledVideoResponse(
        _file_chunks(output_path, chunk_bytes), release=release, media_type=media_type, headers=headers
    )


# ---------------------------------------------------------------- the app


def build_app(
    servicer: AnonymizerServicer,
    *,
    tokens: security.TokenStore | None,
    draining: Callable[[], bool],
    limits: ApiLimits,
    cors_origins: tuple[str, ...] = (),
) -> FastAPI:
    """The FastAPI app: /v1/ API, /openapi.json, /docs and /redoc (offline), and the web page at /.

    ``cors_origins``: other web origins whose pages may call the API (Starlette's CORS middleware, outside
    the gate, so a browser's preflight, which carries no token, is answered).
    """
    if limits.max_video_bytes is None:
        limits = dataclasses.replace(limits, max_video_bytes=servicer.video.config.max_video_bytes)
    app = FastAPIOffline(
        title="Masquerade",
        version=_version(),
        description=(
            "Face anonymization over HTTP: the gRPC service's AnonymizeRequest as query fields (or a multipart "
            "form's `params` JSON part), the image as the body. Send `Authorization: Bearer <token>` when the "
            "server has a token file. Errors are RFC 9457 problem details naming the field."
        ),
        static_url="/docs-assets",
    )
    app.add_middleware(_Gate, tokens=tokens, draining=draining, limits=limits)
    if cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "Accept"],
            expose_headers=[REPORT_HEADER, REPORT_SIZE_HEADER, "Retry-After"],
            max_age=600,
        )
    problem_responses = {
        status: {"description": text, "content": {PROBLEM_MEDIA_TYPE: {}}}
        for status, text in (
            (400, "a field is invalid (the problem's `field` names it)"),
            (401, "missing or invalid bearer token"),
            (413, "the body is larger than the server's limit"),
            (415, "the body's Content-Type is not one the endpoint takes"),
            (422, "the method needs models this server has not loaded"),
            (429, "queue full or quota exceeded; see Retry-After"),
            (503, "loading, warming up or draining; see Retry-After"),
        )
    }
    response_model = schema.model_for(pb2.AnonymizeResponse.DESCRIPTOR)
    info_model = schema.model_for(pb2.ServerInfo.DESCRIPTOR)
    event_model = schema.model_for(pb2.AnonymizeEvent.DESCRIPTOR)
    upload_body = {
        "parameters": [TIMEOUT_PARAMETER],
        "requestBody": {
            "required": True,
            "content": {
                "image/*": {"schema": {"type": "string", "format": "binary"}},
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["image"],
                        "properties": {
                            "image": {"type": "string", "format": "binary"},
                            "params": {
                                "type": "string",
                                "description": "AnonymizeRequest fields as protobuf JSON (all but the image)",
                            },
                        },
                    }
                },
            },
        },
    }

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {"loc": ("request",), "msg": "invalid"}
        field = str(first["loc"][-1]) if first.get("loc") else "request"
        _record(request.scope, _rpc_name(request.scope)).finish(grpc.StatusCode.INVALID_ARGUMENT)
        return problem(400, f"{field}: {first['msg']}", code="INVALID_ARGUMENT", field=field)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return problem(exc.status_code, str(exc.detail), headers=dict(exc.headers or {}))

    @app.exception_handler(BodyTooLargeError)
    async def _body_too_large(request: Request, exc: BodyTooLargeError) -> Response:
        _record(request.scope, _rpc_name(request.scope)).finish(grpc.StatusCode.INVALID_ARGUMENT)
        return _too_large(limits.body_limit(request.url.path))

    @app.exception_handler(BodyTimeoutError)
    async def _body_timeout(request: Request, exc: BodyTimeoutError) -> Response:
        _record(request.scope, _rpc_name(request.scope)).finish(grpc.StatusCode.DEADLINE_EXCEEDED)
        return problem(408, f"body: {exc}", field="body", headers={"Connection": "close"})

    @app.exception_handler(_UnsupportedMediaType)
    async def _media_type(request: Request, exc: _UnsupportedMediaType) -> Response:
        _record(request.scope, _rpc_name(request.scope)).finish(grpc.StatusCode.INVALID_ARGUMENT)
        return problem(415, str(exc), field="Content-Type")

    async def _message_or_problem(
        request: Request, query: dict[str, Any], rpc: str
    ) -> tuple[pb2.AnonymizeRequest | None, AccessRecord, Response | None]:
        record = _record(request.scope, rpc)
        try:
            request.state.call = _HttpCall(request)
            message = await _read_request(request, query, limits.max_body_bytes)
        except InvalidRequestError as exc:
            return None, record, _failure(exc, record)
        record.request_id = message.request_id[:128]
        record.method = convert.method_label(message)
        return message, record, None

    @app.post(
        "/v1/anonymize",
        summary="Anonymize the faces in one image",
        description=(
            "Body: the image (`Content-Type: image/*`) with parameters as query fields, or a multipart form with "
            "an `image` part and an optional `params` JSON part. `Accept: image/*` returns the image with the report "
            f"(base64 JSON) in `{REPORT_HEADER}`, or its size in `{REPORT_SIZE_HEADER}` when too large for a header; "
            "otherwise the JSON report with the image in base64."
        ),
        responses={
            200: {
                "description": "the anonymized image (Accept: image/*) or the JSON report",
                "model": response_model,
                "content": {"image/jpeg": {}, "image/png": {}, "image/webp": {}},
            },
            **problem_responses,
        },
        openapi_extra=upload_body,
    )
    async def anonymize(request: Request, query: QueryFields) -> Response:
        message, record, failed = await _message_or_problem(request, query, "HTTP Anonymize")
        if failed is not None:
            return failed
        wants_image, exact_format = _accept(request)
        if exact_format is not None and message.output.format == pb2.IMAGE_FORMAT_UNSPECIFIED:
            message.output.format = exact_format
        call = request.state.call
        work = asyncio.ensure_future(
            asyncio.wait_for(servicer.run_to_result(message, record, call), call.time_remaining())
        )
        gone = asyncio.ensure_future(_until_disconnected(request))
        try:
            await asyncio.wait((work, gone), return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not work.done():  # the client left: stop the engine's work for it
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
            record.finish(grpc.StatusCode.CANCELLED)
            return Response(status_code=499)
        try:
            response = work.result()
        except Exception as exc:
            return _failure(exc, record, message.request_id)
        record.finish(grpc.StatusCode.OK)
        if wants_image:
            return _image_response(response)
        return JSONResponse(schema.to_json(response))

    @app.post(
        "/v1/anonymize:stream",
        summary="Anonymize one image, with progress as Server-Sent Events",
        description=(
            "The same request as /v1/anonymize. Each event is one AnonymizeEvent as JSON, named after its member: "
            "`queued`, `faces_found`, `progress`, then `result` (with the image in base64). A failure after the "
            "stream has started is an `error` event whose data is a problem document."
        ),
        responses={
            200: {
                "description": "text/event-stream of AnonymizeEvent JSON",
                "content": {"text/event-stream": {"schema": event_model.model_json_schema()}},
            },
            **problem_responses,
        },
        openapi_extra=upload_body,
    )
    async def anonymize_stream(request: Request, query: QueryFields) -> Response:
        message, record, failed = await _message_or_problem(request, query, "HTTP AnonymizeStream")
        if failed is not None:
            return failed
        try:
            handle = servicer.submit(message, record, request.state.call)
        except Exception as exc:
            return _failure(exc, record, message.request_id)
        return StreamingResponse(
            _events(servicer, handle, message.request_id, record, request.state.call),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    video_report_model = schema.model_for(pb2.AnonymizeVideoResponse.DESCRIPTOR)

    @app.post(
        VIDEO_PATH,
        summary="Anonymize the faces in a video file (AnonymizeVideo)",
        description=(
            "Body: the video file (`Content-Type: video/*` or `application/octet-stream`, at most the server's "
            "`max_video_bytes`), with VideoStart's fields as query fields; `filename` (default from the Content-Type, "
            "else video.mp4) names the output's container. Returns the anonymized video with the report (an "
            f"AnonymizeVideoResponse with its `report`, base64 JSON) in `{REPORT_HEADER}`, or its size in "
            f"`{REPORT_SIZE_HEADER}` when too large for a header. With `Accept: application/json`: that JSON plus "
            "`media_type` and `video` (the file in base64). With `Accept: text/event-stream`: once the upload is "
            "read, `progress` events (VideoProgress JSON) while it is processed, then that JSON as a `result` event "
            "(or an `error` event). A client that disconnects cancels the work."
        ),
        responses={
            200: {
                "description": "the anonymized video, or (Accept: application/json) the report with the video, or "
                "(Accept: text/event-stream) `progress` events (VideoProgress JSON) then a `result` event holding "
                "that JSON, or an `error` event holding a problem document",
                "model": video_report_model,
                "content": {
                    **{media: {} for media in VIDEO_MEDIA_TYPES.values()},
                    "text/event-stream": {"schema": {"type": "string"}},
                },
            },
            **problem_responses,
        },
        openapi_extra={
            "parameters": [TIMEOUT_PARAMETER],
            "requestBody": {
                "required": True,
                "content": {
                    "video/*": {"schema": {"type": "string", "format": "binary"}},
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                },
            },
        },
    )
    async def anonymize_video(request: Request, query: VideoQueryFields) -> Response:
        record = _record(request.scope, "HTTP AnonymizeVideo")
        video = servicer.video
        try:
            call = _HttpCall(request)
            start = _read_video_start(request, query)
        except InvalidRequestError as exc:
            return _failure(exc, record, field_names=_VIDEO_FIELD_NAMES)
        reply_kind = _video_reply_kind(request)
        held = contextlib.ExitStack()  # the call's slot and spool entry: released when the response is sent
        handed_off = False
        try:
            try:
                entry = held.enter_context(video.video_call())
            except Exception as exc:
                return _failure(exc, record, start.request_id, _VIDEO_FIELD_NAMES)
            body_read = asyncio.Event()

            async def upload():
                async for data in request.stream():
                    if data:
                        yield data
                body_read.set()

            async def client_gone() -> None:
                await body_read.wait()  # until then, the upload's reads see a disconnect (ClientDisconnect)
                await _until_disconnected(request)

            progress: asyncio.Queue = asyncio.Queue(maxsize=PROGRESS_EVENTS_HELD)

            async def on_progress(event: pb2.VideoProgress) -> None:
                if progress.full():  # each event says all done so far: an older one may go
                    progress.get_nowait()
                progress.put_nowait(event)

            work = asyncio.ensure_future(
                asyncio.wait_for(
                    video.run_video(
                        start,
                        upload(),
                        entry,
                        record,
                        call,
                        on_progress=on_progress if reply_kind == "events" else None,
                    ),
                    call.time_remaining(),
                )
            )
            if reply_kind == "events":
                # Once the upload is read the events start; Starlette's response then watches for a disconnect.
                read = asyncio.ensure_future(body_read.wait())
                await asyncio.wait((work, read), return_when=asyncio.FIRST_COMPLETED)
                read.cancel()
                if (
                    body_read.is_set()
                    and not work.done()
                    or work.done()
                    and not work.cancelled()
                    and not work.exception()
                ):
                    handed_off = True
                    return _SpooledVideoResponse(
                        _video_events(work, progress, entry, start, record, video.config.chunk_bytes),
                        release=held.close,
                        media_type="text/event-stream",
                        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
                    )
            gone = asyncio.ensure_future(client_gone())
            try:
                await asyncio.wait((work, gone), return_when=asyncio.FIRST_COMPLETED)
            finally:
                gone.cancel()
                if not work.done():  # the client left (or the server is stopping): stop the pipeline for it
                    work.cancel()
                    await asyncio.gather(work, return_exceptions=True)
            if work.cancelled():
                record.finish(grpc.StatusCode.CANCELLED)
                return Response(status_code=499)
            try:
                report = work.result()
            except (BodyTooLargeError, BodyTimeoutError):
                raise  # answered by their handlers (413, 408)
            except ClientDisconnect:
                record.finish(grpc.StatusCode.CANCELLED)
                return Response(status_code=499)
            except Exception as exc:
                return _failure(exc, record, start.request_id, _VIDEO_FIELD_NAMES)
            record.finish(grpc.StatusCode.OK)
            response = _video_response(
                report,
                entry.output_path,
                start.request_id,
                as_json=reply_kind == "json",
                chunk_bytes=video.config.chunk_bytes,
                release=held.close,
            )
            handed_off = True
            return response
        finally:
            if not handed_off:
                held.close()

    @app.get(
        "/v1/info",
        summary="What this server offers: methods, models, limits and defaults (GetServerInfo)",
        responses={200: {"model": info_model}, 401: problem_responses[401], 503: problem_responses[503]},
    )
    async def info(request: Request) -> Response:
        record = _record(request.scope, "HTTP GetServerInfo")
        try:
            server_info = servicer.server_info()
        except Exception as exc:
            return _failure(exc, record)
        record.finish(grpc.StatusCode.OK)
        return JSONResponse(schema.to_json(server_info))

    @app.get("/", include_in_schema=False)
    async def page() -> Response:
        return FileResponse(
            str(WEB_ROOT / "index.html"),
            media_type="text/html; charset=utf-8",
            headers={"Content-Security-Policy": PAGE_POLICY, "Cache-Control": "no-cache"},
        )

    app.mount("/web", StaticFiles(directory=str(WEB_ROOT)), name="web")
    return app


async def _events(servicer: AnonymizerServicer, handle, request_id: str, record: AccessRecord, call: _HttpCall):
    """The SSE body: AnonymizeStream's events as JSON; the job is cancelled if the client leaves or its time is up."""
    throttle = ProgressThrottle(servicer.progress_interval_s)
    finished = False
    try:
        async with asyncio.timeout(call.time_remaining()):
            async for event in handle:
                if isinstance(event, et.FailedEvent):
                    finished = True
                    yield _error_event(engine_failure(event.error), record, request_id)
                    return
                for to_send in throttle.offer(event):
                    proto = convert.event_to_proto(to_send, request_id=request_id)
                    yield format_sse_event(event=schema.event_name(proto), data_str=json.dumps(schema.to_json(proto)))
                if isinstance(event, et.ResultEvent):
                    finished = True
                    record.set_result(proto.result)
                    record.finish(grpc.StatusCode.OK)
                    return
        finished = True
        yield _error_event(RuntimeError("the engine's event stream ended without a result"), record, request_id)
    except TimeoutError as exc:  # past X-Server-Timeout: as a gRPC deadline, DEADLINE_EXCEEDED
        yield _error_event(exc, record, request_id)
    except asyncio.CancelledError:
        record.finish(grpc.StatusCode.CANCELLED)
        raise
    finally:
        if not finished:
            handle.cancel()


def _error_event(exc: BaseException, record: AccessRecord, request_id: str) -> bytes:
    response = _failure(exc, record, request_id)
    return format_sse_event(event="error", data_str=response.body.decode("utf-8"))


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("masquerade")
    except Exception:
        return "0"


def decode_report_header(value: str) -> dict:
    """The JSON report of an image response's X-Masquerade-Report header (for clients and tests)."""
    try:
        return json.loads(base64.b64decode(value, validate=True))
    except (binascii.Error, json.JSONDecodeError) as exc:
        raise ValueError(f"{REPORT_HEADER}: not base64 JSON ({exc})") from None
