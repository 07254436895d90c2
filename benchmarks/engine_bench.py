"""End-to-end engine benchmark on full-size SDXL-architecture models with random weights.

On one GPU, in one run: UNet call latency per batch-size bucket (diffusers eager,
our prepared eager, torch.compile), samples/s per bucket, the fraction of the
GPU's dense fp16 peak the UNet reaches (FLOPs from FlopCounterMode), the fused
guidance/solver kernels against eager PyTorch (``kernel_bench.run``), and
per-face latency at the paper's defaults (100 steps, skip 0.7, 1024x1024) for
(a) the research code's loop -- one CFG pair per UNet call, inversion then
generation, eager fp16 SDPA -- and (b) this engine (DiffusionCore with the step
scheduler, continuous batching and ``optimized_unet_fn``), for 1 and 8 faces.

The models are built from SDXL base 1.0's published configs (written out
below; nothing is downloaded), with the IP-Adapter-FaceID key structure loaded
through ``pipe.load_ip_adapter`` and an ArcFace R50-shaped ONNX graph. Random
weights cost the same FLOPs as real ones; outputs are noise.

    python benchmarks/engine_bench.py            # full: buckets 2..16, 100 steps measured
    python benchmarks/engine_bench.py --quick    # ~5 min on an H100: buckets 2 and 8, 20 steps x5
    python benchmarks/engine_bench.py --smoke    # CPU, tiny models, 3 steps: a run, not a timing

Writes ``<out>/engine_bench_<gpu>.json`` and ``.md`` (machine and git commit inside).
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

# Dense (no 2:4 sparsity) fp16/bf16 tensor-core peak in TFLOP/s, matched by GPU name in order.
PEAK_DENSE_FP16_TFLOPS = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
)

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

    from masquerade.models.arcface import load_arcface, write_tiny_arcface_onnx
    from masquerade.models.layout import IP_ADAPTER_FILE
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
    ip_dir = workdir / "ip_adapter"
    ip_dir.mkdir()
    torch.save(ip_adapter_faceid_state_dict(pipe.unet, lora_rank=FACEID_LORA_RANK), ip_dir / IP_ADAPTER_FILE)
    _load_ip_adapter(pipe, ip_dir / IP_ADAPTER_FILE)  # pipe.load_ip_adapter(folder, ...) + FaceID check
    pipe.vae.to(dtype=torch.float32)  # SDXL's VAE overflows in fp16 (force_upcast)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        module.eval().requires_grad_(False)
    arcface_path = write_tiny_arcface_onnx(
        workdir / "w600k_r50.onnx", width=64, blocks=(3, 4, 14, 3), stage_widths=(64, 128, 256, 512)
    )
    return ModelBundle(
        pipe=pipe,
        arcface=load_arcface(arcface_path, device=device, dtype=dtype),
        device=torch.device(device),
        dtype=dtype,
        face_size=SDXL_UNET_CONFIG["sample_size"] * 8,
        versions={"sdxl": "SDXL base 1.0 architecture, random weights", "ip_adapter": "FaceID layout, random"},
    )


def build_tiny_bundle(workdir: Path):
    from masquerade.models.loader import load_models
    from masquerade.models.tiny import make_tiny

    make_tiny(workdir / "tiny")
    return load_models(workdir / "tiny", device="cpu")


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


def unet_flops_per_sample(models) -> float:
    """FLOPs of one sample's UNet evaluation (matmul, conv, attention), counted on an eager batch-2 call."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from masquerade.models.optimize import example_inputs, stock_unet_fn

    inputs = example_inputs(models, 2)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        stock_unet_fn(models.unet)(*inputs)
    return counter.get_total_flops() / 2


def peak_tflops(gpu_name: str | None) -> float | None:
    if not gpu_name:
        return None
    for key, peak in PEAK_DENSE_FP16_TFLOPS:
        if key.lower() in gpu_name.lower():
            return peak
    return None


