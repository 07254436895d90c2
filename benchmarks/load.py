"""Load benchmark: throughput and latency of Anonymize under a concurrency sweep.

Each level runs concurrent REVERSE_PERSONALIZATION calls on one aligned face and
reports images/s, p50/p95/p99 latency and the mean UNet batch (samples per call,
from the server's /metrics). With --compare-max-batch-1 it runs the sweep against
a server with the default max batch and one with --max-batch 2 (one CFG pair per
call: no cross-request batching) and prints the throughput ratio.

    python benchmarks/load.py --spawn tiny --steps 10
    python benchmarks/load.py --spawn tiny --compare-max-batch-1
    python benchmarks/load.py --server gpu-host:50051 --metrics-port 9090 --steps 50
    python benchmarks/load.py --spawn tiny --http        # HTTP vs gRPC, unary blur of t1.jpg

With --http it compares the HTTP/JSON API with gRPC instead of sweeping: p50 latency of the
same unary blur request (t1.jpg, six faces) over each, interleaved in one run, and then 64
concurrent HTTP requests whose images must equal the gRPC result (429/503 are the expected
refusals of a full queue; anything else counts as an error).

Writes JSON (machine, git commit, config, numbers) and a PNG under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class LevelResult:
    concurrency: int
    requests: int
    errors: int
    seconds: float
    images_per_second: float
    p50_s: float
    p95_s: float
    p99_s: float
    mean_unet_batch: float
    unet_calls: int


@dataclass
class SweepResult:
    label: str
    server: str
    server_args: list[str]
    device: str
    max_batch: int
    levels: list[LevelResult] = field(default_factory=list)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def _aligned_face_png(path: Path | None) -> bytes:
    if path is not None:
        return path.read_bytes()
    from PIL import Image

    try:
        from skimage import data

        face = data.astronaut()[10:266, 130:386]  # roughly the astronaut's face, square
        image = Image.fromarray(face)
    except ImportError:
        import numpy as np

        rng = np.random.default_rng(0)
        image = Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def _unet_batch_totals(metrics_url: str | None) -> tuple[float, float]:
    """(samples, calls) so far from masquerade_unet_batch_size; (nan, nan) without /metrics."""
    if not metrics_url:
        return float("nan"), float("nan")
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    total = count = float("nan")
    for line in text.splitlines():
        if line.startswith("masquerade_unet_batch_size_sum "):
            total = float(line.split()[1])
        elif line.startswith("masquerade_unet_batch_size_count "):
            count = float(line.split()[1])
    return total, count


def serve_command(metrics_port: int, server_args: list[str]) -> list[str]:
    """`masquerade serve` on loopback, a free gRPC port (the log says which) and ``metrics_port``."""
    return [
        sys.executable,
        "-m",
        "masquerade.cli",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--metrics-port",
        str(metrics_port),
        "--http-port",  # a free port for the HTTP API (the log says which); 8080 may be taken
        "0",
        "--grace-seconds",
        "5",
        "--drain-seconds",  # no load balancer to tell: stop at once
        "0",
        *server_args,
    ]


class SpawnedServer:
    """`masquerade serve` in a subprocess on free ports; the address comes from its log line."""

    def __init__(self, models: str, extra_args: list[str], device: str):
        self.metrics_port = _free_port()
        self.args = ["--models", models, "--device", device, *extra_args]
        command = serve_command(self.metrics_port, self.args)
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.http_url: str | None = None
        self.address = self._wait_for_address(timeout=600)
        # Keep draining the log so the server never blocks on a full pipe.
        threading.Thread(target=self.process.stdout.read, daemon=True).start()

    def _wait_for_address(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                raise RuntimeError(f"server exited with {self.process.wait()} before serving")
            match = re.search(r"masquerade serving on (\S+:\d+) \(", line)
            if match:
                http = re.search(r"HTTP API and web page on (https?://\S+?)/?$", line.strip())
                self.http_url = http.group(1) if http else None
                return match.group(1)
        raise TimeoutError("server did not start serving in time")

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def run_level(
    client, image: bytes, concurrency: int, requests: int, steps: int, metrics_url: str | None
) -> LevelResult:
    from masquerade_client import MasqueradeError

    latencies: list[float] = []
    errors = 0
    lock = threading.Lock()
    counter = iter(range(requests))

    def worker() -> None:
        nonlocal errors
        while True:
            with lock:
                index = next(counter, None)
            if index is None:
                return
            started = time.perf_counter()
            try:
                client.anonymize(image, method="reverse_personalization", aligned=True, steps=steps, seed=index)
            except MasqueradeError as error:
                with lock:
                    errors += 1
                print(f"  request {index} failed: {error}", file=sys.stderr)
                continue
            with lock:
                latencies.append(time.perf_counter() - started)

    samples_before, calls_before = _unet_batch_totals(metrics_url)
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for _ in range(concurrency):
            pool.submit(worker)
    seconds = time.perf_counter() - started
    samples_after, calls_after = _unet_batch_totals(metrics_url)
    calls = calls_after - calls_before
    return LevelResult(
        concurrency=concurrency,
        requests=requests,
        errors=errors,
        seconds=seconds,
        images_per_second=len(latencies) / seconds,
        p50_s=_percentile(latencies, 50),
        p95_s=_percentile(latencies, 95),
        p99_s=_percentile(latencies, 99),
        mean_unet_batch=(samples_after - samples_before) / calls if calls > 0 else float("nan"),
        unet_calls=int(calls) if calls == calls else -1,
    )


def sweep(label: str, address: str, metrics_url: str | None, server_args: list[str], args, image: bytes) -> SweepResult:
    from masquerade_client import AnonymizerClient

    with AnonymizerClient(address, timeout=args.timeout) as client:
        client.wait_ready(timeout=600)
        info = client.server_info()
        result = SweepResult(label, address, server_args, info.device, info.limits.max_batch)
        # One warm-up call: first-call costs (allocations, caches) are not throughput.
        client.anonymize(image, method="reverse_personalization", aligned=True, steps=args.steps)
        print(f"\n{label}: {address}  device={info.device} max_batch={info.limits.max_batch} steps={args.steps}")
        print(
            f"{'conc':>5} {'reqs':>5} {'img/s':>8} {'p50 s':>8} {'p95 s':>8} {'p99 s':>8} {'unet batch':>11} {'errors':>6}"
        )
        for concurrency in args.concurrency:
            requests = max(args.min_requests, args.requests_per_worker * concurrency)
            level = run_level(client, image, concurrency, requests, args.steps, metrics_url)
            result.levels.append(level)
            print(
                f"{level.concurrency:>5} {level.requests:>5} {level.images_per_second:>8.3f} {level.p50_s:>8.3f} "
                f"{level.p95_s:>8.3f} {level.p99_s:>8.3f} {level.mean_unet_batch:>11.2f} {level.errors:>6}",
                flush=True,
            )
    return result


def _t1_jpeg() -> bytes:
    """insightface's six-person sample photo (installed by scripts/setup.sh --test)."""
    import importlib.util

    spec = importlib.util.find_spec("insightface")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("--http needs insightface's t1.jpg: run scripts/setup.sh --test")
    return (Path(spec.submodule_search_locations[0]) / "data" / "images" / "t1.jpg").read_bytes()


