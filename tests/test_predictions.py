"""prediction_type: the conversions of predictions.py, a v-prediction teacher's loss and checkpoint, and
what a checkpoint without the setting means."""

from __future__ import annotations

import pytest
import torch
from conftest import REPO

from cfg_minimal import TeacherConfig, UserError, load_checkpoint, load_pipeline, train_teacher, with_optim
from cfg_minimal.checkpoint import save_checkpoint
from cfg_minimal.distill import DistillConfig, distill_student
from cfg_minimal.predictions import (
    PREDICTION_TYPES,
    alpha_sigma,
    check_prediction_type,
    eps_from_x0,
    to_eps,
    to_x0,
    training_target,
    x0_from_output,
)
from cfg_minimal.schedulers import DDPMScheduler
from cfg_minimal.train import diffusion_loss

diffusers = pytest.importorskip("diffusers")
VP_TYPES = tuple(p for p in PREDICTION_TYPES if p != "flow_prediction")  # abar's types; flow: tests/test_flow.py


def forward_process(dtype: torch.dtype = torch.float64, seed: int = 0):
    """x_0, eps, abar (B, 1, 1, 1) spanning (0, 1) nearly end to end, and x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(5, 1, 4, 4, generator=g, dtype=dtype) * 2 - 1
    eps = torch.randn(5, 1, 4, 4, generator=g, dtype=dtype)
    abar = torch.tensor([1e-4, 0.1, 0.5, 0.9, 0.9999], dtype=dtype).view(-1, 1, 1, 1)
    return x0, eps, abar, abar.sqrt() * x0 + (1 - abar).sqrt() * eps


def test_every_conversion_round_trips():
    x0, eps, abar, x_t = forward_process()
    for prediction_type in VP_TYPES:
        output = training_target(x0, eps, abar, prediction_type)  # what a perfect network outputs
        torch.testing.assert_close(to_x0(output, x_t, abar, prediction_type), x0, rtol=0, atol=1e-6)
        torch.testing.assert_close(to_eps(output, x_t, abar, prediction_type), eps, rtol=0, atol=1e-6)
        torch.testing.assert_close(x0_from_output(output, x_t, *alpha_sigma(abar), prediction_type), x0,
                                   rtol=0, atol=1e-6)  # fmt: skip
    torch.testing.assert_close(eps_from_x0(x0, x_t, abar), eps, rtol=0, atol=1e-6)
    v = training_target(x0, eps, abar, "v_prediction")
    torch.testing.assert_close(v, abar.sqrt() * eps - (1 - abar).sqrt() * x0, rtol=0, atol=1e-12)  # its definition
    v_back = training_target(to_x0(v, x_t, abar, "v_prediction"), to_eps(v, x_t, abar, "v_prediction"), abar,
                             "v_prediction")  # fmt: skip
    torch.testing.assert_close(v_back, v, rtol=0, atol=1e-6)  # v -> (x_0, eps) -> v


def test_epsilon_is_the_formula_of_before_bit_for_bit():
    x0, eps, abar, x_t = forward_process(torch.float32)
    assert training_target(x0, eps, abar, "epsilon") is eps
    assert to_eps(eps, x_t, abar, "epsilon") is eps
    assert torch.equal(to_x0(eps, x_t, abar, "epsilon"), (x_t - (1 - abar).sqrt() * eps) / abar.sqrt())
    assert torch.equal(eps_from_x0(x0, x_t, abar), (x_t - abar.sqrt() * x0) / (1 - abar).sqrt())


@pytest.mark.parametrize("schedule", ["linear", "squaredcos_cap_v2"])
def test_the_v_target_is_diffusers_velocity(schedule):
    ours, ref = DDPMScheduler(beta_schedule=schedule), diffusers.DDPMScheduler(beta_schedule=schedule)
    x0, eps, _, _ = forward_process(torch.float32)
    t = torch.tensor([0, 10, 500, 900, 999])
    v = training_target(x0, eps, ours.abar_like(t, x0), "v_prediction")
    torch.testing.assert_close(v, ref.get_velocity(x0, eps, t), rtol=1e-6, atol=1e-6)


def test_guidance_combines_either_output_alike():
    """o_u + s (o_c - o_u) implies eps_u + s (eps_c - eps_u): CFG needs no conversion of its own."""
    x0_u, eps_u, abar, x_t = forward_process(seed=1)
    x0_c, _, _, _ = forward_process(seed=2)
    eps_c = (x_t - abar.sqrt() * x0_c) / (1 - abar).sqrt()  # the conditional prediction at the same x_t
    for s in (0.0, 1.0, 3.0):
        v_u, v_c = (training_target(x0, eps, abar, "v_prediction") for x0, eps in ((x0_u, eps_u), (x0_c, eps_c)))
        guided = to_eps(v_u + s * (v_c - v_u), x_t, abar, "v_prediction")
        torch.testing.assert_close(guided, eps_u + s * (eps_c - eps_u), rtol=1e-9, atol=1e-6)


def test_unknown_prediction_types_are_user_errors():
    assert check_prediction_type("v_prediction") == "v_prediction"
    for bad in ("sample", "v", None):
        with pytest.raises(UserError, match="epsilon, v_prediction"):
            check_prediction_type(bad)
    x0, eps, abar, x_t = forward_process()
    with pytest.raises(UserError, match="unknown prediction_type 'sample'"):
        to_x0(eps, x_t, abar, "sample")
    with pytest.raises(ValueError, match="prediction_type"):  # a scheduler refuses it where it is built
        DDPMScheduler(prediction_type="sample")
    with pytest.raises(UserError, match="unknown prediction_type"):  # before any data is loaded
        train_teacher(TeacherConfig(prediction_type="x0"), "unused-out", progress=False)


@pytest.mark.parametrize("prediction_type", VP_TYPES)
def test_the_loss_is_zero_for_a_network_that_outputs_its_target(prediction_type):
    """A stand-in network that knows x_0 and the noise (drawn with the loss's own seed) and outputs the target
    of `prediction_type`: zero loss for it, a positive one for the other type's target."""
    scheduler = DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type=prediction_type)
    loss_fn = diffusion_loss(scheduler)
    x0, y = torch.rand(6, 1, 8, 8) * 2 - 1, torch.arange(6)

    def network(kind: str):
        def forward(x_t, t, labels):
            torch.manual_seed(0)
            t_drawn = torch.randint(0, 1000, (len(x0),))  # the loss's draws, in its order
            noise = torch.randn_like(x0)
            assert torch.equal(t, t_drawn) and torch.equal(x_t, scheduler.add_noise(x0, noise, t))
            return training_target(x0, noise, scheduler.abar_like(t, x0), kind)

        return forward

    for kind in PREDICTION_TYPES:
        torch.manual_seed(0)
        loss = float(loss_fn(network(kind), x0, y))
        assert loss == 0.0 if kind == prediction_type else loss > 1e-3, (kind, loss)


