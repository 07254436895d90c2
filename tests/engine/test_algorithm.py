"""The algorithm of DESIGN section 1 on tiny random models: invariants that hold for any weights,
and parity with the research code's solver (diffusers' own DPM-Solver++ scheduler as the oracle)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from masquerade.engine.diffusion import DiffusionCore
from masquerade.engine.job_state import JobStatus
from masquerade.engine.noise import face_noise_seed, inversion_noise
from masquerade.engine.request import ReversePersonalizationParams
from masquerade.engine.scheduler import StepScheduler
from masquerade.engine.trajectory import build_trajectory, inversion_timesteps, scaled_linear_alphas_cumprod
from masquerade_kernels.reference import generation_step_reference, inversion_step_reference


@pytest.fixture(scope="module")
def faces(core: DiffusionCore):
    """Two random 'aligned faces', their clean latents and unit identity embeddings."""
    rng = np.random.default_rng(7)
    size = core.models.face_size
    crops = rng.integers(0, 256, (2, size, size, 3), dtype=np.uint8)
    identities = core.embed_identity(rng.integers(0, 256, (2, 112, 112, 3), dtype=np.uint8))
    return crops, core.encode(crops), identities


def run_jobs(core, jobs, *, max_batch=16, chunk=8):
    core.run_to_completion(jobs, max_batch=max_batch, inversion_chunk=chunk)
    assert all(job.status is JobStatus.DECODED for job in jobs)
    return torch.stack([job.latent for job in jobs])


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


# ---- schedule and solver --------------------------------------------------------------


def test_default_timesteps_are_the_papers():
    timesteps = inversion_timesteps(100, 0.7)
    assert timesteps[0] == 299 and timesteps[-1] == 1 and len(timesteps) == 100
    assert np.all(np.diff(timesteps) < 0)


def test_too_many_steps_for_the_skip_is_rejected():
    with pytest.raises(ValueError, match="repeats timesteps"):
        inversion_timesteps(100, 0.95)


def test_solver_matches_a_two_step_example_computed_by_hand():
    """Two generation steps (first, then second order) from DESIGN's formulas, scalar by scalar."""
    alphas_cumprod = scaled_linear_alphas_cumprod()
    trajectory = build_trajectory(alphas_cumprod, steps=3, skip=0.5)  # timesteps 499, 250, 1
    t0, t1, t2 = (int(t) for t in trajectory.timesteps)
    g = -7.5

    def alpha_sigma_lambda(t):
        a, s = math.sqrt(alphas_cumprod[t]), math.sqrt(1 - alphas_cumprod[t])
        return a, s, math.log(a) - math.log(s)

    x, eps_u, eps_c, z = 0.8, 0.3, -0.2, 0.45
    # Step 1, first order, t0 -> t1.
    a_s, s_s, l_s = alpha_sigma_lambda(t0)
    a_t, s_t, l_t = alpha_sigma_lambda(t1)
    h = l_t - l_s
    eps = eps_u + g * (eps_c - eps_u)
    m0 = (x - s_s * eps) / a_s
    mu = (s_t / s_s) * math.exp(-h) * x + a_t * (1 - math.exp(-2 * h)) * m0
    x1 = mu + s_t * math.sqrt(1 - math.exp(-2 * h)) * z
    # Step 2, second order, t1 -> t2, with the previous output m0 from t0.
    eps_u2, eps_c2, z2 = -0.1, 0.25, -0.3
    a_s2, s_s2, l_s2 = alpha_sigma_lambda(t1)
    a_t2, s_t2, l_t2 = alpha_sigma_lambda(t2)
    h2 = l_t2 - l_s2
    eps2 = eps_u2 + g * (eps_c2 - eps_u2)
    m1 = (x1 - s_s2 * eps2) / a_s2
    r = (l_s2 - l_s) / h2
    d1 = (m1 - m0) / r
    mu2 = (s_t2 / s_s2) * math.exp(-h2) * x1 + a_t2 * (1 - math.exp(-2 * h2)) * (m1 + 0.5 * d1)
    x2 = mu2 + s_t2 * math.sqrt(1 - math.exp(-2 * h2)) * z2

    coeffs = torch.from_numpy(trajectory.coefficients(g))
    one = lambda v: torch.tensor([[v]], dtype=torch.float64)  # noqa: E731
    got_x1, got_m0 = generation_step_reference(one(eps_u), one(eps_c), one(x), one(0.0), one(z), coeffs[0:1].double())
    got_x2, _ = generation_step_reference(one(eps_u2), one(eps_c2), got_x1, got_m0, one(z2), coeffs[1:2].double())
    assert got_m0.item() == pytest.approx(m0, rel=1e-6)
    assert got_x1.item() == pytest.approx(x1, rel=1e-6)
    assert got_x2.item() == pytest.approx(x2, rel=1e-6)
    # The inversion step recovers the noise that generation then adds.
    noise, _ = inversion_step_reference(one(eps_u), one(eps_c), one(x), one(0.0), got_x1, coeffs[0:1].double())
    assert noise.item() == pytest.approx(z, rel=1e-6)


