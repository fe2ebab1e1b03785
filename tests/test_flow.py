"""Rectified flow: parity of the Euler and Heun samplers with diffusers' FlowMatch schedulers, the conversions and
the training draw, CFG's identities on flow models, a flow teacher and student end to end, and the refusals."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from conftest import REPO, tiny_model

from cfg_minimal import Pipeline, TeacherConfig, UserError, load_checkpoint, load_pipeline, train_teacher, with_optim
from cfg_minimal.checkpoint import save_checkpoint
from cfg_minimal.distill import DistillConfig, distill_student, distillation_loss, make_student
from cfg_minimal.flow import FlowMatchEulerScheduler, FlowMatchHeunScheduler, sample_sigmas, shift_sigmas
from cfg_minimal.predictions import FLOW, eps_from_output, flow_alpha_sigma, to_x0, training_target, x0_from_output
from cfg_minimal.schedulers import SCHEDULERS, DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, with_shift
from cfg_minimal.train import diffusion_loss, training_point

diffusers = pytest.importorskip("diffusers")

FLOW_SAMPLERS = {"euler": FlowMatchEulerScheduler, "heun": FlowMatchHeunScheduler}
LABELS = [0, 3, 7, 9]


def outputs(n: int, seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """x_1 (2, 1, 8, 8) and n stand-ins for a network's velocity."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 1, 8, 8, generator=g), [torch.randn(2, 1, 8, 8, generator=g) for _ in range(n)]


def flow_pipeline(arch: str = "unet-tiny", sampler: str = "euler", **model_kwargs) -> Pipeline:
    model = tiny_model(arch, **model_kwargs)
    return Pipeline(model, FLOW_SAMPLERS[sampler](), dataset="digits", image_size=16, channels=1,
                    class_names=tuple("0123456789"))  # fmt: skip


