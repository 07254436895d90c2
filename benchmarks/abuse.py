"""Abuse: replays the attacks of issue 20 against a server this script spawns, each figure against its target.

One client must not be able to take the machine. Each attack runs on a fresh,
idle server (a classical-only ``masquerade serve`` with a token file, so the
unauthenticated attack has a gate to hit); the server's memory is read from
/proc (VmHWM, its peak RSS, reset before each attack through clear_refs), its
threads and CPU time likewise.

    python benchmarks/abuse.py                 # the issue's sizes (several minutes on 2 cores)
    python benchmarks/abuse.py --small         # CI-sized versions of the same attacks

Attacks and targets (issue 20):

- memory: 16 concurrent 6300x6300 blank PNGs (1.9 MB uploaded in all): peak RSS <= +1.5 GB, none fail;
- non-reading batch: one AnonymizeBatch stream sends 200 requests and reads none: RSS <= +100 MB;
- unauthenticated: 12 concurrent 60 MiB calls without a token: RSS <= +200 MB, all UNAUTHENTICATED;
- cancelled work: two 6300x6300 requests whose deadlines expire; a small blur is back within 2x its
  idle latency <= 1 s after the second expires;
- health: health-check p99 <= 250 ms while both cores are kept busy by concurrent requests;
- probe port: 400 idle, half-sent HTTP requests on the probe port: <= 32 server threads.

Prints one line per attack (figure, target, pass/FAIL) and writes abuse.json (abuse_small.json for
--small) under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load import _git_commit, _machine  # benchmarks/load.py, this script's neighbour
from soak import SpawnedServer

RESULTS_DIR = Path(__file__).resolve().parent / "results"
TOKEN = "abuse-benchmark-token"
MB = 1024 * 1024


@dataclass
class Sizes:
    """How big each attack is; ``--small`` shrinks them for CI (the targets shrink in proportion)."""

    memory_requests: int = 16
    memory_side: int = 6300
    memory_target_mb: float = 1536.0
    batch_requests: int = 200
    batch_target_mb: float = 100.0
    unauth_calls: int = 12
    unauth_mib: int = 60
    unauth_target_mb: float = 200.0
    cancel_side: int = 6300
    health_seconds: float = 20.0
    health_target_ms: float = 250.0
    health_load_side: int = 1500
    probe_connections: int = 400
    probe_target_threads: int = 32


SMALL = Sizes(
    memory_requests=8,
    memory_side=3000,
    memory_target_mb=600.0,
    batch_requests=60,
    batch_target_mb=60.0,
    unauth_calls=6,
    unauth_mib=30,
    unauth_target_mb=120.0,
    cancel_side=4000,
    health_seconds=6.0,
    health_target_ms=500.0,
    probe_connections=100,
    probe_target_threads=32,
)


@dataclass
class Figure:
    attack: str
    figure: str
    value: float
    target: str
    passed: bool
    details: dict = field(default_factory=dict)

    def line(self) -> str:
        verdict = "pass" if self.passed else "FAIL"
        return f"{self.attack:<18} {self.figure:<44} {self.value:>10.1f}  target {self.target:<14} {verdict}"


# ---------------------------------------------------------------------------------- the server's figures


class ServerProbe:
    """/proc figures of the spawned server: RSS now and at peak (resettable), threads, CPU seconds."""

    def __init__(self, pid: int):
        self.pid = pid

    def _status(self) -> dict[str, str]:
        text = Path(f"/proc/{self.pid}/status").read_text()
        return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)

    def rss_mb(self) -> float:
        return int(self._status()["VmRSS"].split()[0]) / 1024

    def peak_mb(self) -> float:
        return int(self._status()["VmHWM"].split()[0]) / 1024

    def threads(self) -> int:
        return int(self._status()["Threads"])

    def reset_peak(self) -> None:
        """VmHWM back to the current RSS (Linux: writing 5 to clear_refs)."""
        Path(f"/proc/{self.pid}/clear_refs").write_text("5")

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def wait_quiet(self, timeout: float = 120.0, busy_fraction: float = 0.05, window: float = 1.0) -> None:
        """Until the server used under ``busy_fraction`` of a core over ``window`` seconds."""
        end = time.monotonic() + timeout
        last = self.cpu_seconds()
        while time.monotonic() < end:
            time.sleep(window)
            now = self.cpu_seconds()
            if now - last < busy_fraction * window:
                return
            last = now


def spawn_server(work_dir: Path, extra_args: list[str] = (), warm_requests: int = 8) -> SpawnedServer:
    """A classical-only server (an empty model folder) that wants ``TOKEN``."""
    token_file = work_dir / "tokens.txt"
    token_file.write_text(TOKEN + "\n")
    env = {"MASQUERADE_MODEL_DIR": str(work_dir / "no-models")}
    args = ["--models", "default", "--device", "cpu", "--auth-token-file", str(token_file), "--no-http", *extra_args]
    server = SpawnedServer(args, work_dir / "server.log", env)
    warm_up(server.address, warm_requests)
    return server


def warm_up(address: str, requests: int) -> None:
    """Loads what the first requests load (per-thread detector, landmark and descriptor models, allocator
    arenas) before idle is measured: without it the first attack pays for them."""
    from skimage import data  # a real photo with a face

    photo = png(np.ascontiguousarray(data.astronaut()))
    channel, stub, pb2 = stubs(address)
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda _: stub.Anonymize(blur_request(pb2, photo), metadata=AUTH, timeout=300), range(requests)))
    channel.close()


class GaugeWatcher:
    """The highest value of the server's pixel-budget gauges, polled from /metrics while an attack runs."""

    NAMES = ("masquerade_inflight_megapixels", "masquerade_pixel_budget_waiting")

    def __init__(self, metrics_port: int, interval: float = 0.02):
        self.url = f"http://127.0.0.1:{metrics_port}/metrics"
        self.interval = interval
        self.highest = dict.fromkeys(self.NAMES, 0.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> GaugeWatcher:
        self._thread.start()
        return self

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join(5)
        return dict(self.highest)

    def _run(self) -> None:
        import urllib.request

        while not self._stop.is_set():
            try:
                with urllib.request.urlopen(self.url, timeout=2) as reply:
                    text = reply.read().decode()
            except OSError:
                text = ""
            for line in text.splitlines():
                name, _, value = line.partition(" ")
                if name in self.highest:
                    self.highest[name] = max(self.highest[name], float(value))
            time.sleep(self.interval)


# ---------------------------------------------------------------------------------- requests


def png(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, "PNG")
    return buffer.getvalue()


def blank_png(side: int) -> bytes:
    return png(np.zeros((side, side, 3), np.uint8))


def noise_png(side: int, seed: int = 0) -> bytes:
    """Incompressible: its anonymized PNG is as large as the pixels (fills transport windows fast)."""
    return png(np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8))


