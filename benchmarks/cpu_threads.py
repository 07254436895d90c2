"""Why a CPU engine sets torch's threads before its first op: UNet call times by thread layout.

Each layout runs in a fresh interpreter (a thread keeps its OpenMP team once made) on the tiny models:

- main only:        every op on the main thread, torch's default threads (a script's view);
- second thread:    models loaded on the main thread, calls made from another thread, default threads
                    (the engine before: loading, UNet and pixel threads each get a team);
- engine setting:   the same second thread, with the count the engine now sets before loading
                    (engine/torch_threads.py: the cores divided among the threads that call torch).

    python benchmarks/cpu_threads.py            # about a minute

Prints a Markdown table of median seconds per call at 1, 2, 4 and 8 rows and writes
benchmarks/results/cpu_threads.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load import _git_commit, _machine  # same folder

RESULTS_DIR = Path(__file__).resolve().parent / "results"
ROWS = (1, 2, 4, 8)

MEASURE = textwrap.dedent(
    """
    import json, statistics, sys, time
    from concurrent.futures import ThreadPoolExecutor
    layout, rows_list, calls = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
    if layout == "engine setting":
        from masquerade.engine.engine import EngineConfig
        from masquerade.engine.torch_threads import configure_cpu_threads
        config = EngineConfig()
        configure_cpu_threads(None, 2 + config.preprocess_threads + config.interactive_threads)
    import numpy as np, torch
    from masquerade.engine.diffusion import DiffusionCore
    from masquerade.engine.request import ReversePersonalizationParams
    from masquerade.engine.scheduler import StepScheduler
    from masquerade.models.loader import load_models
    from masquerade.models.tiny import built_tiny_model_dir
    models = load_models(built_tiny_model_dir(), device="cpu")
    core = DiffusionCore(models, max_batch=16)
    size = models.face_size
    crops = np.random.default_rng(0).integers(0, 256, (8, size, size, 3), dtype=np.uint8)
    latents = core.encode(crops)
    identities = torch.nn.functional.normalize(torch.randn(8, 512), dim=1)
    params = ReversePersonalizationParams(steps=calls + 2)
    caller = ThreadPoolExecutor(1) if layout != "main only" else None
    def call(plan):
        return caller.submit(core.runner.run, plan).result() if caller else core.runner.run(plan)
    seconds = {}
    for rows in rows_list:
        scheduler = StepScheduler(max_batch=16, inversion_chunk=1)
        scheduler.add([core.make_job(f"r{i}", 0, latents[i], identities[i], params) for i in range(rows)])
        times = []
        for _ in range(calls):
            plan = scheduler.plan()
            started = time.perf_counter()
            out = call(plan)
            times.append(time.perf_counter() - started)
            scheduler.update(out)
        seconds[rows] = statistics.median(times[2:])
    print(json.dumps({"threads": torch.get_num_threads(), "seconds": seconds}))
    """
)
LAYOUTS = ("main only", "second thread", "engine setting")


def measure(layout: str, calls: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, layout, json.dumps(ROWS), str(calls)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{layout}: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=12, help="calls per row count (the first 2 are not counted)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    results = {layout: measure(layout, args.calls) for layout in LAYOUTS}
    lines = ["| layout | torch threads | " + " | ".join(f"{rows} row{'s' * (rows > 1)}" for rows in ROWS) + " |"]
    lines.append("|---|---|" + "---|" * len(ROWS))
    for layout, result in results.items():
        cells = " | ".join(f"{1000 * result['seconds'][str(rows)]:.1f} ms" for rows in ROWS)
        lines.append(f"| {layout} | {result['threads']} | {cells} |")
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": "cpu_threads",
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "git_commit": _git_commit(),
        "machine": _machine(),
        "calls": args.calls,
        "results": results,
        "table": table,
    }
    (args.out / "cpu_threads.json").write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out / 'cpu_threads.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