# --- parity with diffusers, step by step -----------------------------------------------------------------------


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("num_steps", [1, 4, 10, 50])
def test_euler_matches_diffusers_step_by_step(shift, num_steps):
    ours, ref = FlowMatchEulerScheduler(shift=shift), diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    torch.testing.assert_close(ours.timesteps, ref.timesteps, rtol=0, atol=0)  # before set_timesteps too
    ours.set_timesteps(num_steps)
    ref.set_timesteps(num_steps)
    torch.testing.assert_close(ours.timesteps, ref.timesteps, rtol=0, atol=0)
    torch.testing.assert_close(ours.sigmas, ref.sigmas, rtol=0, atol=0)
    x, velocities = outputs(num_steps, seed=num_steps)
    x_ours, x_ref = x.clone(), x.clone()
    for i, (t, v) in enumerate(zip(ours.timesteps.tolist(), velocities)):  # python floats, as sample_loop passes
        out = ours.step(v, t, x_ours)
        assert torch.equal(out.pred_original_sample, x_ours - ref.sigmas[i] * v)  # x_0 = x - sigma v
        x_ours, x_ref = out.prev_sample, ref.step(v, t, x_ref).prev_sample
        torch.testing.assert_close(x_ours, x_ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("num_steps", [1, 2, 5, 12])
def test_heun_matches_diffusers_step_by_step(shift, num_steps):
    """Against diffusers' FlowMatchHeunDiscreteScheduler, and against Heun's step written out in float64. diffusers
    recovers v as (x - (x - sigma v)) / sigma, which loses float32 digits where sigma ~ 1e-3 (the last grid point):
    its tolerance is 1e-4, the float64 formula's 1e-6."""
    ours, ref = FlowMatchHeunScheduler(shift=shift), diffusers.FlowMatchHeunDiscreteScheduler(shift=shift)
    ours.set_timesteps(num_steps)
    ref.set_timesteps(num_steps)
    torch.testing.assert_close(ours.timesteps, ref.timesteps, rtol=0, atol=0)
    assert len(ours.timesteps) == 2 * num_steps - 1  # a predictor and a corrector per step, the last Euler
    x, velocities = outputs(len(ours.timesteps), seed=num_steps)
    x_ours, x_ref, x64, sigmas = x.clone(), x.clone(), x.double(), ours.sigmas.double()
    for i, (t, v) in enumerate(zip(ours.timesteps.tolist(), velocities)):
        assert ours.state_in_first_order == ref.state_in_first_order
        x_ours, x_ref = ours.step(v, t, x_ours).prev_sample, ref.step(v, t, x_ref).prev_sample
        torch.testing.assert_close(x_ours, x_ref, rtol=1e-4, atol=1e-4)
        k = (i + 1) // 2  # call i: the predictor from sigma_k (i even), or the corrector at sigma_k (i odd)
        if i % 2 == 0 and k < num_steps - 1:
            x_k, v_k = x64, v.double()
            x64 = x_k + (sigmas[k + 1] - sigmas[k]) * v_k  # Euler predictor
        elif i % 2 == 1:
            x64 = x_k + (sigmas[k] - sigmas[k - 1]) * (v_k + v.double()) / 2  # Heun's corrector from x_{k-1}
        else:
            x64 = x64 + (sigmas[k + 1] - sigmas[k]) * v.double()  # the last step, to sigma = 0: Euler
        torch.testing.assert_close(x_ours, x64.float(), rtol=1e-6, atol=1e-6)


def test_the_shift_is_sd3s_and_keeps_the_ends():
    sigma = torch.linspace(0, 1, 11, dtype=torch.float64)
    torch.testing.assert_close(shift_sigmas(sigma, 3.0), 3 * sigma / (1 + 2 * sigma))
    assert shift_sigmas(sigma, 1.0).equal(sigma)
    assert (shift_sigmas(sigma, 3.0)[1:-1] > sigma[1:-1]).all()  # s > 1: more noise in between
    grid = FlowMatchEulerScheduler(shift=3.0)
    grid.set_timesteps(8)
    assert grid.sigmas[0] == 1 and grid.sigmas[-1] == 0 and (grid.sigmas.diff() < 0).all()


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_diffusers_flow_schedulers_drop_into_the_pipeline(sampler):
    """diffusers' FlowMatch schedulers through our Pipeline give our samplers' images (shift 3, guided)."""
    theirs = {"euler": diffusers.FlowMatchEulerDiscreteScheduler, "heun": diffusers.FlowMatchHeunDiscreteScheduler}
    pipe = flow_pipeline()
    x_T = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(6))
    a = replace(pipe, scheduler=FLOW_SAMPLERS[sampler](shift=3.0))(LABELS, 3.0, num_steps=6, x_T=x_T)
    b = replace(pipe, scheduler=theirs[sampler](shift=3.0))(LABELS, 3.0, num_steps=6, x_T=x_T)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_our_flow_schedulers_run_diffusers_loop(sampler):
    """A diffusers-style loop (0-d tensor timesteps, its keyword arguments) drives our schedulers unchanged."""
    ours, plain = FLOW_SAMPLERS[sampler](shift=2.0), FLOW_SAMPLERS[sampler](shift=2.0)
    ours.set_timesteps(5)
    plain.set_timesteps(5)
    x, velocities = outputs(len(ours.timesteps), seed=3)
    a, b = x.clone(), x.clone()
    for t, v in zip(ours.timesteps, velocities):
        a = ours.step(v, t, a, s_churn=0.0, generator=torch.Generator(), return_dict=True).prev_sample
        b = plain.step(v, float(t), b).prev_sample
    assert torch.equal(a, b)


# --- the process: conversions, add_noise, the training draw ------------------------------------------------------


def test_flow_conversions_and_add_noise_are_the_formulas():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.rand(5, 1, 4, 4, generator=g) * 2 - 1, torch.randn(5, 1, 4, 4, generator=g)
    t = torch.tensor([0.0, 1.0, 250.5, 700.0, 1000.0])  # sigma T, floats
    sigma = (t / 1000).view(-1, 1, 1, 1)
    x_t = FlowMatchEulerScheduler().add_noise(x0, eps, t)
    torch.testing.assert_close(x_t, (1 - sigma) * x0 + sigma * eps, rtol=0, atol=0)
    ref = diffusers.FlowMatchEulerDiscreteScheduler()  # its scale_noise at the same sigmas (on its own grid)
    grid = ref.timesteps[[999, 749, 299]]
    torch.testing.assert_close(FlowMatchEulerScheduler().add_noise(x0[:3], eps[:3], grid),
                               ref.scale_noise(x0[:3], grid, eps[:3]), rtol=1e-6, atol=1e-6)  # fmt: skip
    v = training_target(x0, eps, None, FLOW)
    assert torch.equal(v, eps - x0)
    alpha_sigma = flow_alpha_sigma(sigma)
    torch.testing.assert_close(x0_from_output(v, x_t, *alpha_sigma, FLOW), x0, rtol=0, atol=1e-6)
    torch.testing.assert_close(eps_from_output(v, x_t, *alpha_sigma, FLOW), eps, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="sigma, not abar"):
        to_x0(v, x_t, torch.tensor(0.5), FLOW)