def http_comparison(address: str, http_url: str, image: bytes, rounds: int, concurrent: int, timeout: float) -> dict:
    """Unary blur over gRPC and HTTP, interleaved: p50 of each and their ratio; then ``concurrent`` HTTP calls."""
    import requests

    from masquerade_client import AnonymizerClient

    url = f"{http_url}/v1/anonymize?method=BLUR"
    headers = {"Content-Type": "image/jpeg"}

    def http_call(accept: str) -> requests.Response:
        reply = requests.post(url, data=image, headers={**headers, "Accept": accept}, timeout=timeout)
        reply.raise_for_status()
        return reply

    with AnonymizerClient(address, timeout=timeout) as client:
        client.wait_ready(timeout=600)
        expected = client.anonymize(image, method="blur").image
        for _ in range(2):  # warm-up: first calls pay for allocations and caches
            client.anonymize(image, method="blur")
            http_call("image/jpeg")
        grpc_s, http_image_s, http_json_s = [], [], []
        for _ in range(rounds):
            started = time.perf_counter()
            client.anonymize(image, method="blur")
            grpc_s.append(time.perf_counter() - started)
            started = time.perf_counter()
            reply = http_call("image/jpeg")
            http_image_s.append(time.perf_counter() - started)
            if reply.content != expected:
                raise SystemExit("HTTP returned other image bytes than gRPC for the same request")
            started = time.perf_counter()
            http_call("application/json")
            http_json_s.append(time.perf_counter() - started)

    statuses: dict[int, int] = {}
    mismatched = 0
    lock = threading.Lock()

    def one(_: int) -> None:
        nonlocal mismatched
        reply = requests.post(url, data=image, headers={**headers, "Accept": "image/jpeg"}, timeout=timeout)
        with lock:
            statuses[reply.status_code] = statuses.get(reply.status_code, 0) + 1
            if reply.status_code == 200 and reply.content != expected:
                mismatched += 1

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrent) as pool:
        list(pool.map(one, range(concurrent)))
    concurrent_seconds = time.perf_counter() - started
    unexpected = sum(n for status, n in statuses.items() if status not in (200, 429, 503))
    return {
        "image": "t1.jpg (1280x886, six faces)",
        "rounds": rounds,
        "grpc_p50_s": _percentile(grpc_s, 50),
        "http_image_p50_s": _percentile(http_image_s, 50),
        "http_json_p50_s": _percentile(http_json_s, 50),
        "http_over_grpc_p50": _percentile(http_image_s, 50) / _percentile(grpc_s, 50),
        "http_json_over_grpc_p50": _percentile(http_json_s, 50) / _percentile(grpc_s, 50),
        "concurrent_requests": concurrent,
        "concurrent_seconds": concurrent_seconds,
        "concurrent_statuses": {str(k): v for k, v in sorted(statuses.items())},
        "concurrent_unexpected_errors": unexpected,
        "concurrent_results_differing_from_grpc": mismatched,
    }


