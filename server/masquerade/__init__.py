"""Masquerade: face anonymization by reverse personalization, served over gRPC.

Layers, imports pointing downward only: ``api`` (protos, status codes) ->
``engine`` (requests, step scheduling) -> ``models`` (tensors) and ``face``
(pixels); ``kernels`` holds the fused guidance/solver kernels.
"""

__version__ = "0.1.0"
