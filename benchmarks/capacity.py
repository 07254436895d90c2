"""Capacity model of a Masquerade fleet: step-level batching on N engine replicas, simulated.

From per-call UNet times (the engine benchmark's JSON, figures given on the command line,
or the performance model of DESIGN section 4), a request mix and an arrival rate, it
simulates what the engine does (each UNet call packs classifier-free-guidance pairs of
every ready job: up to ``--inversion-chunk`` inversion steps of one job, one generation
step per generating job, oldest first, ``--max-batch`` samples at most) on N replicas
behind Ray Serve's router (power of two choices on requests in flight, at most
``--max-queue`` per replica, the rest waiting in front). It prints faces/day per
replica at saturation and the replicas needed to keep p99 latency under a target.

    .venv/bin/python benchmarks/capacity.py                        # H100 performance model, 1M faces/day
    .venv/bin/python benchmarks/capacity.py --unet-json benchmarks/results/engine_bench_cuda.json
    .venv/bin/python benchmarks/capacity.py --unet-ms 2:40,4:52,8:80,16:140 --faces-per-day 250000

What it leaves out, on purpose: preprocessing and postprocessing (detection, ArcFace,
VAE; ``--overhead-s`` adds a fixed per-request delay that does not contend for the GPU),
the engine's short wait to fill a call, and network time. The performance model is
t(b) = ``--call-overhead-ms`` + b x 6.76 TFLOP / (989 TFLOP/s x MFU): an SDXL UNet sample
at 1024^2 is 6.76 TFLOP (issue 16), an H100 SXM 989 TFLOP/s dense fp16.
"""

from __future__ import annotations

import argparse
import bisect
import datetime
import heapq
import json
import math
import random
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SAMPLE_TFLOP = 6.76
H100_TFLOPS = 989.0
SECONDS_PER_DAY = 86_400


# ---------------------------------------------------------------- per-call times


@dataclass
class CallTimes:
    """Seconds per UNet call by samples in the call; compiled buckets pad up to the next measured size."""

    sizes: list[int]
    seconds: list[float]
    source: str

    def __call__(self, samples: int) -> float:
        i = bisect.bisect_left(self.sizes, samples)
        if i < len(self.sizes):
            return self.seconds[i]
        # Beyond the largest measured size: linear in samples from the last two points.
        if len(self.sizes) > 1:
            (s0, s1), (t0, t1) = self.sizes[-2:], self.seconds[-2:]
            slope = (t1 - t0) / (s1 - s0)
        else:
            slope = self.seconds[-1] / self.sizes[-1]
        return self.seconds[-1] + slope * (samples - self.sizes[-1])

    @classmethod
    def model(cls, max_batch: int, mfu: float, overhead_ms: float, tflops: float = H100_TFLOPS) -> CallTimes:
        sizes = list(range(2, max_batch + 1, 2))
        seconds = [overhead_ms / 1000 + b * SAMPLE_TFLOP / (tflops * mfu) for b in sizes]
        return cls(sizes, seconds, f"model: {tflops:g} TFLOP/s x MFU {mfu:g} + {overhead_ms:g} ms/call")

    @classmethod
    def parse(cls, text: str) -> CallTimes:
        pairs = sorted((int(a), float(b) / 1000) for a, b in (item.split(":") for item in text.split(",")))
        return cls([p[0] for p in pairs], [p[1] for p in pairs], f"given: {text} (ms per call)")

    @classmethod
    def from_engine_bench(cls, path: Path, prefer: str = "compiled") -> CallTimes:
        data = json.loads(path.read_text())
        table = data.get("unet_ms_per_call") or (data.get("summary") or {}).get("unet_ms_per_call")
        if not table:
            raise SystemExit(f"{path}: no unet_ms_per_call table (is it engine_bench's JSON?)")
        pairs = []
        for size, row in table.items():
            value = row.get(prefer) if isinstance(row, dict) else row
            if value is None and isinstance(row, dict):
                value = row.get("eager")
            if value is not None:
                pairs.append((int(size), float(value) / 1000))
        if not pairs:
            raise SystemExit(f"{path}: the unet_ms_per_call table has no figures")
        pairs.sort()
        device = data.get("device") or (data.get("summary") or {}).get("device") or "?"
        return cls([p[0] for p in pairs], [p[1] for p in pairs], f"measured: {path.name} ({device}, {prefer})")