def test_cfg_on_velocities_is_cfg_on_eps_and_x0():
    """v_u + s (v_c - v_u) implies eps_u + s (eps_c - eps_u) and x0_u + s (x0_c - x0_u): CFG needs no conversion."""
    g = torch.Generator().manual_seed(1)
    x_t, v_u, v_c = (torch.randn(3, 1, 4, 4, generator=g, dtype=torch.float64) for _ in range(3))
    alpha_sigma = flow_alpha_sigma(torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64).view(-1, 1, 1, 1))
    for convert in (x0_from_output, eps_from_output):
        u, c = (convert(v, x_t, *alpha_sigma, FLOW) for v in (v_u, v_c))
        for s in (0.0, 1.0, 3.0):
            torch.testing.assert_close(convert(v_u + s * (v_c - v_u), x_t, *alpha_sigma, FLOW), u + s * (c - u))


@pytest.mark.parametrize("timestep_sampling", ["logit_normal", "uniform"])
def test_the_training_draw_is_the_flow_process(timestep_sampling):
    """training_point: t = sigma T with sigma from the density, x_t = (1 - sigma) x_0 + sigma eps, target eps - x_0;
    a network that outputs the velocity has zero loss."""
    scheduler, x0 = FlowMatchEulerScheduler(), torch.rand(6, 1, 8, 8) * 2 - 1
    torch.manual_seed(0)
    t, x_t, target = training_point(scheduler, x0, timestep_sampling)

    def replay() -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(0)
        return sample_sigmas(6, timestep_sampling), torch.randn_like(x0)  # (6,), (6, 1, 8, 8)

    sigma, eps = replay()
    assert t.dtype == torch.float32 and torch.equal(t, sigma * 1000)
    s = sigma.view(-1, 1, 1, 1)
    torch.testing.assert_close(x_t, (1 - s) * x0 + s * eps, rtol=0, atol=1e-6)
    assert torch.equal(target, eps - x0)

    def network(kind: str):  # knows x_0 and the noise (the loss's own draws) and outputs the target of `kind`
        def forward(x_in, t_in, y):
            sigma, eps = replay()
            assert torch.equal(t_in, sigma * 1000) and torch.equal(x_in, scheduler.add_noise(x0, eps, t_in))
            return eps - x0 if kind == "flow" else eps

        return forward

    for kind in ("flow", "epsilon"):
        torch.manual_seed(0)
        loss = float(diffusion_loss(scheduler, timestep_sampling)(network(kind), x0, torch.arange(6)))
        assert loss == 0.0 if kind == "flow" else loss > 0.1, (kind, loss)


def test_the_densities_are_sd3s_logit_normal_and_uniform():
    torch.manual_seed(0)
    sigma = sample_sigmas(40000, "logit_normal")
    logit = torch.log(sigma / (1 - sigma))
    assert abs(logit.mean()) < 0.02 and abs(logit.std() - 1) < 0.02  # logit(sigma) ~ N(0, 1)
    uniform = sample_sigmas(40000, "uniform")
    assert abs(uniform.mean() - 0.5) < 0.01 and abs((uniform < 0.25).float().mean() - 0.25) < 0.01
    with pytest.raises(ValueError, match="logit_normal, uniform"):
        sample_sigmas(3, "cosine")


