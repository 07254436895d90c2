"""Video files and live frame streams: containers (PyAV), face tracking, per-frame covers, the per-video report.

Knows frames, timestamps and tracks; reaches the engine only through its request types.
``anonymize_video`` (pipeline.py) is the entry point for a whole file; ``LiveFaceTracker``
(tracking.py) with a frame processor (frames.py) serves a live stream one frame at a time.
"""

from .container import VIDEO_SUFFIXES, EncodeOptions, VideoError, VideoInfo, VideoLimits, probe_video
from .pipeline import VideoCancelled, VideoOptions, VideoReport, anonymize_video
from .tracking import FrameFaces, LiveFaceTracker, TrackedFace, TrackingOptions, WindowedFaceTracker

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