# ---------------------------------------------------------------- the simulation


@dataclass
class Job:
    request: Request
    inversion_left: int
    generation_left: int


@dataclass
class Request:
    arrival: float
    faces: int
    steps: int
    replica: int = -1
    faces_left: int = 0
    done_at: float = 0.0


@dataclass
class Replica:
    index: int
    jobs: list[Job] = field(default_factory=list)
    in_flight: int = 0  # requests routed here and not finished
    busy: bool = False
    calls: int = 0
    samples: int = 0
    busy_seconds: float = 0.0


@dataclass
class Mix:
    """A request mix: (weight, faces per image, diffusion steps N) entries."""

    entries: list[tuple[float, int, int]]

    @classmethod
    def parse(cls, text: str) -> Mix:
        entries = []
        for item in text.split(","):
            weight, faces, steps = item.split(":")
            entries.append((float(weight), int(faces), int(steps)))
        return cls(entries)

    def draw(self, rng: random.Random) -> tuple[int, int]:
        weights = [e[0] for e in self.entries]
        _, faces, steps = rng.choices(self.entries, weights)[0]
        return faces, steps

    @property
    def mean_faces(self) -> float:
        total = sum(e[0] for e in self.entries)
        return sum(e[0] * e[1] for e in self.entries) / total

    @property
    def mean_samples_per_face(self) -> float:
        """UNet samples per face: N inversion + N generation evaluations, each a CFG pair."""
        total = sum(e[0] * e[1] for e in self.entries)
        return sum(e[0] * e[1] * 4 * e[2] for e in self.entries) / total


@dataclass
class SimResult:
    replicas: int
    faces_per_s_offered: float
    requests: int
    p50_s: float
    p99_s: float
    mean_s: float
    utilisation: float
    mean_samples_per_call: float
    saturated: bool


