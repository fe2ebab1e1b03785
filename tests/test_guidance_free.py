"""Guidance trained into the model: GFT's and MG's losses are their formulas, their stop-gradients stop gradients,
and tiny GFT and MG models train on digits (eps and flow), say what they are, and sample in one pass per step."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model

import train_mnist
from cfg_minimal import (
    DistillConfig,
    TeacherConfig,
    UserError,
    distill_student,
    load_checkpoint,
    load_pipeline,
    save_checkpoint,
    train_teacher,
    with_optim,
)
from cfg_minimal.data import load_dataset
from cfg_minimal.guidance_free import (
    ModelGuidanceLoss,
    check_objective,
    gft_loss,
    gft_prediction,
    mg_target,
    objective_model_settings,
)
from cfg_minimal.loop import OptimConfig, fit
from cfg_minimal.schedulers import training_scheduler
from cfg_minimal.train import diffusion_loss, training_point

NULL = 10  # digits: ten classes, the null label is 10
FORMULATIONS = {  # prediction type -> (scheduler_config, timestep_sampling)
    "epsilon": (dict(beta_schedule="squaredcos_cap_v2", prediction_type="epsilon"), "uniform"),
    "v_prediction": (dict(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction"), "uniform"),
    "flow_prediction": (dict(prediction_type="flow_prediction"), "logit_normal"),
}


def batch(seed: int = 0, n: int = 6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 16, 16, generator=g)  # (B, 1, 16, 16)
    t = torch.randint(0, 1000, (n,), generator=g)  # (B,)
    y = torch.tensor([3, 7, NULL, 1, NULL, 9][:n])  # (B,) two rows unconditional
    return x, t, y


def scheduler_of(prediction_type: str):
    config, sampling = FORMULATIONS[prediction_type]
    return training_scheduler(dict(num_train_timesteps=1000, **config)), sampling


# ---- the formulas ----------------------------------------------------------------------------------------------


def test_the_gft_prediction_is_its_formula(arch):
    model = tiny_model(arch, guidance_embed=True, p_uncond=0.0)
    x_t, t, y = batch()
    beta = torch.tensor([0.5, 0.25, 0.7, 1.0, 0.3, 0.9])  # (B,)
    with torch.no_grad():
        got = gft_prediction(model, x_t, t, y, beta, NULL)
        pred_s = model(x_t, t, y, guidance=1 / beta)  # (B, C, H, W)
        pred_u = model(x_t, t, torch.full_like(y, NULL), guidance=torch.zeros(6))  # (B, C, H, W)
    b = beta.view(-1, 1, 1, 1)
    by_hand = b * pred_s + (1 - b) * pred_u
    cond = y != NULL
    torch.testing.assert_close(got[cond], by_hand[cond], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[~cond], pred_u[~cond], rtol=1e-5, atol=1e-6)  # the null rows: eps(x | null)


@pytest.mark.parametrize("prediction_type", list(FORMULATIONS))
def test_the_gft_loss_is_its_formula_with_its_draws(prediction_type):
    """t, x_t and the target as train.training_point draws them, then the label dropout, then beta ~ U(beta_min, 1)."""
    scheduler, sampling = scheduler_of(prediction_type)
    model = tiny_model("unet-tiny", guidance_embed=True, p_uncond=0.0)
    x0, _, _ = batch(1)
    y = torch.tensor([3, 7, 2, 1, 0, 9])
    torch.manual_seed(5)
    got = gft_loss(scheduler, sampling, null_class=NULL, p_uncond=0.4, beta_min=0.2)(model, x0, y)
    torch.manual_seed(5)
    t, x_t, target = training_point(scheduler, x0, sampling)
    y_in = torch.where(torch.rand(6) < 0.4, torch.full_like(y, NULL), y)
    beta = 0.2 + 0.8 * torch.rand(6)
    assert (y_in == NULL).any() and (y_in != NULL).any(), "the draw should mix both kinds of rows"
    with torch.no_grad():
        pred_u = model(x_t, t, torch.full_like(y, NULL), guidance=torch.zeros(6))
        pred_s = model(x_t, t, y_in, guidance=torch.where(y_in == NULL, 0.0, 1 / beta))
    b = torch.where(y_in == NULL, 1.0, beta).view(-1, 1, 1, 1)
    torch.testing.assert_close(got, F.mse_loss(b * pred_s + (1 - b) * pred_u, target), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("prediction_type", ["epsilon", "flow_prediction"])
def test_gft_at_beta_one_is_the_plain_conditional_loss(prediction_type):
    scheduler, sampling = scheduler_of(prediction_type)
    model = tiny_model("unet-tiny", guidance_embed=True, p_uncond=0.0)
    x0, _, _ = batch(2)
    y = torch.tensor([3, 7, 2, 1, 0, 9])
    torch.manual_seed(3)
    got = gft_loss(scheduler, sampling, null_class=NULL, p_uncond=0.0, beta_min=1.0)(model, x0, y)
    torch.manual_seed(3)
    t, x_t, target = training_point(scheduler, x0, sampling)
    assert got == F.mse_loss(model(x_t, t, y, guidance=torch.ones(6)), target)


def test_the_mg_target_is_its_formula(arch):
    guide = tiny_model(arch, p_uncond=0.0)
    x_t, t, y = batch()
    target = torch.randn(6, 1, 16, 16)
    w = torch.tensor([1.45, 1.7, 1.45, 1.0, 1.2, 1.9])  # (B,)
    got = mg_target(guide, x_t, t, y, target, w, NULL)
    with torch.no_grad():
        direction = guide(x_t, t, y) - guide(x_t, t, torch.full_like(y, NULL))  # (B, C, H, W)
    by_hand = target + (w - 1).view(-1, 1, 1, 1) * direction
    cond = y != NULL
    torch.testing.assert_close(got[cond], by_hand[cond], rtol=1e-5, atol=1e-6)
    assert torch.equal(got[~cond], target[~cond])  # a null row keeps the plain target
    assert torch.equal(got[3], target[3])  # w = 1: no guidance
    assert torch.equal(mg_target(guide, x_t, t, y, target, torch.ones(6), NULL), target)


@pytest.mark.parametrize("prediction_type", list(FORMULATIONS))
def test_the_mg_loss_is_its_formula_and_at_w_one_the_plain_loss_bit_for_bit(prediction_type):
    """w = 1: exactly train.diffusion_loss (the same draws, the label dropout here instead of in the model)."""
    scheduler, sampling = scheduler_of(prediction_type)
    plain = tiny_model("unet-tiny", p_uncond=0.3).train()  # drops labels itself, as a CFG teacher does
    model = tiny_model("unet-tiny", p_uncond=0.0).train()  # the same weights; the MG loss drops the labels
    x0, _, _ = batch(4)
    y = torch.tensor([3, 7, 2, 1, 0, 9])
    torch.manual_seed(7)
    expected = diffusion_loss(scheduler, sampling)(plain, x0, y)
    at_one = ModelGuidanceLoss(scheduler, sampling, null_class=NULL, p_uncond=0.3, scale=1.0, guide=model)
    torch.manual_seed(7)
    assert at_one(model, x0, y) == expected
    guide = tiny_model("unet-tiny", seed=1, p_uncond=0.0)
    mg = ModelGuidanceLoss(scheduler, sampling, null_class=NULL, p_uncond=0.3, scale=1.45, t_max=0.6, guide=guide)
    torch.manual_seed(7)
    got = mg(model, x0, y)
    torch.manual_seed(7)
    t, x_t, target = training_point(scheduler, x0, sampling)
    y_in = torch.where(torch.rand(6) < 0.3, torch.full_like(y, NULL), y)
    w = torch.where((t < 600) & (y_in != NULL), 1.45, 1.0)  # (B,) the term inside t_max T, on labelled rows
    with torch.no_grad():
        direction = guide(x_t, t, y_in) - guide(x_t, t, torch.full_like(y, NULL))
    by_hand = F.mse_loss(model(x_t, t, y_in), target + (w - 1).view(-1, 1, 1, 1) * direction)
    torch.testing.assert_close(got, by_hand, rtol=1e-5, atol=1e-7)


# ---- the stop-gradients ------------------------------------------------------------------------------------------


def grads(model: torch.nn.Module, loss: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.allclose(x, y, rtol=1e-4, atol=1e-7) for x, y in zip(a, b))


def test_no_gradient_flows_through_gfts_unconditional_pass():
    model = tiny_model("unet-tiny", guidance_embed=True, p_uncond=0.0)
    x_t, t, _ = batch()
    y, target = torch.tensor([3, 7, 2, 1, 0, 9]), torch.randn(6, 1, 16, 16)
    beta = torch.tensor([0.5, 0.25, 0.7, 0.8, 0.3, 0.9]).view(-1, 1, 1, 1)
    got = grads(model, F.mse_loss(gft_prediction(model, x_t, t, y, beta.flatten(), NULL), target))

    def by_hand(stop: bool) -> list[torch.Tensor]:
        pred_u = model(x_t, t, torch.full_like(y, NULL), guidance=torch.zeros(6))
        pred_u = pred_u.detach() if stop else pred_u
        pred = beta * model(x_t, t, y, guidance=1 / beta.flatten()) + (1 - beta) * pred_u
        return grads(model, F.mse_loss(pred, target))

    assert same(got, by_hand(stop=True))
    assert not same(got, by_hand(stop=False))  # the test can tell: through pred_u the gradient differs


def test_no_gradient_flows_through_mgs_guidance_term():
    """With the online model as its own guide (the worst case: EMA weights take no gradient at all)."""
    model = tiny_model("unet-tiny", p_uncond=0.0)
    x_t, t, _ = batch()
    y, target, w = torch.tensor([3, 7, 2, 1, 0, 9]), torch.randn(6, 1, 16, 16), torch.full((6,), 1.45)
    got = grads(model, F.mse_loss(model(x_t, t, y), mg_target(model, x_t, t, y, target, w, NULL)))

    def by_hand(stop: bool) -> list[torch.Tensor]:
        direction = model(x_t, t, y) - model(x_t, t, torch.full_like(y, NULL))
        direction = direction.detach() if stop else direction
        return grads(model, F.mse_loss(model(x_t, t, y), target + 0.45 * direction))

    assert same(got, by_hand(stop=True))
    assert not same(got, by_hand(stop=False))


# ---- the loop's hook ---------------------------------------------------------------------------------------------


def test_mg_reads_the_runs_ema_from_its_start_step(tmp_path):
    """loop.fit hands the loss its Run; the guidance term is off for the first `start` share of the train steps,
    then comes from the run's EMA weights (the very module fit returns), never from the online model."""
    scheduler, sampling = scheduler_of("epsilon")
    loss = ModelGuidanceLoss(scheduler, sampling, null_class=NULL, p_uncond=0.1, scale=1.45, start=0.5)
    seen = []
    original = loss.guide_model
    loss.guide_model = lambda: seen.append(original()) or seen[-1]
    model = tiny_model("unet-tiny", p_uncond=0.0)
    optim = OptimConfig(max_train_steps=4, batch_size=4, warmup_steps=1, device="cpu")
    result = fit(model, loss, load_dataset("digits"), tmp_path / "teacher.pt", {}, optim, progress=False)
    assert seen[:2] == [None, None] and all(g is result.ema for g in seen[2:]) and len(seen) == 4
    assert result.ema is not result.model