def test_final_step_goes_to_discrete_t0_second_order():
    """t = 1 -> the training schedule's t = 0 (sigma_0 = sqrt(beta_0)), not sigma = 0, second order."""
    alphas_cumprod = scaled_linear_alphas_cumprod()
    trajectory = build_trajectory(alphas_cumprod, steps=100, skip=0.7)
    assert trajectory.timesteps[-1] == 1
    final = trajectory.base_coeffs[-1]
    # The research scheduler's last step, as the audit measured it (issue 11).
    assert final[3] == pytest.approx(0.4986, abs=1e-4)  # mean_from_x
    assert final[4] == pytest.approx(0.6899, abs=1e-4)  # mean_from_m
    assert final[5] == pytest.approx(-0.1885, abs=1e-4)  # mean_from_m1: second order
    assert final[6] == pytest.approx(0.0206, abs=1e-4)  # noise scale: sigma_0 > 0
    # sigma_0 itself, from the betas: sqrt(1 - alpha_bar_0) = sqrt(beta_0) = sqrt(0.00085).
    sigma_0 = math.sqrt(1 - alphas_cumprod[0])
    assert sigma_0 == pytest.approx(math.sqrt(0.00085)) and sigma_0 == pytest.approx(0.0292, abs=1e-4)
    # A one-step run has no history: first order, still to t = 0.
    single = build_trajectory(alphas_cumprod, steps=1, skip=0.7).base_coeffs[0]
    assert single[5] == 0 and single[6] > 0


def test_a_skip_that_leaves_no_timestep_above_zero_is_rejected():
    with pytest.raises(ValueError, match="no timestep above 0"):
        inversion_timesteps(1, 0.9995)


# ---- the reconstruction invariant --------------------------------------------------------
#
# With id_emb_scale 0 and no attribute prompt, generation's conditioning equals the inversion's,
# so generation retraces the inversion's fixed latents x_{t_i} to x_0 exactly in exact arithmetic
# (docs/design.md, "The reconstruction invariant"). In floating point every step rounds (the
# solver, and the UNet, whose output for one sample moves by a few ulp with the batch it is in),
# and the steps amplify such differences: ~(1 - g) sigma_s/alpha_s through a random UNet's
# Jacobian, ~1e5 over a whole trajectory for g = -10 on the tiny weights. So the invariant is
# checked where rounding is negligible, float64 (UNet, job state and solver), to 1e-9; and the
# float32 engine is checked against the same amplification: its error is the float64 error
# scaled by the ratio of the unit roundoffs, 2^-24 / 2^-53 = 2^29, within a spread factor.

RECONSTRUCTION_CASES = [  # (seed, skip, steps, guidance)
    (0, 0.7, 10, -10.0),
    (1, 0.3, 6, -10.0),
    (123, 0.0, 5, -10.0),  # from pure noise (t = 999): the most amplifying trajectory
    (5, 0.9, 4, -10.0),
    (2, 0.5, 8, -7.5),
    (3, 0.7, 8, 0.0),  # no guidance: eps_u + 0 (eps_c - eps_u) is eps_u exactly
]
# Measured (one thread, as the tests run them; two threads within 2x): float64 max 2.0e-11
# (case 123), float32 3.3e-2.
FLOAT64_BOUND = 1e-9
# float32 / (2^29 float64), per job, norm-relative: 0.56-1.1 for the first job of the pair,
# up to 10.5 for the second (its rows sit at other batch positions in inversion and generation
# calls, so more of its UNet outputs move by an ulp), over 9 trajectories and 1 or 2 threads.
FLOAT32_SPREAD = 30.0
UNIT_ROUNDOFF_RATIO = 2.0**29