def stubs(address: str):
    from masquerade.v1 import anonymizer_pb2 as pb2
    from masquerade.v1 import anonymizer_pb2_grpc as pb2_grpc

    options = [("grpc.max_send_message_length", 256 * MB), ("grpc.max_receive_message_length", 256 * MB)]
    channel = grpc.insecure_channel(address, options=options)
    return channel, pb2_grpc.AnonymizerStub(channel), pb2


AUTH = (("authorization", f"Bearer {TOKEN}"),)


def blur_request(pb2, image: bytes, request_id: str = ""):
    return pb2.AnonymizeRequest(image=image, method=pb2.BLUR, request_id=request_id)


# ---------------------------------------------------------------------------------- attacks


def attack_memory(address: str, probe: ServerProbe, sizes: Sizes, metrics_port: int = 0) -> Figure:
    """Concurrent blank PNGs of side^2 pixels: tiny uploads that decode to 3 bytes a pixel each."""
    image = blank_png(sizes.memory_side)
    channel, stub, pb2 = stubs(address)
    probe.wait_quiet()
    idle = probe.rss_mb()
    probe.reset_peak()

    def one(i: int) -> str:
        try:
            # Waiting is allowed (one large image at a time on 2 cores): the deadline only bounds a hang.
            stub.Anonymize(blur_request(pb2, image, f"m{i}"), metadata=AUTH, timeout=3600)
            return "OK"
        except grpc.RpcError as error:
            return error.code().name

    gauges = GaugeWatcher(metrics_port).start() if metrics_port else None
    with ThreadPoolExecutor(sizes.memory_requests) as pool:
        codes = list(pool.map(one, range(sizes.memory_requests)))
    channel.close()
    growth = probe.peak_mb() - idle
    highest = gauges.stop() if gauges else {}
    failed = [c for c in codes if c != "OK"]
    return Figure(
        "memory",
        f"{sizes.memory_requests} x {sizes.memory_side}^2 blank PNG: peak RSS +MB",
        growth,
        f"<= {sizes.memory_target_mb:g}",
        growth <= sizes.memory_target_mb and not failed,
        {"idle_mb": idle, "upload_bytes": len(image) * sizes.memory_requests, "codes": codes, "gauges_max": highest},
    )