def simulate(
    replicas: int,
    faces_per_s: float,
    times: CallTimes,
    mix: Mix,
    *,
    max_batch: int,
    inversion_chunk: int,
    max_queue: int,
    overhead_s: float,
    duration_s: float,
    warmup_s: float,
    seed: int = 0,
) -> SimResult:
    rng = random.Random(seed)
    pool = [Replica(i) for i in range(replicas)]
    waiting: list[Request] = []  # in front of the replicas (Ray's router queue)
    events: list[tuple[float, int, str, object]] = []  # (time, tiebreak, kind, payload)
    counter = 0
    finished: list[Request] = []
    request_rate = faces_per_s / mix.mean_faces
    max_rows = max_batch // 2

    def push(t: float, kind: str, payload) -> None:
        nonlocal counter
        counter += 1
        heapq.heappush(events, (t, counter, kind, payload))

    def route(request: Request, now: float) -> bool:
        candidates = [r for r in pool if r.in_flight < max_queue]
        if not candidates:
            return False
        pick = rng.sample(candidates, min(2, len(candidates)))
        replica = min(pick, key=lambda r: r.in_flight)
        replica.in_flight += 1
        request.replica = replica.index
        request.faces_left = request.faces
        push(now + overhead_s / 2, "join", request)  # preprocessing, then the faces join the scheduler
        return True

    def start_call(replica: Replica, now: float) -> None:
        rows_left = max_rows
        plan: list[tuple[Job, str, int]] = []
        for job in replica.jobs:  # oldest first
            if rows_left == 0:
                break
            if job.inversion_left > 0:
                count = min(inversion_chunk, job.inversion_left, rows_left)
                plan.append((job, "inversion", count))
            else:
                count = 1
                plan.append((job, "generation", count))
            rows_left -= count
        if not plan:
            replica.busy = False
            return
        samples = 2 * sum(count for _, _, count in plan)
        seconds = times(samples)
        replica.busy = True
        replica.calls += 1
        replica.samples += samples
        replica.busy_seconds += seconds
        push(now + seconds, "call_done", (replica, plan))

    t = 0.0
    push(rng.expovariate(request_rate), "arrive", None)
    while events:
        t, _, kind, payload = heapq.heappop(events)
        if kind == "arrive":
            if t < duration_s:
                faces, steps = mix.draw(rng)
                request = Request(arrival=t, faces=faces, steps=steps)
                if not route(request, t):
                    waiting.append(request)
                push(t + rng.expovariate(request_rate), "arrive", None)
        elif kind == "join":
            request = payload
            replica = pool[request.replica]
            for _ in range(request.faces):
                replica.jobs.append(Job(request, request.steps, request.steps))
            if not replica.busy:
                start_call(replica, t)
        elif kind == "call_done":
            replica, plan = payload
            for job, phase, count in plan:
                if phase == "inversion":
                    job.inversion_left -= count
                else:
                    job.generation_left -= count
                    if job.generation_left == 0:
                        replica.jobs.remove(job)
                        job.request.faces_left -= 1
                        if job.request.faces_left == 0:
                            push(t + overhead_s / 2, "finish", job.request)
            start_call(replica, t)
        elif kind == "finish":
            request = payload
            request.done_at = t
            finished.append(request)
            replica = pool[request.replica]
            replica.in_flight -= 1
            if waiting and route(waiting[0], t):
                waiting.pop(0)
        if t > duration_s * 3:  # overloaded: the backlog would never drain
            break

    measured = [r for r in finished if r.arrival >= warmup_s]
    latencies = sorted(r.done_at - r.arrival for r in measured)
    unfinished = len(waiting) + sum(len(r.jobs) for r in pool)
    # Past capacity the backlog, and with it the latency, grows for as long as requests arrive:
    # requests arriving late in the window wait much longer than those arriving early.
    middle = (warmup_s + duration_s) / 2
    early = [r.done_at - r.arrival for r in measured if r.arrival < middle]
    late = [r.done_at - r.arrival for r in measured if r.arrival >= middle]
    growing = bool(early and late) and sum(late) / len(late) > 1.5 * sum(early) / len(early)
    saturated = unfinished > 0 or not latencies or growing
    busy = sum(r.busy_seconds for r in pool)
    calls = sum(r.calls for r in pool)

    def quantile(q: float) -> float:
        if not latencies:
            return math.inf
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))]

    return SimResult(
        replicas=replicas,
        faces_per_s_offered=faces_per_s,
        requests=len(measured),
        p50_s=quantile(0.50),
        p99_s=math.inf if saturated else quantile(0.99),
        mean_s=sum(latencies) / len(latencies) if latencies else math.inf,
        utilisation=busy / (replicas * max(t, 1e-9)),
        mean_samples_per_call=sum(r.samples for r in pool) / calls if calls else 0.0,
        saturated=saturated,
    )


def faces_per_s_per_replica(times: CallTimes, mix: Mix, max_batch: int) -> float:
    """At saturation every call is full: max_batch samples per call."""
    return max_batch / (times(max_batch) * mix.mean_samples_per_face)


