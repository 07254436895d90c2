"""gRPC status codes as HTTP statuses, and RFC 9457 problem details (application/problem+json).

The gRPC mapping in ``masquerade.api.errors`` decides the code and the message; this module
only translates, so an HTTP caller and a gRPC caller get the same verdict for the same request.
"""

from __future__ import annotations

import json
import math
import re

import grpc
from starlette.responses import Response

PROBLEM_MEDIA_TYPE = "application/problem+json"

HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    # The request is well formed but this server cannot do it as it stands (a method whose models are not loaded).
    grpc.StatusCode.FAILED_PRECONDITION: 422,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    # nginx's "client closed request": only ever in the access log, the client has gone.
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}

_TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    409: "Conflict",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    422: "Unprocessable Content",
    429: "Too Many Requests",
    499: "Client Closed Request",
    500: "Internal Server Error",
    501: "Not Implemented",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}

DEFAULT_RETRY_AFTER_S = 1.0
"""Retry-After for RESOURCE_EXHAUSTED and UNAVAILABLE when the refusal carries no advice of its own."""

_FIELD_PREFIX = re.compile(r"^([A-Za-z_][A-Za-z0-9_.\[\]]*): ")


def http_status(code: grpc.StatusCode) -> int:
    return HTTP_STATUS.get(code, 500)


def problem(
    status: int,
    detail: str,
    *,
    code: str | None = None,
    field: str | None = None,
    request_id: str = "",
    retry_after_s: float | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    """An RFC 9457 problem response. ``field`` names the request field at fault (taken from
    ``detail``'s "field: message" form when not given); ``code`` is the gRPC code's name."""
    if field is None:
        match = _FIELD_PREFIX.match(detail)
        field = match.group(1) if match else None
    body: dict = {"type": "about:blank", "title": _TITLES.get(status, "Error"), "status": status, "detail": detail}
    if code:
        body["code"] = code
    if field:
        body["field"] = field
    if request_id:
        body["request_id"] = request_id
    out_headers = dict(headers or {})
    if retry_after_s is not None:
        out_headers["Retry-After"] = str(max(1, math.ceil(retry_after_s)))  # delta-seconds: a whole number
    return Response(
        json.dumps(body, ensure_ascii=False).encode("utf-8"),
        status_code=status,
        media_type=PROBLEM_MEDIA_TYPE,
        headers=out_headers,
    )


def problem_for_status(
    code: grpc.StatusCode, detail: str, *, request_id: str = "", retry_after_s: float | None = None, field=None
) -> Response:
    """The problem response for a gRPC status (Retry-After on 429 and 503)."""
    status = http_status(code)
    if retry_after_s is None and code in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE):
        retry_after_s = DEFAULT_RETRY_AFTER_S
    return problem(status, detail, code=code.name, field=field, request_id=request_id, retry_after_s=retry_after_s)
