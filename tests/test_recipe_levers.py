"""The training levers of the laptop recipe: min-SNR-gamma weighting, logit-normal timesteps on the VP process,
the EMA warm-up, and runs that predate them resuming as they were trained."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import train_mnist
from cfg_minimal import OptimConfig, TeacherConfig, UserError, budget, data, recipes, train_teacher, with_optim
from cfg_minimal.data import DATASETS, register_dataset
from cfg_minimal.loop import ema_decay_at
from cfg_minimal.predictions import to_x0
from cfg_minimal.schedulers import DDPMScheduler
from cfg_minimal.train import diffusion_loss, min_snr_weight


class Fixed(torch.nn.Module):
    """A stand-in network whose output is a fixed function of x_t and t, so a loss can be checked by hand."""

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return 0.5 * x_t + t.view(-1, 1, 1, 1) / 1000


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_the_x0_error_by_min_snr_gamma(prediction_type):
    """Hang et al. 2023: for eps or v, the weighted loss equals min(SNR_t, gamma) ||x0_hat - x0||^2, with x0_hat
    the x_0 the network's output implies: the weights are the conversion factors, not a guess."""
    scheduler = DDPMScheduler(prediction_type=prediction_type)
    x0 = torch.randn(64, 1, 8, 8)
    gamma = 5.0
    torch.manual_seed(0)
    weighted = diffusion_loss(scheduler, "uniform", gamma)(Fixed(), x0, torch.zeros(64, dtype=torch.long))
    torch.manual_seed(0)  # the same t, noise and x_t again
    t = scheduler.training_timesteps(64, "cpu")
    x_t = scheduler.add_noise(x0, torch.randn_like(x0), t)
    abar = scheduler.abar_like(t, x0)  # (B, 1, 1, 1)
    x0_hat = to_x0(Fixed()(x_t, t, None), x_t, abar, prediction_type)
    snr = (abar / (1 - abar)).flatten()
    by_hand = (snr.clamp(max=gamma) * (x0_hat - x0).pow(2).flatten(1).mean(1)).mean()
    assert torch.allclose(weighted, by_hand, rtol=1e-4), (weighted, by_hand)


def test_min_snr_with_a_gamma_above_every_snr_is_the_plain_eps_loss():
    scheduler = DDPMScheduler()
    t = torch.arange(0, 1000, 37)
    assert torch.allclose(min_snr_weight(scheduler, t, 1e12), torch.ones(len(t)))
    x0 = torch.randn(32, 1, 8, 8)
    torch.manual_seed(1)
    weighted = diffusion_loss(scheduler, "uniform", 1e12)(Fixed(), x0, torch.zeros(32, dtype=torch.long))
    torch.manual_seed(1)
    plain = diffusion_loss(scheduler, "uniform")(Fixed(), x0, torch.zeros(32, dtype=torch.long))
    assert torch.allclose(weighted, plain, rtol=1e-5)
    assert min_snr_weight(scheduler, torch.tensor([0]), 5.0) < 0.01  # the cleanest timestep counts little


def test_logit_normal_timesteps_on_the_vp_process_favour_the_middle():
    """t = floor(u T), u ~ logit-normal(0, 1) (SD3): integers in [0, T) with P(T/4 <= t < 3T/4) = P(|z| < ln 3)
    = 0.728, against 0.5 for uniform timesteps."""
    scheduler = DDPMScheduler()
    torch.manual_seed(0)
    t = scheduler.training_timesteps(20000, "cpu", "logit_normal")
    assert t.dtype == torch.long and 0 <= t.min() and t.max() < 1000
    middle = ((t >= 250) & (t < 750)).float().mean().item()
    expected = math.erf(math.log(3) / math.sqrt(2))  # 0.728
    assert abs(middle - expected) < 0.015, middle
    uniform = scheduler.training_timesteps(20000, "cpu", "uniform")
    assert abs(((uniform >= 250) & (uniform < 750)).float().mean().item() - 0.5) < 0.015
    with pytest.raises(ValueError, match="unknown timestep_sampling"):
        scheduler.training_timesteps(4, "cpu", "lognormal")


