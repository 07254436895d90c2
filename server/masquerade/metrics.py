"""Prometheus metrics shared by the API layer and the engine.

One registry for the process; the API layer serves it over HTTP at /metrics.
Label values are bounded enums (rpc names, methods, status codes, phases),
never request ids or anything derived from pixels.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

REQUESTS = Counter(
    "masquerade_requests",
    "Requests finished, by rpc, method and gRPC status code name.",
    ["rpc", "method", "status"],
    registry=REGISTRY,
)
FACES = Counter(
    "masquerade_faces",
    "Faces processed, by method applied and face status.",
    ["method", "status"],
    registry=REGISTRY,
)
QUEUE_DEPTH = Gauge(
    "masquerade_queue_depth",
    "Requests admitted to the engine and not yet finished.",
    registry=REGISTRY,
)
ACTIVE_JOBS = Gauge(
    "masquerade_active_face_jobs",
    "Face jobs currently holding diffusion state in the step scheduler.",
    registry=REGISTRY,
)
UNET_BATCH_SIZE = Histogram(
    "masquerade_unet_batch_size",
    "Samples per UNet call (each classifier-free-guidance pair counts as two).",
    buckets=(1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256),
    registry=REGISTRY,
)
UNET_CALL_SECONDS = Histogram(
    "masquerade_unet_call_seconds",
    "Wall-clock seconds of one packed UNet call including the guidance step.",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)
PHASE_SECONDS = Histogram(
    "masquerade_phase_seconds",
    "Seconds a request spends in each phase.",
    ["phase"],
    buckets=(0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
    registry=REGISTRY,
)
INFLIGHT_MEGAPIXELS = Gauge(
    "masquerade_inflight_megapixels",
    "Decoded megapixels held by admitted requests (bounded by --max-inflight-megapixels).",
    registry=REGISTRY,
)
PIXEL_BUDGET_WAITING = Gauge(
    "masquerade_pixel_budget_waiting",
    "Requests waiting, holding only their compressed bytes, for room in the in-flight pixel budget.",
    registry=REGISTRY,
)
AUTH_FAILURES = Counter(
    "masquerade_auth_failures",
    "RPCs refused UNAUTHENTICATED, by reason (missing or invalid bearer token).",
    ["reason"],
    registry=REGISTRY,
)
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
QUEUE_WAIT_SECONDS = Histogram(
    "masquerade_queue_wait_seconds",
    "Seconds a request waited before its work started: in the preprocess pool's queue, plus, for "
    "diffusion, from joining the step scheduler to its first row; by priority (interactive, bulk).",
    ["priority"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
REQUEST_LATENCY_SECONDS = Histogram(
    "masquerade_request_latency_seconds",
    "Seconds from admission to result of requests that succeeded, by priority.",
    ["priority"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
PRIORITY_STEPS = Counter(
    "masquerade_diffusion_steps",
    "Diffusion steps computed (CFG pairs: inversion and generation), by priority.",
    ["priority"],
    registry=REGISTRY,
)
QUOTA_REFUSALS = Counter(
    "masquerade_quota_refusals",
    "Requests refused RESOURCE_EXHAUSTED by a per-client quota, by client name (a token's configured name, "
    "token-<12 hex of its hash>, cert:<common name> or anonymous; past 64 names, other).",
    ["client"],
    registry=REGISTRY,
)
DEADLINE_REFUSALS = Counter(
    "masquerade_deadline_refusals",
    "Requests refused at admission because the estimated finish was past their deadline, by priority.",
    ["priority"],
    registry=REGISTRY,
)
VIDEO_FRAMES = Counter(
    "masquerade_video_frames",
    "Video frames served, by rpc (AnonymizeVideo, AnonymizeFrames); rate() gives frames per second.",
    ["rpc"],
    registry=REGISTRY,
)
FRAME_LATENCY_SECONDS = Histogram(
    "masquerade_frame_latency_seconds",
    "AnonymizeFrames: seconds from reading a frame to handing its result to gRPC.",
    buckets=(0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2, 5),
    registry=REGISTRY,
)
ACTIVE_VIDEO_STREAMS = Gauge(
    "masquerade_active_video_streams",
    "AnonymizeVideo and AnonymizeFrames calls being served, by rpc.",
    ["rpc"],
    registry=REGISTRY,
)
VIDEO_SPOOL_BYTES = Gauge(
    "masquerade_video_spool_bytes",
    "Bytes held in the video spool by AnonymizeVideo calls in flight (uploads and outputs).",
    registry=REGISTRY,
)
