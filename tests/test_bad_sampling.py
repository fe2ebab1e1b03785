"""Probes of reliability round three (issue 26) on the sampling surface: seeds that reproduce on every
sampler, schedules that keep s = 0 and s = 1 exact, a student warned where a schedule leaves its range,
guide models and guider settings checked, and the Pipeline's inputs refused with one clear line."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import randomize, tiny_model
from test_sampling import LABELS, make_pipeline

from cfg_minimal import APG, CFG, Autoguidance, CFGZeroStar, UserError, guider_from_spec, make_student
from cfg_minimal.guiders import scheduled_scale
from cfg_minimal.models import build_model
from cfg_minimal.sampling import sample_scale_grid


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmsolver++"])
def test_a_seed_reproduces_every_sampler_however_the_samples_are_batched(sampler):
    """DDPM's per-step noise used to come from the global generator: two seeded runs differed by up to 1.0."""
    pipe = make_pipeline(sampler=sampler)
    first = pipe(LABELS, 3.0, num_steps=4, generator=7)
    torch.rand(100)  # the global generator moves on
    assert torch.equal(pipe(LABELS, 3.0, num_steps=4, generator=7), first)
    pipe.max_batch_size = 3  # another split: the same noise per sample (the network may round differently)
    torch.testing.assert_close(pipe(LABELS, 3.0, num_steps=4, generator=7), first, rtol=1e-5, atol=1e-5)
    last_two = pipe(LABELS[2:], 3.0, num_steps=4, generator=pipe.noise_generators(2, 7, start=2))
    torch.testing.assert_close(last_two, first[2:], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(pipe(LABELS, 3.0, num_steps=4, generator=8), first, atol=1e-3)


def test_a_seeded_ddpm_grid_is_the_same_twice_and_shares_noise_along_a_row():
    pipe = make_pipeline(sampler="ddpm")
    grid = sample_scale_grid(pipe, [1.0, 1.0], n_per_class=1, num_steps=4, seed=0)  # (R, S, K, C, H, W)
    torch.rand(100)
    assert torch.equal(sample_scale_grid(pipe, [1.0, 1.0], n_per_class=1, num_steps=4, seed=0), grid)
    assert torch.equal(grid[:, 0], grid[:, 1])  # the same x_T and the same step noise along a row


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_schedules_keep_s0_unconditional_and_s1_conditional_exactly(schedule):
    """s_t = 1 + (s - 1) ramp used to run the s = 0 column from +1 to -1 over a run."""
    t, T = torch.arange(0, 1000, 37), 1000
    for s in (0.0, 1.0, 0.4):
        assert torch.equal(scheduled_scale(torch.full_like(t, s, dtype=torch.float32), t, T, schedule),
                           torch.full_like(t, s, dtype=torch.float32))  # fmt: skip
    pipe = make_pipeline()
    x_T = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    for s in (0.0, 1.0):
        scheduled = pipe(LABELS, torch.full((4,), s), num_steps=4, x_T=x_T, guidance_schedule=schedule)
        assert torch.equal(scheduled, pipe(LABELS, torch.full((4,), s), num_steps=4, x_T=x_T))


def test_a_student_is_warned_where_a_schedule_takes_s_beyond_its_range():
    pipe = make_pipeline()
    pipe.model, pipe.guidance_range = make_student(pipe.model).eval(), (0.0, 6.0)
    with pytest.warns(UserWarning, match=r"linear schedule takes s_t over \[1, 11\]"):
        pipe(LABELS, 6.0, num_steps=2, guidance_schedule="linear")
    with pytest.warns(UserWarning, match="outside the student's trained range"):
        pipe(LABELS, 6.5, num_steps=2)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe(LABELS, 3.5, num_steps=2, guidance_schedule="cosine")  # 1 + 2 * 2.5 = 6: inside
        pipe(LABELS, 0.0, num_steps=2, guidance_schedule="linear")  # s = 0 stays 0


def test_autoguidance_refuses_a_guide_of_another_size_or_kind(arch):
    pipe = make_pipeline(arch)
    others = [randomize(build_model(arch, image_size=8)).eval(), randomize(build_model(arch, in_channels=3)).eval(),
              make_student(tiny_model(arch))]  # fmt: skip
    for guide in others:
        with pytest.raises(UserError, match="guiding model must be a teacher of the same dataset"):
            pipe(LABELS, 2.0, num_steps=2, guider=Autoguidance(guide_model=guide))


@pytest.mark.parametrize("make, match", [
    (lambda: guider_from_spec("apg:eta=0,eta=1"), "sets eta twice"),
    (lambda: APG(momentum=1e10), r"momentum beta must lie in \(-1, 1\)"),
    (lambda: APG(eta="0"), "eta must be a finite number"),
    (lambda: CFGZeroStar(zero_init_steps=1.5), "zero_init_steps must be a whole number"),
    (lambda: CFGZeroStar(optimized_scale=1), "optimized_scale must be a bool"),
    (lambda: CFG(rescale=float("nan")), "rescale must be a finite number"),
])  # fmt: skip
def test_guider_settings_of_the_wrong_kind_are_refused(make, match):
    with pytest.raises(UserError, match=match):
        make()


def test_zero_init_covering_every_sampling_step_is_refused():
    """It used to zero every step: labels 1, 5 and 7 gave one and the same image."""
    pipe = make_pipeline()
    with pytest.raises(UserError, match=r"zero_init_steps \(100\) must be below the 4 sampling steps"):
        pipe(LABELS, 3.0, num_steps=4, guider=CFGZeroStar(zero_init_steps=100))
    pipe(LABELS, 3.0, num_steps=4, guider=CFGZeroStar(zero_init_steps=3))


@pytest.mark.parametrize("kwargs, match", [
    (dict(guidance_scale=torch.tensor([1 + 2j] * 4)), "real numbers"),
    (dict(guidance_scale=torch.tensor([True] * 4)), "real numbers"),
    (dict(labels=torch.zeros(4, dtype=torch.long, device="meta")), "meta device"),
    (dict(generator=np.random.default_rng(0)), "generator must be a seed"),
    (dict(generator=[torch.Generator()] * 3), "one torch.Generator per label"),
    (dict(guider={"eta": 0}), "must be a cfg_minimal Guider"),
    (dict(x_T=torch.full((4, 1, 16, 16), 1e30)), r"\|x_T\| up to 1e\+30"),
])  # fmt: skip
def test_pipeline_inputs_it_cannot_use_are_one_clear_line(kwargs, match):
    pipe = make_pipeline()
    call = dict(labels=LABELS, guidance_scale=3.0, num_steps=2) | kwargs
    with pytest.raises(UserError, match=match):
        pipe(**call)


def test_numpy_integers_work_where_python_integers_do():
    pipe = make_pipeline()
    plain = pipe(LABELS, 3.0, num_steps=2, generator=3)
    assert torch.equal(pipe(LABELS, np.float64(3.0), num_steps=np.int64(2), generator=np.int64(3)), plain)


def test_sample_refuses_a_guide_with_another_noise_schedule(tmp_path, capsys):
    import sample
    from cfg_minimal import TeacherConfig, train_teacher, with_optim

    for name, schedule in (("model", "squaredcos_cap_v2"), ("guide", "linear")):
        cfg = with_optim(TeacherConfig(arch="unet-tiny", beta_schedule=schedule), max_train_steps=1)
        train_teacher(cfg, tmp_path / name, progress=False)
    out = tmp_path / "grid.png"
    guide = str(tmp_path / "guide" / "teacher.pt")
    args = [str(tmp_path / "model" / "teacher.pt"), "--guider", "autoguidance", "--guide-ckpt", guide]
    code = sample.main([*args, "--sampling-steps", "2", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "another noise schedule" in err[0] and not out.exists()


def test_a_subclass_without_a_name_of_its_own_does_not_replace_its_parent():
    from dataclasses import dataclass

    from cfg_minimal.guidance import GUIDERS

    @dataclass(frozen=True, eq=False)
    class Louder(CFG):  # inherits CFG's name
        pass

    assert GUIDERS["cfg"] is CFG and type(guider_from_spec("cfg")) is CFG


def test_a_student_refuses_the_cfg_plus_plus_sampler_in_the_pipeline_too():
    from cfg_minimal.schedulers import DDIMCFGPPScheduler

    pipe = make_pipeline()
    pipe.model = make_student(pipe.model).eval()
    pipe.scheduler = DDIMCFGPPScheduler(beta_schedule="squaredcos_cap_v2")
    with pytest.raises(UserError, match="CFG\\+\\+ sampler re-noises with the unconditional prediction"):
        pipe(LABELS, 1.0, num_steps=2)


def test_distillation_refuses_a_cfg_spec_out_of_range_and_an_unknown_schedule():
    from cfg_minimal.distill import DistillConfig, target_guider

    with pytest.raises(UserError, match=r"rescale must be a number in \[0, 1\]"):
        target_guider(DistillConfig(guider="cfg:rescale=5"))
    with pytest.raises(UserError, match="unknown guidance schedule"):
        scheduled_scale(torch.ones(2), torch.zeros(2), 1000, "exponential")
