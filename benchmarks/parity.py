"""Measured effect of each remaining deviation from the research code (README, "Deviations").

Runs on the tiny random models (CPU, about two minutes on two cores) and on the real photographs
the tests use; prints one line per figure and writes
``benchmarks/results/parity.json``. The diffusion figures are relative errors
of latents, ||a - b|| / ||b||, on a clean latent scaled to unit variance (as
SDXL's scaled latents are); random weights make them a statement about the
arithmetic, not about image quality.

    .venv/bin/python benchmarks/parity.py            # tiny models built in a temporary folder, N = 10
    .venv/bin/python benchmarks/parity.py --model-dir tiny --steps 100   # the paper's N; slower
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from masquerade.engine.diffusion import DiffusionCore
from masquerade.engine.noise import inversion_noise
from masquerade.engine.trajectory import build_trajectory
from masquerade_kernels.reference import (
    MEAN_FROM_M,
    MEAN_FROM_M1,
    generation_step_reference,
    inversion_step_reference,
)

RESULTS = Path(__file__).resolve().parent / "results"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


class PairUNet:
    """One CFG pair per call through the engine's prepared UNet (DESIGN section 1 steps 5 and 6)."""

    def __init__(self, core: DiffusionCore):
        self.core = core
        size = core.models.face_size
        self.time_ids = torch.tensor([[size, size, 0, 0, size, size]] * 2, dtype=torch.float32)

    @torch.inference_mode()
    def halves(self, x, t, uncond_prompt, identity):
        uncond, cond = self.core.conditioning.get(uncond_prompt), self.core.conditioning.get("")
        ids = torch.stack([torch.zeros(512), identity.float()])[:, None]
        out = self.core.runner.unet_fn(
            torch.stack([x, x]),
            torch.tensor([int(t)] * 2),
            torch.stack([uncond[0], cond[0]]),
            torch.stack([uncond[1], cond[1]]),
            self.time_ids,
            ids,
            torch.ones(2),
        )
        return out[:1], out[1:]


def run(core, unet, x0, identity, *, steps, skip, guidance, seed, noise_mode="per_face", face_index=0, **variant):
    """Sequential inversion + generation with the engine's coefficients, or a research-code variant.

    variant: reset=False -> the research's first generation step (second order on the inversion's
    last output, from t = 1); lower_order_final=True -> its first-order last generation step (N < 15).
    """
    ac = core.models.alphas_cumprod.double().numpy()
    trajectory = build_trajectory(ac, steps, skip)
    coeffs = torch.from_numpy(trajectory.coefficients(guidance)).double()
    ts = trajectory.timesteps
    noise = inversion_noise(seed, face_index, noise_mode, steps, tuple(x0.shape))
    alphas = torch.from_numpy(trajectory.alphas).float().view(-1, 1, 1, 1)
    sigmas = torch.from_numpy(trajectory.sigmas).float().view(-1, 1, 1, 1)
    xs = torch.cat([alphas * x0 + sigmas * noise, x0[None]])
    prev, zs = torch.zeros_like(x0)[None], []
    for i, t in enumerate(ts):
        eps_u, eps_c = unet.halves(xs[i], t, None, torch.zeros(512))
        z, m = inversion_step_reference(eps_u, eps_c, xs[i][None], prev, xs[i + 1][None], coeffs[i : i + 1])
        zs.append(z)
        prev = m
    generation = coeffs.clone()
    lam = lambda t: 0.5 * math.log(ac[t] / (1 - ac[t]))  # noqa: E731
    if not variant.get("reset", True) and steps > 1:
        # The research scheduler keeps its history: step 0 is second order with s1 = t_{N-1}.
        h = lam(ts[1]) - lam(ts[0])
        r = (lam(ts[0]) - lam(ts[-1])) / h
        data = math.sqrt(ac[ts[1]]) * (1 - math.exp(-2 * h))
        generation[0, MEAN_FROM_M], generation[0, MEAN_FROM_M1] = data * (1 + 0.5 / r), -data * 0.5 / r
    else:
        prev = torch.zeros_like(x0)[None]
    if variant.get("lower_order_final") and 1 < steps < 15:
        h = lam(0) - lam(ts[-1])
        generation[-1, MEAN_FROM_M], generation[-1, MEAN_FROM_M1] = math.sqrt(ac[0]) * (1 - math.exp(-2 * h)), 0.0
    x = xs[0][None]
    scaled_identity = variant.get("id_emb_scale", 1.0) * identity
    for i, t in enumerate(ts):
        eps_u, eps_c = unet.halves(x[0], t, variant.get("attribute_prompt"), scaled_identity)
        x, prev = generation_step_reference(eps_u, eps_c, x, prev, zs[i], generation[i : i + 1])
    return x[0].float(), xs