def test_the_ema_warmup_default_is_the_usual_one_and_sets_the_horizon():
    default = OptimConfig()
    assert [ema_decay_at(t, default) for t in (0, 9, 890, 10**6)] == [
        min(0.999, (1 + t) / (10 + t)) for t in (0, 9, 890, 10**6)
    ]
    short = OptimConfig(ema_warmup=3.0, ema_decay=0.9999)
    assert ema_decay_at(299, short) == pytest.approx(300 / 303)  # averages about the last third of 300 train steps
    assert ema_decay_at(10**7, short) == 0.9999


def test_a_run_trains_with_the_levers_and_resumes_with_them(tmp_path):
    cfg = with_optim(TeacherConfig(arch="unet-tiny", min_snr_gamma=5.0, timestep_sampling="logit_normal"),
                     max_train_steps=6, batch_size=8, ema_warmup=3.0, device="cpu")  # fmt: skip
    train_teacher(cfg, tmp_path, progress=False)
    stored = torch.load(tmp_path / "teacher.pt", weights_only=False)["teacher_config"]
    assert stored["min_snr_gamma"] == 5.0 and stored["timestep_sampling"] == "logit_normal"
    assert stored["optim"]["ema_warmup"] == 3.0
    changed = with_optim(replace(cfg, min_snr_gamma=2.0), max_train_steps=8)
    with pytest.raises(UserError, match="min_snr_gamma=5.0"):  # a lever is part of the run: not changed on resume
        train_teacher(changed, tmp_path, "resume", progress=False)


def test_a_run_from_before_the_levers_resumes_as_it_was_trained(tmp_path):
    """A checkpoint whose stored config has no min_snr_gamma / ema_warmup (written before they existed) resumes
    with the plain loss and the (1 + t) / (10 + t) warm-up it was trained with."""
    cfg = with_optim(TeacherConfig(arch="unet-tiny"), max_train_steps=4, batch_size=8, device="cpu")
    train_teacher(cfg, tmp_path, progress=False)
    ckpt = torch.load(tmp_path / "teacher.pt", weights_only=False)
    del ckpt["teacher_config"]["min_snr_gamma"], ckpt["teacher_config"]["optim"]["ema_warmup"]
    torch.save(ckpt, tmp_path / "teacher.pt")
    train_teacher(with_optim(cfg, max_train_steps=6), tmp_path, "resume", progress=False)
    resumed = torch.load(tmp_path / "teacher.pt", weights_only=False)
    assert resumed["train_step"] == 6
    assert resumed["teacher_config"]["min_snr_gamma"] is None and resumed["teacher_config"]["optim"]["ema_warmup"] == 9


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(min_snr_gamma=-1.0), "min_snr_gamma must be a positive number"),
        (dict(min_snr_gamma=5.0, prediction_type="flow_prediction"), "leave it out"),
        (dict(min_snr_gamma=5.0, objective="gft"), "leave it out"),
        (dict(timestep_sampling="lognormal"), "timestep_sampling must be"),
    ],
)
def test_bad_lever_settings_are_one_line_errors(tmp_path, changes, message):
    cfg = with_optim(TeacherConfig(arch="unet-tiny", **changes), max_train_steps=2, batch_size=4, device="cpu")
    with pytest.raises(UserError, match=message):
        train_teacher(cfg, tmp_path, progress=False)
    assert not (tmp_path / "teacher.pt").exists()


def test_plain_loss_is_unchanged_by_the_weighting_code():
    """Without min_snr_gamma the loss is F.mse_loss itself (bit-equal), so existing runs reproduce."""
    scheduler = DDPMScheduler()
    x0 = torch.randn(16, 1, 8, 8)
    torch.manual_seed(2)
    loss = diffusion_loss(scheduler)(Fixed(), x0, torch.zeros(16, dtype=torch.long))
    torch.manual_seed(2)
    t = scheduler.training_timesteps(16, "cpu")
    noise = torch.randn_like(x0)
    x_t = scheduler.add_noise(x0, noise, t)
    assert torch.equal(loss, F.mse_loss(Fixed()(x_t, t, None), noise))


@pytest.fixture
def recipe_dataset():
    """digits registered again with a teacher recipe (restored afterwards)."""
    before = dict(data._REGISTRY)
    settings = {"min_snr_gamma": 5.0, "optim.lr": 3e-3, "optim.ema_warmup": 4.0}
    yield register_dataset(replace(DATASETS["digits"], teacher_settings=settings), replace=True)
    data._REGISTRY.clear()
    data._REGISTRY.update(before)


