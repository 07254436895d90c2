"""The access log (one line per request) and the JSON log format.

A line holds ids, the peer, the RPC, the method, per-face statuses, durations and the
status code: never pixels, prompts, embeddings or any other request content.
"""

from __future__ import annotations

import importlib.abc
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import ModuleType

import grpc

from masquerade import metrics

ACCESS_LOGGER = "masquerade.access"
_access = logging.getLogger(ACCESS_LOGGER)

_PHASES = ("queued", "preprocess", "inversion", "generation", "postprocess")


@dataclass
class AccessRecord:
    """One request's line, filled in while it is served; ``finish`` counts it and logs it once."""

    rpc: str
    peer: str
    client: str = ""
    """The common name of the client's certificate under mutual TLS; "" otherwise."""
    request_id: str = ""
    """The client's id (free text: quoted in text lines, escaped in JSON)."""
    server_request_id: str = ""
    """The engine's unique id for the request; "" when it never reached the engine."""
    method: str = "none"
    faces: int | None = None
    statuses: list[str] = field(default_factory=list)
    complete: bool | None = None
    durations_ms: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)
    _done: bool = False

    @classmethod
    def from_context(cls, rpc: str, context: grpc.aio.ServicerContext, **fields) -> AccessRecord:
        """A record with the peer address and, under mutual TLS, the client certificate's common name."""
        names = (context.auth_context() or {}).get("x509_common_name") or [b""]
        client = names[0].decode("utf-8", "replace") if isinstance(names[0], bytes) else str(names[0])
        return cls(rpc=rpc, peer=context.peer() or "", client=client[:128], **fields)

    def set_result(self, response) -> None:
        """Takes what the log may hold from an AnonymizeResponse: counts, statuses, timings."""
        from masquerade.api.protos import pb2

        self.faces = len(response.faces)
        self.statuses = [pb2.FaceStatus.Name(face.status) for face in response.faces]
        self.complete = bool(response.complete)
        timings = response.timings
        for phase in _PHASES:
            self.durations_ms[phase] = round(getattr(timings, f"{phase}_seconds") * 1000.0, 3)

    def finish(self, code: grpc.StatusCode) -> None:
        if self._done:
            return
        self._done = True
        metrics.REQUESTS.labels(rpc=self.rpc, method=self.method, status=code.name).inc()
        self.durations_ms["total"] = round((time.perf_counter() - self.started) * 1000.0, 3)
        fields = self.fields(code)
        _access.info("access %s", _as_text(fields), extra={"access": fields})

    def fields(self, code: grpc.StatusCode) -> dict:
        return {
            "request_id": self.request_id,
            "server_request_id": self.server_request_id,
            "peer": self.peer,
            "client": self.client,
            "rpc": self.rpc,
            "method": self.method,
            "faces": self.faces,
            "statuses": self.statuses,
            "complete": self.complete,
            "durations_ms": dict(self.durations_ms),
            "code": code.name,
        }


def _as_text(fields: dict) -> str:
    parts = []
    for key, value in fields.items():
        if key == "durations_ms":
            parts.extend(f"{phase}_ms={ms:g}" for phase, ms in value.items())
        elif key == "statuses":
            parts.append(f"statuses={','.join(value) or '-'}")
        elif value is None:
            parts.append(f"{key}=-")
        elif isinstance(value, bool):
            parts.append(f"{key}={str(value).lower()}")
        elif key in ("request_id", "server_request_id", "client"):
            parts.append(f"{key}={json.dumps(value)}")  # hold client text: quoted, so it cannot forge fields or lines
        else:
            parts.append(f"{key}={value}")
    return " ".join(parts)


