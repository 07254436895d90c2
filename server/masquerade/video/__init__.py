"""Video files and live frame streams: containers (PyAV), face tracking, per-frame covers, the per-video report.

Knows frames, timestamps and tracks; reaches the engine only through its request types.
``anonymize_video`` (pipeline.py) is the entry point for a whole file; ``LiveFaceTracker``
(tracking.py) with a frame processor (frames.py) serves a live stream one frame at a time.
"""

from __future__ import annotations

import importlib

# Names resolve on first use (PEP 562), so importing one module of the package (``masquerade.video.container``
# for the CLI's flag defaults) does not import the pipeline, asyncio and the tracker with it.
_HOME = {
    "VIDEO_SUFFIXES": "container",
    "EncodeOptions": "container",
    "VideoError": "container",
    "VideoInfo": "container",
    "VideoLimits": "container",
    "probe_video": "container",
    "VideoCancelled": "pipeline",
    "VideoOptions": "pipeline",
    "VideoReport": "pipeline",
    "anonymize_video": "pipeline",
    "FrameFaces": "tracking",
    "LiveFaceTracker": "tracking",
    "TrackedFace": "tracking",
    "TrackingOptions": "tracking",
    "WindowedFaceTracker": "tracking",
}


def __getattr__(name: str):
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_HOME))


__all__ = [
    "VIDEO_SUFFIXES",
    "EncodeOptions",
    "FrameFaces",
    "LiveFaceTracker",
    "TrackedFace",
    "TrackingOptions",
    "VideoCancelled",
    "VideoError",
    "VideoInfo",
    "VideoLimits",
    "VideoOptions",
    "VideoReport",
    "WindowedFaceTracker",
    "anonymize_video",
    "probe_video",
]