# --- CFG's identities on flow models -----------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_s0_equals_sampling_with_null_labels(arch, sampler):
    pipe = flow_pipeline(arch, sampler)
    null = [pipe.null_class] * len(LABELS)
    x_T = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    at_s0 = pipe(LABELS, 0.0, num_steps=5, x_T=x_T)
    assert torch.equal(at_s0, pipe(null, 1.0, num_steps=5, x_T=x_T))
    assert torch.equal(at_s0, pipe(null, 4.0, num_steps=5, x_T=x_T))  # null vs null: guidance does nothing
    assert not torch.allclose(at_s0, pipe(LABELS, 1.0, num_steps=5, x_T=x_T), atol=1e-3)  # the label matters


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_s1_equals_the_plain_conditional_sampler(arch, sampler):
    pipe = flow_pipeline(arch, sampler)
    labels = torch.tensor(LABELS)
    x_T = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    guided = pipe(labels, 1.0, num_steps=5, x_T=x_T)
    x = x_T.clone()  # the textbook loop, no guidance code
    pipe.scheduler.set_timesteps(5)
    with torch.no_grad():
        for t in pipe.scheduler.timesteps.tolist():
            x = pipe.scheduler.step(pipe.model(x, torch.full((4,), t), labels), t, x).prev_sample
    torch.testing.assert_close(guided, x, rtol=0, atol=1e-6)


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_batched_and_two_pass_sampling_agree(arch, sampler):
    pipe = flow_pipeline(arch, sampler)
    x_T = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(4))
    a = pipe(LABELS, 3.0, num_steps=5, x_T=x_T, batched=True)
    b = pipe(LABELS, 3.0, num_steps=5, x_T=x_T, batched=False)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_an_untrained_flow_student_equals_its_teacher_at_s0_and_s1(arch, sampler):
    teacher = flow_pipeline(arch, sampler)
    student = replace(teacher, model=make_student(teacher.model).eval(), guidance_range=(0.0, 6.0))
    x_T = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(5))
    for s in (0.0, 1.0):
        torch.testing.assert_close(student(LABELS, s, num_steps=4, x_T=x_T), teacher(LABELS, s, num_steps=4, x_T=x_T),
                                   rtol=0, atol=1e-6)  # fmt: skip
    assert not torch.allclose(student(LABELS, 3.0, num_steps=4, x_T=x_T), teacher(LABELS, 3.0, num_steps=4, x_T=x_T))


def test_distillation_draws_x_t_as_the_flow_teacher_did():
    """The guided student's loss on a flow teacher: t = sigma T from the teacher's density, x_t on the flow path."""
    teacher, x0, y = tiny_model(), torch.rand(5, 1, 16, 16) * 2 - 1, torch.arange(5)
    seen = {}

    def student(x_t, t, labels, guidance):
        seen.update(x_t=x_t, t=t)
        return torch.zeros_like(x_t, requires_grad=True)

    torch.manual_seed(0)
    distillation_loss(teacher, FlowMatchEulerScheduler(), DistillConfig(), "uniform")(student, x0, y)
    torch.manual_seed(0)
    sigma = sample_sigmas(5, "uniform")  # (5,)
    eps = torch.randn_like(x0)
    assert torch.equal(seen["t"], sigma * 1000)
    s = sigma.view(-1, 1, 1, 1)
    torch.testing.assert_close(seen["x_t"], (1 - s) * x0 + s * eps, rtol=0, atol=1e-6)


# --- a flow teacher and student from the API, and what refuses them -----------------------------------------------


@pytest.fixture(scope="module")
def flow_run(tmp_path_factory):
    """A flow teacher trained a few steps on digits, and a student distilled from it a few more."""
    out = tmp_path_factory.mktemp("flow")
    optim = dict(max_train_steps=3, batch_size=16, device="cpu", warmup_steps=1)
    train_teacher(with_optim(TeacherConfig(arch="unet-tiny", prediction_type=FLOW), **optim), out, progress=False)
    distill_student(out / "teacher.pt", with_optim(DistillConfig(), **optim), out, progress=False)
    return out


def test_a_flow_teacher_and_its_student_record_flow_and_sample_with_euler(flow_run):
    teacher = load_checkpoint(flow_run / "teacher.pt")
    assert teacher["teacher_config"]["timestep_sampling"] == "logit_normal"  # SD3's, the flow default
    for name in ("teacher.pt", "student.pt"):
        assert load_checkpoint(flow_run / name)["scheduler_config"] == {"num_train_timesteps": 1000,
                                                                        "prediction_type": FLOW}  # fmt: skip
        pipe = load_pipeline(flow_run / name)  # its own sampler: Euler
        assert isinstance(pipe.scheduler, FlowMatchEulerScheduler) and pipe.scheduler.prediction_type == FLOW
        images = pipe([1, 2], 3.0, num_steps=3, generator=0)
        assert images.shape == (2, 1, 16, 16) and torch.isfinite(images).all()
        heun = load_pipeline(flow_run / name, scheduler="heun")
        assert isinstance(heun.scheduler, FlowMatchHeunScheduler)
        assert heun([1, 2], 3.0, num_steps=3, generator=0).shape == (2, 1, 16, 16)


