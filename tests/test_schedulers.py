"""Parity with diffusers' DDPM, DDIM and DPM-Solver++ schedulers for eps and v prediction, the forward process in
closed form, and the CFG++ variant of DDIM."""

from __future__ import annotations

import math

import pytest
import torch

from cfg_minimal.schedulers import (
    SCHEDULERS,
    DDIMCFGPPScheduler,
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    make_betas,
)

diffusers = pytest.importorskip("diffusers")

SCHEDULES = ["linear", "squaredcos_cap_v2"]
SPACINGS = ["leading", "trailing"]


def trajectory_inputs(n: int, seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 1, 8, 8, generator=g)
    return x, [torch.randn(2, 1, 8, 8, generator=g) for _ in range(n)]


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_betas_match_diffusers(schedule):
    ref = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule=schedule)
    torch.testing.assert_close(make_betas(1000, schedule), ref.betas, rtol=0, atol=0)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("num_steps", [10, 50])
def test_ddim_eta0_trajectory_matches_diffusers(schedule, spacing, clip, num_steps):
    kw = dict(num_train_timesteps=1000, beta_schedule=schedule, timestep_spacing=spacing, clip_sample=clip)
    ours, ref = DDIMScheduler(**kw), diffusers.DDIMScheduler(**kw)
    ours.set_timesteps(num_steps)
    ref.set_timesteps(num_steps)
    assert ours.timesteps.tolist() == ref.timesteps.tolist()
    x, eps_list = trajectory_inputs(num_steps)
    x_ours, x_ref = x.clone(), x.clone()
    for t, eps in zip(ours.timesteps, eps_list):  # eps stands in for a network's output
        out, out_ref = ours.step(eps, t, x_ours), ref.step(eps, t, x_ref)
        torch.testing.assert_close(out.pred_original_sample, out_ref.pred_original_sample, rtol=1e-5, atol=1e-5)
        x_ours, x_ref = out.prev_sample, out_ref.prev_sample
        torch.testing.assert_close(x_ours, x_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("set_alpha_to_one", [True, False])
def test_ddim_eta1_and_final_alpha_match_diffusers(set_alpha_to_one):
    kw = dict(num_train_timesteps=1000, set_alpha_to_one=set_alpha_to_one, steps_offset=1)
    ours, ref = DDIMScheduler(**kw), diffusers.DDIMScheduler(**kw)
    ours.set_timesteps(20)
    ref.set_timesteps(20)
    assert ours.timesteps.tolist() == ref.timesteps.tolist()
    x, eps_list = trajectory_inputs(20, seed=1)
    for t, eps in zip(ours.timesteps, eps_list):
        a = ours.step(eps, t, x, eta=1.0, generator=torch.Generator().manual_seed(int(t))).prev_sample
        b = ref.step(eps, t, x, eta=1.0, generator=torch.Generator().manual_seed(int(t))).prev_sample
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("spacing", SPACINGS)
def test_ddpm_posterior_mean_and_variance_match_diffusers(schedule, spacing):
    """With the same noise, our DDPM step equals diffusers'; with zero noise the step is the
    posterior mean, so the two together pin both the mean and the variance."""
    kw = dict(num_train_timesteps=1000, beta_schedule=schedule, timestep_spacing=spacing)
    ours, ref = DDPMScheduler(**kw), diffusers.DDPMScheduler(**kw)
    ours.set_timesteps(25)
    ref.set_timesteps(25)
    assert ours.timesteps.tolist() == ref.timesteps.tolist()
    x, eps_list = trajectory_inputs(25, seed=2)
    for t, eps in zip(ours.timesteps, eps_list):
        a = ours.step(eps, t, x, generator=torch.Generator().manual_seed(int(t)))
        b = ref.step(eps, t, x, generator=torch.Generator().manual_seed(int(t)))
        torch.testing.assert_close(a.prev_sample, b.prev_sample, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.pred_original_sample, b.pred_original_sample, rtol=1e-5, atol=1e-5)
        coef_x0, coef_xt, variance = ours._posterior(int(t))
        torch.testing.assert_close(variance, ref._get_variance(t).clamp(min=1e-20), rtol=1e-5, atol=1e-12)
        x = a.prev_sample


def test_ddpm_full_chain_matches_diffusers_without_set_timesteps():
    ours, ref = DDPMScheduler(num_train_timesteps=50), diffusers.DDPMScheduler(num_train_timesteps=50)
    x, eps_list = trajectory_inputs(50, seed=3)
    for t, eps in zip(range(49, -1, -1), eps_list):
        a = ours.step(eps, t, x, generator=torch.Generator().manual_seed(t)).prev_sample
        b = ref.step(eps, t, x, generator=torch.Generator().manual_seed(t)).prev_sample
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        x = a


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_add_noise_is_the_closed_form(schedule):
    sched = DDPMScheduler(beta_schedule=schedule)
    x0, noise = torch.randn(4, 1, 6, 6), torch.randn(4, 1, 6, 6)
    t = torch.tensor([0, 10, 500, 999])
    abar = torch.cumprod(1 - make_betas(1000, schedule).double(), 0)[t].view(-1, 1, 1, 1)
    expected = abar.sqrt() * x0.double() + (1 - abar).sqrt() * noise.double()
    torch.testing.assert_close(sched.add_noise(x0, noise, t), expected.float(), rtol=1e-5, atol=1e-5)
    ref = diffusers.DDPMScheduler(beta_schedule=schedule)
    torch.testing.assert_close(sched.add_noise(x0, noise, t), ref.add_noise(x0, noise, t), rtol=1e-6, atol=1e-6)


def test_aligned_grid_halves_exactly_from_the_same_top():
    aligned, leading = DDIMScheduler(timestep_spacing="aligned"), DDIMScheduler(timestep_spacing="leading")
    aligned.set_timesteps(64), leading.set_timesteps(64)
    assert aligned.timesteps.tolist() == [i * 1000 // 64 for i in range(63, -1, -1)]  # 984, 968, ..., 15, 0
    for n in (64, 32, 16, 8, 4):
        aligned.set_timesteps(n)
        fine = aligned.timesteps.clone()
        aligned.set_timesteps(n // 2)
        assert torch.equal(aligned.timesteps, fine[0::2])  # one halved step spans exactly two, from t = 984
    grid = aligned.timesteps.tolist()
    assert [aligned.previous_timestep(t) for t in grid] == grid[1:] + [-1]  # each step to the next grid point
    with pytest.raises(ValueError, match="dividing 64"):
        aligned.set_timesteps(50)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="beta_schedule"):
        DDIMScheduler(beta_schedule="quadratic")
    with pytest.raises(ValueError, match="timestep_spacing"):
        DDIMScheduler(timestep_spacing="middle")
    with pytest.raises(ValueError, match="num_inference_steps"):
        DDIMScheduler().set_timesteps(0)
    with pytest.raises(ValueError, match="prediction_type"):
        DDIMScheduler(prediction_type="sample")


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("num_steps", [4, 10, 20])
@pytest.mark.parametrize("lambda_min_clipped", [-math.inf, -5.1])
def test_dpm_solver_trajectory_matches_diffusers(schedule, spacing, num_steps, lambda_min_clipped):
    """DPM-Solver++(2M), unclipped, against diffusers' DPMSolverMultistepScheduler at every step. The
    eps here are random, not a network's, so the cosine schedule's noisiest steps blow the trajectory
    up (x0 = (x - sigma eps) / alpha with alpha_999 = 0.00005): the tolerance is relative to its scale."""
    kw = dict(num_train_timesteps=1000, beta_schedule=schedule, timestep_spacing=spacing,
              lambda_min_clipped=lambda_min_clipped)  # fmt: skip
    ours, ref = DPMSolverMultistepScheduler(**kw, clip_sample=False), diffusers.DPMSolverMultistepScheduler(**kw)
    for _ in range(2):  # the second round checks that set_timesteps resets the multistep state
        ours.set_timesteps(num_steps)
        ref.set_timesteps(num_steps)
        assert ours.timesteps.tolist() == ref.timesteps.tolist()
        x, eps_list = trajectory_inputs(num_steps, seed=num_steps)
        x_ours, x_ref = x.clone(), x.clone()
        for t, eps in zip(ours.timesteps, eps_list):
            x_ours, x_ref = ours.step(eps, t, x_ours).prev_sample, ref.step(eps, t, x_ref).prev_sample
            torch.testing.assert_close(x_ours, x_ref, rtol=1e-4, atol=1e-5 * float(x_ref.abs().max()))


def test_dpm_solver_first_step_is_ddim():
    """With no earlier x0 the update is first order, x' = (sigma'/sigma) x - alpha' (exp(-h) - 1) x0, which
    is DDIM's x' = alpha' x0 + sigma' eps (eta = 0) written in lambda: the two must agree."""
    dpm = DPMSolverMultistepScheduler(beta_schedule="squaredcos_cap_v2", timestep_spacing="trailing")
    ddim = DDIMScheduler(beta_schedule="squaredcos_cap_v2", timestep_spacing="trailing")
    dpm.set_timesteps(10)
    ddim.set_timesteps(10)
    x, (eps,) = trajectory_inputs(1, seed=3)
    t = int(dpm.timesteps[0])
    torch.testing.assert_close(dpm.step(eps, t, x).prev_sample,
                               ddim.step(eps, t, x, use_clipped_model_output=True).prev_sample,
                               rtol=1e-4, atol=1e-4)  # fmt: skip


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("use_clipped", [False, True])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_v_prediction_matches_diffusers(schedule, clip, use_clipped, eta):
    kw = dict(num_train_timesteps=1000, beta_schedule=schedule, clip_sample=clip, prediction_type="v_prediction")
    ours, ref = DDIMScheduler(**kw), diffusers.DDIMScheduler(**kw)
    ours.set_timesteps(10)
    ref.set_timesteps(10)
    x, v_list = trajectory_inputs(10, seed=4)
    x_ours, x_ref = x.clone(), x.clone()
    for t, v in zip(ours.timesteps, v_list):  # v stands in for a v-prediction network's output
        step = dict(eta=eta, use_clipped_model_output=use_clipped)
        out = ours.step(v, t, x_ours, **step, generator=torch.Generator().manual_seed(int(t)))
        out_ref = ref.step(v, t, x_ref, **step, generator=torch.Generator().manual_seed(int(t)))
        torch.testing.assert_close(out.pred_original_sample, out_ref.pred_original_sample, rtol=1e-5, atol=1e-5)
        x_ours, x_ref = out.prev_sample, out_ref.prev_sample
        torch.testing.assert_close(x_ours, x_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_ddpm_v_prediction_matches_diffusers(schedule):
    kw = dict(num_train_timesteps=1000, beta_schedule=schedule, prediction_type="v_prediction")
    ours, ref = DDPMScheduler(**kw), diffusers.DDPMScheduler(**kw)
    ours.set_timesteps(25)
    ref.set_timesteps(25)
    x, v_list = trajectory_inputs(25, seed=5)
    for t, v in zip(ours.timesteps, v_list):
        a = ours.step(v, t, x, generator=torch.Generator().manual_seed(int(t)))
        b = ref.step(v, t, x, generator=torch.Generator().manual_seed(int(t)))
        torch.testing.assert_close(a.prev_sample, b.prev_sample, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.pred_original_sample, b.pred_original_sample, rtol=1e-5, atol=1e-5)
        x = a.prev_sample


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("num_steps", [4, 10])
def test_dpm_solver_v_prediction_matches_diffusers(schedule, num_steps):
    """v keeps x0 = alpha x - sigma v bounded, so no step blows up: the tolerance of the DDIM tests."""
    kw = dict(num_train_timesteps=1000, beta_schedule=schedule, prediction_type="v_prediction")
    ours, ref = DPMSolverMultistepScheduler(**kw, clip_sample=False), diffusers.DPMSolverMultistepScheduler(**kw)
    ours.set_timesteps(num_steps)
    ref.set_timesteps(num_steps)
    x, v_list = trajectory_inputs(num_steps, seed=6)
    x_ours, x_ref = x.clone(), x.clone()
    for t, v in zip(ours.timesteps, v_list):
        x_ours, x_ref = ours.step(v, t, x_ours).prev_sample, ref.step(v, t, x_ref).prev_sample
        torch.testing.assert_close(x_ours, x_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_cfg_plus_plus_step_is_the_hand_written_one(prediction_type, clip, eta):
    """x_0 from the guided output (clipped), re-noised with eps_u (Chung et al. 2025), written out in float64."""
    kw = dict(beta_schedule="squaredcos_cap_v2", clip_sample=clip, prediction_type=prediction_type)
    sched = SCHEDULERS["ddim-cfg++"](**kw)
    assert isinstance(sched, DDIMCFGPPScheduler) and sched.needs_unconditional_output
    assert not getattr(DDIMScheduler(**kw), "needs_unconditional_output", False)
    sched.set_timesteps(5)
    x, outputs = trajectory_inputs(10, seed=7)
    for i, t in enumerate(sched.timesteps.tolist()):
        guided, uncond = outputs[2 * i] * 2, outputs[2 * i + 1]  # (B, C, H, W) each
        a, a_prev = sched.alphas_cumprod.double()[t], sched.alphas_cumprod.double()[t - 200] if t >= 200 else 1.0
        xd, g, u = x.double(), guided.double(), uncond.double()
        if prediction_type == "epsilon":
            x0, eps_u = (xd - (1 - a) ** 0.5 * g) / a**0.5, u
        else:
            x0, eps_u = a**0.5 * xd - (1 - a) ** 0.5 * g, a**0.5 * u + (1 - a) ** 0.5 * xd
        x0 = x0.clamp(-1, 1) if clip else x0
        sigma = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)) ** 0.5
        z = torch.randn(x.shape, generator=torch.Generator().manual_seed(i)).double()
        expected = a_prev**0.5 * x0 + (1 - a_prev - sigma**2) ** 0.5 * eps_u + sigma * z
        out = sched.step(guided, t, x, unconditional_output=uncond, eta=eta,
                         generator=torch.Generator().manual_seed(i))  # fmt: skip
        torch.testing.assert_close(out.pred_original_sample, x0.float(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.prev_sample, expected.float(), rtol=1e-5, atol=1e-5)
        x = out.prev_sample


def test_cfg_plus_plus_with_the_guided_output_as_unconditional_is_ddim():
    """eps_u = the guided eps: CFG++'s step is DDIM's, bit for bit (without re-deriving eps from a clipped x_0)."""
    for prediction_type in ("epsilon", "v_prediction"):
        kw = dict(prediction_type=prediction_type)
        ddim, cfg_pp = DDIMScheduler(**kw), DDIMCFGPPScheduler(**kw)
        ddim.set_timesteps(10), cfg_pp.set_timesteps(10)
        x, (out,) = trajectory_inputs(1, seed=8)
        for t in ddim.timesteps.tolist():
            a, b = ddim.step(out * 3, t, x), cfg_pp.step(out * 3, t, x, unconditional_output=out * 3)
            assert torch.equal(a.prev_sample, b.prev_sample), (prediction_type, t)
            assert torch.equal(a.pred_original_sample, b.pred_original_sample), (prediction_type, t)
            x = a.prev_sample