@pytest.fixture
def one_thread():
    """One intra-op thread while a reconstruction runs: its roundings then do not depend on the machine's
    core count, and a float64 run does not stall on a loaded 2-core machine (measured: 2.5 s with one
    thread, 11-41 s with two while other tests ran)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def core64(tiny_model_dir):
    """The same tiny weights through the same loader in float64: the whole trajectory runs in float64."""
    from masquerade.models.loader import load_models

    return DiffusionCore(load_models(tiny_model_dir, device="cpu", dtype=torch.float64))


def reconstruct(core, faces, seed, skip, steps, guidance):
    """Both faces as one request's jobs, batched (chunks of 3 inversion steps, 4 CFG pairs a call)."""
    _, clean, identities = faces
    params = ReversePersonalizationParams(seed=seed, skip=skip, steps=steps, guidance_scale=guidance, id_emb_scale=0.0)
    jobs = [core.make_job("r", i, clean[i], identities[i], params) for i in range(2)]
    return run_jobs(core, jobs, max_batch=8, chunk=3)


def per_face_error(final: torch.Tensor, clean: torch.Tensor) -> list[float]:
    """||x_final - x_0|| / ||x_0|| per face, in float64."""
    return [float((f.double() - c.double()).norm() / c.double().norm()) for f, c in zip(final, clean)]


@pytest.fixture(scope="module")
def float64_reconstructions(core64, faces):
    cache = {}

    def run(case):
        if case not in cache:
            cache[case] = reconstruct(core64, faces, *case)
        return cache[case]

    return run


@pytest.mark.parametrize("case", RECONSTRUCTION_CASES, ids=lambda c: "seed{}-skip{}-N{}-g{}".format(*c))
def test_zero_identity_reproduces_input_in_float64(core64, faces, float64_reconstructions, case, one_thread):
    """The invariant itself: float64 end to end reproduces x_0 to rounding, through the batched engine."""
    _, clean, _ = faces
    final = float64_reconstructions(case)
    assert final.dtype == torch.float64  # job state and solver follow the models' float64
    assert relative_error(final, clean.double()) < FLOAT64_BOUND
    # And so the decoded image is the VAE round trip of the input, to the level.
    assert np.array_equal(core64.decode(final), core64.decode(clean))


@pytest.mark.parametrize("case", RECONSTRUCTION_CASES, ids=lambda c: "seed{}-skip{}-N{}-g{}".format(*c))
def test_zero_identity_reproduces_input(core, faces, float64_reconstructions, case, one_thread):
    """The float32 engine (the CPU/CUDA state dtype) is as exact as float32 rounding allows."""
    _, clean, _ = faces
    final = reconstruct(core, faces, *case)
    assert final.dtype == torch.float32
    errors32 = per_face_error(final, clean)
    errors64 = per_face_error(float64_reconstructions(case), clean)
    for face, (e32, e64) in enumerate(zip(errors32, errors64)):
        # An fp16 rounding anywhere in the state would be 2^13 times larger; a solver that is not an
        # exact inverse of itself, O(1).
        assert e32 <= FLOAT32_SPREAD * UNIT_ROUNDOFF_RATIO * e64, f"face {face}: float32 {e32:.3g}, float64 {e64:.3g}"
    # The image: the latent error through the decoder, ~400 levels per unit of relative latent
    # error on these weights (measured: 13 levels max at 3.4e-2), plus one for the uint8 rounding.
    pixel_error = np.abs(core.decode(final).astype(int) - core.decode(clean).astype(int))
    latent_error = relative_error(final, clean)
    assert pixel_error.max() <= 1 + 1000 * latent_error and pixel_error.mean() <= 0.5 + 100 * latent_error