def test_a_data_sets_recipe_is_what_its_teacher_trains_with_unless_a_flag_says_otherwise(recipe_dataset):
    cfg = recipes.teacher_config("digits")
    assert (cfg.min_snr_gamma, cfg.optim.lr, cfg.optim.ema_warmup) == (5.0, 3e-3, 4.0)
    assert recipes.teacher_config("cifar10") == TeacherConfig(dataset="cifar10")  # no recipe: the dataclass defaults
    teacher = train_mnist.configs_from(train_mnist.parse_args(["--dataset", "digits"]))["teacher"]
    assert (teacher.min_snr_gamma, teacher.optim.lr, teacher.optim.ema_warmup) == (5.0, 3e-3, 4.0)
    given = ["--dataset", "digits", "--teacher-lr", "2e-3", "--min-snr-gamma", "2"]
    teacher = train_mnist.configs_from(train_mnist.parse_args(given))["teacher"]
    assert (teacher.min_snr_gamma, teacher.optim.lr, teacher.optim.ema_warmup) == (2.0, 2e-3, 4.0)


def test_a_recipe_naming_no_field_is_refused(recipe_dataset):
    register_dataset(replace(recipe_dataset, teacher_settings={"optim.learning_rate": 1e-3}), replace=True)
    with pytest.raises(UserError, match="'optim.learning_rate', which is not a TeacherConfig field"):
        recipes.teacher_config("digits")


def test_a_budget_in_minutes_becomes_the_train_steps_that_fit(monkeypatch):
    """A fake clock: a run costs 2 s (data, model, checkpoint) + 0.5 s per train step. The three probes take
    3 + 3 + 18 = 24 s; 60 - 24 - 2 = 34 s are left for the run's train steps: 68 of them."""
    clock = [0.0]
    monkeypatch.setattr(budget.time, "perf_counter", lambda: clock[0])

    def fake_train(cfg, folder, progress):
        clock[0] += 2.0 + 0.5 * cfg.optim.max_train_steps

    monkeypatch.setattr(budget, "train_teacher", fake_train)
    assert budget.train_steps_in(1.0, TeacherConfig()) == 68
    with pytest.raises(UserError, match="do not fit one train step"):
        budget.train_steps_in(0.3, TeacherConfig())


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--teacher-train-steps", "5"], "--teacher-train-steps gives the count itself"),
        (["--stage", "distill"], "--stage distill trains no teacher"),
        (["--resume"], "--resume continues to the train steps stored in the run"),
    ],
)
def test_teacher_minutes_with_a_count_or_without_a_teacher_is_refused(tmp_path, capsys, flags, message):
    assert train_mnist.main(["--teacher-minutes", "1", "--out", str(tmp_path), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "teacher.pt").exists()


def test_a_run_started_before_its_data_sets_recipe_changed_resumes_with_its_own_settings(tmp_path):
    """An eps run at batch 8 (the defaults of its day), resumed after digits' recipe became a flow teacher at
    batch 4: it continues as it was trained, and the new recipe trains new runs only."""
    flags = ["--dataset", "digits", "--stage", "teacher", "--arch", "unet-tiny", "--sampling-steps", "2", "--device",
             "cpu", "--no-progress", "--out", str(tmp_path / "old")]  # fmt: skip
    assert train_mnist.main([*flags, "--teacher-train-steps", "3", "--teacher-batch-size", "8"]) == 0
    before = dict(data._REGISTRY)
    try:
        laptop = {"prediction_type": "flow_prediction", "optim.batch_size": 4}
        register_dataset(replace(DATASETS["digits"], teacher_settings=laptop), replace=True)
        assert train_mnist.main([*flags, "--resume", "--teacher-train-steps", "5"]) == 0
        resumed = torch.load(tmp_path / "old" / "teacher.pt", weights_only=False)
        assert resumed["train_step"] == 5 and resumed["teacher_config"]["prediction_type"] == "epsilon"
        assert resumed["teacher_config"]["optim"]["batch_size"] == 8
        new = [*flags[:-1], str(tmp_path / "new"), "--teacher-train-steps", "2"]
        assert train_mnist.main(new) == 0
        fresh = torch.load(tmp_path / "new" / "teacher.pt", weights_only=False)["teacher_config"]
        assert (fresh["prediction_type"], fresh["optim"]["batch_size"]) == ("flow_prediction", 4)
    finally:
        data._REGISTRY.clear()
        data._REGISTRY.update(before)
