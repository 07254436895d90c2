"""End-to-end engine benchmark: the figures of issues 16 and 25, one JSON summary as the last line.

In one run, on full-size SDXL-architecture models with random weights (or the
tiny models, for a CPU check of the same code path), in phases that each end
by a deadline (``--budget-s`` split by ``--shares``, or gpu_check.sh's
``--deadlines``); a phase that does not fit reads "skipped: budget":

1. build: the models; the stock diffusers UNet's ms per call and the research
   code's loop (one CFG pair per call, eager) as baselines; FLOPs per face
   per bucket (FlopCounterMode: UNet per sample x 400 samples at the paper's
   100 + 100 steps, plus the VAE); every Triton solver kernel the runs will
   meet, compiled (untimed);
2. compile: bucket 2 (one face, idle) and bucket 16 (8 faces = 8 CFG pairs)
   first, leaving the figures their estimated time;
3. figures: compiled ms per call; s/face on an idle engine at the paper's
   defaults (skip 0.7, 100 steps, 1024x1024), timed on bucket 2 (20
   inversion + 20 generation steps, one CFG pair per call, after a warm-up;
   each phase's mean step time x 100); faces/min with 8 faces at once, peak
   GPU memory per face, host-device syncs per call, MFU against 989 TFLOP/s
   (H100 SXM dense fp16) and Dynamo recompiles after the warm-up (must be 0);
4. baselines: the prepared UNet eager (FaceID LoRA fused, fused QKV/IP
   processors), the fused solver kernels against eager PyTorch;
5. extra, while time lasts: the other buckets, then ``--extra-compile-mode``
   (max-autotune-no-cudagraphs) on bucket 2.

The SDXL modules are built from SDXL base 1.0's published configs (nothing is
downloaded) and IP-Adapter-FaceID's random state dict is loaded from memory
through ``pipe.load_ip_adapter``. Random weights cost the same FLOPs as real
ones; outputs are noise.

    python benchmarks/engine_bench.py --budget-s 420           # H100/H200: SDXL, buckets 2/4/8/16
    OMP_NUM_THREADS=1 python benchmarks/engine_bench.py --device cpu --models tiny   # CPU check of the logic
    python benchmarks/engine_bench.py --smoke                  # CPU, tiny, no compile: CI's smoke run

Writes ``<out>/engine_bench_<label>.json`` and ``.md``, rewritten after every
section and phase (a timeout keeps what was measured), and prints the summary
JSON last.
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
from collections.abc import Sequence
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


def unet_flops_per_sample(models, forward, batch: int = 2) -> float:
    """FLOPs of one sample's evaluation by ``forward`` (matmul, conv, attention), counted on an eager ``batch`` call.

    Counted on the prepared UNet (FaceID LoRA merged): SDXL's own FLOPs, the work the engine must
    do. The stock model with the LoRA live does more (the low-rank products on every projection).
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from masquerade.models.optimize import example_inputs

    inputs = example_inputs(models, batch)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        forward(*inputs)
    return counter.get_total_flops() / batch


def vae_flops_per_face(models) -> dict[str, float]:
    """FLOPs of one face's VAE encode and decode (counted on one crop at the face size)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    vae = models.vae
    size = models.face_size
    image = torch.zeros(1, 3, size, size, device=models.device, dtype=vae.dtype)
    with torch.inference_mode():
        with FlopCounterMode(display=False) as encode:
            latent = vae.encode(image).latent_dist.mean
        with FlopCounterMode(display=False) as decode:
            vae.decode(latent)
    return {"encode": encode.get_total_flops(), "decode": decode.get_total_flops()}


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


def warm_solver_kernels(models, max_rows: int) -> dict[str, object]:
    """Launch the engine's solver steps once per row count and UNet output layout, untimed.

    Triton compiles a kernel the first time it meets a new specialisation (block size, which
    follows the row count; dtypes; strides of 1 or divisible by 16), so every one the timed runs
    will meet is compiled here: generation launches one row per job, inversion up to
    ``max_rows``; the CFG halves come channels-last or contiguous, latents and history fp32 NCHW.
    """
    import torch

    from masquerade.engine import solver
    from masquerade_kernels.guidance_step import guidance_step_available
    from masquerade_kernels.reference import MEAN_FROM_M1, NOISE_SCALE, NUM_COEFFS

    device = models.device
    if device.type != "cuda" or not guidance_step_available(device):
        return {"status": "not needed: the engine runs the PyTorch reference here (no JIT)"}
    started = time.perf_counter()
    latent = models.face_size // models.vae_scale_factor
    shape = (models.unet.config.in_channels, latent, latent)
    launches = 0
    with torch.inference_mode():
        for rows in range(1, max_rows + 1):
            for layout in (torch.channels_last, torch.contiguous_format):
                eps = torch.randn(2 * rows, *shape, device=device, dtype=models.dtype).contiguous(memory_format=layout)
                x, prev, io = (torch.randn(rows, *shape, device=device) for _ in range(3))
                coeffs = torch.rand(rows, NUM_COEFFS, device=device)
                coeffs[:, NOISE_SCALE] += 0.1
                coeffs[0, MEAN_FROM_M1] = 0.0  # a first-order row among second-order ones
                for step in (solver.generation_step, solver.inversion_step):
                    step(eps[:rows], eps[rows:], x, prev, io, coeffs)
                    launches += 1
    synchronize(device)
    return {"status": "done", "launches": launches, "rows": [1, max_rows], "s": round(time.perf_counter() - started, 1)}


class CallCounter:
    """Wraps a runner's ``unet_fn`` and counts its calls and samples (an observer: it calls the real one)."""

    def __init__(self, fn):
        self.fn, self.calls, self.samples = fn, 0, 0

    def __call__(self, *inputs):
        self.calls += 1
        self.samples += inputs[0].shape[0]
        return self.fn(*inputs)