# ---- training, checkpoints, sampling -----------------------------------------------------------------------------


def count_passes(pipe, labels, scale, num_steps: int) -> list[int]:
    """The batch size of every network evaluation while sampling."""
    sizes: list[int] = []
    handle = pipe.model.register_forward_hook(lambda module, args, out: sizes.append(args[0].shape[0]))
    try:
        images = pipe(labels, scale, num_steps=num_steps, generator=0)
    finally:
        handle.remove()
    assert torch.isfinite(images).all() and images.shape == (len(labels), 1, 16, 16)
    return sizes


@pytest.mark.parametrize("objective", ["gft", "mg"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "flow_prediction"])
def test_a_tiny_model_trains_records_its_objective_and_samples_in_one_pass(objective, prediction_type, tmp_path):
    extra = dict(gft_beta_min=0.2) if objective == "gft" else dict(mg_scale=1.5, mg_start=0.5)
    cfg = TeacherConfig(arch="unet-tiny", prediction_type=prediction_type, objective=objective, **extra)
    cfg = with_optim(cfg, max_train_steps=6, batch_size=8, warmup_steps=1, device="cpu")
    result = train_teacher(cfg, tmp_path, progress=False)
    assert all(torch.isfinite(p).all() for p in result.ema.parameters())
    ckpt = load_checkpoint(tmp_path / "teacher.pt", kind="teacher")
    stored = ckpt["teacher_config"]
    assert stored["objective"] == objective and all(stored[k] == v for k, v in extra.items())
    assert ckpt["scheduler_config"]["prediction_type"] == prediction_type
    assert ckpt["model_config"]["guidance_embed"] is (objective == "gft") and ckpt["model_config"]["p_uncond"] == 0
    assert ckpt.get("guidance_range") == ([0.0, 5.0] if objective == "gft" else None)
    pipe = load_pipeline(tmp_path / "teacher.pt")
    labels = [0, 3, 7]
    own_scale = 3.0 if objective == "gft" else 1.0  # GFT: any s in one pass; MG: s = 1 is its setting
    assert pipe.is_student is (objective == "gft")
    assert count_passes(pipe, labels, own_scale, num_steps=4) == [3] * 4  # one evaluation per step, per image
    if objective == "mg":  # CFG on an MG model still works: two passes, in one batch of 2B
        assert count_passes(pipe, labels, 3.0, num_steps=4) == [6] * 4
    else:
        with pytest.raises(UserError, match="nothing to distil"):
            distill_student(tmp_path / "teacher.pt", DistillConfig(), tmp_path / "student")
        edited = {**ckpt, "teacher_config": {**stored, "objective": "diffusion"}}  # a CFG teacher has no guidance input
        save_checkpoint(tmp_path / "edited.pt", edited)
        with pytest.raises(UserError, match="says it is a teacher, but its model_config has guidance_embed True"):
            load_checkpoint(tmp_path / "edited.pt")
    resumed = train_teacher(with_optim(cfg, max_train_steps=8), tmp_path, if_exists="resume", progress=False)
    assert load_checkpoint(tmp_path / "teacher.pt")["train_step"] == 8 and resumed.ema is not None


