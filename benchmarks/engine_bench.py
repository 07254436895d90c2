"""End-to-end engine benchmark: the figures of issue 16, one JSON summary as the last line.

In one run, on full-size SDXL-architecture models with random weights (or the
tiny models, for a CPU check of the same code path):

- ms per UNet call at the bucket sizes (2/4/8/16 by default): diffusers eager,
  our prepared eager (FaceID LoRA fused, fused QKV/IP processors) and
  torch.compile'd, with samples/s and MFU against 989 TFLOP/s (H100 SXM dense
  fp16/bf16; FLOPs counted by FlopCounterMode);
- the fused guidance/solver kernels against eager PyTorch (``kernel_bench.run``);
- s/face for one face on an idle engine at the paper's defaults (skip 0.7, 100
  steps, 1024x1024), with the research code's loop (one CFG pair per call,
  eager) as the baseline;
- faces/min with 8 faces at once (continuous batching), the peak GPU memory per
  face, host-device syncs per UNet call (``torch.cuda.set_sync_debug_mode``)
  and Dynamo recompiles after the warm-up (must be 0).

The SDXL modules are built from SDXL base 1.0's published configs (nothing is
downloaded) and IP-Adapter-FaceID's random state dict is loaded from memory
through ``pipe.load_ip_adapter``. Random weights cost the same FLOPs as real
ones; outputs are noise.

    python benchmarks/engine_bench.py                          # H100: SDXL, buckets 2/4/8/16, ~5 min
    python benchmarks/engine_bench.py --device cpu --models tiny --buckets 2,4   # CPU check of the logic
    python benchmarks/engine_bench.py --smoke                  # CPU, tiny, no compile: CI's smoke run

Writes ``<out>/engine_bench_<device>.json`` and ``.md``, rewritten after every
section (a timeout keeps what was measured), and prints the summary JSON last.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import logging
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
PAPER_STEPS = 100
PAPER_SKIP = 0.7
CONCURRENT_FACES = 8

# The yardstick: H100 SXM dense fp16/bf16 tensor-core peak (H200: the same chip's rate).
MFU_PEAK_TFLOPS = 989.0
DEFAULT_BUCKETS = (2, 4, 8, 16)
RESEARCH_LOOP = "research loop (eager, 1 CFG pair per call)"
ENGINE_LOOP_1 = "engine, 1 face (idle server)"
ENGINE_LOOP_N = "engine, faces at once"

# SDXL base 1.0 (stabilityai/stable-diffusion-xl-base-1.0), unet/, vae/, text_encoder*/ config.json.
SDXL_UNET_CONFIG = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    center_input_sample=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    only_cross_attention=False,
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-05,
    cross_attention_dim=2048,
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    use_linear_projection=True,
    upcast_attention=False,
    resnet_time_scale_shift="default",
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,  # 6 time ids x 256 + pooled 1280
)
SDXL_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    sample_size=1024,
    scaling_factor=0.13025,
    force_upcast=True,
)
# Token ids follow the offline tokenizer of masquerade.models.tiny (start 0, end/pad 1);
# everything that sets the cost (widths, depths, heads, vocabulary) is SDXL's.
SDXL_TEXT_ENCODER_CONFIG = dict(  # CLIP ViT-L/14 text tower
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=768,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=1,
)
SDXL_TEXT_ENCODER_2_CONFIG = dict(  # OpenCLIP ViT-bigG/14 text tower
    vocab_size=49408,
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    max_position_embeddings=77,
    hidden_act="gelu",
    projection_dim=1280,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=1,
)
# Published parameter counts, to check the configs above (millions).
SDXL_PARAMS_M = {"unet": 2567.5, "vae": 83.7, "text_encoder": 123.1, "text_encoder_2": 694.7}
FACEID_LORA_RANK = 128  # ip-adapter-faceid_sdxl.bin's LoRA rank

log = logging.getLogger("engine_bench")


def load_kernel_bench():
    spec = importlib.util.spec_from_file_location("kernel_bench", REPO_ROOT / "benchmarks" / "kernel_bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- models -----------------------------------------------------------------------------


def build_sdxl_modules(device: str):
    """UNet, VAE, both text encoders and the scheduler from SDXL base 1.0's configs (random weights)."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    with torch.device(device):  # initialise on the GPU: seconds instead of minutes of CPU init
        modules = {
            "unet": UNet2DConditionModel(**SDXL_UNET_CONFIG),
            "vae": AutoencoderKL(**SDXL_VAE_CONFIG),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**SDXL_TEXT_ENCODER_CONFIG)),
            "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT_ENCODER_2_CONFIG)),
        }
    from masquerade.models.tiny import SDXL_SCHEDULER_CONFIG

    modules["scheduler"] = EulerDiscreteScheduler(**SDXL_SCHEDULER_CONFIG)
    return modules


