"""The generated wire modules, rebuilt first when the proto is newer.

Import ``pb2`` (messages) and ``pb2_grpc`` (service stubs and servicers) from here
rather than from masquerade.v1 directly, so a fresh checkout needs no build step.
"""

from __future__ import annotations

from masquerade.api.codegen import ensure_generated

ensure_generated()

from masquerade.v1 import anonymizer_pb2 as pb2  # noqa: E402
from masquerade.v1 import anonymizer_pb2_grpc as pb2_grpc  # noqa: E402

SERVICE_NAME = pb2.DESCRIPTOR.services_by_name["Anonymizer"].full_name  # "masquerade.v1.Anonymizer"

__all__ = ["pb2", "pb2_grpc", "SERVICE_NAME"]