def relabel_as_eps(flow_ckpt, out) -> None:
    """The same weights saved as an eps model: what the loaders decide from the scheduler_config alone."""
    ckpt = load_checkpoint(flow_ckpt)
    ckpt["scheduler_config"] = {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2",
                                "prediction_type": "epsilon"}  # fmt: skip
    ckpt["teacher_config"]["prediction_type"] = "epsilon"
    save_checkpoint(out, ckpt)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "dpmsolver++", "ddim-cfg++"])
def test_a_flow_checkpoint_refuses_the_vp_samplers(flow_run, sampler):
    with pytest.raises(UserError, match="rectified-flow model.*sample it with euler or heun"):
        load_pipeline(flow_run / "teacher.pt", scheduler=sampler)


def test_the_samplers_refuse_the_other_process(flow_run, tmp_path):
    for cls in (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler):
        with pytest.raises(ValueError, match="euler or heun"):
            cls(prediction_type=FLOW)
    for cls in FLOW_SAMPLERS.values():
        with pytest.raises(ValueError, match="ddim, ddpm or dpmsolver"):
            cls(prediction_type="epsilon")
    relabel_as_eps(flow_run / "teacher.pt", tmp_path / "eps.pt")
    with pytest.raises(UserError, match="euler is a rectified-flow sampler"):
        load_pipeline(tmp_path / "eps.pt", scheduler="euler")
    assert isinstance(load_pipeline(tmp_path / "eps.pt").scheduler, DDIMScheduler)  # an eps model's own: DDIM
    ckpt = load_checkpoint(flow_run / "teacher.pt")
    ckpt["scheduler_config"]["prediction_type"] = "epsilon"  # an edited config: the weights are a flow model's
    save_checkpoint(tmp_path / "edited.pt", ckpt)
    with pytest.raises(UserError, match="trained with 'flow_prediction'"):
        load_pipeline(tmp_path / "edited.pt")


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_a_shift_given_at_loading_is_the_grid_the_pipeline_samples_on(flow_run, sampler):
    pipe = load_pipeline(flow_run / "teacher.pt", scheduler=sampler, shift=3.0)
    reference = FLOW_SAMPLERS[sampler](shift=3.0)
    for scheduler in (pipe.scheduler, reference):
        scheduler.set_timesteps(6)
    assert torch.equal(pipe.scheduler.sigmas, reference.sigmas)
    unshifted = load_pipeline(flow_run / "teacher.pt", scheduler=sampler).scheduler
    unshifted.set_timesteps(6)
    assert (pipe.scheduler.sigmas[1:-1] > unshifted.sigmas[1:-1]).all()  # s > 1: more steps at high noise


def test_evaluate_samples_at_the_shift_given_and_records_it(flow_run, tmp_path):
    from cfg_minimal import evaluate

    args = ["--ckpt", str(flow_run / "teacher.pt"), "--scales", "1", "--n", "20", "--sampling-steps", "2"]
    for shift in ("1", "3"):
        assert evaluate.main([*args, "--shift", shift, "--device", "cpu", "--out", str(tmp_path / shift)]) == 0
    fd = {}
    for shift in ("1", "3"):
        (model,) = json.loads((tmp_path / shift / "metrics.json").read_text())["models"].values()
        assert model["sampler"] == "FlowMatchEulerScheduler" and model["shift"] == float(shift)
        fd[shift] = model["per_scale"][0]["fd"]
    assert fd["1"] != fd["3"]  # the same noise on another grid: other samples


def test_a_shift_is_refused_where_it_means_nothing_or_breaks_a_grid(flow_run, tmp_path):
    with pytest.raises(UserError, match="positive number"):
        load_pipeline(flow_run / "teacher.pt", shift=0.0)
    few_step = {"num_train_timesteps": 1000, "prediction_type": FLOW, "shift": 2.0, "timestep_spacing": "aligned"}
    assert with_shift(few_step, 2.0, "student_4steps.pt", step_distilled=True)["shift"] == 2.0  # its own: accepted
    with pytest.raises(UserError, match="step-distilled on the Euler grid of shift 2"):
        with_shift(few_step, 3.0, "student_4steps.pt", step_distilled=True)
    relabel_as_eps(flow_run / "teacher.pt", tmp_path / "eps.pt")
    with pytest.raises(UserError, match="sigma shift of a rectified-flow sampler.*predicts epsilon"):
        load_pipeline(tmp_path / "eps.pt", shift=3.0)


