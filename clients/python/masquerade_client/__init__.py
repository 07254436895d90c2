"""Python client for the Masquerade face-anonymization server (masquerade.v1.Anonymizer).

from masquerade_client import AnonymizerClient
with AnonymizerClient("localhost:50051") as client:  # ca_file=, cert_file=, key_file=, token= for TLS
    client.wait_ready(timeout=60)
    response = client.anonymize(image_bytes, method="reverse_personalization", steps=50)
    open("out.jpg", "wb").write(response.image)
"""

from masquerade_client.client import (
    DEFAULT_TIMEOUT_S,
    SERVICE_NAME,
    AnonymizerClient,
    AsyncAnonymizerClient,
    RetryPolicy,
    build_request,
    channel_credentials,
    pb2,
    pb2_grpc,
)
from masquerade_client.errors import (
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    MasqueradeError,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    error_for,
    error_for_code_number,
)
from masquerade_client.video import FrameOutput, VideoResult

__all__ = [
    "AnonymizerClient",
    "AsyncAnonymizerClient",
    "RetryPolicy",
    "build_request",
    "channel_credentials",
    "pb2",
    "pb2_grpc",
    "SERVICE_NAME",
    "DEFAULT_TIMEOUT_S",
    "MasqueradeError",
    "InvalidArgument",
    "ResourceExhausted",
    "FailedPrecondition",
    "Unavailable",
    "Unauthenticated",
    "PermissionDenied",
    "DeadlineExceeded",
    "Cancelled",
    "Internal",
    "Unimplemented",
    "NotFound",
    "error_for",
    "error_for_code_number",
    "VideoResult",
    "FrameOutput",
]