def test_kernel_path_equals_reference_path_in_the_engine(core, faces, monkeypatch, one_thread):
    """The fused Triton step (CUDA's path; Triton's interpreter here) gives the engine bit for bit
    what the PyTorch reference gives (CPU's path): same operations, same order, no FMA."""
    pytest.importorskip("triton")
    from masquerade.engine import solver
    from masquerade_kernels import guidance_step

    case = (123, 0.0, 5, -10.0)
    reference_final = reconstruct(core, faces, *case)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert guidance_step.guidance_step_available(torch.device("cpu"))
    launches = []

    def counted(step):
        def launch(*args):
            launches.append(args[2].shape[0])
            return step(*args)

        return launch

    # The engine's CUDA choice, made on the CPU: the kernels wherever the state is float32.
    monkeypatch.setattr(solver, "_fused", lambda x, coeffs: coeffs.dtype == torch.float32)
    monkeypatch.setattr(guidance_step, "generation_step", counted(guidance_step.generation_step))
    monkeypatch.setattr(guidance_step, "inversion_step", counted(guidance_step.inversion_step))
    kernel_final = reconstruct(core, faces, *case)
    assert len(launches) >= 2 * 5 and torch.equal(kernel_final, reference_final)


def test_identity_moves_the_output_away_from_the_input(core, faces):
    crops, clean, identities = faces
    params = ReversePersonalizationParams(steps=6, id_emb_scale=1.0)
    jobs = [core.make_job("r", i, clean[i], identities[i], params) for i in range(2)]
    final = run_jobs(core, jobs)
    assert relative_error(final, clean) > 1.0


def test_attribute_prompt_changes_the_output(core, faces):
    crops, clean, identities = faces
    plain = ReversePersonalizationParams(steps=5, id_emb_scale=0.0)
    prompted = ReversePersonalizationParams(steps=5, id_emb_scale=0.0, attribute_prompt="an old woman")
    a = run_jobs(core, [core.make_job("r", 0, clean[0], identities[0], plain)])
    b = run_jobs(core, [core.make_job("r", 0, clean[0], identities[0], prompted)])
    assert relative_error(b, a) > 0.01


def test_same_seed_gives_the_same_output(core, faces):
    _, clean, identities = faces
    params = ReversePersonalizationParams(steps=5, seed=11)
    a = run_jobs(core, [core.make_job("r", 0, clean[0], identities[0], params)])
    b = run_jobs(core, [core.make_job("r", 0, clean[0], identities[0], params)])
    assert torch.equal(a, b)


def test_different_seeds_give_different_outputs(core, faces):
    _, clean, identities = faces
    a = run_jobs(core, [core.make_job("r", 0, clean[0], identities[0], ReversePersonalizationParams(steps=5, seed=1))])
    b = run_jobs(core, [core.make_job("r", 0, clean[0], identities[0], ReversePersonalizationParams(steps=5, seed=2))])
    assert relative_error(a, b) > 0.01


# ---- batched engine against a plain sequential oracle -----------------------------------------