def check_sdxl_configs() -> dict[str, float]:
    """Build the full-size modules on the meta device and compare parameter counts with SDXL's."""
    modules = build_sdxl_modules("meta")
    counts = {}
    for name, published in SDXL_PARAMS_M.items():
        millions = sum(p.numel() for p in modules[name].parameters()) / 1e6
        if abs(millions - published) > 0.01 * published:
            raise AssertionError(f"{name}: {millions:.1f}M parameters, SDXL base 1.0 has {published}M")
        counts[name] = round(millions, 1)
    return counts


def build_sdxl_bundle(workdir: Path, device: str):
    """A ModelBundle of SDXL-architecture random models, loaded through the project's own loaders."""
    import torch
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    from masquerade.models.loader import ModelBundle, _load_ip_adapter
    from masquerade.models.tiny import _write_tiny_clip_tokenizer, ip_adapter_faceid_state_dict

    dtype = torch.float16
    modules = build_sdxl_modules(device)
    for name in ("unet", "text_encoder", "text_encoder_2"):
        modules[name].to(dtype)
    tokenizers = {}
    for name in ("tokenizer", "tokenizer_2"):
        _write_tiny_clip_tokenizer(workdir / name)
        tokenizers[name] = CLIPTokenizer.from_pretrained(str(workdir / name))
    pipe = StableDiffusionXLPipeline(**modules, **tokenizers, force_zeros_for_empty_prompt=True)
    # Kept in memory: pipe.load_ip_adapter takes the state dict itself (no 2 GB save and reload).
    _load_ip_adapter(pipe, ip_adapter_faceid_state_dict(pipe.unet, lora_rank=FACEID_LORA_RANK))
    pipe.vae.to(dtype=torch.float32)  # SDXL's VAE overflows in fp16 (force_upcast)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        module.eval().requires_grad_(False)
    return ModelBundle(
        pipe=pipe,
        arcface=None,  # identities are random unit vectors here; ArcFace is not timed
        device=torch.device(device),
        dtype=dtype,
        face_size=SDXL_UNET_CONFIG["sample_size"] * 8,
        versions={"sdxl": "SDXL base 1.0 architecture, random weights", "ip_adapter": "FaceID layout, random"},
    )


def build_tiny_bundle(workdir: Path, device: str):
    from masquerade.models.loader import load_models
    from masquerade.models.tiny import make_tiny

    make_tiny(workdir / "tiny")
    return load_models(workdir / "tiny", device=device)


# ---- timing -----------------------------------------------------------------------------------


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn, device, reps: int, warmup: int = 1) -> float:
    """Median wall milliseconds of ``fn`` with the device synchronised around each call."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        fn()
        synchronize(device)
        times.append(1e3 * (time.perf_counter() - started))
    return statistics.median(times)


def unet_flops_per_sample(models, forward) -> float:
    """FLOPs of one sample's evaluation by ``forward`` (matmul, conv, attention), counted on an eager batch-2 call.

    Counted on the prepared UNet (FaceID LoRA merged): SDXL's own FLOPs, the work the engine must
    do. The stock model with the LoRA live does more (the low-rank products on every projection).
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from masquerade.models.optimize import example_inputs

    inputs = example_inputs(models, 2)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        forward(*inputs)
    return counter.get_total_flops() / 2