def test_a_gft_model_at_s0_is_its_unconditional_model():
    """s = 0 drops the label entirely (embeddings.Conditioning): the model GFT trains as eps(x | null)."""
    model = tiny_model("unet-tiny", guidance_embed=True, p_uncond=0.0)
    x_t, t, _ = batch()
    y = torch.tensor([3, 7, 2, 1, 0, 9])
    zeros = torch.zeros(6)
    assert torch.equal(model(x_t, t, y, guidance=zeros), model(x_t, t, torch.full_like(y, NULL), guidance=zeros))


# ---- settings --------------------------------------------------------------------------------------------------


def test_the_cli_sets_the_objective_and_its_settings():
    args = train_mnist.parse_args(["--objective", "mg", "--mg-scale", "1.3", "--mg-start", "0.1", "--mg-t-max", "0.5"])
    teacher = train_mnist.configs_from(args)["teacher"]
    assert (teacher.objective, teacher.mg_scale, teacher.mg_start, teacher.mg_t_max) == ("mg", 1.3, 0.1, 0.5)
    teacher = train_mnist.configs_from(train_mnist.parse_args(["--objective", "gft", "--gft-beta-min", "0.25"]))
    assert (teacher["teacher"].objective, teacher["teacher"].gft_beta_min) == ("gft", 0.25)
    assert train_mnist.configs_from(train_mnist.parse_args([]))["teacher"].objective == "diffusion"