def attack_non_reading_batch(address: str, probe: ServerProbe, sizes: Sizes) -> Figure:
    """One batch stream sends every request and reads nothing until the server has stalled it."""
    image = noise_png(256)
    channel, stub, pb2 = stubs(address)
    probe.wait_quiet()
    idle = probe.rss_mb()
    probe.reset_peak()
    sent = 0

    def requests():
        nonlocal sent
        for i in range(sizes.batch_requests):
            sent += 1
            yield blur_request(pb2, image, f"b{i}")

    responses = stub.AnonymizeBatch(requests(), metadata=AUTH, timeout=600)
    time.sleep(1.0)
    probe.wait_quiet(busy_fraction=0.05, window=1.5)  # the server has done all it will do unread
    stalled_sent = sent
    growth = probe.peak_mb() - idle
    received = sum(1 for _ in responses)  # now read: everything must still arrive
    channel.close()
    return Figure(
        "non-reading batch",
        f"{sizes.batch_requests} requests, none read: peak RSS +MB",
        growth,
        f"<= {sizes.batch_target_mb:g}",
        growth <= sizes.batch_target_mb and received == sizes.batch_requests,
        {"idle_mb": idle, "sent_before_stall": stalled_sent, "received_after_reading": received},
    )


def attack_unauthenticated(address: str, probe: ServerProbe, sizes: Sizes) -> Figure:
    """Large bodies without a token; the serialized body is built once and sent as raw bytes."""
    from masquerade.v1 import anonymizer_pb2 as pb2

    body = pb2.AnonymizeRequest(image=b"\0" * (sizes.unauth_mib * MB - 64)).SerializeToString()
    options = [("grpc.max_send_message_length", 256 * MB)]
    channel = grpc.insecure_channel(address, options=options)
    call = channel.unary_unary("/masquerade.v1.Anonymizer/Anonymize", lambda b: b, lambda b: b)
    probe.wait_quiet()
    idle = probe.rss_mb()
    probe.reset_peak()

    def one(_i: int) -> str:
        try:
            call(body, timeout=120)
            return "OK"
        except grpc.RpcError as error:
            return error.code().name

    with ThreadPoolExecutor(sizes.unauth_calls) as pool:
        codes = list(pool.map(one, range(sizes.unauth_calls)))
    channel.close()
    time.sleep(0.5)
    growth = probe.peak_mb() - idle
    return Figure(
        "unauthenticated",
        f"{sizes.unauth_calls} x {sizes.unauth_mib} MiB, no token: peak RSS +MB",
        growth,
        f"<= {sizes.unauth_target_mb:g}",
        growth <= sizes.unauth_target_mb and set(codes) == {"UNAUTHENTICATED"},
        {"idle_mb": idle, "codes": codes},
    )


def small_blur_seconds(stub, pb2, image: bytes) -> float:
    started = time.perf_counter()
    stub.Anonymize(blur_request(pb2, image), metadata=AUTH, timeout=120)
    return time.perf_counter() - started