class StepTimer:
    """Times every engine step (UNet call + solver) of a run by phase, with no host sync per step.

    A marker is recorded as each step starts and one when the run ends: CUDA events on the GPU's
    timeline (a step's time then includes any wait for the host to launch it), wall-clock
    readings on CPU, where every call is synchronous.
    """

    def __init__(self, runner, device):
        self.runner, self.device = runner, device
        self.marks: list[tuple[str, object]] = []
        self.end = None

    def _mark(self):
        import torch

        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def __enter__(self):
        run = self.runner.run

        def timed_run(plan):
            phases = {piece.phase.name.lower() for piece in plan.slices}
            self.marks.append((phases.pop() if len(phases) == 1 else "mixed", self._mark()))
            return run(plan)

        self.runner.run = timed_run  # an instance attribute over the method; removed on exit
        return self

    def stop(self) -> None:
        self.end = self._mark()

    def __exit__(self, *exc):
        del self.runner.run
        return False

    def ms_by_phase(self) -> dict[str, list[float]]:
        synchronize(self.device)
        points = [mark for _, mark in self.marks] + [self.end]
        if self.device.type == "cuda":
            durations = [a.elapsed_time(b) for a, b in zip(points, points[1:])]
        else:
            durations = [1e3 * (b - a) for a, b in zip(points, points[1:])]
        out: dict[str, list[float]] = {}
        for (phase, _), ms in zip(self.marks, durations):
            out.setdefault(phase, []).append(ms)
        return out


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


def run_faces(
    core, models, faces: int, steps: int, max_batch: int, inversion_chunk: int, timer: bool = False
) -> dict[str, object]:
    """Encode, invert + generate (continuous batching), decode ``faces`` random crops; seconds per phase.

    Also counts the UNet calls and samples, and the host-device syncs of job creation and of the
    diffusion loop (CUDA only); ``timer`` adds each step's milliseconds by phase (``StepTimer``).
    """
    import contextlib

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
    step_timer = StepTimer(core.runner, models.device) if timer else None
    try:
        synchronize(models.device)
        started = time.perf_counter()
        latents = core.encode(crops)  # in chunks of --vae-chunk faces
        synchronize(models.device)
        encoded = time.perf_counter()
        with SyncCounter(models.device) as job_syncs:
            jobs = [core.make_job("bench", i, latents[i], identity[i], params) for i in range(faces)]
        synchronize(models.device)
        made = time.perf_counter()
        with SyncCounter(models.device) as loop_syncs, step_timer or contextlib.nullcontext():
            core.run_to_completion(jobs, max_batch=max_batch, inversion_chunk=inversion_chunk)
            if step_timer:
                step_timer.stop()
            synchronize(models.device)
        diffused = time.perf_counter()
        core.decode(torch.stack([job.latent for job in jobs]))
        synchronize(models.device)
        decoded = time.perf_counter()
    finally:
        core.runner.unet_fn = counter.fn
    timing = {
        "encode_s": encoded - started,
        "jobs_s": made - encoded,
        "diffusion_s": diffused - made,
        "decode_s": decoded - diffused,
        "unet_calls": counter.calls,
        "unet_samples": counter.samples,
        "syncs_job_creation": job_syncs.count,
        "syncs_diffusion_loop": loop_syncs.count,
        "sync_sites": getattr(loop_syncs, "where", None),
    }
    if step_timer:
        timing["step_ms"] = step_timer.ms_by_phase()
    return timing