def time_unet(fn, models, buckets, reps: int, warmup: int) -> dict[int, float]:
    import torch

    from masquerade.models.optimize import example_inputs

    latencies = {}
    with torch.inference_mode():
        for size in buckets:
            inputs = example_inputs(models, size)
            latencies[size] = median_ms(lambda: fn(*inputs), models.device, reps, warmup)
            log.info("  bucket %3d: %.2f ms", size, latencies[size])
    return latencies


def run_faces(core, models, faces: int, steps: int, max_batch: int, inversion_chunk: int) -> dict[str, float]:
    """Encode, invert + generate (continuous batching), decode ``faces`` random crops; seconds per phase."""
    import numpy as np
    import torch

    from masquerade.engine.request import ReversePersonalizationParams

    params = ReversePersonalizationParams(steps=steps, skip=PAPER_SKIP).validated()
    rng = np.random.default_rng(faces)
    size = models.face_size
    crops = rng.integers(0, 256, (faces, size, size, 3), dtype=np.uint8)
    identity = torch.nn.functional.normalize(torch.from_numpy(rng.standard_normal((faces, 512))).float(), dim=1)
    started = time.perf_counter()
    latents = [core.encode(crops[i : i + 1])[0] for i in range(faces)]  # one at a time: 1024^2 fp32 VAE is big
    synchronize(models.device)
    encoded = time.perf_counter()
    jobs = [core.make_job("bench", i, latents[i], identity[i], params) for i in range(faces)]
    core.run_to_completion(jobs, max_batch=max_batch, inversion_chunk=inversion_chunk)
    synchronize(models.device)
    diffused = time.perf_counter()
    for job in jobs:
        core.decode(job.latent[None])
    synchronize(models.device)
    decoded = time.perf_counter()
    return {"encode_s": encoded - started, "diffusion_s": diffused - encoded, "decode_s": decoded - diffused}