def sequential_oracle(core, clean, identity, params):
    """DESIGN section 1 re-derived from its formulas: one CFG pair per UNet call, step after step.

    This is the project's own algorithm written plainly (plain diffusers UNet calls, no packing,
    no per-row coefficient table, no chunked history term), the oracle for the *batched* engine.
    It is not the research code; parity with the research's solver is checked against diffusers'
    own scheduler in the test_research_parity_* tests below.
    """
    models = core.models
    unet = models.unet
    alphas_cumprod = models.alphas_cumprod.double()
    timesteps = inversion_timesteps(params.steps, params.skip)
    generator = torch.Generator().manual_seed(face_noise_seed(params.seed, 0))
    noise = torch.randn((params.steps,) + tuple(clean.shape), generator=generator)
    x0 = clean.float()

    def coefficients(t):
        a = alphas_cumprod[t].sqrt().item()
        return a, math.sqrt(1 - alphas_cumprod[t].item())

    xs = [coefficients(t)[0] * x0 + coefficients(t)[1] * noise[i] for i, t in enumerate(timesteps)] + [x0]
    empty, empty_pooled = core.conditioning.get("")
    zero, zero_pooled = torch.zeros_like(empty), torch.zeros_like(empty_pooled)
    attr = (
        core.conditioning.get(params.attribute_prompt) if params.attribute_prompt is not None else (zero, zero_pooled)
    )
    size = models.face_size
    time_ids = torch.tensor([[size, size, 0, 0, size, size]] * 2, dtype=torch.float32)

    def eps(x, t, uncond, cond_id):
        out = unet(
            torch.stack([x, x]),
            torch.tensor([int(t)] * 2),
            encoder_hidden_states=torch.stack([uncond[0], empty]),
            added_cond_kwargs={
                "text_embeds": torch.stack([uncond[1], empty_pooled]),
                "time_ids": time_ids,
                "image_embeds": [torch.stack([torch.zeros(512), cond_id])[:, None]],
            },
        ).sample
        return out[0] + params.guidance_scale * (out[1] - out[0])

    def mean(i, x, e, m_prev):
        a_s, s_s = coefficients(timesteps[i])
        m = (x - s_s * e) / a_s
        # The last step lands on the discrete t = 0 of the training schedule.
        a_t, s_t = coefficients(timesteps[i + 1] if i + 1 < len(timesteps) else 0)
        lam = lambda a, s: math.log(a) - math.log(s)  # noqa: E731
        h = lam(a_t, s_t) - lam(a_s, s_s)
        data = m
        if m_prev is not None:
            a_p, s_p = coefficients(timesteps[i - 1])
            r = (lam(a_s, s_s) - lam(a_p, s_p)) / h
            data = m + 0.5 * (m - m_prev) / r
        mu = (s_t / s_s) * math.exp(-h) * x + a_t * (1 - math.exp(-2 * h)) * data
        return mu, m, s_t * math.sqrt(1 - math.exp(-2 * h))

    with torch.inference_mode():
        zs, m_prev = [], None
        for i, t in enumerate(timesteps):
            mu, m_prev, scale = mean(i, xs[i], eps(xs[i], t, (zero, zero_pooled), torch.zeros(512)), m_prev)
            zs.append((xs[i + 1] - mu) / scale)
        x, m_prev = xs[0], None
        identity_scaled = params.id_emb_scale * identity.float()
        for i, t in enumerate(timesteps):
            mu, m_prev, scale = mean(i, x, eps(x, t, attr, identity_scaled), m_prev)
            x = mu + scale * zs[i]
    return torch.stack(zs), x


@pytest.mark.parametrize("chunk", [1, 3, 8])
def test_batched_inversion_equals_sequential_oracle(core, faces, chunk):
    _, clean, identities = faces
    params = ReversePersonalizationParams(steps=7, skip=0.6, seed=3, attribute_prompt="an old man")
    oracle_noise, oracle_final = sequential_oracle(core, clean[0], identities[0], params)
    job = core.make_job("r", 0, clean[0], identities[0], params)
    scheduler = StepScheduler(max_batch=16, inversion_chunk=chunk)
    scheduler.add([job])
    while job.status is JobStatus.INVERTING:
        scheduler.update(core.runner.run(scheduler.plan()))
    assert relative_error(job.noise_maps, oracle_noise) < 5e-3
    while (plan := scheduler.plan()) is not None:
        scheduler.update(core.runner.run(plan))
    assert relative_error(job.latent, oracle_final) < 5e-3


def test_a_job_in_a_mixed_batch_equals_the_job_alone(core, faces):
    """15 other jobs at other timesteps, guidance, prompts and step counts share the calls."""
    _, clean, identities = faces
    params = ReversePersonalizationParams(steps=6, seed=4)
    alone = run_jobs(core, [core.make_job("r", 0, clean[0], identities[0], params)])
    others = [
        core.make_job(
            f"o{k}",
            k,
            clean[k % 2],
            identities[(k + 1) % 2],
            ReversePersonalizationParams(
                steps=3 + k % 5, seed=k, guidance_scale=-5.0 - k, attribute_prompt="a child" if k % 3 else None
            ),
        )
        for k in range(15)
    ]
    target = core.make_job("r", 0, clean[0], identities[0], params)
    mixed = run_jobs(core, others[:7] + [target] + others[7:], max_batch=32, chunk=4)
    assert relative_error(mixed[7], alone[0]) < 5e-3