def per_face_summary(name: str, faces: int, steps: int, timing: dict[str, object]) -> dict[str, object]:
    """Measured times plus the time at the paper's 100 steps.

    With per-step times (``StepTimer``): each phase's mean ms per step x 100 steps. Otherwise the
    diffusion time scaled by 100 / steps (diffusion is linear in the steps).
    """
    fixed = timing["encode_s"] + timing["jobs_s"] + timing["decode_s"]
    step_ms = timing.get("step_ms")
    row: dict[str, object] = {"loop": name, "faces": faces, "steps_measured": steps}
    if step_ms:
        means = {phase: statistics.fmean(values) for phase, values in step_ms.items()}
        diffusion_at_paper = sum(PAPER_STEPS * ms / 1e3 for ms in means.values())
        row["ms_per_step"] = {phase: round(ms, 3) for phase, ms in means.items()}
        row["steps_timed"] = {phase: len(values) for phase, values in step_ms.items()}
        row["extrapolation"] = (
            f"{' + '.join(f'{len(v)} {p}' for p, v in step_ms.items())} steps timed one by one after a warm-up; "
            f"each phase's mean ms per step x {PAPER_STEPS} steps, plus the measured VAE encode, job set-up and decode"
        )
    else:
        diffusion_at_paper = timing["diffusion_s"] * PAPER_STEPS / steps
        row["extrapolation"] = f"diffusion time x {PAPER_STEPS}/{steps} steps, plus the measured VAE and job set-up"
    total = fixed + diffusion_at_paper
    calls = timing["unet_calls"]
    row.update(
        {
            **{k: round(v, 4) if isinstance(v, float) else v for k, v in timing.items() if k != "step_ms"},
            "extrapolated_to_paper_steps": steps != PAPER_STEPS,
            "batch_latency_s_at_100_steps": round(total, 3),
            "seconds_per_face_at_100_steps": round(total / faces, 3),
            "faces_per_min_at_100_steps": round(60 * faces / total, 2),
            "host_syncs_per_unet_call": (
                round(timing["syncs_diffusion_loop"] / calls, 3) if timing["syncs_diffusion_loop"] is not None else None
            ),
        }
    )
    return row


# ---- budget -----------------------------------------------------------------------------------------

SKIPPED = "skipped: budget"
# Percent of the budget each phase may use, in the order they run; "extra" (other buckets, a second
# compile mode) gets what is left. gpu_check.sh passes its own shares (written at its top).
DEFAULT_SHARES = {"build": 10, "compile": 42, "figures": 20, "baselines": 9}


def compile_order(buckets: Sequence[int], concurrent_bucket: int) -> list[int]:
    """The buckets the figures need first -- 2 (one face, idle) and ``concurrent_bucket`` (the
    concurrent faces' CFG pairs) -- then the others, smallest first."""
    if 2 not in buckets or concurrent_bucket not in buckets:
        raise ValueError(f"buckets {tuple(buckets)} must hold 2 and the concurrent faces' bucket {concurrent_bucket}")
    first = [2] if concurrent_bucket == 2 else [2, concurrent_bucket]
    return first + sorted(b for b in buckets if b not in first)


class Budget:
    """Deadlines per phase (unix seconds): a phase may run until its deadline, and time an earlier
    phase left unused passes on. ``fits`` tells whether ``need_s`` more seconds fit before one."""

    def __init__(self, started_at: float, deadlines: dict[str, float]):
        self.started_at, self.deadlines = started_at, deadlines

    @classmethod
    def from_shares(cls, started_at: float, budget_s: float, shares: dict[str, float]) -> Budget:
        deadlines, done = {}, 0.0
        for name, percent in shares.items():
            done += percent
            deadlines[name] = started_at + budget_s * done / 100
        deadlines["extra"] = started_at + budget_s
        return cls(started_at, deadlines)

    def left(self, phase: str) -> float:
        return self.deadlines[phase] - time.time()

    def fits(self, phase: str, need_s: float) -> bool:
        return need_s <= self.left(phase)


# ---- report ---------------------------------------------------------------------------------------


class Report:
    """The JSON result, rewritten after every section so that a timeout still leaves what was measured."""

    def __init__(self, path_json: Path, path_md: Path, header: dict):
        self.path_json, self.path_md = path_json, path_md
        self.data = dict(header)
        self.data.setdefault("sections_done", [])
        self.data.setdefault("phases", {})

    def section(self, name: str, value) -> None:
        self.data[name] = value
        if name not in self.data["sections_done"]:
            self.data["sections_done"].append(name)
        self.data["summary"] = summary(self.data)
        self.save()

    def phase(self, name: str, status: str) -> None:
        """Record a phase's status: "running" until it ends ("done ...", "skipped: budget", ...)."""
        self.data["phases"][name] = status
        self.data["summary"] = summary(self.data)
        self.save()

    def save(self) -> None:
        self.path_json.parent.mkdir(parents=True, exist_ok=True)
        self.path_json.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        self.path_md.write_text(markdown(self.data))