def attack_cancelled_work(address: str, probe: ServerProbe, sizes: Sizes) -> Figure:
    """Two large requests whose deadlines expire early; how soon is a small blur fast again?"""
    large = blank_png(sizes.cancel_side)  # 116 KB that decodes to 119 MB and a full tiled detection
    small = noise_png(64, seed=2)
    channel, stub, pb2 = stubs(address)
    probe.wait_quiet()
    idle = statistics.median(small_blur_seconds(stub, pb2, small) for _ in range(7))
    futures = [stub.Anonymize.future(blur_request(pb2, large, f"c{i}"), metadata=AUTH, timeout=1.0) for i in range(2)]
    codes = []
    for future in futures:
        try:
            future.result()
            codes.append("OK")
        except grpc.RpcError as error:
            codes.append(error.code().name)
    expired = time.perf_counter()
    recovered = None
    latencies = []
    while time.perf_counter() - expired < 30:
        latency = small_blur_seconds(stub, pb2, small)
        latencies.append(latency)
        if latency <= 2 * max(idle, 0.01):
            recovered = time.perf_counter() - expired
            break
    channel.close()
    value = recovered if recovered is not None else float("inf")
    return Figure(
        "cancelled work",
        "small blur back within 2x idle after 2 expired: s",
        value,
        "<= 1",
        value <= 1.0,
        {"idle_s": idle, "codes": codes, "latencies_s": latencies[:20]},
    )


def _health_load(address: str, load_side: int, seconds: float, threads: int, results) -> None:
    """The load of the health attack, in its own process: a client's GIL must not delay the probes."""
    images = [noise_png(load_side, seed=3), blank_png(2 * load_side)]
    channel, stub, pb2 = stubs(address)
    info = stub.GetServerInfo(pb2.GetServerInfoRequest(), metadata=AUTH, timeout=30)
    generative = any(m.method == pb2.REVERSE_PERSONALIZATION and m.available for m in info.methods)
    face = noise_png(64, seed=4)
    end = time.monotonic() + seconds
    outcomes: dict[str, int] = {}

    def load(i: int) -> None:
        while time.monotonic() < end:
            if generative and i % 2:  # the step loop and UNet calls too, when the server has (tiny) models
                request = pb2.AnonymizeRequest(
                    image=face,
                    method=pb2.REVERSE_PERSONALIZATION,
                    detection=pb2.DetectionOptions(aligned=True),
                    params=pb2.ReversePersonalizationParams(steps=10),
                )
            else:
                request = blur_request(pb2, images[i % len(images)])
            try:
                stub.Anonymize(request, metadata=AUTH, timeout=120)
                code = "OK"
            except grpc.RpcError as error:
                code = error.code().name
            outcomes[code] = outcomes.get(code, 0) + 1

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(load, range(threads)))
    channel.close()
    results.put(outcomes)


def attack_health_under_load(address: str, probe: ServerProbe, sizes: Sizes) -> Figure:
    """Health checks (1 s deadline, as Kubernetes sends) while concurrent requests keep the cores busy.

    The load runs in a child process, so the probes here measure the server, not this process's GIL."""
    import multiprocessing

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    warm = 3.0
    loader = context.Process(
        target=_health_load, args=(address, sizes.health_load_side, warm + sizes.health_seconds, 6, results)
    )
    loader.start()
    health_channel = grpc.insecure_channel(address)
    health = health_pb2_grpc.HealthStub(health_channel)
    latencies: list[float] = []
    failures = 0
    time.sleep(warm)
    cpu_before, wall_before = probe.cpu_seconds(), time.monotonic()
    end = time.monotonic() + sizes.health_seconds
    while time.monotonic() < end:
        started = time.perf_counter()
        try:
            health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
            latencies.append(time.perf_counter() - started)
        except grpc.RpcError:
            failures += 1
            latencies.append(1.0)
        time.sleep(0.05)
    cores_busy = (probe.cpu_seconds() - cpu_before) / (time.monotonic() - wall_before)
    outcomes = results.get(timeout=300)
    loader.join(60)
    health_channel.close()
    p99_ms = float(np.percentile(latencies, 99)) * 1000 if latencies else float("inf")
    return Figure(
        "health",
        "health p99 under load: ms",
        p99_ms,
        f"<= {sizes.health_target_ms:g}",
        p99_ms <= sizes.health_target_ms and failures == 0,
        {
            "checks": len(latencies),
            "failures": failures,
            "p50_ms": float(np.percentile(latencies, 50)) * 1000,
            "server_cores_busy": cores_busy,
            "load_outcomes": outcomes,
        },
    )


