"""Step distillation: a round teaches one student step to cover two steps of the previous model, and
the checkpoint's step count drives sampling."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize, tiny_model

from cfg_minimal import TeacherConfig, UserError, load_checkpoint, load_pipeline, train_teacher, with_optim
from cfg_minimal.data import load_dataset
from cfg_minimal.distill import DistillConfig, distill_student, make_student, sample_scales
from cfg_minimal.guidance import guided_noise_pred
from cfg_minimal.schedulers import DDIMScheduler
from cfg_minimal.step_distill import (
    StepDistillConfig,
    ddim_x0_target,
    halve_sampling_steps,
    round_sizes,
    step_distillation_loss,
    two_step_target,
)

SCALES = [0.0, 1.0, 3.0, 5.0]


@pytest.fixture(scope="module")
def rounds(tmp_path_factory):
    """A tiny guided student on digits, then one round 8 -> 4 sampling steps and one 4 -> 2."""
    out = tmp_path_factory.mktemp("steps")
    optim = dict(batch_size=32, lr=3e-3, device="cpu")
    train_teacher(with_optim(TeacherConfig(arch="unet-tiny"), max_train_steps=200, **optim), out, progress=False)
    distill_student(out / "teacher.pt", with_optim(DistillConfig(), max_train_steps=100, **optim), out, progress=False)
    cfg = StepDistillConfig(start_sampling_steps=8, target_sampling_steps=2)
    cfg = with_optim(cfg, max_train_steps=300, batch_size=32, lr=1e-3, device="cpu")
    paths = halve_sampling_steps(out / "student.pt", cfg, out, progress=False)
    return out, paths


def one_vs_two_step_error(student, previous, n_previous: int, scale: float, n: int = 128) -> float:
    """Mean squared distance, over held-out x_0 and every point of the halved grid, between one student
    step and two steps of the previous model (both as the sampler takes them)."""
    fine = DDIMScheduler(beta_schedule="squaredcos_cap_v2", timestep_spacing="aligned", aligned_base=n_previous)
    coarse = DDIMScheduler(beta_schedule="squaredcos_cap_v2", timestep_spacing="aligned", aligned_base=n_previous)
    fine.set_timesteps(n_previous), coarse.set_timesteps(n_previous // 2)
    g = torch.Generator().manual_seed(7)
    test = load_dataset("digits", train=False)  # held-out images: z_t as the student meets them
    x0, y = test.images[:n], test.labels[:n]
    s = torch.full((n,), scale)
    errors = []
    with torch.no_grad():
        for t in coarse.timesteps.tolist():
            z = z_t = fine.add_noise(x0, torch.randn(x0.shape, generator=g), torch.full((n,), t))
            u, t_end = t, coarse.previous_timestep(t)
            while u != t_end:
                z = fine.step(guided_noise_pred(previous, z, torch.full((n,), u), y, s), u, z,
                              use_clipped_model_output=True).prev_sample  # fmt: skip
                u = fine.previous_timestep(u)
            one = coarse.step(guided_noise_pred(student, z_t, torch.full((n,), t), y, s), t, z_t,
                              use_clipped_model_output=True).prev_sample  # fmt: skip
            errors.append((one - z).pow(2).mean().item())
    return sum(errors) / len(errors)


def test_a_round_lowers_the_one_step_versus_two_step_error_at_every_scale(rounds):
    out, _ = rounds
    previous = load_pipeline(out / "student.pt").model
    halved = load_pipeline(out / "student_4steps.pt").model
    for s in SCALES:
        before = one_vs_two_step_error(previous, previous, 8, s)  # the round starts from the previous weights
        after = one_vs_two_step_error(halved, previous, 8, s)
        assert after < 0.7 * before, (s, before, after)


def test_the_checkpoint_step_count_drives_sampling(rounds):
    _, paths = rounds
    assert [p.name for p in paths] == ["student_4steps.pt", "student_2steps.pt"]
    assert load_checkpoint(paths[1])["step_rounds"] == [
        dict(from_sampling_steps=8, to_sampling_steps=4),
        dict(from_sampling_steps=4, to_sampling_steps=2),
    ]
    pipe = load_pipeline(paths[1])
    assert pipe.sampling_steps == 2 and pipe.scheduler.timestep_spacing == "aligned"
    calls = []
    pipe.model.register_forward_hook(lambda module, args, output: calls.append(int(args[1][0])))
    x_T = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    by_default = pipe([1, 2, 3], 3.0, x_T=x_T)
    assert calls == [875, 375]  # one pass per step, every fourth point of the 8-step grid 875, 750, ..., 0
    assert torch.equal(by_default, pipe([1, 2, 3], 3.0, num_steps=2, x_T=x_T))
    with pytest.raises(UserError, match="must divide 8"):
        pipe([1], 3.0, num_steps=3)
    with pytest.raises(UserError, match="sample it with the ddim sampler"):  # another sampler would lose the grid
        load_pipeline(paths[1], scheduler="dpmsolver++")


def test_a_step_distilled_checkpoint_is_halved_from_its_own_step_count(rounds):
    _, paths = rounds
    with pytest.raises(UserError, match="was step-distilled to 4 sampling steps"):
        cfg = StepDistillConfig(start_sampling_steps=8, target_sampling_steps=2)
        halve_sampling_steps(paths[0], cfg, paths[0].parent)


def test_the_x0_target_lands_on_the_given_point():
    sched = DDIMScheduler(beta_schedule="squaredcos_cap_v2", timestep_spacing="aligned", clip_sample=False)
    sched.set_timesteps(4)  # 984, 734, 484, 234, then clean
    g = torch.Generator().manual_seed(0)
    z_t, z_end = torch.randn(2, 1, 4, 4, generator=g), torch.randn(2, 1, 4, 4, generator=g)
    for t in sched.timesteps.tolist():
        t_end = sched.previous_timestep(t)
        abar = sched.alphas_cumprod[t]
        abar_end = sched.alphas_cumprod[t_end] if t_end >= 0 else sched.final_alpha_cumprod
        eps = (z_t - abar.sqrt() * ddim_x0_target(z_t, abar, z_end, abar_end)) / (1 - abar).sqrt()
        torch.testing.assert_close(sched.step(eps, t, z_t).prev_sample, z_end, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("clip_sample", [True, False])
def test_the_batched_two_step_target_equals_the_samplers_steps(rounds, clip_sample):
    """All samples step at once, each from its own grid point: the same as the scheduler's own step,
    taken one grid point at a time, as the sampler takes it."""
    _, paths = rounds
    previous = load_pipeline(paths[0]).model  # a 4-step student, halved to 2 in the second round
    fine = DDIMScheduler(beta_schedule="squaredcos_cap_v2", timestep_spacing="aligned", aligned_base=8,
                         clip_sample=clip_sample)  # fmt: skip
    fine.set_timesteps(4)
    g = torch.Generator().manual_seed(0)
    k = torch.tensor([0, 1, 1, 0, 1])  # the halved sampler's step of each sample: points 2k -> 2k+1 -> 2k+2
    z_t, y, s = torch.randn(5, 1, 16, 16, generator=g), torch.tensor([0, 3, 7, 9, 2]), torch.tensor([0, 1, 3, 5, 2.0])
    points = torch.cat([fine.timesteps, torch.tensor([-1])])[2 * k[:, None] + torch.arange(3)]  # (5, 3)
    abar = torch.cat([fine.alphas_cumprod, fine.final_alpha_cumprod.view(1)])[points]  # index -1: the end
    clip = fine.clip_sample_range if clip_sample else None
    batched = two_step_target(previous, z_t, y, s, points, abar, clip)
    for i in range(5):
        z, t = z_t[i : i + 1], int(points[i, 0])
        with torch.no_grad():
            for _ in range(2):
                eps = guided_noise_pred(previous, z, torch.tensor([t]), y[i : i + 1], s[i : i + 1])
                z = fine.step(eps, t, z, use_clipped_model_output=True).prev_sample
                t = fine.previous_timestep(t)
        expected = ddim_x0_target(z_t[i : i + 1], abar[i, 0], z, abar[i, 2])
        torch.testing.assert_close(batched[i : i + 1], expected, rtol=1e-5, atol=1e-5)


def test_unreachable_targets_are_clear_errors():
    assert round_sizes(64, 8) == [32, 16, 8]
    with pytest.raises(UserError, match="not reached by halving"):
        round_sizes(48, 5)
    with pytest.raises(UserError, match="below the 8 sampling steps"):
        round_sizes(8, 8)


def v_student_steps(model, z_t, y, s, t, fine, n=2):
    """n steps of this project's DDIMScheduler (as the sampler takes them) of the guided `model` from z_t, t."""
    z = z_t
    with torch.no_grad():
        for _ in range(n):
            out = guided_noise_pred(model, z, torch.full((len(z),), t), y, s)  # (1, C, H, W), a v
            z = fine.step(out, t, z, use_clipped_model_output=True).prev_sample
            t = fine.previous_timestep(t)
    return z