def test_jobs_with_different_ip_adapter_scales_share_calls_and_match_alone(core, faces):
    _, clean, identities = faces
    half = ReversePersonalizationParams(steps=5, ip_adapter_scale=0.5)
    full = ReversePersonalizationParams(steps=5, ip_adapter_scale=1.0)
    alone_half = run_jobs(core, [core.make_job("a", 0, clean[0], identities[0], half)])
    alone_full = run_jobs(core, [core.make_job("b", 0, clean[0], identities[0], full)])
    assert relative_error(alone_half, alone_full) > 0.01  # the scale matters
    jobs = [core.make_job("a", 0, clean[0], identities[0], half), core.make_job("b", 0, clean[0], identities[0], full)]
    scheduler = StepScheduler(max_batch=16, inversion_chunk=8)
    scheduler.add(jobs)
    assert {piece.job.job_id for piece in scheduler.plan().slices} == {job.job_id for job in jobs}
    mixed = run_jobs(
        core,
        [core.make_job("a", 0, clean[0], identities[0], half), core.make_job("b", 0, clean[0], identities[0], full)],
    )
    assert relative_error(mixed[0], alone_half[0]) < 5e-3
    assert relative_error(mixed[1], alone_full[0]) < 5e-3


# ---- the explicit empty attribute prompt ----------------------------------------------------


def test_explicit_empty_attribute_prompt_is_encoded_not_zeroed(core, faces):
    """As in the research code: unset -> zeros (c_zero); "" -> the encoders on "" (c_empty)."""
    from masquerade.api import convert
    from masquerade.api.protos import pb2

    defaults = ReversePersonalizationParams()
    assert convert.params_from_proto(pb2.ReversePersonalizationParams(), defaults).attribute_prompt is None
    explicit = convert.params_from_proto(pb2.ReversePersonalizationParams(attribute_prompt=""), defaults)
    assert explicit.attribute_prompt == ""
    assert not convert.params_to_proto(defaults).HasField("attribute_prompt")

    _, clean, identities = faces
    unset = ReversePersonalizationParams(steps=3, id_emb_scale=0.0)
    empty = ReversePersonalizationParams(steps=3, id_emb_scale=0.0, attribute_prompt="")
    a = run_jobs(core, [core.make_job("r", 0, clean[0], identities[0], unset)])
    b = run_jobs(core, [core.make_job("r", 0, clean[0], identities[0], empty)])
    assert relative_error(a, clean[:1]) < 3e-2  # unset: generation retraces the inversion
    assert relative_error(b, a) > 0.01  # "": the uncond half is c_empty, not zeros


# ---- parity with the research code (diffusers' DPM-Solver++ as an independent oracle) ---------


def research_scheduler(core, timesteps):
    """diffusers' own DPMSolverMultistepScheduler, configured as the research code steps it."""
    from diffusers import DPMSolverMultistepScheduler

    scheduler = DPMSolverMultistepScheduler.from_config(
        core.models.pipe.scheduler.config,
        algorithm_type="sde-dpmsolver++",
        solver_order=2,
        final_sigmas_type="sigma_min",
        lower_order_final=False,
        euler_at_final=False,
    )
    scheduler.set_timesteps(timesteps=[int(t) for t in timesteps])
    return scheduler