@pytest.mark.parametrize(
    "changes, message",
    [(dict(objective="cfg"), "unknown objective"),
     (dict(objective="mg", mg_scale=2.0), "mg_scale must satisfy"),
     (dict(objective="mg", mg_scale=0.5), "mg_scale must satisfy"),
     (dict(objective="mg", mg_start=1.0), "mg_start must satisfy"),
     (dict(objective="gft", gft_beta_min=0.0), "gft_beta_min must satisfy"),
     (dict(objective="gft", mg_scale=1.2), "mg_scale is a setting of the mg objective"),
     (dict(objective="diffusion", gft_beta_min=0.3), "gft_beta_min is a setting of the gft objective"),
     (dict(objective="gft", p_uncond=0.0), "needs the unconditional model")],
)  # fmt: skip
def test_bad_settings_are_refused(changes, message):
    with pytest.raises(UserError, match=message):
        check_objective(TeacherConfig(**changes))


def test_the_plain_objective_builds_the_model_it_always_did():
    assert objective_model_settings(TeacherConfig(p_uncond=0.2)) == dict(p_uncond=0.2)
    assert objective_model_settings(TeacherConfig(objective="gft")) == dict(p_uncond=0.0, guidance_embed=True)


def test_stage_all_with_gft_trains_the_model_alone(tmp_path):
    out = tmp_path / "run"
    argv = ["--objective", "gft", "--arch", "unet-tiny", "--teacher-train-steps", "10", "--teacher-batch-size", "8",
            "--sampling-steps", "2", "--device", "cpu", "--out", str(out), "--no-progress"]  # fmt: skip
    assert train_mnist.main(argv) == 0
    assert (out / "teacher.pt").is_file() and (out / "samples_teacher.png").is_file()
    assert not (out / "student.pt").exists()
    assert load_checkpoint(out / "teacher.pt")["teacher_config"]["objective"] == "gft"