def per_face_summary(name: str, faces: int, steps: int, timing: dict[str, float]) -> dict[str, object]:
    """Measured times plus the time at the paper's 100 steps (diffusion scales linearly with steps)."""
    vae = timing["encode_s"] + timing["decode_s"]
    diffusion_at_paper = timing["diffusion_s"] * PAPER_STEPS / steps
    total = vae + diffusion_at_paper
    return {
        "loop": name,
        "faces": faces,
        "steps_measured": steps,
        **{k: round(v, 4) for k, v in timing.items()},
        "extrapolated_to_paper_steps": steps != PAPER_STEPS,
        "batch_latency_s_at_100_steps": round(total, 3),
        "seconds_per_face_at_100_steps": round(total / faces, 3),
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
        self.data["sections_done"].append(name)
        self.save()

    def save(self) -> None:
        self.path_json.parent.mkdir(parents=True, exist_ok=True)
        self.path_json.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        self.path_md.write_text(markdown(self.data))


def markdown(data: dict) -> str:
    machine = data.get("machine", {})
    lines = [
        f"# engine_bench on {machine.get('gpu', 'CPU')} ({data.get('mode')})",
        "",
        f"commit {data.get('git', {}).get('commit')}, torch {machine.get('torch')}, {data.get('date')}, "
        f"compile mode {data.get('compile_mode')}, peak {data.get('peak_dense_fp16_tflops')} TFLOP/s dense fp16",
        "",
    ]
    unet = data.get("unet")
    if unet:
        lines += [
            "| bucket | diffusers eager ms | prepared eager ms | compiled ms | compile s | samples/s | TFLOP/s | % peak |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for row in unet["buckets"]:
            lines.append(
                "| {bucket} | {diffusers_eager_ms} | {prepared_eager_ms} | {compiled_ms} | {compile_s} | "
                "{samples_per_s} | {tflops} | {percent_of_peak} |".format(**row)
            )
        lines.append("")
    faces = data.get("per_face")
    if faces:
        lines += [
            "| loop | faces | steps measured | batch latency s @100 | s/face @100 | extrapolated |",
            "| --- | ---: | ---: | ---: | ---: | --- |",
        ]
        for row in faces:
            lines.append(
                "| {loop} | {faces} | {steps_measured} | {batch_latency_s_at_100_steps} | "
                "{seconds_per_face_at_100_steps} | {extrapolated_to_paper_steps} |".format(**row)
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
    return "\n".join(lines) + "\n"


# ---- main ------------------------------------------------------------------------------------------


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="GPU run in ~5 minutes: buckets 2 and 8, 20 steps x5")
    mode.add_argument("--smoke", action="store_true", help="CPU, tiny models, 3 steps: exercises the code path")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder for the JSON and markdown results")
    parser.add_argument("--steps", type=int, help="steps actually run per face (default: 100, --quick 20)")
    parser.add_argument("--max-batch", type=int, help="samples per UNet call (default 16, --quick 8)")
    parser.add_argument("--compile-mode", help="torch.compile mode (default: the server's; --quick: default)")
    parser.add_argument("--reps", type=int, help="timed repetitions per UNet bucket")
    args = parser.parse_args(argv)
    from masquerade.models.optimize import DEFAULT_COMPILE_MODE, bucket_sizes

    if args.smoke:
        defaults = dict(steps=3, max_batch=4, compile_mode="default", reps=1)
    elif args.quick:
        defaults = dict(steps=20, max_batch=8, compile_mode="default", reps=3)
    else:
        defaults = dict(steps=PAPER_STEPS, max_batch=16, compile_mode=DEFAULT_COMPILE_MODE, reps=10)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    # --quick compiles two buckets (each is a full inductor compile of the SDXL UNet).
    args.buckets = (2, args.max_batch) if args.quick else bucket_sizes(args.max_batch)
    args.warmup = 0 if args.smoke else 1
    args.concurrent_faces = 2 if args.smoke else CONCURRENT_FACES
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stdout)
    if argv is None:
        argv = sys.argv[1:]
    if "--smoke" in argv:
        os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are first decorated, i.e. on import
    import torch

    args = parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("engine_bench needs a CUDA GPU; pass --smoke for a CPU run of the same code path on tiny models.")
        return 0

    from masquerade.engine.diffusion import DiffusionCore
    from masquerade.models.optimize import optimized_unet_fn, stock_unet_fn

    kernel_bench = load_kernel_bench()
    machine = kernel_bench.machine()
    gpu = machine.get("gpu")
    slug = "cpu_smoke" if args.smoke else re.sub(r"[^a-z0-9]+", "_", str(gpu).lower()).strip("_")
    peak = None if args.smoke else peak_tflops(gpu)
    report = Report(
        args.out / f"engine_bench_{slug}.json",
        args.out / f"engine_bench_{slug}.md",
        {
            "benchmark": "engine_bench",
            "mode": "smoke" if args.smoke else ("quick" if args.quick else "full"),
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "machine": machine,
            "git": kernel_bench.git_commit(),
            "compile_mode": args.compile_mode,
            "buckets": list(args.buckets),
            "max_batch": args.max_batch,
            "peak_dense_fp16_tflops": peak,
            "paper_defaults": {"steps": PAPER_STEPS, "skip": PAPER_SKIP, "face_size": 1024},
            "timing": "median wall ms per UNet call (device synchronised); per-face times are one run each",
        },
    )
    print(f"GPU: {gpu or 'none (smoke run on CPU)'}; dense fp16 peak {peak} TFLOP/s")
    bench_started = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="engine_bench_") as tmp:
        started = time.perf_counter()
        if args.smoke:
            report.section("sdxl_config_params_m", check_sdxl_configs())
            models = build_tiny_bundle(Path(tmp))
        else:
            models = build_sdxl_bundle(Path(tmp), "cuda")
        report.section("build_s", round(time.perf_counter() - started, 1))
        log.info("models built in %.1fs (face size %d)", report.data["build_s"], models.face_size)

        flops = unet_flops_per_sample(models)
        report.section("unet_gflop_per_sample", round(flops / 1e9, 1))

        log.info("diffusers eager UNet (peft LoRA live, stock processors):")
        stock = stock_unet_fn(models.unet)
        diffusers_eager = time_unet(stock, models, args.buckets, args.reps, args.warmup)

        # (a) the research code's loop: one CFG pair per call, inversion sequential, then generation.
        naive = DiffusionCore(models, unet_fn=stock)
        per_face = [
            per_face_summary(
                "research loop (eager fp16 SDPA, 1 CFG pair per call)",
                1,
                args.steps,
                run_faces(naive, models, 1, args.steps, max_batch=2, inversion_chunk=1),
            )
        ]
        sequential = dict(
            per_face[0], loop="research loop, faces one after another (derived)", faces=args.concurrent_faces
        )
        sequential["batch_latency_s_at_100_steps"] = round(
            args.concurrent_faces * per_face[0]["batch_latency_s_at_100_steps"], 3
        )
        per_face.append(sequential)
        report.section("per_face", per_face)
        del naive

        kernel_args = argparse.Namespace(
            dtype="float32" if args.smoke else "float16",
            batches=[1, 2] if args.smoke else sorted({b // 2 for b in args.buckets}),
            order="2",
            interpret=args.smoke,
            shape=(4, 8, 8) if args.smoke else (4, models.face_size // 8, models.face_size // 8),
        )
        report.section("kernels", kernel_bench.run(kernel_args))

        log.info("prepared eager UNet (FaceID LoRA fused, fused QKV/IP processors, channels_last):")
        prepared = optimized_unet_fn(models, max_batch=args.max_batch, compile=False, buckets=args.buckets, pad=True)
        prepared_eager = time_unet(prepared, models, args.buckets, args.reps, args.warmup)
        report.section("optimizations", prepared.prepared)

        log.info("compiling %s buckets (%s):", list(args.buckets), args.compile_mode)
        compiled = optimized_unet_fn(
            models, max_batch=args.max_batch, compile=True, buckets=args.buckets, compile_mode=args.compile_mode
        )
        compiled_ms = (
            time_unet(compiled, models, args.buckets, args.reps, args.warmup) if compiled.compiled else prepared_eager
        )
        rows = []
        for size in args.buckets:
            best_ms = compiled_ms[size]
            tflops = flops * size / (best_ms * 1e-3) / 1e12
            rows.append(
                {
                    "bucket": size,
                    "diffusers_eager_ms": round(diffusers_eager[size], 2),
                    "prepared_eager_ms": round(prepared_eager[size], 2),
                    "compiled_ms": round(best_ms, 2) if compiled.compiled else None,
                    "compile_s": round(compiled.warm_seconds[size], 1) if compiled.compiled else None,
                    "samples_per_s": round(size / (best_ms * 1e-3), 2),
                    "tflops": round(tflops, 1),
                    "percent_of_peak": round(100 * tflops / peak, 1) if peak else None,
                }
            )
        report.section("unet", {"compiled": compiled.compiled, "buckets": rows})

        # (b) this engine: inversion steps batched, generation steps of all faces packed per call.
        engine = DiffusionCore(models, max_batch=args.max_batch, unet_fn=compiled)
        label = f"engine (buckets, {args.compile_mode} compile)" if compiled.compiled else "engine (buckets, eager)"
        for faces in (1, args.concurrent_faces):
            timing = run_faces(engine, models, faces, args.steps, args.max_batch, inversion_chunk=args.max_batch // 2)
            per_face.append(per_face_summary(label, faces, args.steps, timing))
            report.section("per_face", per_face)

        report.section("total_s", round(time.perf_counter() - bench_started, 1))
    print(report.path_md.read_text())
    print(f"wrote {report.path_json} and {report.path_md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