class ResearchConditioning:
    """The research pipeline's CFG pair, assembled from the diffusers pipeline itself.

    Inversion: prompt "" with no negative prompt (zeros, force_zeros_for_empty_prompt), both
    identities zero. Generation: prompt "", negative prompt = the attribute prompt (None -> zeros),
    identity (0, s_id e). One CFG pair per call through the engine's prepared UNet function.
    """

    def __init__(self, core, params, identity):
        self.core, self.params = core, params
        pipe = core.models.pipe
        with torch.inference_mode():
            inv = pipe.encode_prompt("", device="cpu", do_classifier_free_guidance=True, negative_prompt=None)
            gen = pipe.encode_prompt(
                "", device="cpu", do_classifier_free_guidance=True, negative_prompt=params.attribute_prompt
            )
        # encode_prompt returns (cond, uncond, cond_pooled, uncond_pooled).
        self.inversion = (torch.cat([inv[1], inv[0]]), torch.cat([inv[3], inv[2]]), torch.zeros(2, 1, 512))
        ids = torch.stack([torch.zeros(512), params.id_emb_scale * identity.float()])[:, None]
        self.generation = (torch.cat([gen[1], gen[0]]), torch.cat([gen[3], gen[2]]), ids)
        size = core.models.face_size
        self.time_ids = torch.tensor([[size, size, 0, 0, size, size]] * 2, dtype=torch.float32)

    @torch.inference_mode()
    def eps(self, phase, x, t):
        text, pooled, ids = self.inversion if phase == "inversion" else self.generation
        scales = torch.full((2,), self.params.ip_adapter_scale)
        out = self.core.runner.unet_fn(
            torch.stack([x, x]), torch.tensor([int(t)] * 2), text, pooled, self.time_ids, ids, scales
        )
        return out[:1] + self.params.guidance_scale * (out[1:] - out[:1])


def engine_trajectory(core, clean, identity, params):
    """Run one job one CFG pair per UNet call; return (x_{t_i} and x_0, noise maps, generation latents)."""
    job = core.make_job("r", 0, clean, identity, params)
    noisy = job.noisy_latents.clone()
    scheduler = StepScheduler(max_batch=2, inversion_chunk=1)
    scheduler.add([job])
    noise_maps, latents = None, []
    while (plan := scheduler.plan()) is not None:
        generating = job.status is JobStatus.GENERATING
        scheduler.update(core.runner.run(plan))
        if generating:
            latents.append(job.latent.clone())
        elif job.status is JobStatus.GENERATING and noise_maps is None:
            noise_maps = job.noise_maps.clone()
    assert job.status is JobStatus.DECODED and len(latents) == params.steps
    return noisy, noise_maps, latents


def parity_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """||got - expected|| / ||expected||: the relative error of a whole latent."""
    return float((got.double() - expected.double()).norm() / expected.double().norm())


PARITY_CASES = {
    "prompt": ReversePersonalizationParams(steps=6, skip=0.6, seed=5, attribute_prompt="an old man"),
    "research-noise": ReversePersonalizationParams(steps=5, skip=0.7, seed=2, noise="research", guidance_scale=-7.5),
    "empty-prompt": ReversePersonalizationParams(steps=4, skip=0.3, seed=9, attribute_prompt="", ip_adapter_scale=0.5),
}


@pytest.fixture(scope="module")
def parity_runs(core, faces):
    """One engine run per case, shared by the generation and inversion parity tests.

    The clean latent is scaled to unit variance, as SDXL's scaled latents are: the tiny VAE's are
    ~0.03, which would make the last steps' targets (x_{t=1}, x_0) tiny next to x_{t_i} and turn
    float32 round-off into a large relative error on both sides.
    """
    _, clean, identities = faces
    x0 = clean[0] / clean[0].std()
    cache = {}

    def run(case):
        if case not in cache:
            cache[case] = engine_trajectory(core, x0, identities[0], PARITY_CASES[case])
        return cache[case]

    return run


# fp32 arithmetic on both sides (diffusers computes its coefficients in float32, the engine in
# float64 then rounds them), amplified by |g| through a random UNet: ~1e-6 typical, 1e-5 bound.
PARITY_TOLERANCE = 1e-5


@pytest.mark.parametrize("case", PARITY_CASES)
def test_research_parity_generation_trajectory(core, faces, parity_runs, case):
    """diffusers' scheduler, stepped from x_{t_0} with the engine's noise maps, retraces every generation step."""
    params = PARITY_CASES[case]
    noisy, noise_maps, latents = parity_runs(case)
    conditioning = ResearchConditioning(core, params, faces[2][0])
    timesteps = inversion_timesteps(params.steps, params.skip)
    scheduler = research_scheduler(core, timesteps)
    x = noisy[0][None]  # the research's init_latents: the inversion's first noisy latent
    for i, t in enumerate(timesteps):
        eps = conditioning.eps("generation", x[0], t)
        x = scheduler.step(eps, int(t), x, variance_noise=noise_maps[i][None]).prev_sample
        assert parity_error(latents[i], x[0]) < PARITY_TOLERANCE, f"step {i} (t={t})"