class JsonFormatter(logging.Formatter):
    """Every record as one JSON object per line; access records carry their fields at the top level."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
        }
        access = getattr(record, "access", None)
        if access is not None:
            out["event"] = "access"
            out.update(access)
        else:
            out["message"] = record.getMessage()
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: str = "INFO", log_format: str = "text") -> None:
    """The root handler on stderr, in ``text`` or ``json``; replaces any handler set before."""
    if log_format not in ("text", "json"):
        raise ValueError(f"--log-format {log_format!r}: must be 'text' or 'json'")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, str(level).upper(), logging.INFO))
    if log_format == "json":
        _route_library_output_through_logging()
        handler.setStream(_native_stderr_as_log_records())


def _route_library_output_through_logging() -> None:
    """So that every line is JSON: warnings and the HF libraries' own handlers go through the root handler.

    transformers and diffusers are set up when they are imported, never imported for it: a classical
    server must not load them (and torch) only to configure their logging."""
    logging.captureWarnings(True)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for library in ("transformers", "diffusers"):
        after_import(f"{library}.utils.logging", _propagate_hf_logging)


def _propagate_hf_logging(library_logging: ModuleType) -> None:
    library_logging.disable_default_handler()
    library_logging.enable_propagation()
    library_logging.disable_progress_bar()


def after_import(name: str, callback: Callable[[ModuleType], None]) -> None:
    """Calls ``callback(module)`` once module ``name`` is imported: now if it already is, else right after
    whoever imports it first has run it (a finder at the front of sys.meta_path that answers only for
    the modules watched)."""
    module = sys.modules.get(name)
    if module is not None:
        callback(module)
        return
    with _hooks_lock:
        if not any(isinstance(finder, _AfterImportFinder) for finder in sys.meta_path):
            sys.meta_path.insert(0, _AfterImportFinder())
        _after_import.setdefault(name, []).append(callback)


_after_import: dict[str, list[Callable[[ModuleType], None]]] = {}
_hooks_lock = threading.Lock()


class _AfterImportFinder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: for a watched module it asks the other finders and wraps the spec's loader."""

    def find_spec(self, name, path, target=None):
        if name not in _after_import:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _CallbackLoader(spec.loader, name)
                return spec
        return None


class _CallbackLoader(importlib.abc.Loader):
    def __init__(self, loader, name: str):
        self._loader, self._name = loader, name

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        with _hooks_lock:
            callbacks = _after_import.pop(self._name, [])
        for callback in callbacks:
            callback(module)

    def __getattr__(self, attribute):  # resource readers and the like: the wrapped loader's
        return getattr(self._loader, attribute)


# gRPC core (absl) prefixes its lines with a severity letter: "E0000 00:00:00.000000 123 file.cc:45] text".
_NATIVE_LEVELS = {"I": logging.INFO, "W": logging.WARNING, "E": logging.ERROR, "F": logging.CRITICAL}
_native_capture: list = []  # the original stderr once captured (so a second call does not capture twice)


def _native_stderr_as_log_records():
    """Routes what native code writes to file descriptor 2 (gRPC core's own lines) through logging.

    fd 2 becomes a pipe that a daemon thread reads line by line, emitting each as a record of the
    ``native.stderr`` logger (level from gRPC's severity letter); the root handler writes to a copy
    of the original stderr, returned here. faulthandler is pointed at that copy too, so a crash's
    traceback is written directly, never lost in the pipe.
    """
    if _native_capture:
        return _native_capture[0]
    import faulthandler

    sys.stderr.flush()
    original = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
    read_fd, write_fd = os.pipe()
    os.dup2(write_fd, 2)
    os.close(write_fd)
    _native_capture.append(original)
    if faulthandler.is_enabled():
        faulthandler.enable(file=original)
    native = logging.getLogger("native.stderr")

    def pump() -> None:
        with os.fdopen(read_fd, "r", encoding="utf-8", errors="replace") as lines:
            for line in lines:
                text = line.rstrip("\n")
                if text.strip():
                    native.log(
                        _NATIVE_LEVELS.get(text[:1], logging.WARNING) if text[1:2].isdigit() else logging.WARNING,
                        "%s",
                        text,
                    )

    threading.Thread(target=pump, name="masquerade-native-stderr", daemon=True).start()
    return original