def diffusion_figures(core, args) -> dict:
    unet = PairUNet(core)
    rng = np.random.default_rng(0)
    size = core.models.face_size
    crops = rng.integers(0, 256, (2, size, size, 3), dtype=np.uint8)
    latents = core.encode(crops)
    x0s = [latent / latent.std() for latent in latents]
    identities = core.embed_identity(rng.integers(0, 256, (2, 112, 112, 3), dtype=np.uint8))
    common = dict(steps=args.steps, skip=0.7, guidance=-10.0, seed=0)
    figures = {}

    # History reset: reconstruction (id 0, no prompt) and anonymization (id 1).
    ours_rec, _ = run(core, unet, x0s[0], identities[0], id_emb_scale=0.0, **common)
    research_rec, _ = run(core, unet, x0s[0], identities[0], id_emb_scale=0.0, reset=False, **common)
    ours, _ = run(core, unet, x0s[0], identities[0], **common)
    research, _ = run(core, unet, x0s[0], identities[0], reset=False, **common)
    figures["history_reset"] = {
        "reconstruction_error_ours": rel(ours_rec, x0s[0]),
        "reconstruction_error_research": rel(research_rec, x0s[0]),
        "anonymized_output_difference": rel(research, ours),
        "anonymized_change_ours": rel(ours, x0s[0]),
    }

    # The research's lower-order final generation step for N < 15 (lower_order_final's default).
    short = dict(common, steps=min(args.steps, 10))
    ours_rec10, _ = run(core, unet, x0s[0], identities[0], id_emb_scale=0.0, **short)
    research_rec10, _ = run(core, unet, x0s[0], identities[0], id_emb_scale=0.0, lower_order_final=True, **short)
    ours10, _ = run(core, unet, x0s[0], identities[0], **short)
    research10, _ = run(core, unet, x0s[0], identities[0], lower_order_final=True, **short)
    figures["lower_order_final_under_15_steps"] = {
        "steps": short["steps"],
        "reconstruction_error_ours": rel(ours_rec10, x0s[0]),
        "reconstruction_error_research": rel(research_rec10, x0s[0]),
        "anonymized_output_difference": rel(research10, ours10),
    }

    # Per-face noise vs the research's one seed for every face (two faces of one image, same seed).
    per_face = [inversion_noise(0, k, "per_face", args.steps, tuple(x0s[0].shape)) for k in (0, 1)]
    research_noise = [inversion_noise(0, k, "research", args.steps, tuple(x0s[0].shape)) for k in (0, 1)]

    def correlation(a, b):
        return float(torch.corrcoef(torch.stack([a.flatten().double(), b.flatten().double()]))[0, 1])

    outputs = {}
    for mode in ("per_face", "research"):
        outputs[mode] = [
            run(core, unet, x0s[k], identities[k], noise_mode=mode, face_index=k, **common)[0] - x0s[k] for k in (0, 1)
        ]
    figures["per_face_noise"] = {
        "noise_correlation_between_faces_per_face": correlation(*per_face),
        "noise_correlation_between_faces_research": correlation(*research_noise),
        "edit_correlation_between_faces_per_face": correlation(*outputs["per_face"]),
        "edit_correlation_between_faces_research": correlation(*outputs["research"]),
    }

    # x_t in float32 (ours) vs float16 (the research's add_noise on fp16 latents and noise).
    noise = research_noise[0]
    ac = core.models.alphas_cumprod.double()
    ts = build_trajectory(ac.numpy(), args.steps, 0.7).timesteps
    a = ac[ts].sqrt().view(-1, 1, 1, 1)
    s = (1 - ac[ts]).sqrt().view(-1, 1, 1, 1)
    x32 = a.float() * x0s[0] + s.float() * noise
    x16 = (a.half() * x0s[0].half() + s.half() * noise.half()).float()
    figures["fp32_noisy_latents"] = {"fp16_vs_fp32_relative_difference": rel(x16, x32)}
    return figures


