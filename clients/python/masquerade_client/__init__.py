"""Python client for the Masquerade face-anonymization server (masquerade.v1.Anonymizer).

from masquerade_client import AnonymizerClient
with AnonymizerClient("localhost:50051") as client:
    client.wait_ready(timeout=60)
    response = client.anonymize(image_bytes, method="reverse_personalization", steps=50)
    open("out.jpg", "wb").write(response.image)
"""

from masquerade_client.client import (
    DEFAULT_TIMEOUT_S,
    AnonymizerClient,
    AsyncAnonymizerClient,
    RetryPolicy,
    build_request,
)
from masquerade_client.errors import (
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    MasqueradeError,
    NotFound,
    ResourceExhausted,
    Unavailable,
    Unimplemented,
    error_for,
    error_for_code_number,
)

__all__ = [
    "AnonymizerClient",
    "AsyncAnonymizerClient",
    "RetryPolicy",
    "build_request",
    "DEFAULT_TIMEOUT_S",
    "MasqueradeError",
    "InvalidArgument",
    "ResourceExhausted",
    "FailedPrecondition",
    "Unavailable",
    "DeadlineExceeded",
    "Cancelled",
    "Internal",
    "Unimplemented",
    "NotFound",
    "error_for",
    "error_for_code_number",
]