def _print_http(result: dict) -> None:
    print(f"\nunary blur, {result['image']}, {result['rounds']} interleaved rounds:")
    print(f"  gRPC p50              {result['grpc_p50_s'] * 1000:8.1f} ms")
    print(
        f"  HTTP p50 (image)      {result['http_image_p50_s'] * 1000:8.1f} ms  "
        f"{result['http_over_grpc_p50']:.3f}x gRPC (target <= 1.15x)"
    )
    print(
        f"  HTTP p50 (JSON)       {result['http_json_p50_s'] * 1000:8.1f} ms  {result['http_json_over_grpc_p50']:.3f}x gRPC"
    )
    print(
        f"{result['concurrent_requests']} concurrent HTTP requests in {result['concurrent_seconds']:.1f} s: "
        f"statuses {result['concurrent_statuses']}, unexpected errors {result['concurrent_unexpected_errors']}, "
        f"results differing from gRPC {result['concurrent_results_differing_from_grpc']}"
    )


def _git_commit() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO_ROOT, capture_output=True, text=True)
        return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _machine() -> dict:
    machine = {
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
    }
    try:
        import torch

        machine["torch"] = torch.__version__
        if torch.cuda.is_available():
            machine["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return machine


def _plot(sweeps: list[SweepResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_tp, ax_lat) = plt.subplots(1, 2, figsize=(11, 4))
    for result in sweeps:
        xs = [level.concurrency for level in result.levels]
        ax_tp.plot(xs, [level.images_per_second for level in result.levels], marker="o", label=result.label)
        ax_lat.plot(xs, [level.p50_s for level in result.levels], marker="o", label=f"{result.label} p50")
        ax_lat.plot(
            xs, [level.p95_s for level in result.levels], marker="x", linestyle="--", label=f"{result.label} p95"
        )
    for ax, ylabel in ((ax_tp, "images / s"), (ax_lat, "latency (s)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("masquerade Anonymize load sweep")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--server", help="HOST:PORT of a running server")
    target.add_argument("--spawn", choices=("tiny", "default"), help="start `masquerade serve --models X` subprocesses")
    parser.add_argument(
        "--metrics-port", type=int, default=9090, help="with --server: its /metrics port (0: no batch stats)"
    )
    parser.add_argument("--device", default="auto", help="with --spawn: the server's --device")
    parser.add_argument(
        "--max-batch", type=int, default=None, help="with --spawn: the server's --max-batch (its default if unset)"
    )
    parser.add_argument(
        "--compare-max-batch-1",
        action="store_true",
        help="with --spawn: also sweep a --max-batch 2 server (one CFG pair per call) and print the ratio",
    )
    parser.add_argument("--concurrency", default="1,2,4,8,16", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--steps", type=int, default=10, help="diffusion steps per request")
    parser.add_argument(
        "--requests-per-worker", type=int, default=2, help="requests per concurrent worker at each level"
    )
    parser.add_argument("--min-requests", type=int, default=4, help="at least this many requests per level")
    parser.add_argument(
        "--image", type=Path, default=None, help="an aligned face image (default: a crop of skimage's astronaut)"
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="per-request deadline, seconds")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument(
        "--http", action="store_true", help="compare the HTTP API with gRPC (unary blur of t1.jpg) instead of sweeping"
    )
    parser.add_argument("--http-url", help="with --server --http: the server's HTTP API, e.g. http://gpu-host:8080")
    parser.add_argument("--http-rounds", type=int, default=30, help="with --http: interleaved unary calls per protocol")
    parser.add_argument("--http-concurrent", type=int, default=64, help="with --http: concurrent HTTP requests")
    args = parser.parse_args(argv)
    if args.compare_max_batch_1 and not args.spawn:
        parser.error("--compare-max-batch-1 needs --spawn (it starts both servers itself)")

    if args.http:
        return _main_http(args)
    image = _aligned_face_png(args.image)
    sweeps: list[SweepResult] = []
    if args.server:
        metrics_url = (
            f"http://{args.server.rsplit(':', 1)[0]}:{args.metrics_port}/metrics" if args.metrics_port else None
        )
        sweeps.append(sweep("server", args.server, metrics_url, [], args, image))
    else:
        configs = [("batched", [] if args.max_batch is None else ["--max-batch", str(args.max_batch)])]
        if args.compare_max_batch_1:
            configs.append(("one-pair-per-call", ["--max-batch", "2"]))
        for label, extra in configs:  # one at a time: they would compete for the same device
            spawned = SpawnedServer(args.spawn, extra, args.device)
            try:
                sweeps.append(sweep(label, spawned.address, spawned.metrics_url, spawned.args, args, image))
            finally:
                spawned.stop()

    ratios = None
    if len(sweeps) == 2:
        ratios = {
            level.concurrency: level.images_per_second / other.images_per_second
            if other.images_per_second
            else float("nan")
            for level, other in zip(sweeps[0].levels, sweeps[1].levels)
        }
        print("\nthroughput ratio, batched / one pair per call:")
        for concurrency, ratio in ratios.items():
            print(f"  concurrency {concurrency:>3}: {ratio:.2f}x")

    args.out.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    stem = args.out / f"load-{stamp}"
    report = {
        "benchmark": "load",
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "git_commit": _git_commit(),
        "machine": _machine(),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "sweeps": [asdict(s) for s in sweeps],
        "throughput_ratio_batched_over_one_pair": ratios,
    }
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2))
    _plot(sweeps, stem.with_suffix(".png"))
    print(f"\nwrote {stem.with_suffix('.json')} and {stem.with_suffix('.png')}")
    return 0


def _main_http(args) -> int:
    image = args.image.read_bytes() if args.image else _t1_jpeg()
    if args.server:
        if not args.http_url:
            raise SystemExit("--server --http needs --http-url")
        result = http_comparison(
            args.server, args.http_url.rstrip("/"), image, args.http_rounds, args.http_concurrent, args.timeout
        )
    else:
        spawned = SpawnedServer(
            args.spawn, [] if args.max_batch is None else ["--max-batch", str(args.max_batch)], args.device
        )
        try:
            if spawned.http_url is None:
                raise SystemExit("the spawned server did not log its HTTP API address")
            result = http_comparison(
                spawned.address, spawned.http_url, image, args.http_rounds, args.http_concurrent, args.timeout
            )
        finally:
            spawned.stop()
    _print_http(result)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"load-http-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    report = {
        "benchmark": "load --http",
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "git_commit": _git_commit(),
        "machine": _machine(),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "http_vs_grpc": result,
    }
    path.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
