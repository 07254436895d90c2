"""Fused guidance + solver step kernels against the eager PyTorch reference.

Times one generation and one inversion step on SDXL latents ([B, 4, 128, 128],
the CFG halves packed channels-last as the UNet returns them, the latent NCHW), both as launched from Python
and replayed from a CUDA graph (the engine's steady state), prints a table and
writes ``benchmarks/results/kernel_bench_<gpu>.json`` with the machine and the
commit. Needs CUDA; ``--interpret`` instead pushes a tiny shape through
Triton's interpreter on CPU as a smoke run (no timings worth keeping, no JSON).

    python benchmarks/kernel_bench.py [--dtype float16] [--batches 1,2,4,8,16,32]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def step_inputs(batch: int, shape_chw: tuple[int, int, int], dtype: torch.dtype, device: str, order: str):
    """The tensors one step reads, laid out as the engine holds them."""
    from masquerade_kernels.reference import MEAN_FROM_M1, NOISE_SCALE, NUM_COEFFS

    generator = torch.Generator(device=device).manual_seed(0)
    shape = (batch, *shape_chw)
    # Packed CFG halves, channels-last as the engine's UNet returns them on CUDA; the rest NCHW.
    packed = torch.randn((2 * batch, *shape_chw), generator=generator, device=device).to(dtype)
    packed = packed.contiguous(memory_format=torch.channels_last)
    tensors = [torch.randn(shape, generator=generator, device=device).to(dtype) for _ in range(3)]
    coeffs = torch.rand(batch, NUM_COEFFS, generator=generator, device=device)
    second_order = {
        "1": torch.zeros(batch, dtype=torch.bool, device=device),
        "2": torch.ones(batch, dtype=torch.bool, device=device),
        "mixed": torch.arange(batch, device=device) % 2 == 1,
    }[order]
    coeffs[:, MEAN_FROM_M1] = torch.where(second_order, -coeffs[:, MEAN_FROM_M1], 0.0)
    coeffs[:, NOISE_SCALE] += 0.1  # keep the inversion's division well away from 0
    return packed[:batch], packed[batch:], *tensors, coeffs, second_order.float().mean().item()


def git_commit() -> dict[str, object]:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown (not a git checkout)", "dirty": None}


def machine() -> dict[str, object]:
    import triton

    info: dict[str, object] = {
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=props.name,
            compute_capability=f"{props.major}.{props.minor}",
            sm_count=props.multi_processor_count,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
        )
    return info


def time_cuda(fn, use_graph: bool) -> float:
    """Median microseconds per call, L2 flushed between calls by triton's do_bench."""
    from triton.testing import do_bench, do_bench_cudagraph

    if use_graph:
        return 1e3 * do_bench_cudagraph(fn, rep=100, return_mode="median")
    return 1e3 * do_bench(fn, warmup=25, rep=100, return_mode="median")


def time_wall(fn, repeats: int = 3) -> float:
    """Best-of wall time in microseconds (interpreter smoke run only)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return 1e6 * best


def run(args: argparse.Namespace) -> list[dict[str, object]]:
    from masquerade_kernels import guidance_step as gs
    from masquerade_kernels.reference import generation_step_reference, inversion_step_reference

    device = "cpu" if args.interpret else "cuda"
    dtype = DTYPES[args.dtype]
    steps = {
        "generation": (gs.generation_step, generation_step_reference),
        "inversion": (gs.inversion_step, inversion_step_reference),
    }
    tolerance = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}[dtype]
    rows = []
    for batch in args.batches:
        *inputs, second_order_fraction = step_inputs(batch, args.shape, dtype, device, args.order)
        numel = inputs[2].numel()
        # Compulsory traffic: eps_u, eps_c, x, noise or x_next in; x_next or
        # noise and m out; the history only for second-order rows.
        bytes_moved = numel * inputs[2].element_size() * (6 + second_order_fraction)
        for step, (fused, reference) in steps.items():
            for got, want in zip(fused(*inputs), reference(*inputs)):
                torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance)
            row: dict[str, object] = {"step": step, "batch": batch, "shape": [batch, *args.shape]}
            if args.interpret:
                row["reference_us"] = time_wall(lambda: reference(*inputs))
                row["fused_us"] = time_wall(lambda: fused(*inputs))
            else:
                row["reference_us"] = time_cuda(lambda: reference(*inputs), use_graph=False)
                row["fused_us"] = time_cuda(lambda: fused(*inputs), use_graph=False)
                row["reference_graph_us"] = time_cuda(lambda: reference(*inputs), use_graph=True)
                row["fused_graph_us"] = time_cuda(lambda: fused(*inputs), use_graph=True)
                row["fused_graph_gbps"] = bytes_moved / (row["fused_graph_us"] * 1e-6) / 1e9
                row["graph_speedup"] = row["reference_graph_us"] / row["fused_graph_us"]
            row["speedup"] = row["reference_us"] / row["fused_us"]
            rows.append(row)
    return rows


def print_table(rows: list[dict[str, object]], interpret: bool) -> None:
    columns = ["step", "batch", "reference_us", "fused_us", "speedup"]
    if not interpret:
        columns += ["reference_graph_us", "fused_graph_us", "graph_speedup", "fused_graph_gbps"]
    print("  ".join(f"{c:>18}" for c in columns))
    for row in rows:
        cells = [f"{row[c]:>18.2f}" if isinstance(row[c], float) else f"{row[c]!s:>18}" for c in columns]
        print("  ".join(cells))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", choices=DTYPES, default="float16", help="latent dtype (SDXL runs fp16)")
    parser.add_argument("--batches", default="1,2,4,8,16,32", help="comma-separated batch sizes")
    parser.add_argument("--order", choices=["1", "2", "mixed"], default="2", help="solver order of the rows")
    parser.add_argument("--interpret", action="store_true", help="CPU smoke run through Triton's interpreter")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    args.shape = (4, 128, 128)

    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"  # read when the kernel is first decorated
        args.shape, args.batches = (4, 8, 8), [1, 2]
    elif not torch.cuda.is_available():
        print("kernel_bench needs a CUDA GPU; pass --interpret for a CPU smoke run through Triton's interpreter.")
        return 0

    rows = run(args)
    print_table(rows, args.interpret)
    if args.interpret:
        print("smoke run: interpreter timings say nothing about the GPU; no results written")
        return 0

    info = machine()
    gpu_slug = re.sub(r"[^a-z0-9]+", "_", str(info["gpu"]).lower()).strip("_")
    report = {
        "benchmark": "kernel_bench",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": info,
        "git": git_commit(),
        "dtype": args.dtype,
        "order": args.order,
        "timing": "median us per call; triton.testing.do_bench (L2 flushed) and do_bench_cudagraph",
        "results": rows,
    }
    args.results_dir.mkdir(parents=True, exist_ok=True)
    path = args.results_dir / f"kernel_bench_{gpu_slug}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
