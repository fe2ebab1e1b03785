"""Step distillation: a round teaches one student step to cover two steps of the previous model, and
the checkpoint's step count drives sampling."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from conftest import randomize, tiny_model

from cfg_minimal import TeacherConfig, UserError, load_checkpoint, load_pipeline, train_teacher, with_optim
from cfg_minimal.data import load_dataset
from cfg_minimal.distill import DistillConfig, distill_student, make_student, sample_scales
from cfg_minimal.flow import FlowMatchEulerScheduler
from cfg_minimal.guidance import guided_noise_pred
from cfg_minimal.pretrained import save_pretrained
from cfg_minimal.schedulers import DDIMScheduler
from cfg_minimal.step_distill import (
    StepDistillConfig,
    ddim_x0_target,
    flow_two_step_target,
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


@pytest.mark.parametrize("fixture", ["rounds", "flow_rounds"])
def test_a_round_lowers_the_one_step_versus_two_step_error_at_every_scale(fixture, request):
    """eps / v on DDIM's grid and rectified flow on the Euler grid alike."""
    out, _ = request.getfixturevalue(fixture)
    error = flow_one_vs_two_step_error if fixture == "flow_rounds" else partial(one_vs_two_step_error, n_previous=8)
    previous = load_pipeline(out / "student.pt").model
    halved = load_pipeline(out / "student_4steps.pt").model
    for s in SCALES:
        before = error(previous, previous, scale=s)  # the round starts from the previous weights
        after = error(halved, previous, scale=s)
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


# --- rectified flow: halving the Euler grid ---------------------------------------------------------------------


def flow_grid(n: int, base: int = 8, shift: float = 1.0) -> FlowMatchEulerScheduler:
    """The Euler sampler of a flow round's grid: n steps, 'aligned' on the base grid."""
    sched = FlowMatchEulerScheduler(shift=shift, timestep_spacing="aligned", aligned_base=base)
    sched.set_timesteps(n)
    return sched