def pixel_figures() -> dict:
    """Paste-back, the fail-closed fallback and aligned-input resizing, on real photographs."""
    import cv2
    import insightface
    from skimage import data as skimage_data

    from masquerade.face import FaceDetector, align_face, apply_classical, decode_image, face_region_mask, paste_back
    from masquerade.face.align import square_mask
    from masquerade.face.verify import DlibVerifier

    t1 = decode_image((Path(insightface.__file__).parent / "data" / "images" / "t1.jpg").read_bytes()).rgb
    faces = FaceDetector("hog", upsample=1).detect(t1)
    size = 1024
    figures: dict = {"faces": len(faces)}

    # Paste-back of a reconstruction (the aligned crop itself): research = nearest, hard edge.
    errors_ours, errors_research = [], []
    for face in faces:
        aligned = align_face(t1, face.landmarks, size)
        mask = square_mask(t1.shape, aligned.matrix, size) > 0
        ours = paste_back(t1, aligned.crop, aligned.matrix)
        research = _research_paste(t1, aligned.crop, aligned.matrix)
        errors_ours.append(float(np.abs(ours.astype(float) - t1)[mask].mean()))
        errors_research.append(float(np.abs(research.astype(float) - t1)[mask].mean()))
    figures["paste_back_reconstruction_mean_abs_error"] = {
        "ours_bilinear_feathered": float(np.mean(errors_ours)),
        "research_nearest_hard": float(np.mean(errors_research)),
    }

    # Neighbours: how much of a face's ellipse core a neighbour's whole square covers.
    reached = []
    for a, face in enumerate(faces):
        aligned = align_face(t1, face.landmarks, size)
        square = square_mask(t1.shape, aligned.matrix, size) > 0
        for b, other in enumerate(faces):
            if a != b:
                other_core = face_region_mask(t1.shape, align_face(t1, other.landmarks, size).matrix, size) == 1
                reached.append(float((square & other_core).sum() / other_core.sum()))
    face = faces[2]
    aligned = align_face(t1, face.landmarks, size)
    width = face.box[2] - face.box[0]
    close = cv2.warpAffine(
        face_region_mask(t1.shape, aligned.matrix, size),
        np.float32([[1, 0, 1.1 * width], [0, 1, 0]]),
        t1.shape[1::-1],
        flags=cv2.INTER_NEAREST,
    )
    square = square_mask(t1.shape, aligned.matrix, size) > 0
    figures["neighbour_faces_covered_by_a_square"] = {
        "t1_max_fraction_of_a_neighbours_ellipse_core": max(reached),
        "neighbour_1_1_face_widths_away_fraction": float((square & (close == 1)).sum() / (close == 1).sum()),
    }

    # Fail closed: a face the identity step cannot embed. Research: untouched; ours: blurred.
    verifier = DlibVerifier()
    distances = []
    for face in faces:
        blurred = apply_classical(t1, face, "blur", 1.0)
        before = verifier.descriptor(t1, face.landmarks)
        after = verifier.descriptor_in_box(blurred, face.box)
        if before is not None and after is not None:
            distances.append(float(verifier.distance(before, after)))
    figures["fallback_blur_dlib_distance"] = {
        "untouched_research": 0.0,
        "blurred_ours_mean": float(np.mean(distances)) if distances else None,
        "faces_measured": len(distances),
        "same_person_below": 0.6,
    }

    # Aligned inputs: resized to the model's face size and back (research: diffused at native size).
    astronaut = np.ascontiguousarray(skimage_data.astronaut())  # 512 x 512
    up = cv2.resize(astronaut, (size, size), interpolation=cv2.INTER_LANCZOS4)
    back = cv2.resize(up, astronaut.shape[1::-1], interpolation=cv2.INTER_LANCZOS4)
    figures["aligned_input_resize_round_trip"] = {
        "input_px": astronaut.shape[0],
        "face_size": size,
        "mean_abs_error_levels": float(np.abs(back.astype(float) - astronaut).mean()),
    }
    return figures


def _research_paste(background: np.ndarray, crop: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """The research merger's rule: the whole square, warped back nearest-neighbour, hard-edged."""
    import cv2

    height, width = background.shape[:2]
    flags = cv2.WARP_INVERSE_MAP | cv2.INTER_NEAREST
    on_white = cv2.warpAffine(crop, matrix, (width, height), flags=flags, borderValue=(255, 255, 255))
    on_black = cv2.warpAffine(crop, matrix, (width, height), flags=flags, borderValue=(0, 0, 0))
    outside = cv2.absdiff(on_white, on_black) / 255.0
    return (outside * background + on_black).astype(np.uint8)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", help="a tiny model set (default: build one in a temporary folder)")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    from masquerade.models.loader import load_models
    from masquerade.models.tiny import make_tiny

    started = time.time()
    model_dir = args.model_dir or tempfile.mkdtemp(prefix="masquerade-parity-")
    if not args.model_dir:
        make_tiny(model_dir)
    core = DiffusionCore(load_models(model_dir, device="cpu"))
    torch.manual_seed(0)
    results = {"diffusion_tiny_models": diffusion_figures(core, args), "pixels_real_photos": pixel_figures()}
    results["command"] = "python benchmarks/parity.py" + (f" --steps {args.steps}" if args.steps != 10 else "")
    results["seconds"] = round(time.time() - started, 1)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "parity.json").write_text(json.dumps(results, indent=2))
    for section, figures in results.items():
        if isinstance(figures, dict):
            for name, value in figures.items():
                print(f"{section:24s} {name}: {value}")
    print(f"wrote {RESULTS / 'parity.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