def idle_latency_s(times: CallTimes, steps: int, inversion_chunk: int, max_batch: int = 16) -> float:
    """One face on an idle replica: inversion calls of up to ``chunk`` pairs, then N calls of one pair."""
    chunk = max(1, min(inversion_chunk, max_batch // 2))
    full, rest = divmod(steps, chunk)
    return full * times(2 * chunk) + (times(2 * rest) if rest else 0.0) + steps * times(2)


# ---------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--unet-json", type=Path, help="engine_bench JSON with unet_ms_per_call")
    source.add_argument("--unet-ms", help='per-call times, "SAMPLES:MS,...", e.g. a CPU figure "2:35,4:41,8:55"')
    parser.add_argument("--prefer", choices=("compiled", "eager"), default="compiled", help="column of --unet-json")
    parser.add_argument("--mfu", type=float, default=0.4, help="performance model: UNet MFU at full batch")
    parser.add_argument("--call-overhead-ms", type=float, default=5.0, help="performance model: fixed ms per call")
    parser.add_argument("--tflops", type=float, default=H100_TFLOPS, help="performance model: peak dense fp16")
    parser.add_argument("--faces-per-day", type=float, default=1_000_000)
    parser.add_argument(
        "--mix",
        default="1:1:100",
        help='"WEIGHT:FACES:STEPS,...": images with FACES faces at STEPS diffusion steps (default: one face, N=100)',
    )
    parser.add_argument("--p99-target-s", type=float, default=120.0)
    parser.add_argument("--max-batch", type=int, default=16, help="samples per UNet call (the engine's --max-batch)")
    parser.add_argument("--inversion-chunk", type=int, default=8)
    parser.add_argument("--max-queue", type=int, default=64, help="requests in flight per replica")
    parser.add_argument("--overhead-s", type=float, default=0.0, help="per-request pre+post seconds, off the GPU")
    parser.add_argument("--duration-s", type=float, default=1800.0, help="simulated arrivals, seconds")
    parser.add_argument("--max-replicas", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    if args.unet_json:
        times = CallTimes.from_engine_bench(args.unet_json, args.prefer)
    elif args.unet_ms:
        times = CallTimes.parse(args.unet_ms)
    else:
        times = CallTimes.model(args.max_batch, args.mfu, args.call_overhead_ms, args.tflops)
    mix = Mix.parse(args.mix)
    rate = args.faces_per_day / SECONDS_PER_DAY
    per_replica = faces_per_s_per_replica(times, mix, args.max_batch)
    steps = max(e[2] for e in mix.entries)
    print(f"per-call times   {times.source}")
    print("                 " + ", ".join(f"{s}:{t * 1000:.1f}ms" for s, t in zip(times.sizes, times.seconds)))
    print(f"mix              {args.mix} -> {mix.mean_samples_per_face:.0f} UNet samples per face")
    print(f"one idle face    {idle_latency_s(times, steps, args.inversion_chunk, args.max_batch):.1f} s at N={steps}")
    print(
        f"per replica      {per_replica:.3f} faces/s = {per_replica * SECONDS_PER_DAY:,.0f} faces/day "
        f"(saturated, {args.max_batch} samples per call)"
    )
    print(
        f"offered          {args.faces_per_day:,.0f} faces/day = {rate:.2f} faces/s; p99 target {args.p99_target_s:g} s"
    )

    rows: dict[int, SimResult] = {}

    def run(n: int) -> SimResult:
        if n not in rows:
            rows[n] = result = simulate(
                n,
                rate,
                times,
                mix,
                max_batch=args.max_batch,
                inversion_chunk=args.inversion_chunk,
                max_queue=args.max_queue,
                overhead_s=args.overhead_s,
                duration_s=args.duration_s,
                warmup_s=args.duration_s * 0.2,
                seed=args.seed,
            )
            print(
                f"  {n:4d} replicas: p50 {result.p50_s:8.1f} s  p99 {result.p99_s:8.1f} s  "
                f"GPU busy {100 * result.utilisation:5.1f}%  {result.mean_samples_per_call:5.1f} samples/call"
                + ("  (backlog grows)" if result.saturated else "")
            )
        return rows[n]

    # Grow by a quarter from the throughput bound until p99 meets the target, then bisect.
    low, high = max(1, math.ceil(rate / per_replica)) - 1, None
    n = low + 1
    while n <= args.max_replicas:
        if run(n).p99_s <= args.p99_target_s:
            high = n
            break
        low, n = n, max(n + 1, math.ceil(n * 1.25))
    while high is not None and high - low > 1:
        middle = (low + high) // 2
        if run(middle).p99_s <= args.p99_target_s:
            high = middle
        else:
            low = middle
    found = rows[high] if high is not None else None
    if found is None:
        print(f"no replica count up to {args.max_replicas} keeps p99 under {args.p99_target_s:g} s")
    else:
        print(f"replicas needed  {found.replicas} (p99 {found.p99_s:.1f} s <= {args.p99_target_s:g} s)")

    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d-%H%M%S")
    path = args.out / f"capacity-{stamp}.json"
    record = {
        "benchmark": "capacity",
        "date": stamp,
        "commit": _commit(),
        "argv": sys.argv[1:] if argv is None else argv,
        "unet_times": {
            "source": times.source,
            "ms_per_call": dict(zip(times.sizes, [t * 1000 for t in times.seconds])),
        },
        "faces_per_day_per_replica": per_replica * SECONDS_PER_DAY,
        "replicas_needed": found.replicas if found else None,
        "runs": [rows[n].__dict__ for n in sorted(rows)],
    }
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"saved {path}")
    return 0


def _commit() -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True, cwd=RESULTS.parent
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


if __name__ == "__main__":
    sys.exit(main())