def flow_spans(fine: FlowMatchEulerScheduler, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The timesteps and sigmas (B, 3) of the student steps k (B,): points 2k -> 2k+1 -> 2k+2 of the fine grid."""
    index = 2 * k[:, None] + torch.arange(3)  # (B, 3)
    return torch.cat([fine.timesteps, torch.zeros(1)])[index], fine.sigmas[index]


def test_the_aligned_flow_grid_of_n_steps_is_every_other_point_of_2n():
    for shift in (1.0, 3.0):
        fine, coarse = flow_grid(8, shift=shift), flow_grid(4, shift=shift)
        assert torch.equal(coarse.sigmas, fine.sigmas[::2]) and torch.equal(coarse.timesteps, fine.timesteps[::2])
        plain = FlowMatchEulerScheduler(shift=shift)
        plain.set_timesteps(8)  # the base grid itself is the plain Euler grid of 8 steps (diffusers')
        assert torch.equal(fine.sigmas, plain.sigmas) and fine.sigmas[0] == 1 and fine.sigmas[-1] == 0


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("previous_kind", ["student", "teacher"])
def test_the_flow_two_step_target_is_two_euler_steps_of_the_sampler(shift, previous_kind):
    """All samples at once, each from its own grid point, against FlowMatchEulerScheduler.step taken one sample
    at a time; one coarse step with the target lands on the same point. For a CFG teacher, s = 0 rows are the
    null-label model's steps and s = 1 rows the conditional model's (the identities of CFG carry over)."""
    model = tiny_model() if previous_kind == "teacher" else randomize(make_student(tiny_model()), std=0.05)
    fine, coarse = flow_grid(8, shift=shift), flow_grid(4, shift=shift)
    g = torch.Generator().manual_seed(3)
    k = torch.tensor([0, 3, 1, 2, 0])  # the halved sampler's step of each sample
    x_a, y, s = torch.randn(5, 1, 16, 16, generator=g), torch.tensor([0, 3, 7, 9, 2]), torch.tensor([0, 1, 3, 5, 2.0])
    t, sigma = flow_spans(fine, k)  # (5, 3) each
    target = flow_two_step_target(model, x_a, y, s, t, sigma)  # (5, 1, 16, 16)
    for i in range(5):
        one, u = slice(i, i + 1), float(t[i, 0])
        x = x_a[one]
        for _ in range(2):
            with torch.no_grad():
                if previous_kind == "teacher" and s[i] in (0, 1):  # plain one-pass samplers
                    label = y[one] if s[i] == 1 else torch.tensor([model.null_class])
                    v = model(x, torch.tensor([u]), label)
                else:
                    v = guided_noise_pred(model, x, torch.tensor([u]), y[one], s[one])
            x = fine.step(v, u, x).prev_sample
            u = float(t[i, 1])
        assert float(t[i, 0]) in coarse.timesteps.tolist()
        torch.testing.assert_close(coarse.step(target[one], float(t[i, 0]), x_a[one]).prev_sample, x,
                                   rtol=1e-5, atol=1e-5)  # fmt: skip
        torch.testing.assert_close(target[one], (x_a[one] - x) / (sigma[i, 0] - sigma[i, 2]), rtol=1e-5, atol=1e-5)


class StraightFlow(torch.nn.Module):
    """The exact velocity of a one-point data set x_0 = mu, v(x, sigma) = (x - mu) / sigma: straight paths, an
    Euler step of any size is exact. A 'student' (it takes s) that ignores y and s."""

    is_student, num_classes, null_class = True, 10, 10

    def __init__(self, mu: torch.Tensor):
        super().__init__()
        self.mu = mu

    def forward(self, x, t, y, guidance=None):
        return (x - self.mu) / (t / 1000).view(-1, 1, 1, 1)  # (B, C, H, W)


def test_a_straight_flow_is_its_own_few_step_student():
    model = StraightFlow(torch.randn(1, 1, 16, 16, generator=torch.Generator().manual_seed(4)))
    fine = flow_grid(8, shift=3.0)
    x_a, y, s = torch.randn(4, 1, 16, 16), torch.arange(4), torch.tensor([0, 1, 3, 5.0])
    t, sigma = flow_spans(fine, torch.arange(4))
    target = flow_two_step_target(model, x_a, y, s, t, sigma)
    torch.testing.assert_close(target, model(x_a, t[:, 0], y), rtol=1e-4, atol=1e-4)


class OracleStudent(torch.nn.Module):
    """A student whose velocity is the round's target itself (plus `offset`): the previous model's two Euler steps
    from x_t, on the fine grid, found by its timestep."""

    is_student = True

    def __init__(self, previous: torch.nn.Module, fine: FlowMatchEulerScheduler, offset: float = 0.0):
        super().__init__()
        self.previous, self.fine, self.offset = previous, fine, offset

    def forward(self, x, t, y, guidance):
        k = torch.tensor([self.fine.timesteps.tolist().index(float(u)) // 2 for u in t])  # (B,)
        steps_t, sigma = flow_spans(self.fine, k)
        return flow_two_step_target(self.previous, x, y, guidance, steps_t, sigma) + self.offset


def test_the_flow_loss_is_zero_for_the_oracle_student_and_the_plain_velocity_mse():
    """The loss builds x_a, s and the target as the oracle sees them (same draws), and weighs nothing: a student
    off the target by a constant c everywhere has loss c^2."""
    config = dict(num_train_timesteps=1000, prediction_type="flow_prediction", shift=3.0, timestep_spacing="aligned",
                  aligned_base=8)  # fmt: skip
    previous = randomize(make_student(tiny_model()), std=0.05)
    loss_fn = step_distillation_loss(previous, config, 8, DistillConfig())
    x0, y = torch.rand(6, 1, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1, torch.arange(6)
    fine = flow_grid(8, shift=3.0)
    for offset, expected in ((0.0, 0.0), (0.1, 0.01)):
        torch.manual_seed(0)
        loss = loss_fn(OracleStudent(previous, fine, offset), x0, y)
        assert float(loss) == pytest.approx(expected, abs=1e-9), offset


@pytest.fixture(scope="module")
def flow_rounds(tmp_path_factory):
    """A tiny flow teacher and guided student on digits, then rounds 8 -> 4 -> 2 Euler sampling steps."""
    out = tmp_path_factory.mktemp("flow_steps")
    optim = dict(batch_size=32, lr=3e-3, device="cpu")
    teacher = TeacherConfig(arch="unet-tiny", prediction_type="flow_prediction")
    train_teacher(with_optim(teacher, max_train_steps=150, **optim), out, progress=False)
    distill_student(out / "teacher.pt", with_optim(DistillConfig(), max_train_steps=50, **optim), out, progress=False)
    cfg = StepDistillConfig(start_sampling_steps=8, target_sampling_steps=2)
    cfg = with_optim(cfg, max_train_steps=200, batch_size=32, lr=1e-3, device="cpu")
    return out, halve_sampling_steps(out / "student.pt", cfg, out, progress=False)


def flow_one_vs_two_step_error(student, previous, scale: float, n: int = 128) -> float:
    """Mean squared distance, over held-out x_0 and every step of the 4-step grid, between one Euler step of
    `student` and two of `previous` on the 8-step grid (as the sampler takes them)."""
    fine, coarse = flow_grid(8), flow_grid(4)
    g = torch.Generator().manual_seed(7)
    test = load_dataset("digits", train=False)
    x0, y, s = test.images[:n], test.labels[:n], torch.full((n,), scale)
    errors = []
    with torch.no_grad():
        for j, t in enumerate(coarse.timesteps.tolist()):
            x = x_a = fine.add_noise(x0, torch.randn(x0.shape, generator=g), torch.full((n,), t))
            for u in fine.timesteps[2 * j : 2 * j + 2].tolist():
                x = fine.step(guided_noise_pred(previous, x, torch.full((n,), u), y, s), u, x).prev_sample
            one = coarse.step(guided_noise_pred(student, x_a, torch.full((n,), t), y, s), t, x_a).prev_sample
            errors.append((one - x).pow(2).mean().item())
    return sum(errors) / len(errors)


def test_a_flow_step_student_samples_with_euler_on_its_own_grid_one_pass_per_step(flow_rounds, tmp_path):
    out, paths = flow_rounds
    ckpt = load_checkpoint(paths[1])
    assert ckpt["scheduler_config"] == dict(num_train_timesteps=1000, prediction_type="flow_prediction", shift=1.0,
                                            timestep_spacing="aligned", aligned_base=8)  # fmt: skip
    assert ckpt["step_rounds"] == [dict(from_sampling_steps=8, to_sampling_steps=4),
                                   dict(from_sampling_steps=4, to_sampling_steps=2)]  # fmt: skip
    pipe = load_pipeline(paths[1])
    assert isinstance(pipe.scheduler, FlowMatchEulerScheduler) and pipe.sampling_steps == 2
    calls = []
    pipe.model.register_forward_hook(lambda module, args, output: calls.append(float(args[1][0])))
    x_T = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    by_default = pipe([1, 2, 3], 3.0, x_T=x_T)
    assert calls == flow_grid(8).timesteps[::4].tolist()  # one pass per step: points 0 and 4 of the 8-step grid
    assert torch.equal(by_default, pipe([1, 2, 3], 3.0, num_steps=2, x_T=x_T))
    with pytest.raises(UserError, match="must divide 8"):
        pipe([1], 3.0, num_steps=3)
    with pytest.raises(UserError, match="sample it with the euler sampler"):  # Heun would leave the grid it learnt
        load_pipeline(paths[1], scheduler="heun")
    folder = save_pretrained(ckpt, tmp_path / "flow-2steps", command="python train_mnist.py ...")
    exported = load_pipeline(folder)
    assert exported.sampling_steps == 2 and exported.scheduler.timestep_spacing == "aligned"
    assert torch.equal(exported([1, 2, 3], 3.0, x_T=x_T), by_default)


def test_a_flow_step_student_is_halved_from_its_own_grid(flow_rounds):
    _, paths = flow_rounds
    with pytest.raises(UserError, match="was step-distilled to 4 sampling steps"):
        halve_sampling_steps(
            paths[0], StepDistillConfig(start_sampling_steps=8, target_sampling_steps=2), paths[0].parent
        )
