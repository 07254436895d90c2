"""Soak test: minutes of mixed concurrent load against a server this script spawns, watching its health.

The load mixes everything a public server meets at once: real photos at several
sizes (insightface's t1.jpg with six people, scikit-image's astronaut, scaled
copies up to a large one), every method (reverse personalization on the tiny
models, blur, pixelate, solid), unary, streaming and batch RPCs, streams
cancelled mid-flight, deadlines too short to finish, and bad inputs (garbage
bytes, an empty image, out-of-range parameters, unknown enum values). Every
outcome is classed as OK, an expected error (the status that input must get:
INVALID_ARGUMENT for bad input, CANCELLED for a cancel, DEADLINE_EXCEEDED for a
deadline, RESOURCE_EXHAUSTED under overload) or an unexpected error (anything
else, and OK results that are wrong: a face left SKIPPED, or a face that fell
back because a diffusion step failed). The server's RSS, open fds and threads
are sampled every second from /proc; a server that exits is a crash.

    python benchmarks/soak.py                              # 10 minutes at concurrency 32
    python benchmarks/soak.py --minutes 0.2 --concurrency 4 --out /tmp/soak   # a smoke run

Prints requests, OK, expected and unexpected errors, p50/p99 latency, RSS at
start (after warm-up), peak and end, fds and threads; writes
``soak_<label>.json`` and ``soak_<label>.png`` under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import io
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from load import (
    _free_port,
    _git_commit,
    _machine,
    _percentile,
    serve_command,
)  # benchmarks/load.py, this script's neighbour

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# Scenario -> relative weight in the mix.
MIX = {
    "rp_aligned": 18,
    "rp_photo": 8,
    "classical_photo": 22,
    "large_photo": 2,
    "stream_cancel": 14,
    "deadline": 10,
    "batch": 6,
    "bad_input": 12,
    "info": 3,
    "health": 5,
}


@dataclass
class Outcome:
    scenario: str
    started: float  # seconds since the load began
    seconds: float
    kind: str  # "ok" | "expected" | "unexpected"
    code: str  # gRPC status name, or OK
    detail: str = ""


@dataclass
class Sample:
    t: float
    rss_mb: float
    fds: int
    threads: int


@dataclass
class SoakReport:
    label: str
    commit: str
    machine: dict
    config: dict
    started_utc: str
    duration_s: float = 0.0
    warmup_s: float = 0.0
    requests: int = 0
    ok: int = 0
    ok_incomplete: int = 0  # OK results whose self-check still recognised a face (complete=false, reported)
    expected_errors: int = 0
    unexpected_errors: int = 0
    crashes: int = 0
    server_exit_code: int | None = None
    p50_s: float = float("nan")
    p99_s: float = float("nan")
    rss_start_mb: float = float("nan")  # idle, after the warm-up
    rss_peak_mb: float = float("nan")  # during the measured load
    rss_end_mb: float = float("nan")  # idle, after the measured load
    rss_growth_pct: float = float("nan")  # end vs start
    fds_start: int = 0
    fds_end: int = 0
    fds_peak: int = 0
    threads_start: int = 0
    threads_end: int = 0
    threads_peak: int = 0
    by_scenario: dict = field(default_factory=dict)
    codes: dict = field(default_factory=dict)
    unexpected_examples: list = field(default_factory=list)
    server_log_tracebacks: int = 0
    server_log_fatal: list = field(default_factory=list)
    idle_times_s: list = field(default_factory=list)  # when the start and end idle samples were read
    large_request: dict = field(default_factory=dict)  # one 6300x6300 PNG on the idle server, RSS before/after
    completed_per_30s: list = field(default_factory=list)  # [{"minute": m, "ok": n, "expected": n, "unexpected": n}]
    samples: list = field(default_factory=list)


# ---------------------------------------------------------------------------------- inputs


def _encode(rgb, fmt: str, quality: int = 90) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, {"jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}[fmt], quality=quality)
    return buffer.getvalue()


def build_inputs() -> dict[str, list[bytes]]:
    """Photos at several sizes, aligned faces and bad bytes, all made once."""
    import importlib.util

    import numpy as np
    from PIL import Image

    photos = []
    spec = importlib.util.find_spec("insightface")
    if spec is not None and spec.submodule_search_locations:
        t1 = np.asarray(
            Image.open(Path(spec.submodule_search_locations[0]) / "data" / "images" / "t1.jpg").convert("RGB")
        )
        photos.append(t1)
    try:
        from skimage import data

        photos.append(np.ascontiguousarray(data.astronaut()))
    except ImportError:
        pass
    if not photos:
        raise SystemExit("needs insightface's or scikit-image's sample photos: run scripts/setup.sh --test")
    scaled = []
    for rgb in photos:
        height, width = rgb.shape[:2]
        for factor in (0.5, 1.0, 1.5):
            size = (max(16, int(width * factor)), max(16, int(height * factor)))
            scaled.append(np.asarray(Image.fromarray(rgb).resize(size, Image.BILINEAR)))
    formats = ("jpeg", "png", "webp")
    photo_bytes = [_encode(rgb, formats[i % 3]) for i, rgb in enumerate(scaled)]
    big = photos[-1]
    height, width = big.shape[:2]
    factor = 3000 / max(height, width)
    large = np.asarray(Image.fromarray(big).resize((int(width * factor), int(height * factor)), Image.BILINEAR))
    rng = np.random.default_rng(0)
    aligned = [_encode(rng.integers(0, 256, (side, side, 3), dtype=np.uint8), "png") for side in (32, 48, 64, 96)]
    if photos:
        face = photos[-1][10:266, 130:386] if photos[-1].shape[0] >= 266 else photos[-1]
        aligned.append(_encode(np.ascontiguousarray(face), "jpeg"))
    valid_png = aligned[0]
    bad = [b"", b"definitely not an image", valid_png[: len(valid_png) // 2], b"\x89PNG\r\n\x1a\n" + b"\0" * 64]
    return {"photos": photo_bytes, "large": [_encode(large, "jpeg", 85)], "aligned": aligned, "bad": bad}


# ---------------------------------------------------------------------------------- the server


class SpawnedServer:
    """`masquerade serve` in a subprocess on free ports; its log goes to a file."""

    def __init__(self, extra_args: list[str], log_path: Path, env: dict[str, str] | None = None):
        self.metrics_port = _free_port()
        self.log_path = log_path
        self.command = serve_command(self.metrics_port, extra_args)
        env = dict(os.environ, PYTHONFAULTHANDLER="1", **(env or {}))
        self._log = open(log_path, "w")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(self.command, stdout=self._log, stderr=subprocess.STDOUT, text=True, env=env)
        self.address = self._wait_for_address(timeout=600)
        self._wait_for_serving(timeout=600)

    def _wait_for_address(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode} before serving; see {self.log_path}")
            match = re.search(r"masquerade serving on (\S+:\d+) \(", self.log_path.read_text(errors="replace"))
            if match:
                return match.group(1).replace("0.0.0.0", "127.0.0.1")
            time.sleep(0.2)
        raise TimeoutError(f"server did not start serving within {timeout}s; see {self.log_path}")

    def _wait_for_serving(self, timeout: float) -> None:
        """The port opens before the models load (health NOT_SERVING until then): load starts once it is SERVING."""
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(
                        f"server exited with {self.process.returncode} while loading; see {self.log_path}"
                    )
                try:
                    reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.2)
        raise TimeoutError(f"server not SERVING within {timeout}s; see {self.log_path}")

    def sample(self, t: float) -> Sample | None:
        pid = self.process.pid
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            fds = len(os.listdir(f"/proc/{pid}/fd"))
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            return None
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        rss_kb = int(fields.get("VmRSS", "0 kB").split()[0])
        return Sample(t=t, rss_mb=rss_kb / 1024, fds=fds, threads=int(fields.get("Threads", "0")))

    def cpu_seconds(self) -> float:
        """User + system CPU time the server has used so far."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def wait_quiet(self, timeout: float = 180.0, busy_fraction: float = 0.05) -> float:
        """Wait until the server uses under ``busy_fraction`` of a core for two seconds in a row
        (work of cancelled requests still running on its threads counts); returns the wait."""
        began = time.monotonic()
        quiet = 0
        last = self.cpu_seconds()
        while time.monotonic() - began < timeout and self.process.poll() is None:
            time.sleep(1.0)
            now = self.cpu_seconds()
            quiet = quiet + 1 if now - last < busy_fraction else 0
            last = now
            if quiet >= 2:
                break
        return time.monotonic() - began

    def stop(self) -> int | None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