def time_unet(fn, models, buckets, reps: int, warmup: int) -> dict[int, float]:
    import torch

    from masquerade.models.optimize import example_inputs

    latencies = {}
    with torch.inference_mode():
        for size in buckets:
            inputs = example_inputs(models, size)
            latencies[size] = median_ms(lambda: fn(*inputs), models.device, reps, warmup)
            log.info("  batch %3d: %.2f ms", size, latencies[size])
    return latencies


class CallCounter:
    """Wraps a runner's ``unet_fn`` and counts its calls and samples (an observer: it calls the real one)."""

    def __init__(self, fn):
        self.fn, self.calls, self.samples = fn, 0, 0

    def __call__(self, *inputs):
        self.calls += 1
        self.samples += inputs[0].shape[0]
        return self.fn(*inputs)


class SyncCounter:
    """Counts host-device synchronisations on CUDA (``torch.cuda.set_sync_debug_mode("warn")``) inside ``with``."""

    def __init__(self, device):
        self.device, self.count = device, None

    def __enter__(self):
        import warnings

        import torch

        if self.device.type != "cuda":
            return self
        self._catch = warnings.catch_warnings(record=True)
        self._records = self._catch.__enter__()
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc):
        import torch

        if self.device.type != "cuda":
            return False
        torch.cuda.set_sync_debug_mode("default")
        self._catch.__exit__(*exc)
        syncs = [r for r in self._records if "synchroniz" in str(r.message)]
        self.count = len(syncs)
        self.where = sorted({f"{r.filename.rsplit('/', 1)[-1]}:{r.lineno}" for r in syncs})[:10]
        return False


def run_faces(core, models, faces: int, steps: int, max_batch: int, inversion_chunk: int) -> dict[str, object]:
    """Encode, invert + generate (continuous batching), decode ``faces`` random crops; seconds per phase.

    Also counts the UNet calls and samples, and the host-device syncs of job creation and of the
    diffusion loop (CUDA only).
    """
    import numpy as np
    import torch

    from masquerade.engine.request import ReversePersonalizationParams

    params = ReversePersonalizationParams(steps=steps, skip=PAPER_SKIP)
    rng = np.random.default_rng(faces)
    size = models.face_size
    crops = rng.integers(0, 256, (faces, size, size, 3), dtype=np.uint8)
    identity = torch.nn.functional.normalize(torch.from_numpy(rng.standard_normal((faces, 512))).float(), dim=1)
    counter = CallCounter(core.runner.unet_fn)
    core.runner.unet_fn = counter
    try:
        synchronize(models.device)
        started = time.perf_counter()
        latents = core.encode(crops)  # in chunks of --vae-chunk faces
        synchronize(models.device)
        encoded = time.perf_counter()
        with SyncCounter(models.device) as job_syncs:
            jobs = [core.make_job("bench", i, latents[i], identity[i], params) for i in range(faces)]
        with SyncCounter(models.device) as loop_syncs:
            core.run_to_completion(jobs, max_batch=max_batch, inversion_chunk=inversion_chunk)
            synchronize(models.device)
        diffused = time.perf_counter()
        core.decode(torch.stack([job.latent for job in jobs]))
        synchronize(models.device)
        decoded = time.perf_counter()
    finally:
        core.runner.unet_fn = counter.fn
    return {
        "encode_s": encoded - started,
        "diffusion_s": diffused - encoded,
        "decode_s": decoded - diffused,
        "unet_calls": counter.calls,
        "unet_samples": counter.samples,
        "syncs_job_creation": job_syncs.count,
        "syncs_diffusion_loop": loop_syncs.count,
        "sync_sites": getattr(loop_syncs, "where", None),
    }


def per_face_summary(name: str, faces: int, steps: int, timing: dict[str, object]) -> dict[str, object]:
    """Measured times plus the time at the paper's 100 steps (diffusion scales linearly with steps)."""
    vae = timing["encode_s"] + timing["decode_s"]
    diffusion_at_paper = timing["diffusion_s"] * PAPER_STEPS / steps
    total = vae + diffusion_at_paper
    calls = timing["unet_calls"]
    return {
        "loop": name,
        "faces": faces,
        "steps_measured": steps,
        **{k: round(v, 4) if isinstance(v, float) else v for k, v in timing.items()},
        "extrapolated_to_paper_steps": steps != PAPER_STEPS,
        "batch_latency_s_at_100_steps": round(total, 3),
        "seconds_per_face_at_100_steps": round(total / faces, 3),
        "faces_per_min_at_100_steps": round(60 * faces / total, 2),
        "host_syncs_per_unet_call": (
            round(timing["syncs_diffusion_loop"] / calls, 3) if timing["syncs_diffusion_loop"] is not None else None
        ),
    }


