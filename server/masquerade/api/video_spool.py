"""The bounded folder where AnonymizeVideo keeps an upload and its output while it is processed.

A video cannot be decoded from memory in pieces the way it arrives (containers put their index at
either end), so the upload goes to disk. Three limits hold: one upload's size (``max_file_bytes``),
the folder's total over every call at once (``max_total_bytes``: inputs and outputs), and the life
of each file: a call's folder is deleted when the call ends, whatever ended it (success, error,
cancel, deadline, a client that vanished). A server killed outright cannot clean up after itself,
so each server process works in its own ``pid<N>-*`` subfolder and the next one to start removes
the subfolders of processes that are gone.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import threading
from pathlib import Path

from masquerade import metrics
from masquerade.errors import InvalidRequestError, QueueFullError

log = logging.getLogger(__name__)

GIB = 1024**3
DEFAULT_MAX_VIDEO_BYTES = 2 * GIB
DEFAULT_SPOOL_DIR = Path(tempfile.gettempdir()) / "masquerade-video-spool"


class SpoolFullError(QueueFullError):
    """The spool's total budget is taken by other calls; the client should retry later."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return True


class VideoSpool:
    """One server process's spool: a private subfolder of ``root`` and a byte budget over it. Thread-safe."""

    def __init__(self, root: str | Path | None, *, max_file_bytes: int, max_total_bytes: int | None = None):
        if max_file_bytes < 1:
            raise ValueError(f"max_video_bytes must be positive, got {max_file_bytes}")
        self.max_file_bytes = max_file_bytes
        # Room for one upload of the largest size and its output, at least.
        self.max_total_bytes = max_total_bytes if max_total_bytes is not None else 4 * max_file_bytes
        if self.max_total_bytes < max_file_bytes:
            raise ValueError(
                f"the spool's total ({self.max_total_bytes} bytes) must hold at least one upload ({max_file_bytes})"
            )
        self.root = Path(root) if root is not None else DEFAULT_SPOOL_DIR
        self.root.mkdir(parents=True, exist_ok=True)
        self._sweep_dead_processes()
        self.directory = Path(tempfile.mkdtemp(prefix=f"pid{os.getpid()}-", dir=self.root))
        self._lock = threading.Lock()
        self._used = 0
        metrics.VIDEO_SPOOL_BYTES.set(0)

    def _sweep_dead_processes(self) -> None:
        for child in self.root.glob("pid*-*"):
            try:
                pid = int(child.name[3:].split("-", 1)[0])
            except ValueError:
                continue
            if child.is_dir() and pid != os.getpid() and not _pid_alive(pid):
                log.info("removing %s, left by server process %d which is gone", child, pid)
                shutil.rmtree(child, ignore_errors=True)

    @property
    def used_bytes(self) -> int:
        return self._used

    def entry(self, label: str = "video") -> SpoolEntry:
        """A new call's subfolder; close it (or use it as a context manager) when the call ends."""
        return SpoolEntry(self, Path(tempfile.mkdtemp(prefix=f"{label}-", dir=self.directory)))

    def _charge(self, delta: int) -> None:
        with self._lock:
            if delta > 0 and self._used + delta > self.max_total_bytes:
                raise SpoolFullError(
                    f"the video spool is full ({self._used} of {self.max_total_bytes} bytes held by calls in flight)"
                )
            self._used += delta
            metrics.VIDEO_SPOOL_BYTES.set(self._used)

    def close(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def _safe_name(filename: str) -> str:
    """The client's base name with only [A-Za-z0-9._-] kept: it never leaves the call's folder."""
    path = Path(filename)
    stem = re.sub(r"[^A-Za-z0-9_-]", "_", path.stem)[:80].strip("_") or "video"
    return f"{stem}{path.suffix.lower()}"


class SpoolEntry:
    """One AnonymizeVideo call's files: ``input`` written by the upload, ``output`` by the encoder."""

    def __init__(self, spool: VideoSpool, directory: Path):
        self.spool = spool
        self.directory = directory
        self.charged = 0
        self._input_bytes = 0
        self._input_file = None
        self.input_path: Path | None = None
        self.output_path: Path | None = None

    def open_input(self, filename: str) -> None:
        """Creates the upload's file, named after the client's file (so errors name it), safely."""
        name = _safe_name(filename)
        self.input_path = self.directory / name
        self.output_path = self.directory / f"anonymized-{name}"
        self._input_file = open(self.input_path, "wb")  # noqa: SIM115 (closed by finish_input or close)

    def check_size(self, size: int) -> None:
        """Refuses a declared size over the per-file limit before any byte is sent."""
        if size > self.spool.max_file_bytes:
            raise InvalidRequestError(
                "start.size_bytes",
                f"{size} bytes is over this server's limit of {self.spool.max_file_bytes} bytes per video",
            )

    def append(self, data: bytes) -> None:
        """Writes the next chunk, charging it to the per-file limit and the spool's budget first."""
        if self._input_bytes + len(data) > self.spool.max_file_bytes:
            raise InvalidRequestError(
                "chunk",
                f"the upload passed this server's limit of {self.spool.max_file_bytes} bytes per video",
            )
        self._charge_to(self.charged + len(data))
        self._input_file.write(data)
        self._input_bytes += len(data)

    @property
    def input_bytes(self) -> int:
        return self._input_bytes

    def finish_input(self) -> None:
        if self._input_file is not None:
            self._input_file.close()
            self._input_file = None

    def charge_output(self) -> None:
        """Charges what the call's folder holds now besides the upload: the encoder's output, whatever
        name it writes under while it works (a hidden partial file, renamed at the end)."""
        held = 0
        for path in self.directory.iterdir():
            if path != self.input_path:
                try:
                    held += path.stat().st_size
                except FileNotFoundError:  # renamed or removed between listing and stat
                    pass
        self._charge_to(self._input_bytes + held)

    def _charge_to(self, total: int) -> None:
        delta = total - self.charged
        if delta:
            self.spool._charge(delta)
            self.charged = total

    def close(self) -> None:
        """Deletes the call's files and returns their bytes to the budget. Idempotent."""
        self.finish_input()
        shutil.rmtree(self.directory, ignore_errors=True)
        if self.charged:
            self.spool._charge(-self.charged)
            self.charged = 0

    def __enter__(self) -> SpoolEntry:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