# ---------------------------------------------------------------------------------- the load


class Load:
    """The request mix; each ``run_*`` returns (kind, code, detail)."""

    def __init__(self, address: str, inputs: dict[str, list[bytes]], rp: bool):
        import grpc

        from masquerade.api.protos import pb2, pb2_grpc

        self.grpc, self.pb2 = grpc, pb2
        self.channel = grpc.insecure_channel(
            address,
            options=[("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)],
        )
        self.stub = pb2_grpc.AnonymizerStub(self.channel)
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        self.health_pb2 = health_pb2
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.inputs = inputs
        self.rp = rp  # the server has (tiny) diffusion models

    def close(self) -> None:
        self.channel.close()

    # -- requests

    def _request(self, image: bytes, rng: random.Random, *, method=None, aligned=False, steps=None):
        pb2 = self.pb2
        message = pb2.AnonymizeRequest(image=image, request_id=f"soak-{rng.getrandbits(32):08x}")
        message.method = method if method is not None else pb2.REVERSE_PERSONALIZATION
        if steps is not None:
            message.params.steps = steps
            message.params.seed = rng.randrange(1000)
        message.detection.aligned = aligned
        return message

    def _classical(self, rng: random.Random) -> int:
        pb2 = self.pb2
        return rng.choice((pb2.BLUR, pb2.PIXELATE, pb2.SOLID))

    def _check_result(self, response) -> tuple[str, str, str]:
        pb2 = self.pb2
        for face in response.faces:
            if face.status == pb2.SKIPPED:
                return "unexpected", "OK", f"face {face.index} left SKIPPED: {face.reason}"
            if face.status == pb2.FALLBACK and "diffusion step failed" in face.reason:
                return "unexpected", "OK", f"face {face.index} fell back: {face.reason}"
        if not response.complete:
            # Every face was covered, yet the server's self-check still recognised one and says so
            # (complete=false, residual_recognisable): a reported result, not a fault. Counted apart.
            residual = getattr(response, "residual_recognisable", 0)
            if residual > 0:
                return "ok", "OK_INCOMPLETE", f"{len(response.faces)} faces, {residual} still recognisable"
            return "unexpected", "OK", f"complete=false ({len(response.faces)} faces, none said recognisable)"
        return "ok", "OK", ""

    def _unary(self, message, timeout: float, expected: set[str] = frozenset()) -> tuple[str, str, str]:
        try:
            response = self.stub.Anonymize(message, timeout=timeout)
        except self.grpc.RpcError as error:
            code = error.code().name
            if code in expected or code == "RESOURCE_EXHAUSTED":
                return "expected", code, ""
            return "unexpected", code, (error.details() or "")[:200]
        return self._check_result(response)

    def run_rp_aligned(self, rng):
        if not self.rp:
            return self.run_classical_photo(rng)
        message = self._request(rng.choice(self.inputs["aligned"]), rng, aligned=True, steps=rng.randint(3, 10))
        return self._unary(message, timeout=300)

    def run_rp_photo(self, rng):
        if not self.rp:
            return self.run_classical_photo(rng)
        message = self._request(rng.choice(self.inputs["photos"]), rng, steps=rng.randint(2, 5))
        return self._unary(message, timeout=300)

    def run_classical_photo(self, rng):
        message = self._request(rng.choice(self.inputs["photos"]), rng, method=self._classical(rng))
        return self._unary(message, timeout=300)

    def run_large_photo(self, rng):
        message = self._request(self.inputs["large"][0], rng, method=rng.choice((self.pb2.PIXELATE, self.pb2.SOLID)))
        return self._unary(message, timeout=300)

    def run_deadline(self, rng):
        if self.rp:
            message = self._request(rng.choice(self.inputs["aligned"]), rng, aligned=True, steps=rng.randint(20, 40))
        else:
            message = self._request(rng.choice(self.inputs["photos"]), rng, method=self._classical(rng))
        return self._unary(message, timeout=rng.uniform(0.05, 1.0), expected={"DEADLINE_EXCEEDED"})

    def run_stream_cancel(self, rng):
        if self.rp:
            message = self._request(rng.choice(self.inputs["aligned"]), rng, aligned=True, steps=rng.randint(10, 30))
        else:
            message = self._request(rng.choice(self.inputs["photos"]), rng, method=self._classical(rng))
        call = self.stub.AnonymizeStream(message, timeout=300)
        cancel_after = rng.choice(("queued", "faces", "progress", "timer"))
        timer = threading.Timer(rng.uniform(0.0, 0.5), call.cancel) if cancel_after == "timer" else None
        if timer is not None:
            timer.start()
        try:
            for event in call:
                which = event.WhichOneof("event")
                if (cancel_after, which) in (("queued", "queued"), ("faces", "faces_found"), ("progress", "progress")):
                    call.cancel()
                if which == "result":
                    return self._check_result(event.result)
        except self.grpc.RpcError as error:
            code = error.code().name
            if code in ("CANCELLED", "RESOURCE_EXHAUSTED"):
                return "expected", code, ""
            return "unexpected", code, (error.details() or "")[:200]
        finally:
            if timer is not None:
                timer.cancel()
        return "unexpected", "NO_RESULT", "stream ended without a result"

    def run_batch(self, rng):
        pb2 = self.pb2
        good = [
            self._request(rng.choice(self.inputs["photos"]), rng, method=self._classical(rng)),
            self._request(rng.choice(self.inputs["aligned"]), rng, aligned=True, steps=3)
            if self.rp
            else self._request(rng.choice(self.inputs["aligned"]), rng, aligned=True, method=pb2.BLUR),
        ]
        bad = self._request(rng.choice(self.inputs["bad"]), rng, method=pb2.BLUR)
        messages = [*good, bad]
        for i, message in enumerate(messages):
            message.request_id = f"b{i}-{message.request_id}"
        try:
            answers = {answer.request_id: answer for answer in self.stub.AnonymizeBatch(iter(messages), timeout=300)}
        except self.grpc.RpcError as error:
            code = error.code().name
            if code == "RESOURCE_EXHAUSTED":
                return "expected", code, ""
            return "unexpected", code, (error.details() or "")[:200]
        if set(answers) != {m.request_id for m in messages}:
            return "unexpected", "OK", f"batch answered {len(answers)} of {len(messages)} request ids"
        bad_answer = answers[bad.request_id]
        if bad_answer.WhichOneof("outcome") != "error" or bad_answer.error.code != 3:  # INVALID_ARGUMENT
            return "unexpected", "OK", "the bad batch entry was not answered INVALID_ARGUMENT"
        checks = []
        for message in good:
            answer = answers[message.request_id]
            if answer.WhichOneof("outcome") == "error":
                if answer.error.code == 8:  # RESOURCE_EXHAUSTED
                    return "expected", "RESOURCE_EXHAUSTED", ""
                return "unexpected", f"batch error {answer.error.code}", answer.error.message[:200]
            checks.append(self._check_result(answer.result))
        # The worst outcome speaks for the batch: unexpected, then a reported-incomplete result.
        return min(checks, key=lambda check: (check[0] != "unexpected", check[1] == "OK"))

    def run_bad_input(self, rng):
        pb2 = self.pb2
        case = rng.choice(("bytes", "steps", "skip", "method", "format", "quality", "strength"))
        image = rng.choice(self.inputs["bad"]) if case == "bytes" else rng.choice(self.inputs["aligned"])
        message = self._request(image, rng, method=pb2.BLUR, aligned=True)
        if case == "steps":
            message.method, message.params.steps = pb2.REVERSE_PERSONALIZATION, rng.choice((0, 100000))
        elif case == "skip":
            message.method, message.params.skip = pb2.REVERSE_PERSONALIZATION, 1.5
        elif case == "method":
            message.method = 99
        elif case == "format":
            message.output.format = 42
        elif case == "quality":
            message.output.quality = 0
        elif case == "strength":
            message.classical.strength = float("nan")
        if case in ("steps", "skip") and not self.rp:
            expected = {"INVALID_ARGUMENT", "FAILED_PRECONDITION"}
        else:
            expected = {"INVALID_ARGUMENT"}
        kind, code, detail = self._unary(message, timeout=60, expected=expected)
        if kind == "ok":
            return "unexpected", "OK", f"bad input ({case}) was accepted"
        return kind, code, detail

    def run_info(self, rng):
        try:
            self.stub.GetServerInfo(self.pb2.GetServerInfoRequest(), timeout=30)
        except self.grpc.RpcError as error:
            return "unexpected", error.code().name, (error.details() or "")[:200]
        return "ok", "OK", ""

    def run_health(self, rng):
        try:
            reply = self.health.Check(self.health_pb2.HealthCheckRequest(service=""), timeout=30)
        except self.grpc.RpcError as error:
            return "unexpected", error.code().name, (error.details() or "")[:200]
        if reply.status != self.health_pb2.HealthCheckResponse.SERVING:
            return "unexpected", "NOT_SERVING", ""
        return "ok", "OK", ""


# ---------------------------------------------------------------------------------- running

LARGE_SIDE = 6300  # 39.7 Mpx, under the server's default 40 Mpx cap; a 116 KB PNG of zeros


def large_request_check(load: Load, before: Sample, idle_sample) -> dict:
    """One large image on the idle server: its RSS once idle again must be within 200 MB of before."""
    import numpy as np

    image = _encode(np.zeros((LARGE_SIDE, LARGE_SIDE, 3), np.uint8), "png")
    message = load._request(image, random.Random(0), method=load.pb2.BLUR)
    began = time.monotonic()
    kind, code, detail = load._unary(message, timeout=900)
    seconds = time.monotonic() - began
    after = idle_sample()
    delta = after.rss_mb - before.rss_mb if after is not None else float("nan")
    print(f"  large request: {code} in {seconds:.1f} s, RSS {before.rss_mb:.0f} -> {after.rss_mb:.0f} MB", flush=True)
    return {
        "pixels": LARGE_SIDE * LARGE_SIDE,
        "png_bytes": len(image),
        "kind": kind,
        "code": code,
        "detail": detail,
        "seconds": seconds,
        "rss_before_mb": before.rss_mb,
        "rss_after_mb": after.rss_mb if after is not None else float("nan"),
        "rss_delta_mb": delta,
    }


def soak(args) -> SoakReport:
    duration = args.minutes * 60.0
    warmup = min(args.warmup_minutes * 60.0, duration * 0.2)
    inputs = build_inputs()
    args.out.mkdir(parents=True, exist_ok=True)
    # The server's access log runs to megabytes: it stays outside the results (the JSON counts its tracebacks).
    log_path = Path(tempfile.mkdtemp(prefix="masquerade-soak-")) / "server.log"
    server_args = ["--models", "tiny" if args.models == "tiny" else "default"]
    server_args += ["--device", args.device, "--max-queue", str(args.max_queue)]
    server_env = {}
    if args.models == "classical":
        # The default model folder, pointed at an empty one: the server serves classical methods only.
        server_env["MASQUERADE_MODEL_DIR"] = str(args.out / "soak-no-models")
        (args.out / "soak-no-models").mkdir(parents=True, exist_ok=True)
    report = SoakReport(
        label=args.label,
        commit=_git_commit(),
        machine=_machine(),
        config={
            "minutes": args.minutes,
            "concurrency": args.concurrency,
            "server_args": server_args,
            "mix": MIX,
            "seed": args.seed,
        },
        started_utc=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        warmup_s=warmup,
    )
    print(f"starting server: {' '.join(server_args)} (log: {log_path})", flush=True)
    server = SpawnedServer(server_args, log_path, server_env)
    load = Load(server.address, inputs, rp=args.models != "classical")
    load_started = time.monotonic()
    stop = threading.Event()
    outcomes: list[Outcome] = []
    samples: list[Sample] = []
    lock = threading.Lock()
    scenarios, weights = zip(*MIX.items())

    def sampler() -> None:
        while not stop.is_set():
            sample = server.sample(time.monotonic() - load_started)
            if sample is not None:
                samples.append(sample)
            if server.process.poll() is not None:
                stop.set()  # a crash ends the run
                return
            stop.wait(1.0)

    def worker(index: int, phase: str, until: float) -> None:
        rng = random.Random(f"{args.seed}-{phase}-{index}")
        while not stop.is_set() and time.monotonic() - load_started < until:
            scenario = rng.choices(scenarios, weights)[0]
            began = time.monotonic()
            try:
                kind, code, detail = getattr(load, f"run_{scenario}")(rng)
            except Exception as error:  # a bug in the load itself still counts, loudly
                kind, code, detail = "unexpected", type(error).__name__, str(error)[:200]
            outcome = Outcome(scenario, began - load_started, time.monotonic() - began, kind, code, detail)
            with lock:
                outcomes.append(outcome)

    def run_phase(phase: str, until: float) -> None:
        workers = [
            threading.Thread(target=worker, args=(i, phase, until), daemon=True) for i in range(args.concurrency)
        ]
        for thread in workers:
            thread.start()
        next_report = time.monotonic() - load_started + 30.0
        while any(thread.is_alive() for thread in workers):
            time.sleep(0.5)
            elapsed = time.monotonic() - load_started
            if elapsed >= next_report:
                with lock:
                    done = list(outcomes)
                last = samples[-1] if samples else None
                unexpected = sum(o.kind == "unexpected" for o in done)
                print(
                    f"  {phase:7s} {elapsed:6.0f}s  requests {len(done):6d}  unexpected {unexpected:3d}"
                    + (f"  rss {last.rss_mb:7.1f} MB  fds {last.fds:4d}  threads {last.threads:3d}" if last else ""),
                    flush=True,
                )
                next_report += 30.0

    def idle_sample() -> Sample | None:
        """The server's figures once every request has finished and its threads went quiet."""
        server.wait_quiet()
        time.sleep(args.idle_seconds)
        sample = server.sample(time.monotonic() - load_started)
        if sample is not None:
            samples.append(sample)
        return sample

    sampling = threading.Thread(target=sampler, daemon=True)
    sampling.start()
    # Warm-up (first calls, caches, allocator pools), then the measured load; RSS, fds and
    # threads are compared idle to idle: after the warm-up and after the load.
    run_phase("warm-up", warmup)
    start_sample = idle_sample() if not stop.is_set() else None
    run_phase("load", warmup + args.idle_seconds + duration)
    crashed = server.process.poll() is not None
    end_sample = idle_sample() if not crashed else None
    if args.large_check and end_sample is not None:
        report.large_request = large_request_check(load, end_sample, idle_sample)
        crashed = server.process.poll() is not None
    load.close()
    stop.set()
    sampling.join(timeout=5)
    exit_code = server.stop()

    report.duration_s = time.monotonic() - load_started
    report.crashes = 1 if crashed else 0
    report.server_exit_code = exit_code
    report.requests = len(outcomes)
    report.ok = sum(o.kind == "ok" for o in outcomes)
    report.ok_incomplete = sum(o.code == "OK_INCOMPLETE" for o in outcomes)
    report.expected_errors = sum(o.kind == "expected" for o in outcomes)
    report.unexpected_errors = sum(o.kind == "unexpected" for o in outcomes)
    latencies = [o.seconds for o in outcomes if o.kind == "ok" and o.scenario not in ("info", "health")]
    report.p50_s, report.p99_s = _percentile(latencies, 50), _percentile(latencies, 99)
    per_scenario: dict[str, dict] = {}
    for name in MIX:
        mine = [o for o in outcomes if o.scenario == name]
        ok_times = [o.seconds for o in mine if o.kind == "ok"]
        per_scenario[name] = {
            "requests": len(mine),
            "ok": len(ok_times),
            "expected": sum(o.kind == "expected" for o in mine),
            "unexpected": sum(o.kind == "unexpected" for o in mine),
            "p50_s": _percentile(ok_times, 50),
            "p99_s": _percentile(ok_times, 99),
        }
    report.by_scenario = per_scenario
    report.codes = dict(collections.Counter(f"{o.kind}:{o.code}" for o in outcomes))
    report.unexpected_examples = [asdict(o) for o in outcomes if o.kind == "unexpected"][:20]
    if start_sample is not None and end_sample is not None:
        during = [s for s in samples if start_sample.t <= s.t <= end_sample.t]
        report.rss_start_mb, report.rss_end_mb = start_sample.rss_mb, end_sample.rss_mb
        report.idle_times_s = [start_sample.t, end_sample.t]
        report.rss_peak_mb = max(s.rss_mb for s in during)
        report.rss_growth_pct = 100.0 * (end_sample.rss_mb - start_sample.rss_mb) / start_sample.rss_mb
        report.fds_start, report.fds_end, report.fds_peak = start_sample.fds, end_sample.fds, max(s.fds for s in during)
        report.threads_start, report.threads_end = start_sample.threads, end_sample.threads
        report.threads_peak = max(s.threads for s in during)
    report.samples = [asdict(s) for s in samples]
    buckets: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
    for o in outcomes:
        buckets[int((o.started + o.seconds) // 30)][o.kind] += 1
    report.completed_per_30s = [
        {"minute": b / 2, **{kind: buckets[b][kind] for kind in ("ok", "expected", "unexpected")}}
        for b in sorted(buckets)
    ]
    log_text = log_path.read_text(errors="replace")
    report.server_log_tracebacks = log_text.count("Traceback (most recent call last)")
    report.server_log_fatal = [
        line for line in log_text.splitlines() if re.search(r"Fatal Python error|Segmentation fault|double free", line)
    ][:10]
    return report


def _plot(report: SoakReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = report.samples
    ts = [s["t"] / 60 for s in samples]
    fig, axes = plt.subplots(2, 2, figsize=(12, 7))
    ax = axes[0][0]
    ax.plot(ts, [s["rss_mb"] for s in samples])
    ax.axvline(report.warmup_s / 60, color="grey", linestyle="--", label="end of warm-up")
    if report.idle_times_s:
        idle_t = [t / 60 for t in report.idle_times_s]
        ax.scatter(idle_t, [report.rss_start_mb, report.rss_end_mb], color="red", zorder=3, label="idle: start, end")
    if report.large_request and report.idle_times_s:
        ax.axvspan(idle_t[1], ts[-1], color="orange", alpha=0.15, label="one 6300x6300 image")
    ax.set_ylabel("server RSS (MB)")
    ax.legend(fontsize=8)
    ax = axes[0][1]
    ax.plot(ts, [s["fds"] for s in samples], label="open fds")
    ax.plot(ts, [s["threads"] for s in samples], label="threads")
    ax.legend(fontsize=8)
    ax = axes[1][0]
    ax.set_ylabel("completed per 30 s")
    for kind in ("ok", "expected", "unexpected"):
        rows = report.completed_per_30s
        ax.plot([row["minute"] for row in rows], [row[kind] for row in rows], marker=".", label=kind)
    ax.legend(fontsize=8)
    ax = axes[1][1]
    names = list(report.by_scenario)
    ax.barh(names, [report.by_scenario[n]["p99_s"] for n in names], color="tab:orange", label="p99")
    ax.barh(names, [report.by_scenario[n]["p50_s"] for n in names], color="tab:blue", label="p50")
    ax.set_xlabel("latency of OK requests (s)")
    ax.legend(fontsize=8)
    for ax in (axes[0][0], axes[0][1], axes[1][0]):
        ax.set_xlabel("minutes")
        ax.grid(True, alpha=0.3)
    fig.suptitle(
        f"masquerade soak: {report.config['minutes']} min, concurrency {report.config['concurrency']}, "
        f"{report.requests} requests, {report.unexpected_errors} unexpected, {report.crashes} crashes"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    parser.add_argument("--minutes", type=float, default=10.0, help="how long the load runs")
    parser.add_argument("--concurrency", type=int, default=32, help="client threads, each one request at a time")
    parser.add_argument(
        "--warmup-minutes", type=float, default=1.0, help="load before the measured run (at most 20 %% of --minutes)"
    )
    parser.add_argument(
        "--idle-seconds",
        type=float,
        default=2.0,
        help="once the server's threads are quiet, wait this long before reading RSS, fds and threads",
    )
    parser.add_argument(
        "--models", choices=("tiny", "classical"), default="tiny", help="'classical': a server without diffusion models"
    )
    parser.add_argument("--device", default="cpu", help="the server's --device")
    parser.add_argument("--max-queue", type=int, default=64, help="the server's --max-queue")
    parser.add_argument("--seed", type=int, default=0, help="seeds the request mix")
    parser.add_argument(
        "--large-check",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="after the load, one 6300x6300 image on the idle server: RSS must come back within 200 MB",
    )
    parser.add_argument("--label", default=None, help="results file suffix (default: models and concurrency)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    args.label = args.label or f"{args.models}_c{args.concurrency}_{args.minutes:g}min"
    report = soak(args)
    json_path = args.out / f"soak_{args.label}.json"
    json_path.write_text(json.dumps(asdict(report), indent=2, default=float))
    png_path = args.out / f"soak_{args.label}.png"
    _plot(report, png_path)
    print()
    print(f"soak {args.label}: {report.duration_s / 60:.1f} min at concurrency {args.concurrency} ({report.commit})")
    print(f"  requests          {report.requests}")
    print(f"  OK                {report.ok} ({report.ok_incomplete} of them complete=false, said so)")
    print(
        f"  expected errors   {report.expected_errors}  {dict(sorted((k, v) for k, v in report.codes.items() if k.startswith('expected')))}"
    )
    print(f"  unexpected errors {report.unexpected_errors}")
    print(f"  crashes           {report.crashes} (server exit code {report.server_exit_code})")
    print(f"  latency p50 / p99 {report.p50_s:.2f} s / {report.p99_s:.2f} s")
    print(
        f"  RSS start/peak/end {report.rss_start_mb:.0f} / {report.rss_peak_mb:.0f} / {report.rss_end_mb:.0f} MB "
        f"(growth {report.rss_growth_pct:+.1f} % after {report.warmup_s:.0f} s warm-up)"
    )
    print(f"  fds start/peak/end {report.fds_start} / {report.fds_peak} / {report.fds_end}")
    print(f"  threads start/peak/end {report.threads_start} / {report.threads_peak} / {report.threads_end}")
    large = report.large_request
    if large:
        print(
            f"  large request     {large['code']} in {large['seconds']:.1f} s; idle RSS "
            f"{large['rss_before_mb']:.0f} -> {large['rss_after_mb']:.0f} MB ({large['rss_delta_mb']:+.0f} MB)"
        )
    print(f"  server log: {report.server_log_tracebacks} tracebacks, fatal lines: {report.server_log_fatal or 'none'}")
    for example in report.unexpected_examples[:5]:
        print(f"  unexpected: {example}")
    print(f"  wrote {json_path} and {png_path}")
    large_ok = not large or (large["kind"] == "ok" and large["rss_delta_mb"] < 200)
    return 0 if report.unexpected_errors == 0 and report.crashes == 0 and large_ok else 1


if __name__ == "__main__":
    sys.exit(main())