@pytest.mark.parametrize("case", PARITY_CASES)
def test_research_parity_inversion_noise_maps(core, faces, parity_runs, case):
    """Each inversion step: diffusers' step from x_{t_i} with the engine's z_i lands on x_{t_{i+1}}
    (x_0 after t = 1), and the noise map diffusers' step implies equals the engine's."""
    params = PARITY_CASES[case]
    noisy, noise_maps, _ = parity_runs(case)
    conditioning = ResearchConditioning(core, params, faces[2][0])
    timesteps = inversion_timesteps(params.steps, params.skip)
    scheduler = research_scheduler(core, timesteps)
    for i, t in enumerate(timesteps):
        x, target = noisy[i][None], noisy[i + 1][None]
        eps = conditioning.eps("inversion", x[0], t)
        # The step is affine in the noise: its mean from z = 0, varsigma from z = 1.
        mean = copy.deepcopy(scheduler).step(eps, int(t), x, variance_noise=torch.zeros_like(x)).prev_sample
        scale = copy.deepcopy(scheduler).step(eps, int(t), x, variance_noise=torch.ones_like(x)).prev_sample - mean
        landed = scheduler.step(eps, int(t), x, variance_noise=noise_maps[i][None]).prev_sample
        assert parity_error(landed, target) < PARITY_TOLERANCE, f"step {i} (t={t})"
        assert parity_error(noise_maps[i][None], (target - mean) / scale) < PARITY_TOLERANCE, f"step {i} (t={t})"


def test_research_parity_noise_draws(core, faces):
    """--noise research draws what the research code draws: one CPU generator seeded with the seed,
    float16 [1, C, h, w] per timestep from t = 1 upward (diffusers' randn_tensor), for every face."""
    from diffusers.utils.torch_utils import randn_tensor

    _, clean, identities = faces
    params = ReversePersonalizationParams(steps=6, skip=0.7, seed=1234, noise="research")
    timesteps = inversion_timesteps(params.steps, params.skip)
    generator = torch.Generator(device="cpu").manual_seed(params.seed)
    expected = torch.zeros((params.steps,) + tuple(clean[0].shape))
    for k, t in enumerate(reversed(timesteps)):
        draw = randn_tensor((1,) + tuple(clean[0].shape), generator=generator, device="cpu", dtype=torch.float16)
        assert draw.dtype == torch.float16
        expected[params.steps - 1 - k] = draw[0].float()
    for face_index in (0, 3):  # re-seeded per face: every face gets the same draws
        got = inversion_noise(params.seed, face_index, "research", params.steps, tuple(clean[0].shape))
        assert torch.equal(got, expected)
    # x_{t_i} = sqrt(alpha_bar) x_0 + sqrt(1 - alpha_bar) eps_i, the research scheduler's add_noise.
    alphas_cumprod = core.models.pipe.scheduler.alphas_cumprod.double()
    job = core.make_job("r", 0, clean[0], identities[0], params)
    for i, t in enumerate(timesteps):
        a, s = alphas_cumprod[t].sqrt(), (1 - alphas_cumprod[t]).sqrt()
        torch.testing.assert_close(job.noisy_latents[i].double(), a * clean[0].double() + s * expected[i].double())
    assert torch.equal(job.noisy_latents[-1], clean[0])


def test_per_face_noise_differs_between_faces_and_is_reproducible():
    shape = (4, 8, 8)
    a = inversion_noise(7, 0, "per_face", 5, shape)
    assert torch.equal(a, inversion_noise(7, 0, "per_face", 5, shape))
    assert a.dtype == torch.float32 and a.shape == (5,) + shape
    b = inversion_noise(7, 1, "per_face", 5, shape)
    assert abs(float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])) < 0.1
    with pytest.raises(ValueError, match="noise mode"):
        inversion_noise(7, 0, "other", 5, shape)
    with pytest.raises(Exception, match="params.noise"):
        ReversePersonalizationParams(noise="other").validated()