def test_heun_refuses_a_step_out_of_order_and_every_sampler_a_timestep_off_its_grid():
    heun = FlowMatchHeunScheduler()
    heun.set_timesteps(4)
    x, (v,) = outputs(1)
    heun.step(v, heun.timesteps[0], x)  # the predictor from t_0 ...
    with pytest.raises(ValueError, match="corrector"):
        heun.step(v, heun.timesteps[3], x)  # ... then t_2 instead of t_1
    for name in ("euler", "heun"):
        sampler = SCHEDULERS[name]()
        sampler.set_timesteps(4)
        with pytest.raises(ValueError, match="not on this sampler's grid"):
            sampler.step(v, 123.0, x)


@pytest.mark.parametrize("prediction_type", ["epsilon", FLOW])
def test_timestep_sampling_is_checked_before_any_data_is_read(prediction_type):
    cfg = TeacherConfig(prediction_type=prediction_type, timestep_sampling="cosine", data_dir="/nonexistent")
    with pytest.raises(UserError, match="timestep_sampling must be logit_normal or uniform, got 'cosine'"):
        train_teacher(cfg, "unused-out", progress=False)


def test_the_cli_sets_the_flow_fields():
    import train_mnist

    args = train_mnist.parse_args(["--prediction-type", FLOW, "--timestep-sampling", "uniform"])
    teacher = train_mnist.configs_from(args)["teacher"]
    assert (teacher.prediction_type, teacher.timestep_sampling) == (FLOW, "uniform")
    assert train_mnist.configs_from(train_mnist.parse_args([]))["teacher"].timestep_sampling is None


def test_a_flow_run_dir_step_distils_from_the_cli_and_its_students_sample_and_evaluate(flow_run, tmp_path):
    """train_mnist.py --stage step-distill on a flow run dir: each round's student on its own aligned Euler grid,
    measured against the teacher at 64 Euler steps; then sample.py and cfg_minimal.evaluate read it."""
    import sample
    from cfg_minimal import evaluate

    cmd = [sys.executable, str(REPO / "train_mnist.py"), "--stage", "step-distill", "--student",
           str(flow_run / "student.pt"), "--teacher", str(flow_run / "teacher.pt"), "--start-sampling-steps", "4",
           "--target-sampling-steps", "1", "--round-train-steps", "2", "--round-batch-size", "8", "--eval-n", "20",
           "--device", "cpu", "--no-progress", "--out", str(tmp_path)]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    one_step = load_checkpoint(tmp_path / "student_1steps.pt", kind="student")
    assert one_step["sampling_steps"] == 1 and one_step["scheduler_config"]["aligned_base"] == 4
    metrics = json.loads((tmp_path / "step_distill" / "metrics.json").read_text())
    steps = {name: model["per_scale"][0]["sampling_steps"] for name, model in metrics["models"].items()}
    assert steps == {"teacher 64 steps": 64, "student 2 steps": 2, "student 1 steps": 1}
    evals = {name: model["per_scale"][-1]["evals_per_image"] for name, model in metrics["models"].items()}
    assert evals == {"teacher 64 steps": 128, "student 2 steps": 2, "student 1 steps": 1}  # at s = 3: 1 pass a step
    assert sample.main([str(tmp_path / "student_2steps.pt"), "--scales", "1", "3", "--n-per-class", "1",
                        "--device", "cpu", "--out", str(tmp_path / "grid.png")]) == 0  # fmt: skip
    assert (tmp_path / "grid.png").stat().st_size > 0
    assert evaluate.main(["--ckpt", str(tmp_path / "student_2steps.pt"), "--scales", "1", "--n", "20", "--device",
                          "cpu", "--out", str(tmp_path / "eval")]) == 0  # fmt: skip
    rows = json.loads((tmp_path / "eval" / "metrics.json").read_text())["models"]
    assert [row["sampling_steps"] for model in rows.values() for row in model["per_scale"]] == [2]