# ---- report ---------------------------------------------------------------------------------------


class Report:
    """The JSON result, rewritten after every section so that a timeout still leaves what was measured."""

    def __init__(self, path_json: Path, path_md: Path, header: dict):
        self.path_json, self.path_md = path_json, path_md
        self.data = dict(header)
        self.data.setdefault("sections_done", [])

    def section(self, name: str, value) -> None:
        self.data[name] = value
        if name not in self.data["sections_done"]:
            self.data["sections_done"].append(name)
        self.data["summary"] = summary(self.data)
        self.save()

    def save(self) -> None:
        self.path_json.parent.mkdir(parents=True, exist_ok=True)
        self.path_json.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        self.path_md.write_text(markdown(self.data))


def summary(data: dict) -> dict:
    """The issue's figures in one flat object (None where a section did not run or does not apply)."""
    per_face = {row["loop"]: row for row in data.get("per_face", [])}
    idle = per_face.get(ENGINE_LOOP_1)
    busy = per_face.get(ENGINE_LOOP_N)
    research = per_face.get(RESEARCH_LOOP)
    unet = {row["bucket"]: row for row in (data.get("unet") or {}).get("buckets", [])}
    kernels = data.get("kernels") or []
    largest_kernel_batch = max((row["batch"] for row in kernels), default=None)
    fused = {
        row["step"]: round(row.get("graph_speedup", row["speedup"]), 2)
        for row in kernels
        if row["batch"] == largest_kernel_batch
    }
    memory = data.get("memory") or {}
    mfu = [row["mfu_percent"] for row in unet.values() if row.get("mfu_percent") is not None]
    out = {
        "benchmark": "engine_bench",
        "device": data.get("machine", {}).get("gpu") or "cpu",
        "models": data.get("models"),
        "measured_on_gpu": data.get("device") == "cuda",
        "note": data.get("note"),
        "s_per_face_idle_default_params": idle and idle["seconds_per_face_at_100_steps"],
        "idle_extrapolated_from_steps": idle
        and (idle["steps_measured"] if idle["extrapolated_to_paper_steps"] else None),
        "research_loop_s_per_face": research and research["seconds_per_face_at_100_steps"],
        "faces_per_min_8_concurrent": busy and busy["faces_per_min_at_100_steps"],
        "concurrent_faces": busy and busy["faces"],
        "concurrent_extrapolated_from_steps": busy
        and (busy["steps_measured"] if busy["extrapolated_to_paper_steps"] else None),
        "unet_ms_per_call": {
            str(size): {
                "eager": row["prepared_eager_ms"],
                "diffusers_eager": row["diffusers_eager_ms"],
                "compiled": row["compiled_ms"],
            }
            for size, row in sorted(unet.items())
        },
        "mfu_percent_vs_989_tflops": max(mfu) if mfu else None,
        "mfu_serving_percent": busy and busy.get("mfu_percent"),
        "recompiles_after_warmup": data.get("recompiles_after_warmup"),
        "host_syncs_per_unet_call": idle and idle["host_syncs_per_unet_call"],
        "peak_gpu_memory_gib": memory.get("peak_gib"),
        "peak_gpu_memory_per_face_gib": memory.get("per_face_gib"),
        "fused_kernel_speedup_vs_eager": fused or None,
        "compile_mode": data.get("compile_mode"),
        "compile_s": {str(k): v for k, v in (data.get("compile_s") or {}).items()} or None,
    }
    if out["measured_on_gpu"]:
        out["targets"] = {
            "s_per_face_idle_le_5_4": out["s_per_face_idle_default_params"] is not None
            and out["s_per_face_idle_default_params"] <= 5.4,
            "batch2_call_le_40_ms": (unet.get(2) or {}).get("compiled_ms") is not None and unet[2]["compiled_ms"] <= 40,
            "faces_per_min_8_ge_10": out["faces_per_min_8_concurrent"] is not None
            and out["faces_per_min_8_concurrent"] >= 10,
            "zero_recompiles": out["recompiles_after_warmup"] == 0,
        }
    return out