def attack_probe_connections(server: SpawnedServer, probe: ServerProbe, sizes: Sizes) -> Figure:
    """Idle connections that send half a request and wait, on the HTTP probe port."""
    sockets = []
    before = probe.threads()
    peak = before
    for _ in range(sizes.probe_connections):
        try:
            sock = socket.create_connection(("127.0.0.1", server.metrics_port), timeout=5)
            sock.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\n")  # no blank line: the request never ends
            sockets.append(sock)
        except OSError:
            break
        peak = max(peak, probe.threads())
    time.sleep(1.0)
    peak = max(peak, probe.threads())
    # Is the probe still answered while they hang?
    try:
        with socket.create_connection(("127.0.0.1", server.metrics_port), timeout=2) as sock:
            sock.settimeout(2)
            sock.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            answered = sock.recv(64).startswith(b"HTTP/1.1 200")
    except OSError:
        answered = False
    for sock in sockets:
        sock.close()
    return Figure(
        "probe port",
        f"{sizes.probe_connections} half-sent HTTP requests: peak threads",
        float(peak),
        f"<= {sizes.probe_target_threads}",
        peak <= sizes.probe_target_threads,
        {"threads_before": before, "connections_opened": len(sockets), "livez_answered_meanwhile": answered},
    )


ATTACKS = ("memory", "batch", "unauth", "cancel", "health", "probe")


def run(sizes: Sizes, attacks: tuple[str, ...], extra_server_args: list[str]) -> list[Figure]:
    figures = []
    for name in attacks:
        with tempfile.TemporaryDirectory(prefix="masquerade-abuse-") as tmp:
            server = spawn_server(Path(tmp), extra_server_args)
            try:
                probe = ServerProbe(server.process.pid)
                if name == "memory":
                    figure = attack_memory(server.address, probe, sizes, server.metrics_port)
                elif name == "batch":
                    figure = attack_non_reading_batch(server.address, probe, sizes)
                elif name == "unauth":
                    figure = attack_unauthenticated(server.address, probe, sizes)
                elif name == "cancel":
                    figure = attack_cancelled_work(server.address, probe, sizes)
                elif name == "health":
                    figure = attack_health_under_load(server.address, probe, sizes)
                else:
                    figure = attack_probe_connections(server, probe, sizes)
            finally:
                code = server.stop()
            figure.details["server_exit_code"] = code
            print(figure.line(), flush=True)
            figures.append(figure)
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="CI-sized attacks")
    parser.add_argument("--only", nargs="+", choices=ATTACKS, default=list(ATTACKS), help="attacks to run")
    parser.add_argument("--server-arg", action="append", default=[], help="extra `masquerade serve` argument")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args()
    sizes = SMALL if args.small else Sizes()
    figures = run(sizes, tuple(args.only), args.server_arg)
    report = {
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "commit": _git_commit(),
        "machine": _machine(),
        "load_average_at_end": os.getloadavg(),  # other jobs on a shared machine slow every figure here
        "sizes": asdict(sizes),
        "figures": [asdict(f) for f in figures],
        "all_passed": all(f.passed for f in figures),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / ("abuse_small.json" if args.small else "abuse.json")
    path.write_text(json.dumps(report, indent=2, default=str))
    print(f"wrote {path}")
    return 0 if report["all_passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