@pytest.fixture(scope="module")
def v_run(tmp_path_factory):
    """A v-prediction teacher trained a few steps on digits, and a student distilled from it a few more."""
    out = tmp_path_factory.mktemp("v")
    optim = dict(max_train_steps=4, batch_size=16, device="cpu", warmup_steps=1)
    train_teacher(with_optim(TeacherConfig(arch="unet-tiny", prediction_type="v_prediction"), **optim), out,
                  progress=False)  # fmt: skip
    distill_student(out / "teacher.pt", with_optim(DistillConfig(), **optim), out, progress=False)
    return out


def test_a_v_teacher_and_its_student_record_their_prediction_type(v_run):
    for name in ("teacher.pt", "student.pt"):
        ckpt = load_checkpoint(v_run / name)
        assert ckpt["scheduler_config"]["prediction_type"] == "v_prediction", name
    assert load_checkpoint(v_run / "teacher.pt")["teacher_config"]["prediction_type"] == "v_prediction"
    for name, sampler in [("student.pt", "ddim"), ("student.pt", "ddpm"), ("student.pt", "dpmsolver++"),
                          ("teacher.pt", "ddim-cfg++")]:  # fmt: skip
        pipe = load_pipeline(v_run / name, scheduler=sampler)
        assert pipe.scheduler.prediction_type == "v_prediction", sampler
        assert pipe([1, 2], 0.5, num_steps=3).shape == (2, 1, 16, 16)


def test_a_checkpoint_without_prediction_type_is_epsilon(v_run, tmp_path):
    ckpt = load_checkpoint(v_run / "teacher.pt")
    del ckpt["scheduler_config"]["prediction_type"]  # as every checkpoint written before the setting
    save_checkpoint(tmp_path / "old.pt", ckpt)
    for sampler in ("ddim", "ddpm", "dpmsolver++"):
        assert load_pipeline(tmp_path / "old.pt", scheduler=sampler).scheduler.prediction_type == "epsilon"
    assert load_pipeline(REPO / "pretrained" / "mnist-teacher").scheduler.prediction_type == "epsilon"  # no key