@pytest.mark.parametrize("clip_sample", [True, False])
def test_the_two_step_target_of_a_v_model_equals_two_v_ddim_steps(clip_sample):
    previous = randomize(make_student(tiny_model()), std=0.05)  # a guided student whose output is a v
    fine = DDIMScheduler(beta_schedule="squaredcos_cap_v2", timestep_spacing="aligned", aligned_base=8,
                         clip_sample=clip_sample, prediction_type="v_prediction")  # fmt: skip
    fine.set_timesteps(8)
    g = torch.Generator().manual_seed(1)
    k = torch.tensor([0, 3, 1, 2])  # the halved sampler's step of each sample: points 2k -> 2k+1 -> 2k+2
    z_t, y, s = torch.randn(4, 1, 16, 16, generator=g), torch.tensor([0, 3, 7, 9]), torch.tensor([0, 1, 3, 5.0])
    points = torch.cat([fine.timesteps, torch.tensor([-1])])[2 * k[:, None] + torch.arange(3)]  # (4, 3)
    abar = torch.cat([fine.alphas_cumprod, fine.final_alpha_cumprod.view(1)])[points]
    clip = fine.clip_sample_range if clip_sample else None
    batched = two_step_target(previous, z_t, y, s, points, abar, clip, "v_prediction")
    as_eps = two_step_target(previous, z_t, y, s, points, abar, clip, "epsilon")
    for i in range(4):
        one = slice(i, i + 1)
        z = v_student_steps(previous, z_t[one], y[one], s[one], int(points[i, 0]), fine)
        expected = ddim_x0_target(z_t[one], abar[i, 0], z, abar[i, 2])
        torch.testing.assert_close(batched[one], expected, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(as_eps[one], expected, rtol=1e-2, atol=1e-2)  # the type matters


def test_the_step_distillation_loss_reads_the_students_v_as_v():
    """The loss of a v-prediction round, written out with the scheduler: the student's output is a v, its x_0
    the DDIM step's (clipped) x_0, regressed on the two-step target at max(SNR, 1)."""
    config = dict(beta_schedule="squaredcos_cap_v2", timestep_spacing="aligned", aligned_base=8,
                  prediction_type="v_prediction")  # fmt: skip
    previous = randomize(make_student(tiny_model()), std=0.05)
    student = randomize(make_student(tiny_model()), std=0.05, seed=1)
    loss_fn = step_distillation_loss(previous, config, 8, DistillConfig())
    x0, y = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1, torch.tensor([1, 2, 3, 4])
    torch.manual_seed(0)
    loss = loss_fn(student, x0, y)
    fine = DDIMScheduler(**config)
    fine.set_timesteps(8)
    torch.manual_seed(0)  # the loss's draws, in its order: the step per sample, the noise, the scales
    k, noise, s = torch.randint(0, 4, (4,)), torch.randn_like(x0), sample_scales(4, DistillConfig())
    expected = []
    for i in range(4):
        one, t = slice(i, i + 1), int(fine.timesteps[2 * k[i]])
        abar, abar_end = fine.alphas_cumprod[t], fine._abar(t - 250) if t >= 250 else fine.final_alpha_cumprod
        z_t = fine.add_noise(x0[one], noise[one], torch.tensor([t]))
        x_target = ddim_x0_target(z_t, abar, v_student_steps(previous, z_t, y[one], s[one], t, fine), abar_end)
        with torch.no_grad():
            out = student(z_t, torch.tensor([t]), y[one], guidance=s[one])
        x0_pred = fine.step(out, t, z_t).pred_original_sample  # clipped, as the loss's forward value is
        expected.append(max(float(abar / (1 - abar)), 1.0) * float((x0_pred - x_target).pow(2).mean()))
    assert float(loss.detach()) == pytest.approx(sum(expected) / 4, rel=1e-4)
