"""Priorities, per-client quotas and honest admission, measured against the issue's targets in one run.

A real server (`masquerade serve` in a subprocess, tiny models by default) with a token file:
`product` (interactive), `archive` and `nightly` (bulk-only). Every request is one aligned face.

1. idle:        interactive requests one after another on an idle server -> idle p99.
2. bulk alone:  `archive` keeps --backlog requests in flight -> bulk faces per second.
3. mixed:       the same backlog, plus interactive requests one at a time, paced so that they ask
                for --interactive-share (5 %) of the steps the server did in 2: a product's
                trickle of user-facing photos next to a batch, not a second batch
                -> interactive p99 (target <= 1.5x idle) and bulk faces/s (target >= 90 % of 2).
                2 and 3 alternate in --rounds windows each (one backlog throughout), so a change in
                the machine's other load during the run weighs on both alike.
4. two bulk:    `archive` (16 in flight) and `nightly` (8 in flight) saturate the server
                -> each one's share of the diffusion steps (target 40-60 %).
5. admission:   during 3's load, interactive requests with deadlines from 0.3x to 3x the median
                interactive latency measured in 3 -> refused within 50 ms when the deadline is
                below that latency's 5th percentile (could not make it; target >= 95 %), never
                refused when it is above 1.2x its 95th percentile (would have made it with a 20 %
                margin). A refusal's estimate (its message says it) is kept.

    python benchmarks/priority.py                    # tiny models on CPU, ~10 minutes on 2 cores
    python benchmarks/priority.py --smoke            # a minute: the code path, not the figures

Writes benchmarks/results/priority_<device>_<models>.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load import SpawnedServer, _git_commit, _machine  # same folder: one way to spawn a server

RESULTS_DIR = Path(__file__).resolve().parent / "results"
TOKENS = {
    "product": "product-token name=product priority=interactive",
    "archive": "archive-token name=archive priority=bulk max-priority=bulk",
    "nightly": "nightly-token name=nightly priority=bulk max-priority=bulk",
}


def face_png() -> bytes:
    """An 'already aligned' face: with tiny models any picture is one (detection is skipped)."""
    import io

    import numpy as np
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def steps_by_priority(metrics_url: str) -> dict[str, float]:
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    found = {}
    for line in text.splitlines():
        if line.startswith("masquerade_diffusion_steps_total{"):
            label = line.split('priority="', 1)[1].split('"', 1)[0]
            found[label] = float(line.split()[-1])
    return found


@dataclass
class Report:
    config: dict
    idle_latencies_s: list[float] = field(default_factory=list)
    mixed_latencies_s: list[float] = field(default_factory=list)
    idle_timings: list[dict] = field(default_factory=list)  # the responses' per-phase seconds
    mixed_timings: list[dict] = field(default_factory=list)
    interactive_pause_s: float = 0.0
    # os.getloadavg()[0] as each phase ended: the machine's other work skews every figure here.
    load_average: dict[str, float] = field(default_factory=dict)
    bulk_alone_faces_per_s: float = 0.0
    bulk_mixed_faces_per_s: float = 0.0
    shares: dict[str, float] = field(default_factory=dict)
    admission: list[dict] = field(default_factory=list)
    windows: list[dict] = field(default_factory=list)  # 2 and 3's alternating windows, in order
    steps_by_priority: dict[str, float] = field(default_factory=dict)
    summary: dict = field(default_factory=dict)


class Load:
    """Keeps ``concurrency`` requests of one client in flight until stopped; records completion times."""

    def __init__(self, client, image: bytes, steps: int, concurrency: int):
        self.client, self.image, self.steps, self.concurrency = client, image, steps, concurrency
        self.done: list[float] = []
        self.errors: list[str] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._worker()) for _ in range(self.concurrency)]

    async def _worker(self) -> None:
        while not self._stop.is_set():
            try:
                await self.client.anonymize(self.image, aligned=True, steps=self.steps)
                self.done.append(time.monotonic())
            except Exception as error:  # counted, and the load goes on
                self.errors.append(type(error).__name__)
                await asyncio.sleep(0.2)

    def completed_between(self, start: float, end: float) -> int:
        return sum(1 for t in self.done if start <= t < end)

    async def stop(self) -> None:
        self._stop.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def interactive_series(
    client, image: bytes, steps: int, count: int, pause_s: float, timings: list | None = None
) -> list[float]:
    from google.protobuf.json_format import MessageToDict

    latencies = []
    for _ in range(count):
        started = time.monotonic()
        response = await client.anonymize(image, aligned=True, steps=steps)
        latencies.append(time.monotonic() - started)
        if timings is not None:
            timings.append(MessageToDict(response.timings, preserving_proto_field_name=True))
        await asyncio.sleep(pause_s)
    return latencies


async def run(args, server: SpawnedServer, report: Report) -> None:
    from masquerade_client import AsyncAnonymizerClient
    from masquerade_client.errors import DeadlineExceeded

    image = face_png()
    steps = args.steps
    clients = {
        name: AsyncAnonymizerClient(server.address, token=line.split()[0], timeout=600) for name, line in TOKENS.items()
    }
    product, archive, nightly = clients["product"], clients["archive"], clients["nightly"]
    try:
        await product.wait_ready(timeout=120)
        # Warm-up: every call size the runs will use gets measured once, as a running server's are.
        await interactive_series(product, image, steps, 2, 0.0)
        warm = Load(archive, image, steps, args.backlog)
        warm.start()
        await asyncio.sleep(args.warmup_s)
        await interactive_series(product, image, steps, 2, 0.2)
        await warm.stop()
        await asyncio.sleep(2.0)

        print(f"[1/5] idle: {args.samples} interactive requests", flush=True)
        report.idle_latencies_s = await interactive_series(
            product, image, steps, args.samples, 0.2, report.idle_timings
        )
        report.load_average["idle"] = os.getloadavg()[0]

        # 2 and 3 alternate (alone, mixed, alone, mixed, ...: --rounds of each, window_s in all for each), so
        # a drift in the machine's other load over the run weighs on both figures alike, not on one.
        print(f"[2+3/5] bulk alone and mixed, alternating: {args.backlog} bulk in flight", flush=True)
        bulk = Load(archive, image, steps, args.backlog)
        bulk.start()
        await asyncio.sleep(args.warmup_s)
        part = args.window_s / args.rounds
        alone_faces = alone_seconds = mixed_faces = mixed_seconds = 0.0
        latencies: list[float] = []
        pause = None
        for round_index in range(args.rounds):
            start = time.monotonic()
            await asyncio.sleep(part)
            end = time.monotonic()
            alone_faces += bulk.completed_between(start, end)
            alone_seconds += end - start
            report.windows.append(
                {"kind": "bulk_alone", "seconds": end - start, "faces": bulk.completed_between(start, end)}
            )
            if pause is None:
                # One interactive face per `period` asks for interactive_share of the steps bulk alone got done.
                period = 1.0 / max(1e-6, args.interactive_share * alone_faces / alone_seconds)
                pause = max(0.0, period - statistics.median(report.idle_latencies_s))
                report.interactive_pause_s = pause
                print(f"      mixed: the backlog + interactive requests one at a time, {pause:.1f} s apart", flush=True)
            start = time.monotonic()
            wanted = -(-args.samples // args.rounds) * (round_index + 1)
            while time.monotonic() - start < part or len(latencies) < wanted:
                latencies += await interactive_series(product, image, steps, 1, pause, report.mixed_timings)
            end = time.monotonic()
            mixed_faces += bulk.completed_between(start, end)
            mixed_seconds += end - start
            report.windows.append(
                {"kind": "mixed", "seconds": end - start, "faces": bulk.completed_between(start, end)}
            )
        report.bulk_alone_faces_per_s = alone_faces / alone_seconds
        report.bulk_mixed_faces_per_s = mixed_faces / mixed_seconds
        report.mixed_latencies_s = latencies
        report.load_average["bulk_alone_and_mixed"] = os.getloadavg()[0]

        print("[5/5 first, same load] admission: deadlines around the measured interactive latency", flush=True)
        typical = statistics.median(latencies)
        factors = [0.3, 0.5, 0.7, 0.85, 1.0, 1.15, 1.3, 1.6, 2.0, 3.0, 4.0, 6.0]
        for _round in range(args.admission_rounds):
            for factor in factors:
                deadline = factor * typical
                sent = time.monotonic()
                outcome, seconds, estimate = "ok", None, None
                try:
                    await product.anonymize(image, aligned=True, steps=steps, timeout=deadline)
                    seconds = time.monotonic() - sent
                except DeadlineExceeded as error:
                    seconds = time.monotonic() - sent
                    outcome = "refused" if "refused at once" in error.details else "timed_out"
                    if outcome == "refused":  # "... would finish in about 1.23 s ..."
                        estimate = float(error.details.split("in about ", 1)[1].split(" s", 1)[0])
                report.admission.append(
                    {
                        "factor": factor,
                        "deadline_s": deadline,
                        "estimate_s": estimate,
                        "outcome": outcome,
                        "answer_s": seconds,
                    }
                )
                await asyncio.sleep(pause)
        await bulk.stop()
        await asyncio.sleep(2.0)

        print(f"[4/5] two bulk clients: archive x16, nightly x8, {args.window_s:.0f} s", flush=True)
        before = {}
        loads = {"archive": Load(archive, image, steps, 16), "nightly": Load(nightly, image, steps, 8)}
        for load in loads.values():
            load.start()
        await asyncio.sleep(args.warmup_s)
        start = time.monotonic()
        await asyncio.sleep(args.window_s)
        end = time.monotonic()
        for name, load in loads.items():
            before[name] = load.completed_between(start, end)
        for load in loads.values():
            await load.stop()
        total = sum(before.values()) or 1
        report.shares = {name: count / total for name, count in before.items()}
        report.steps_by_priority = steps_by_priority(server.metrics_url)
    finally:
        for client in clients.values():
            await client.close()


def summarise(report: Report, steps: int) -> dict:
    idle_p99 = percentile(report.idle_latencies_s, 99)
    mixed_p99 = percentile(report.mixed_latencies_s, 99)
    latencies = report.mixed_latencies_s
    low, high = percentile(latencies, 5), percentile(latencies, 95)
    cannot = [a for a in report.admission if a["deadline_s"] < low]
    comfortable = [a for a in report.admission if a["deadline_s"] >= 1.2 * high]
    refused_fast = [a for a in cannot if a["outcome"] == "refused" and a["answer_s"] <= 0.05]
    wrongly_refused = [a for a in comfortable if a["outcome"] == "refused"]
    ratio = report.bulk_mixed_faces_per_s / report.bulk_alone_faces_per_s if report.bulk_alone_faces_per_s else 0.0
    return {
        "steps": steps,
        "interactive_idle_p50_s": percentile(report.idle_latencies_s, 50),
        "interactive_idle_p99_s": idle_p99,
        "interactive_with_backlog_p50_s": percentile(latencies, 50),
        "interactive_with_backlog_p99_s": mixed_p99,
        "p99_ratio": mixed_p99 / idle_p99,
        "p50_ratio": percentile(latencies, 50) / percentile(report.idle_latencies_s, 50),
        "load_average": report.load_average,
        "p99_target_met": mixed_p99 <= 1.5 * idle_p99,
        "bulk_alone_faces_per_s": report.bulk_alone_faces_per_s,
        "bulk_with_interactive_faces_per_s": report.bulk_mixed_faces_per_s,
        "bulk_throughput_ratio": ratio,
        "bulk_target_met": ratio >= 0.9,
        "shares": report.shares,
        "shares_target_met": bool(report.shares) and all(0.4 <= s <= 0.6 for s in report.shares.values()),
        "admission_cannot_make_it": len(cannot),
        "admission_refused_within_50ms": len(refused_fast),
        "admission_refusal_rate": len(refused_fast) / len(cannot) if cannot else None,
        "admission_comfortable": len(comfortable),
        "admission_wrongly_refused": len(wrongly_refused),
        "admission_target_met": (not cannot or len(refused_fast) / len(cannot) >= 0.95) and not wrongly_refused,
        "refused_estimate_over_median_latency": (
            statistics.median(a["estimate_s"] for a in report.admission if a["outcome"] == "refused")
            / statistics.median(latencies)
            if any(a["outcome"] == "refused" for a in report.admission)
            else None
        ),
        "interactive_pause_s": report.interactive_pause_s,
        "phase_seconds_idle": mean_timings(report.idle_timings),
        "phase_seconds_with_backlog": mean_timings(report.mixed_timings),
    }


def mean_timings(timings: list[dict]) -> dict[str, float]:
    names = sorted({name for entry in timings for name in entry})
    return {name: statistics.fmean(float(entry.get(name, 0.0)) for entry in timings) for name in names}


def markdown(summary: dict) -> str:
    shares = ", ".join(f"{name} {share:.0%}" for name, share in summary["shares"].items())
    rate = summary["admission_refusal_rate"]
    rows = [
        (
            "Interactive p99 with 24 bulk faces queued / idle p99",
            "<= 1.5x",
            f"{summary['interactive_with_backlog_p99_s']:.2f} s / {summary['interactive_idle_p99_s']:.2f} s = "
            f"{summary['p99_ratio']:.2f}x",
            summary["p99_target_met"],
        ),
        (
            "Bulk faces/s with interactive traffic / bulk alone",
            ">= 90 %",
            f"{summary['bulk_with_interactive_faces_per_s']:.3f} / {summary['bulk_alone_faces_per_s']:.3f} = "
            f"{summary['bulk_throughput_ratio']:.0%}",
            summary["bulk_target_met"],
        ),
        ("Two bulk tokens (16 and 8 in flight): share of steps", "40-60 % each", shares, summary["shares_target_met"]),
        (
            "Deadlines below the p5 latency: refused within 50 ms",
            ">= 95 %",
            f"{summary['admission_refused_within_50ms']}/{summary['admission_cannot_make_it']}"
            + (f" ({rate:.0%})" if rate is not None else ""),
            rate is None or rate >= 0.95,
        ),
        (
            "Deadlines above 1.2x the p95 latency: refused",
            "never",
            f"{summary['admission_wrongly_refused']}/{summary['admission_comfortable']}",
            summary["admission_wrongly_refused"] == 0,
        ),
    ]
    lines = ["| Target | Goal | Measured | Met |", "|---|---|---|---|"]
    for name, goal, measured, met in rows:
        lines.append(f"| {name} | {goal} | {measured} | {'' if met is None else ('yes' if met else 'no')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=10, help="diffusion steps of every request")
    parser.add_argument("--backlog", type=int, default=24, help="bulk faces kept in flight")
    parser.add_argument("--samples", type=int, default=20, help="interactive requests per latency measurement")
    parser.add_argument("--window-s", type=float, default=90.0, help="length of each throughput window")
    parser.add_argument("--warmup-s", type=float, default=20.0, help="load before each window starts counting")
    parser.add_argument("--rounds", type=int, default=3, help="2 and 3 alternate this many times (window_s in all)")
    parser.add_argument(
        "--interactive-share",
        type=float,
        default=0.05,
        help="interactive traffic in 3, as a fraction of the steps the server does for bulk alone",
    )
    parser.add_argument("--admission-rounds", type=int, default=3)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--smoke", action="store_true", help="short windows: the code path, not the figures")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.backlog, args.samples, args.window_s, args.warmup_s = 3, 4, 3, 4.0, 2.0
        args.admission_rounds = 1

    with tempfile.TemporaryDirectory() as folder:
        token_file = Path(folder) / "tokens.txt"
        token_file.write_text("\n".join(TOKENS.values()) + "\n")
        server_args = ["--auth-token-file", str(token_file), "--max-batch", str(args.max_batch), "--max-queue", "128"]
        server_args += ["--no-http"]
        server = SpawnedServer(args.models, server_args, args.device)
        report = Report(config={**vars(args), "out": str(args.out), "server_args": server_args})
        try:
            asyncio.run(run(args, server, report))
        finally:
            server.stop()
    report.summary = summarise(report, args.steps)
    table = markdown(report.summary)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"priority_{args.device}_{args.models}{'_smoke' if args.smoke else ''}.json"
    payload = {
        "benchmark": "priority",
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "git_commit": _git_commit(),
        "machine": _machine(),
        **asdict(report),
        "table": table,
    }
    (args.out / name).write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