def _status(data: dict, phase: str, value):
    """``value`` when measured, "skipped: budget" when its phase was skipped, else None (not reached)."""
    if value is not None:
        return value
    return SKIPPED if str(data.get("phases", {}).get(phase, "")).startswith(SKIPPED) else None


def summary(data: dict) -> dict:
    """The issue's figures in one flat object.

    A figure is a number when measured, "skipped: budget" when its phase did not fit, "n/a: cpu" for
    GPU-only figures on a CPU run, and null where its phase was not reached (gpu_check.sh reads
    that as the phase running out of time).
    """
    on_gpu = data.get("device") == "cuda"
    gpu_only = (lambda value: value) if on_gpu else (lambda value: "n/a: cpu")
    per_face = {row["loop"]: row for row in data.get("per_face", [])}
    idle, busy, research = per_face.get(ENGINE_LOOP_1), per_face.get(ENGINE_LOOP_N), per_face.get(RESEARCH_LOOP)
    compiled = {int(k): v for k, v in (data.get("compiled_ms") or {}).items()}
    eager = {int(k): v for k, v in (data.get("prepared_eager_ms") or {}).items()}
    flops = data.get("flops") or {}
    per_sample = {int(k): v for k, v in (flops.get("unet_gflop_per_sample") or {}).items()}
    kernels = data.get("kernels") or []
    largest_kernel_batch = max((row["batch"] for row in kernels), default=None)
    fused = {
        row["step"]: round(row.get("graph_speedup", row["speedup"]), 2)
        for row in kernels
        if row["batch"] == largest_kernel_batch
    }
    memory = data.get("memory") or {}
    buckets = data.get("buckets") or []
    phases = data.get("phases", {})

    def bucket_ms(size: int):
        if size in compiled:
            return compiled[size]
        status = str(phases.get(f"compile_{size}", ""))
        return status if status.startswith(("skipped", "off")) else None

    tflop_per_face = flops.get("tflop_per_face")
    mfu = None
    if on_gpu and per_sample and (compiled or eager):
        calls = {size: ms for size, ms in {**eager, **compiled}.items() if size in per_sample}
        best = max(calls, key=lambda size: per_sample[size] * size / calls[size], default=None)
        mfu = {
            "peak_tflops": MFU_PEAK_TFLOPS,
            "best_call_percent": best
            and round(100 * per_sample[best] * 1e9 * best / (calls[best] * 1e-3) / 1e12 / MFU_PEAK_TFLOPS, 1),
            "best_call_bucket": best,
            "idle_face_percent": idle
            and tflop_per_face
            and round(100 * tflop_per_face["2"] / idle["seconds_per_face_at_100_steps"] / MFU_PEAK_TFLOPS, 1),
            "concurrent_faces_percent": busy and busy.get("mfu_percent"),
        }
    speedup = None
    if idle and research:
        speedup = round(research["seconds_per_face_at_100_steps"] / idle["seconds_per_face_at_100_steps"], 2)
    out = {
        "benchmark": "engine_bench",
        "device": data.get("machine", {}).get("gpu") or "cpu",
        "torch": data.get("machine", {}).get("torch"),
        "models": data.get("models"),
        "measured_on_gpu": on_gpu,
        "note": data.get("note"),
        "s_per_face_idle": _status(data, "idle", idle and idle["seconds_per_face_at_100_steps"]),
        "s_per_face_idle_method": idle and idle.get("extrapolation"),
        "idle_bucket": data.get("idle_bucket"),
        "ms_per_call": {str(size): bucket_ms(size) for size in buckets} if buckets else None,
        "ms_per_call_eager": {str(k): v for k, v in eager.items()} or _status(data, "eager_ms", None),
        "faces_per_min_8": _status(data, "concurrent", busy and busy["faces_per_min_at_100_steps"]),
        "concurrent_faces": busy and busy["faces"],
        "concurrent_unet": data.get("concurrent_unet"),
        "mfu": gpu_only(_status(data, "concurrent", mfu)),
        "recompiles_after_warmup": data.get("recompiles_after_warmup", data.get("recompiles_after_warmup_end"))
        if data.get("compile_s") or not str(phases.get("figures", "")).startswith("done")
        else "n/a: no bucket compiled",
        "host_syncs_per_call": gpu_only(_status(data, "concurrent", busy and busy["host_syncs_per_unet_call"])),
        "kernel_speedup_vs_eager": fused or _status(data, "kernels", None),
        "peak_gpu_gib_per_face": gpu_only(_status(data, "concurrent", memory.get("per_face_gib"))),
        "peak_gpu_gib": gpu_only(memory.get("peak_gib")),
        "buckets_compiled": list((data.get("compile_s") or {}).keys()),
        "compile_s": data.get("compile_s"),
        "compile_mode": data.get("compile_mode"),
        "tflop_per_face": tflop_per_face,
        "research_loop_s_per_face": _status(
            data, "research_loop", research and research["seconds_per_face_at_100_steps"]
        ),
        "speedup_vs_research_loop": speedup,
        "extra_compile_mode": data.get("extra_compile_mode") or _status(data, "extra_compile_mode", None),
        "phases": dict(phases),
    }
    number = lambda value: isinstance(value, int | float) and not isinstance(value, bool)  # noqa: E731
    out["targets"] = gpu_only(
        {
            "s_per_face_idle_le_5_4": number(out["s_per_face_idle"]) and out["s_per_face_idle"] <= 5.4,
            "batch2_call_le_40_ms": number(compiled.get(2)) and compiled[2] <= 40,
            "faces_per_min_8_ge_10": number(out["faces_per_min_8"]) and out["faces_per_min_8"] >= 10,
            "zero_recompiles": out["recompiles_after_warmup"] == 0,
        }
    )
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
            "| batch | diffusers eager ms | prepared eager ms | compiled ms | compile s | GFLOP/sample | MFU % |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for row in unet["buckets"]:
            lines.append(
                "| {bucket} | {diffusers_eager_ms} | {prepared_eager_ms} | {compiled_ms} | {compile_s} | "
                "{gflop_per_sample} | {mfu_percent} |".format(**row)
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


def parse_shares(text: str) -> dict[str, float]:
    shares = {}
    for item in text.split(","):
        name, _, percent = item.partition("=")
        shares[name.strip()] = float(percent)
    if set(shares) != set(DEFAULT_SHARES) or sum(shares.values()) > 100:
        raise argparse.ArgumentTypeError(f"--shares needs {sorted(DEFAULT_SHARES)} summing to <= 100, got {text!r}")
    return shares


def parse_deadlines(text: str) -> dict[str, float]:
    deadlines = {name.strip(): float(when) for name, _, when in (item.partition("=") for item in text.split(","))}
    if set(deadlines) != {*DEFAULT_SHARES, "extra"}:
        raise argparse.ArgumentTypeError(f"--deadlines needs {sorted({*DEFAULT_SHARES, 'extra'})}, got {text!r}")
    return deadlines


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
    parser.add_argument(
        "--extra-compile-mode",
        default="max-autotune-no-cudagraphs",
        help="a second mode timed on bucket 2 with the time left at the end ('none': never)",
    )
    parser.add_argument("--idle-steps", type=int, default=20, help="inversion and generation steps timed for 1 face")
    parser.add_argument("--idle-warmup-steps", type=int, default=2, help="untimed 1-face run before the timed one")
    parser.add_argument("--concurrent-steps", type=int, default=20, help="steps run for the 8 faces (x5 = 100)")
    parser.add_argument("--baseline-steps", type=int, default=20, help="steps run for the research loop baseline")
    parser.add_argument("--concurrent-faces", type=int, default=CONCURRENT_FACES)
    parser.add_argument("--vae-chunk", type=int, default=4)
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per UNet batch size")
    parser.add_argument("--budget-s", type=float, default=330, help="seconds for the whole run, from --started-at")
    parser.add_argument("--started-at", type=float, help="unix time the budget counts from (default: now)")
    parser.add_argument(
        "--shares", type=parse_shares, default=DEFAULT_SHARES, help="percent per phase, e.g. build=10,..."
    )
    parser.add_argument(
        "--deadlines",
        type=parse_deadlines,
        help="unix time each phase must end by (build=T,compile=T,figures=T,baselines=T,extra=T); overrides --shares",
    )
    parser.add_argument(
        "--compile-estimate-s",
        type=float,
        help="expected first compile (default 90 SDXL, 40 tiny); later ones are measured",
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.device, args.models, args.compile = "cpu", "tiny", False
        args.idle_steps, args.idle_warmup_steps, args.concurrent_steps, args.baseline_steps = 3, 1, 3, 3
        args.concurrent_faces, args.reps, args.buckets = 2, 1, args.buckets or "2,4"
    args.buckets = tuple(sorted({int(b) for b in args.buckets.split(",")})) if args.buckets else DEFAULT_BUCKETS
    if any(b < 2 or b % 2 for b in args.buckets):
        parser.error(f"--buckets must be even sizes >= 2, got {args.buckets}")
    args.concurrent_bucket = 2 * args.concurrent_faces
    if 2 not in args.buckets or args.concurrent_bucket not in args.buckets:
        parser.error(f"--buckets must hold 2 and {args.concurrent_bucket} (the concurrent faces' CFG pairs)")
    args.compile = True if args.compile is None else args.compile
    if args.compile_estimate_s is None:
        args.compile_estimate_s = 90.0 if args.models == "sdxl" else 40.0
    if args.extra_compile_mode == "none":
        args.extra_compile_mode = None
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stdout)
    args = parse_args(sys.argv[1:] if argv is None else argv)
    started_at = args.started_at or time.time()
    if args.deadlines:
        budget = Budget(started_at, args.deadlines)
    else:
        budget = Budget.from_shares(started_at, args.budget_s, args.shares)
    if args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # the fused kernels through Triton's interpreter (read on import)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("engine_bench: no CUDA device here; run with --device cpu --models tiny for a CPU check.")
        return 0
    from masquerade.engine.diffusion import DiffusionCore
    from masquerade.models.optimize import COMPILE_MODES, optimized_unet_fn, stock_unet_fn

    if args.extra_compile_mode and args.extra_compile_mode not in COMPILE_MODES:
        raise SystemExit(f"--extra-compile-mode must be one of {COMPILE_MODES} or 'none'")
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
            "deadlines_s": {k: round(v - budget.started_at, 1) for k, v in budget.deadlines.items()},
            "timing": "median wall ms per UNet call (device synchronised); per-face times are one run each",
            "note": (
                "CPU run on tiny random models: it checks the benchmark's logic and JSON end to end; its "
                "timings say nothing about GPU performance (and vary with the machine's load)"
                if args.device == "cpu"
                else "SDXL-size random weights: same FLOPs as the real model; outputs are noise"
            ),
        },
    )
    print(f"device: {gpu or 'CPU'}; models {args.models}; buckets {args.buckets}; budget {args.budget_s:.0f}s")
    order = compile_order(args.buckets, args.concurrent_bucket)
    essential = order[:2]

    with tempfile.TemporaryDirectory(prefix="engine_bench_") as tmp:
        # ---- build: models, the stock UNet's baselines (before preparing mutates it), FLOPs, kernels
        report.phase("build", "running")
        started = time.perf_counter()
        if args.models == "tiny":
            report.section("sdxl_config_params_m", check_sdxl_configs())
            models = build_tiny_bundle(Path(tmp), args.device)
        else:
            models = build_sdxl_bundle(Path(tmp), args.device)
        report.section("build_s", round(time.perf_counter() - started, 1))
        log.info("models built in %.1fs (face size %d)", report.data["build_s"], models.face_size)
        # Before any timed run: the research loop below already runs the engine's solver.
        report.section("solver_kernels_warmup", warm_solver_kernels(models, args.concurrent_bucket // 2))
        vae_flops = vae_flops_per_face(models)  # also the VAE's first (cold) calls, untimed
        log.info("diffusers eager UNet (peft LoRA live, stock processors):")
        stock = stock_unet_fn(models.unet)
        diffusers_eager = time_unet(stock, models, essential, max(1, args.reps // 2), warmup=1)
        report.section("diffusers_eager_ms", {str(k): round(v, 2) for k, v in diffusers_eager.items()})
        # The research code's loop: one CFG pair per call, inversion sequential, then generation.
        report.phase("research_loop", "running")
        naive = DiffusionCore(models, unet_fn=stock, vae_chunk=args.vae_chunk)
        timing = run_faces(naive, models, 1, args.baseline_steps, max_batch=2, inversion_chunk=1)
        per_face = [per_face_summary(RESEARCH_LOOP, 1, args.baseline_steps, timing)]
        report.section("per_face", per_face)
        report.phase("research_loop", "done")
        vae_face_s = timing["encode_s"] + timing["decode_s"]
        del naive

        prepared = optimized_unet_fn(models, max_batch=max(args.buckets), compile=False, buckets=args.buckets)
        report.section("optimizations", prepared.prepared)
        per_sample = {size: unet_flops_per_sample(models, prepared.eager_forward, size) for size in args.buckets}
        samples_per_face = 2 * 2 * PAPER_STEPS  # a CFG pair per step, inversion + generation
        report.section(
            "flops",
            {
                "counted": "torch.utils.flop_counter on one eager call per bucket (prepared UNet) and one VAE encode/decode",
                "samples_per_face_at_paper_steps": samples_per_face,
                "unet_gflop_per_sample": {str(k): round(v / 1e9, 2) for k, v in per_sample.items()},
                "vae_gflop_per_face": {k: round(v / 1e9, 2) for k, v in vae_flops.items()},
                "tflop_per_face": {
                    str(k): round((v * samples_per_face + sum(vae_flops.values())) / 1e12, 2)
                    for k, v in per_sample.items()
                },
            },
        )
        report.phase("build", f"done at {time.perf_counter() - started_all:.0f}s")

        # ---- compile: bucket 2 and the concurrent faces' bucket first, leaving the figures their time
        def figures_need_s(ms: dict[int, float]) -> float:
            """The figures' cost, estimated from the slowest per-call times known so far."""
            idle_calls = 2 * (args.idle_steps + args.idle_warmup_steps)
            busy_calls = 2 * args.concurrent_faces * args.concurrent_steps / (args.concurrent_bucket // 2) + 2
            timing_calls = (args.reps + 1) * len(essential)
            return (
                1e-3 * (ms[2] * idle_calls + ms[args.concurrent_bucket] * (busy_calls + timing_calls))
                + vae_face_s * (2 + args.concurrent_faces)
                + 5
            )

        compile_s: dict[int, float] = {}
        engine_fn = prepared
        if args.compile:
            engine_fn = optimized_unet_fn(
                models,
                max_batch=max(args.buckets),
                compile=True,
                buckets=args.buckets,
                compile_mode=args.compile_mode,
                warm=False,
            )
            reserve = figures_need_s(diffusers_eager)
            for size in essential:
                need = 1.2 * max(compile_s.values()) if compile_s else args.compile_estimate_s
                if budget.left("figures") - reserve < need:
                    log.warning(
                        "budget: bucket %d not compiled (needs ~%.0fs, %.0fs left)",
                        size,
                        need,
                        budget.left("figures") - reserve,
                    )
                    report.phase(
                        f"compile_{size}",
                        f"{SKIPPED} (needs ~{need:.0f}s, {budget.left('figures') - reserve:.0f}s left)",
                    )
                    continue
                report.phase(f"compile_{size}", "running")
                log.info("compiling bucket %d (%s); already warm: %s", size, args.compile_mode, sorted(compile_s))
                engine_fn.warm([size])
                compile_s[size] = round(engine_fn.warm_seconds[size], 1)
                report.section("compile_s", {str(k): v for k, v in compile_s.items()})
                report.phase(f"compile_{size}", "done")
        else:
            for size in order:
                report.phase(f"compile_{size}", "off (--no-compile)")

        # ---- figures: compiled ms per call, one face idle on bucket 2, the concurrent faces
        report.phase("figures", "running")
        warm = sorted(compile_s)
        compiled_ms = time_unet(engine_fn, models, warm, args.reps, warmup=1) if warm else {}
        report.section("compiled_ms", {str(k): round(v, 2) for k, v in compiled_ms.items()})
        known_ms = {**diffusers_eager, **compiled_ms}

        idle_fn = engine_fn if 2 in compile_s else prepared
        report.section("idle_bucket", 2)
        report.section("idle_unet", "compiled" if idle_fn is engine_fn and args.compile else "eager")
        need = 1e-3 * known_ms[2] * 2 * (args.idle_steps + args.idle_warmup_steps) + 2 * vae_face_s + 2
        if budget.fits("figures", need):
            report.phase("idle", "running")
            idle_core = DiffusionCore(models, max_batch=2, unet_fn=idle_fn, vae_chunk=args.vae_chunk)
            run_faces(idle_core, models, 1, args.idle_warmup_steps, 2, inversion_chunk=1)  # untimed warm-up
            timing = run_faces(idle_core, models, 1, args.idle_steps, 2, inversion_chunk=1, timer=True)
            per_face.append(per_face_summary(ENGINE_LOOP_1, 1, args.idle_steps, timing))
            report.section("per_face", per_face)
            report.phase("idle", "done")
            del idle_core
        else:
            report.phase("idle", SKIPPED)

        faces, bucket = args.concurrent_faces, args.concurrent_bucket
        busy_fn = prepared
        if bucket in compile_s:
            engine_fn.buckets = tuple(sorted(compile_s))  # calls pad up to a warm bucket, never compile
            busy_fn = engine_fn
        report.section("concurrent_unet", f"compiled, buckets {sorted(compile_s)}" if bucket in compile_s else "eager")
        need = (
            1e-3 * known_ms[bucket] * (2 * faces * args.concurrent_steps / (bucket // 2) + 2) + faces * vae_face_s + 2
        )
        if budget.fits("figures", need):
            report.phase("concurrent", "running")
            engine = DiffusionCore(models, max_batch=bucket, unet_fn=busy_fn, vae_chunk=args.vae_chunk)
            if args.device == "cuda":
                synchronize(models.device)
                baseline = torch.cuda.memory_allocated(models.device)
                torch.cuda.reset_peak_memory_stats(models.device)
            timing = run_faces(engine, models, faces, args.concurrent_steps, bucket, inversion_chunk=bucket // 2)
            row = per_face_summary(ENGINE_LOOP_N, faces, args.concurrent_steps, timing)
            row["mfu_percent"] = (
                round(
                    100 * per_sample[bucket] * timing["unet_samples"] / timing["diffusion_s"] / 1e12 / MFU_PEAK_TFLOPS,
                    1,
                )
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
            report.phase("concurrent", "done")
            del engine
        else:
            report.phase("concurrent", SKIPPED)
        if compile_s:
            report.section("recompiles_after_warmup", engine_fn.recompiles())
        report.phase("figures", f"done at {time.perf_counter() - started_all:.0f}s")

        # ---- baselines: the prepared UNet eager, the fused solver kernels against eager PyTorch
        prepared_eager: dict[int, float] = {}
        for size in args.buckets:
            if budget.fits(
                "baselines", 1e-3 * known_ms.get(size, max(known_ms.values())) * (max(1, args.reps // 2) + 1) * 1.5
            ):
                prepared_eager.update(time_unet(prepared, models, [size], max(1, args.reps // 2), warmup=1))
        report.section("prepared_eager_ms", {str(k): round(v, 2) for k, v in prepared_eager.items()})
        report.phase("eager_ms", "done" if len(prepared_eager) == len(args.buckets) else SKIPPED)
        if budget.fits("baselines", 10 if args.device == "cuda" else 3):
            kernel_args = argparse.Namespace(
                dtype="float32" if args.device == "cpu" else "float16",
                batches=[1, 2] if args.device == "cpu" else [1, args.concurrent_bucket // 2],
                order="2",
                interpret=args.device == "cpu",
                shape=(4, 8, 8) if args.device == "cpu" else (4, models.face_size // 8, models.face_size // 8),
            )
            report.section("kernels", kernel_bench.run(kernel_args))
            report.phase("kernels", "done")
        else:
            report.phase("kernels", SKIPPED)
        report.phase("baselines", f"done at {time.perf_counter() - started_all:.0f}s")

        # ---- extra, while time lasts: the other buckets, then a second compile mode on bucket 2
        # A figure bucket that did not fit before the figures still comes first: its ms per call.
        for size in [b for b in order if b not in compile_s] if args.compile else []:
            need = 1.2 * max(compile_s.values()) if compile_s else args.compile_estimate_s
            if not budget.fits("extra", need + 5):
                report.phase(f"compile_{size}", SKIPPED)
                continue
            report.phase(f"compile_{size}", "running")
            engine_fn.buckets = tuple(sorted({*compile_s, size}))
            engine_fn.warm([size])
            compile_s[size] = round(engine_fn.warm_seconds[size], 1)
            report.section("compile_s", {str(k): v for k, v in compile_s.items()})
            compiled_ms.update(time_unet(engine_fn, models, [size], args.reps, warmup=1))
            report.section("compiled_ms", {str(k): round(v, 2) for k, v in compiled_ms.items()})
            report.phase(f"compile_{size}", "done")
        if compile_s:  # before the second mode's compile, which Dynamo's global count would include
            report.section("recompiles_after_warmup_end", engine_fn.recompiles())
        if not args.compile or not args.extra_compile_mode or args.extra_compile_mode == args.compile_mode:
            report.phase("extra_compile_mode", "off")
        else:
            # Autotuning modes search GEMM and conv configurations: several default compiles' worth.
            need = 4 * max(compile_s.values()) if compile_s else 4 * args.compile_estimate_s
            if budget.fits("extra", need):
                report.phase("extra_compile_mode", "running")
                other = optimized_unet_fn(
                    models, max_batch=2, compile=True, buckets=(2,), compile_mode=args.extra_compile_mode, warm=False
                )
                other.warm([2])
                ms = time_unet(other, models, [2], args.reps, warmup=1)[2]
                report.section(
                    "extra_compile_mode",
                    {
                        "mode": args.extra_compile_mode,
                        "compile_s_bucket_2": round(other.warm_seconds[2], 1),
                        "ms_per_call_bucket_2": round(ms, 2),
                        "vs_default_mode": round(compiled_ms[2] / ms, 3) if 2 in compiled_ms else None,
                    },
                )
                report.phase("extra_compile_mode", "done")
                del other
            else:
                report.phase("extra_compile_mode", f"{SKIPPED} (needs ~{need:.0f}s, {budget.left('extra'):.0f}s left)")

        rows = []
        for size in args.buckets:
            best_ms = compiled_ms.get(size, prepared_eager.get(size))
            rows.append(
                {
                    "bucket": size,
                    "diffusers_eager_ms": round(diffusers_eager[size], 2) if size in diffusers_eager else None,
                    "prepared_eager_ms": round(prepared_eager[size], 2) if size in prepared_eager else None,
                    "compiled_ms": round(compiled_ms[size], 2) if size in compiled_ms else None,
                    "compile_s": compile_s.get(size),
                    "gflop_per_sample": round(per_sample[size] / 1e9, 2),
                    "mfu_percent": (
                        round(100 * per_sample[size] * size / (best_ms * 1e-3) / 1e12 / MFU_PEAK_TFLOPS, 1)
                        if args.device == "cuda" and best_ms
                        else None
                    ),
                }
            )
        report.section("unet", {"compiled": bool(compiled_ms), "buckets": rows})
        report.section("total_s", round(time.perf_counter() - started_all, 1))
    print(report.path_md.read_text())
    print(f"wrote {report.path_json} and {report.path_md}")
    print(json.dumps(report.data["summary"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