def markdown(data: dict) -> str:
    machine = data.get("machine", {})
    lines = [
        f"# engine_bench on {machine.get('gpu') or 'CPU'} ({data.get('models')} models, {data.get('mode')})",
        "",
        f"commit {data.get('git', {}).get('commit')}, torch {machine.get('torch')}, {data.get('date')}, "
        f"compile mode {data.get('compile_mode')}, MFU against {MFU_PEAK_TFLOPS} TFLOP/s dense fp16",
        "",
    ]
    unet = data.get("unet")
    if unet:
        lines += [
            "| batch | diffusers eager ms | prepared eager ms | compiled ms | compile s | samples/s | TFLOP/s | MFU % |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for row in unet["buckets"]:
            lines.append(
                "| {bucket} | {diffusers_eager_ms} | {prepared_eager_ms} | {compiled_ms} | {compile_s} | "
                "{samples_per_s} | {tflops} | {mfu_percent} |".format(**row)
            )
        lines.append("")
    faces = data.get("per_face")
    if faces:
        lines += [
            "| loop | faces | steps measured | UNet calls | s/face @100 | faces/min @100 | syncs/call |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for row in faces:
            lines.append(
                "| {loop} | {faces} | {steps_measured} | {unet_calls} | {seconds_per_face_at_100_steps} | "
                "{faces_per_min_at_100_steps} | {host_syncs_per_unet_call} |".format(**row)
            )
        lines.append("")
    kernels = data.get("kernels")
    if kernels:
        lines += ["| kernel step | batch | eager us | fused us | speedup |", "| --- | ---: | ---: | ---: | ---: |"]
        for row in kernels:
            lines.append(
                f"| {row['step']} | {row['batch']} | {row['reference_us']:.1f} | {row['fused_us']:.1f} | "
                f"{row['speedup']:.2f} |"
            )
        lines.append("")
    lines += ["```json", json.dumps(data.get("summary", {}), indent=1), "```", ""]
    return "\n".join(lines)


# ---- main ------------------------------------------------------------------------------------------


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--models", choices=("sdxl", "tiny"), default="sdxl", help="SDXL-size random, or tiny")
    parser.add_argument("--smoke", action="store_true", help="CI's run: --device cpu --models tiny, no compile")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder for the JSON and markdown results")
    parser.add_argument("--label", help="file name suffix (default: the GPU's name, or cpu_<models>)")
    parser.add_argument("--buckets", help="comma-separated UNet batch sizes to time and compile (default 2,4,8,16)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="default: on")
    parser.add_argument("--compile-mode", default="default", help="torch.compile mode of the engine's UNet")
    parser.add_argument("--idle-steps", type=int, default=PAPER_STEPS, help="steps run for the 1-face latency")
    parser.add_argument("--concurrent-steps", type=int, default=20, help="steps run for the 8 faces (x5 = 100)")
    parser.add_argument("--baseline-steps", type=int, default=20, help="steps run for the research loop baseline")
    parser.add_argument("--concurrent-faces", type=int, default=CONCURRENT_FACES)
    parser.add_argument("--vae-chunk", type=int, default=4)
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per UNet batch size")
    parser.add_argument("--budget-s", type=float, default=330, help="skip the remaining buckets' compiles past this")
    args = parser.parse_args(argv)
    if args.smoke:
        args.device, args.models, args.compile = "cpu", "tiny", False
        args.idle_steps, args.concurrent_steps, args.baseline_steps = 3, 3, 3
        args.concurrent_faces, args.reps, args.buckets = 2, 1, args.buckets or "2,4"
    args.buckets = tuple(sorted({int(b) for b in args.buckets.split(",")})) if args.buckets else DEFAULT_BUCKETS
    if any(b < 2 or b % 2 for b in args.buckets):
        parser.error(f"--buckets must be even sizes >= 2, got {args.buckets}")
    args.max_batch = max(args.buckets)
    args.compile = True if args.compile is None else args.compile
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stdout)
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # the fused kernels through Triton's interpreter (read on import)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("engine_bench: no CUDA device here; run with --device cpu --models tiny for a CPU check.")
        return 0
    from masquerade.engine.diffusion import DiffusionCore
    from masquerade.models.optimize import optimized_unet_fn, stock_unet_fn

    started_all = time.perf_counter()
    kernel_bench = load_kernel_bench()
    machine = kernel_bench.machine()
    gpu = machine.get("gpu") if args.device == "cuda" else None
    if args.device == "cpu":
        machine.pop("gpu", None)
        machine["torch_threads"] = torch.get_num_threads()  # OMP_NUM_THREADS=1 steadies a shared machine
    label = args.label or (re.sub(r"[^a-z0-9]+", "_", str(gpu).lower()).strip("_") if gpu else f"cpu_{args.models}")
    report = Report(
        args.out / f"engine_bench_{label}.json",
        args.out / f"engine_bench_{label}.md",
        {
            "benchmark": "engine_bench",
            "mode": "smoke" if args.smoke else "full",
            "device": args.device,
            "models": args.models,
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "machine": machine,
            "git": kernel_bench.git_commit(),
            "compile_mode": args.compile_mode if args.compile else None,
            "buckets": list(args.buckets),
            "paper_defaults": {"steps": PAPER_STEPS, "skip": PAPER_SKIP, "face_size": 1024},
            "args": {k: v for k, v in vars(args).items() if k not in ("out",)},
            "timing": "median wall ms per UNet call (device synchronised); per-face times are one run each",
            "note": (
                "CPU run on tiny random models: it checks the benchmark's logic and JSON end to end; its "
                "timings say nothing about GPU performance (and vary with the machine's load)"
                if args.device == "cpu"
                else "SDXL-size random weights: same FLOPs as the real model; outputs are noise"
            ),
        },
    )
    print(f"device: {gpu or 'CPU'}; models {args.models}; buckets {args.buckets}")

    def left() -> float:
        return args.budget_s - (time.perf_counter() - started_all)

    with tempfile.TemporaryDirectory(prefix="engine_bench_") as tmp:
        started = time.perf_counter()
        if args.models == "tiny":
            report.section("sdxl_config_params_m", check_sdxl_configs())
            models = build_tiny_bundle(Path(tmp), args.device)
        else:
            models = build_sdxl_bundle(Path(tmp), args.device)
        report.section("build_s", round(time.perf_counter() - started, 1))
        log.info("models built in %.1fs (face size %d)", report.data["build_s"], models.face_size)
        log.info("diffusers eager UNet (peft LoRA live, stock processors):")
        stock = stock_unet_fn(models.unet)
        diffusers_eager = time_unet(stock, models, args.buckets, args.reps, warmup=1)
        # The research code's loop: one CFG pair per call, inversion sequential, then generation.
        naive = DiffusionCore(models, unet_fn=stock, vae_chunk=args.vae_chunk)
        timing = run_faces(naive, models, 1, args.baseline_steps, max_batch=2, inversion_chunk=1)
        per_face = [per_face_summary(RESEARCH_LOOP, 1, args.baseline_steps, timing)]
        report.section("per_face", per_face)
        del naive

        kernel_args = argparse.Namespace(
            dtype="float32" if args.device == "cpu" else "float16",
            batches=[1, 2] if args.device == "cpu" else sorted({b // 2 for b in args.buckets}),
            order="2",
            interpret=args.device == "cpu",
            shape=(4, 8, 8) if args.device == "cpu" else (4, models.face_size // 8, models.face_size // 8),
        )
        report.section("kernels", kernel_bench.run(kernel_args))

        log.info("prepared eager UNet (FaceID LoRA fused, fused QKV/IP processors):")
        prepared = optimized_unet_fn(models, max_batch=args.max_batch, compile=False, buckets=args.buckets)
        prepared_eager = time_unet(prepared, models, args.buckets, args.reps, warmup=1)
        report.section("optimizations", prepared.prepared)
        flops = unet_flops_per_sample(models, prepared.eager_forward)
        report.section("unet_gflop_per_sample", round(flops / 1e9, 2))

        compiled_ms, compile_s, engine_fn = {}, {}, prepared
        if args.compile:
            # Largest bucket first (the engine's cap), then the rest while the budget lasts; the
            # engine then serves only the warm buckets (the others pad up to a warm one).
            engine_fn = optimized_unet_fn(
                models,
                max_batch=args.max_batch,
                compile=True,
                buckets=args.buckets,
                compile_mode=args.compile_mode,
                warm=False,
            )
            for size in [args.max_batch] + [b for b in args.buckets if b != args.max_batch]:
                if compile_s and left() < 1.3 * max(compile_s.values()) + 60:
                    log.warning("budget: bucket %d not compiled (%.0fs left)", size, left())
                    continue
                log.info("compiling bucket %d (%s); already warm: %s", size, args.compile_mode, sorted(compile_s))
                engine_fn.warm([size])
                compile_s[size] = round(engine_fn.warm_seconds[size], 1)
                report.section("compile_s", compile_s)
            engine_fn.serve_only_warm_buckets()
            compiled_ms = time_unet(engine_fn, models, engine_fn.buckets, args.reps, warmup=1)
        rows = []
        for size in args.buckets:
            best_ms = compiled_ms.get(size, prepared_eager[size])
            tflops = flops * size / (best_ms * 1e-3) / 1e12
            rows.append(
                {
                    "bucket": size,
                    "diffusers_eager_ms": round(diffusers_eager[size], 2),
                    "prepared_eager_ms": round(prepared_eager[size], 2),
                    "compiled_ms": round(compiled_ms[size], 2) if size in compiled_ms else None,
                    "compile_s": compile_s.get(size),
                    "samples_per_s": round(size / (best_ms * 1e-3), 2),
                    "tflops": round(tflops, 3),
                    "mfu_percent": round(100 * tflops / MFU_PEAK_TFLOPS, 1) if args.device == "cuda" else None,
                }
            )
        report.section("unet", {"compiled": bool(compiled_ms), "buckets": rows})

        # This engine: inversion steps batched, generation steps of all faces packed per call.
        engine = DiffusionCore(models, max_batch=args.max_batch, unet_fn=engine_fn, vae_chunk=args.vae_chunk)
        chunk = args.max_batch // 2
        timing = run_faces(engine, models, 1, args.idle_steps, args.max_batch, inversion_chunk=chunk)
        per_face.append(per_face_summary(ENGINE_LOOP_1, 1, args.idle_steps, timing))
        report.section("per_face", per_face)

        faces = args.concurrent_faces
        if args.device == "cuda":
            synchronize(models.device)
            baseline = torch.cuda.memory_allocated(models.device)
            torch.cuda.reset_peak_memory_stats(models.device)
        timing = run_faces(engine, models, faces, args.concurrent_steps, args.max_batch, inversion_chunk=chunk)
        row = per_face_summary(ENGINE_LOOP_N, faces, args.concurrent_steps, timing)
        row["mfu_percent"] = (
            round(100 * flops * timing["unet_samples"] / timing["diffusion_s"] / 1e12 / MFU_PEAK_TFLOPS, 1)
            if args.device == "cuda"
            else None
        )
        per_face.append(row)
        report.section("per_face", per_face)
        if args.device == "cuda":
            peak = torch.cuda.max_memory_allocated(models.device)
            report.section(
                "memory",
                {
                    "weights_and_caches_gib": round(baseline / 2**30, 2),
                    "peak_gib": round(peak / 2**30, 2),
                    "per_face_gib": round((peak - baseline) / faces / 2**30, 3),
                    "faces": faces,
                    "vae_chunk": args.vae_chunk,
                },
            )
        recompiles = engine_fn.recompiles() if args.compile and compiled_ms else None
        report.section("recompiles_after_warmup", recompiles)
        report.section("total_s", round(time.perf_counter() - started_all, 1))
    print(report.path_md.read_text())
    print(f"wrote {report.path_json} and {report.path_md}")
    print(json.dumps(report.data["summary"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
