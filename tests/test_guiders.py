"""Guiders beyond plain CFG: parity with diffusers' guiders where diffusers has the method, the paper's
formula written out otherwise, plain CFG exactly at each neutral setting, per-sample behaviour, and
the distillation target of a guider."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_model
from test_guidance import CountingModel, inputs
from test_sampling import LABELS, make_pipeline

from cfg_minimal import UserError
from cfg_minimal.distill import DistillConfig, distillation_target, make_student
from cfg_minimal.guidance import cfg_combine, guided_noise_pred
from cfg_minimal.guiders import (
    Guider,
    GuiderState,
    apg,
    cfg_zero_star,
    guide_noise_pred,
    guider_from_spec,
    scheduled_scale,
    tangential_cfg,
)


def preds(batch: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(eps_u, eps_c) (B, 1, 8, 8): correlated, as a network's two predictions are."""
    g = torch.Generator().manual_seed(seed)
    eps_u = torch.randn(batch, 1, 8, 8, generator=g)
    return eps_u, 0.8 * eps_u + 0.6 * torch.randn(batch, 1, 8, 8, generator=g)


def diffusers_guider(name: str, **kwargs):
    guiders = pytest.importorskip("diffusers.guiders")
    return getattr(guiders, name)(**kwargs)


# --- parity with diffusers, step by step ---------------------------------------------------------


@pytest.mark.parametrize("eta, r, beta", [(0.0, 0.0, 0.0), (0.3, 2.0, 0.0), (0.0, 3.0, -0.5), (1.0, 0.0, 0.5)])
def test_apg_matches_diffusers_over_several_steps(eta, r, beta):
    """The paper's eps_c + (s - 1) (D_orth + eta D_par) is diffusers' rule with use_original_formulation
    (its guidance_scale is then w = s - 1); the momentum runs over three sampling steps."""
    momentum_buffer = pytest.importorskip("diffusers.guiders.adaptive_projected_guidance").MomentumBuffer
    s = 4.0
    theirs = diffusers_guider("AdaptiveProjectedGuidance", guidance_scale=s - 1, eta=eta, use_original_formulation=True,
                              adaptive_projected_guidance_rescale=r,
                              adaptive_projected_guidance_momentum=beta or None)  # fmt: skip
    theirs.momentum_buffer = momentum_buffer(beta) if beta else None
    state = GuiderState()
    for step in range(3):
        eps_u, eps_c = preds(seed=step)
        theirs.set_state(step, 3, torch.tensor(999))
        expected = theirs.forward(eps_c, eps_u).pred
        torch.testing.assert_close(apg(eps_u, eps_c, s, eta, r, beta, state), expected, rtol=1e-5, atol=1e-5)


def test_cfg_zero_star_matches_diffusers():
    eps_u, eps_c = preds()
    theirs = diffusers_guider("ClassifierFreeZeroStarGuidance", guidance_scale=3.5, zero_init_steps=0)
    theirs.set_state(0, 10, torch.tensor(999))
    torch.testing.assert_close(cfg_zero_star(eps_u, eps_c, 3.5), theirs.forward(eps_c, eps_u).pred)
    # the optimised scale is the least-squares a in min_a ||eps_c - a eps_u||, per sample
    a = cfg_zero_star(eps_u, eps_c, 0.0) / eps_u  # s = 0 leaves a* eps_u
    for i in range(len(eps_u)):
        u, c = eps_u[i].flatten().double(), eps_c[i].flatten().double()
        torch.testing.assert_close(a[i].mean().double(), torch.linalg.lstsq(u[:, None], c[:, None]).solution[0, 0])


def test_tangential_cfg_matches_diffusers():
    eps_u, eps_c = preds()
    theirs = diffusers_guider("TangentialClassifierFreeGuidance", guidance_scale=3.0)
    theirs.set_state(0, 10, torch.tensor(999))
    torch.testing.assert_close(tangential_cfg(eps_u, eps_c, 3.0), theirs.forward(eps_c, eps_u).pred)


def test_autoguidance_matches_diffusers_combination(arch):
    """diffusers' AutoGuidance makes its weak pass by dropping layers; given the same two predictions its
    combination is ours: eps_w + s (eps_c - eps_w)."""
    model, weak = tiny_model(arch, seed=0), tiny_model(arch, seed=1)
    x, t, y = inputs(model)
    theirs = diffusers_guider("AutoGuidance", guidance_scale=2.5, auto_guidance_layers=[0], dropout=1.0)
    theirs.set_state(0, 10, torch.tensor(999))
    with torch.no_grad():
        ours = guide_noise_pred(model, x, t, y, 2.5, Guider("autoguidance", guide_model=weak)).eps
        expected = theirs.forward(model(x, t, y), weak(x, t, y)).pred  # the weak model sees the same labels
    torch.testing.assert_close(ours, expected)


# --- formulas written out where diffusers has no guider --------------------------------------------


def test_apg_formula_by_hand():
    """D_par and D_orth from a scalar projection per sample; eta weighs D_par; r caps ||D||."""
    eps_u, eps_c = preds()
    s, eta, r = torch.tensor([0.0, 1.0, 3.0, 6.0]), 0.25, 1.5
    for i in range(len(eps_u)):
        d = (eps_c[i] - eps_u[i]).double()
        d = d * min(1.0, r / float(d.norm()))
        c = eps_c[i].double()
        par = (d * c).sum() / (c * c).sum() * c
        expected = c + (s[i].item() - 1) * ((d - par) + eta * par)
        torch.testing.assert_close(apg(eps_u, eps_c, s, eta, r)[i].double(), expected, rtol=1e-5, atol=1e-5)


def test_cfg_plus_plus_is_ddim_renoised_with_eps_u(arch):
    """Chung et al. 2025, Algorithm 1: x_0 from the guided eps (clipped, as the sampler does), then
    x_t' = sqrt(abar_t') x_0 + sqrt(1 - abar_t') eps_u; three steps by hand against the pipeline."""
    pipe = make_pipeline(arch)
    labels = torch.tensor(LABELS)
    x_T = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    sched, x = pipe.scheduler, x_T.clone()
    sched.set_timesteps(3)
    with torch.no_grad():
        for t in sched.timesteps.tolist():
            t_b = torch.full((4,), t)
            eps_u, eps_c = pipe.model(x, t_b, torch.full_like(labels, pipe.null_class)), pipe.model(x, t_b, labels)
            abar, prev = sched.alphas_cumprod[t], sched.previous_timestep(t)
            abar_prev = sched.alphas_cumprod[prev] if prev >= 0 else torch.tensor(1.0)
            x0 = ((x - (1 - abar).sqrt() * cfg_combine(eps_u, eps_c, 0.6)) / abar.sqrt()).clamp(-1, 1)
            x = abar_prev.sqrt() * x0 + (1 - abar_prev).sqrt() * eps_u
        ours = pipe(LABELS, 0.6, num_steps=3, x_T=x_T, guider=Guider("cfg++"))
    torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours, pipe(LABELS, 0.6, num_steps=3, x_T=x_T), atol=1e-3)  # not plain CFG


def test_schedules_ramp_the_guidance_weight_and_keep_its_mean():
    T, s = 1000, torch.tensor([4.0])
    t = torch.arange(T)
    for schedule in ("linear", "cosine"):
        s_t = torch.cat([scheduled_scale(s, t[i : i + 1], T, schedule) for i in range(T)])  # (T,)
        assert math.isclose(float(s_t.double().mean()), 4.0, rel_tol=2e-3)  # the mean weight is s's
        assert bool((s_t[:-1] >= s_t[1:]).all())  # larger as t falls: increasing over the sampling run
        assert math.isclose(float(s_t[0]), 1 + 3 * 2, rel_tol=1e-6)  # u = 1 at t = 0: w doubled
        assert math.isclose(float(s_t[T // 2]), 4.0, rel_tol=1e-6)  # u = 1/2: w itself
    assert scheduled_scale(s, t[:1], T, "constant") is s


# --- the neutral setting of each method is plain CFG, exactly ----------------------------------------


def test_neutral_settings_are_plain_cfg_to_the_bit():
    eps_u, eps_c = preds()
    s = torch.tensor([0.0, 1.0, 3.0, 7.5])
    plain = cfg_combine(eps_u, eps_c, s)
    assert torch.equal(apg(eps_u, eps_c, s, eta=1.0, norm_threshold=0.0, momentum=0.0), plain)
    assert torch.equal(Guider("cfg-zero-star", optimized_scale=False).combine(eps_u, eps_c, s).eps, plain)
    assert torch.equal(Guider("cfg").combine(eps_u, eps_c, s).eps, plain)
    assert not torch.allclose(apg(eps_u, eps_c, s, eta=0.0), plain, atol=1e-3)  # the settings do act
    assert not torch.allclose(cfg_zero_star(eps_u, eps_c, s), plain, atol=1e-3)
    # TCFG has no setting that turns it off: it is CFG when eps_u already lies along the shared direction
    torch.testing.assert_close(tangential_cfg(0.5 * eps_c, eps_c, s), cfg_combine(0.5 * eps_c, eps_c, s))
    assert not torch.allclose(tangential_cfg(eps_u, eps_c, s), plain, atol=1e-3)


@pytest.mark.parametrize("spec", ["apg", "cfg-zero-star:optimized_scale=false", "cfg"])
def test_neutral_guiders_sample_plain_cfg_to_the_bit(arch, spec):
    pipe = make_pipeline(arch)
    x_T = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    plain = pipe(LABELS, 3.0, num_steps=4, x_T=x_T)
    assert torch.equal(pipe(LABELS, 3.0, num_steps=4, x_T=x_T, guider=guider_from_spec(spec)), plain)
    assert torch.equal(pipe(LABELS, 3.0, num_steps=4, x_T=x_T, guidance_schedule="constant"), plain)


def test_at_s1_every_guider_is_the_conditional_model_and_skips_the_guiding_pass(arch):
    model = CountingModel(tiny_model(arch))
    x, t, y = inputs(model.model)
    with torch.no_grad():
        conditional = model.model(x, t, y)
        for guider in (Guider("apg", eta=0.0, norm_threshold=2.0), Guider("cfg-zero-star"), Guider("tcfg"),
                       Guider("autoguidance", guide_model=tiny_model(arch, seed=1))):  # fmt: skip
            model.images = 0
            assert torch.equal(guide_noise_pred(model, x, t, y, 1.0, guider).eps, conditional), guider.method
            assert model.images == len(x), guider.method  # one pass per sample


def test_autoguidance_with_the_null_label_as_its_weak_model_is_plain_cfg(arch):
    model = tiny_model(arch)
    x, t, y = inputs(model)

    class NullLabel(torch.nn.Module):  # the same network, always shown the null label
        def forward(self, x, t, y):
            return model(x, t, torch.full_like(y, model.null_class))

    with torch.no_grad():
        ours = guide_noise_pred(model, x, t, y, 3.0, Guider("autoguidance", guide_model=NullLabel())).eps
        assert torch.equal(ours, guided_noise_pred(model, x, t, y, 3.0, batched=False))


def test_cfg_plus_plus_at_s0_is_unconditional_ddim():
    pipe = make_pipeline()
    pipe.scheduler.clip_sample = False  # the sampler re-derives eps from a clipped x_0; CFG++ keeps eps_u
    x_T = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    ours = pipe(LABELS, 0.0, num_steps=5, x_T=x_T, guider=Guider("cfg++"))
    torch.testing.assert_close(ours, pipe(LABELS, 0.0, num_steps=5, x_T=x_T), rtol=1e-5, atol=1e-5)


# --- per sample, and state across sampling steps -----------------------------------------------------


@pytest.mark.parametrize("spec", ["apg:eta=0,norm_threshold=3,momentum=-0.5", "cfg-zero-star", "tcfg", "cfg++",
                                  "autoguidance"])  # fmt: skip
def test_each_row_of_a_mixed_batch_is_the_row_alone(arch, spec):
    """Mixed scales (0 and 1 included), timesteps and negative labels; two steps, so momentum counts."""
    model = tiny_model(arch)
    guider = guider_from_spec(spec, tiny_model(arch, seed=1) if spec == "autoguidance" else None)
    x, t, y = inputs(model)
    scale = torch.tensor([0.0, 1.0, 2.0, 3.5, 6.0, 1.5])
    negative = (y + 1) % model.num_classes if spec != "autoguidance" else None
    state, alone_states = GuiderState(), [GuiderState() for _ in range(len(x))]
    with torch.no_grad():
        for step in range(2):
            x_step = x + 0.1 * step
            together = guide_noise_pred(model, x_step, t, y, scale, guider, state, negative_labels=negative)
            for i in range(len(x)):
                one = slice(i, i + 1)
                alone = guide_noise_pred(model, x_step[one], t[one], y[one], scale[one], guider, alone_states[i],
                                         negative_labels=None if negative is None else negative[one])  # fmt: skip
                torch.testing.assert_close(together.eps[one], alone.eps, rtol=1e-5, atol=1e-5)
                if alone.renoise_eps is not None:
                    torch.testing.assert_close(together.renoise_eps[one], alone.renoise_eps, rtol=1e-5, atol=1e-5)


def test_cfg_zero_star_zero_init_costs_no_evaluation_then_guides(arch):
    model = CountingModel(tiny_model(arch))
    x, t, y = inputs(model.model)
    guider, state = Guider("cfg-zero-star", zero_init_steps=2), GuiderState()
    with torch.no_grad():
        for step in range(3):
            eps = guide_noise_pred(model, x, t, y, 3.0, guider, state).eps
            assert torch.equal(eps, torch.zeros_like(x)) == (step < 2)
        assert model.images == 2 * len(x)  # only the third step evaluated the network, both passes
        eps_u = model.model(x, t, torch.full_like(y, model.model.null_class))
        torch.testing.assert_close(eps, cfg_zero_star(eps_u, model.model(x, t, y), 3.0))
    with pytest.raises(UserError, match="GuiderState"):
        guide_noise_pred(model, x, t, y, 3.0, guider)  # stateful without a state


def test_apg_momentum_is_state_of_one_sampling_run():
    """Two pipeline calls give the same images: the momentum starts afresh in each run."""
    pipe = make_pipeline()
    guider = Guider("apg", eta=0.0, momentum=-0.5)
    x_T = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    first = pipe(LABELS, 3.0, num_steps=4, x_T=x_T, guider=guider)
    assert torch.equal(pipe(LABELS, 3.0, num_steps=4, x_T=x_T, guider=guider), first)
    assert not torch.allclose(first, pipe(LABELS, 3.0, num_steps=4, x_T=x_T, guider=Guider("apg", eta=0.0)), atol=1e-4)


# --- what is refused ---------------------------------------------------------------------------------


def test_mistakes_are_user_errors(arch):
    pipe = make_pipeline(arch)
    mistakes = [("apg:eta", "name=value"), ("apg:zero_init_steps=1", "eta, norm_threshold, momentum"),
                ("apg:eta=zero", "a float"), ("nope", "unknown guider"), ("autoguidance", "weaker")]  # fmt: skip
    for spec, match in mistakes:
        with pytest.raises(UserError, match=match):
            guider_from_spec(spec)
    with pytest.raises(UserError, match="tcfg has no setting momentum"):
        Guider("tcfg", momentum=-0.5)
    with pytest.raises(UserError, match="ddim"):
        make_pipeline(arch, "dpmsolver++")(LABELS, 3.0, num_steps=2, guider=Guider("cfg++"))
    with pytest.raises(UserError, match="schedule"):
        pipe(LABELS, 3.0, num_steps=2, guidance_schedule="exponential")
    with pytest.raises(UserError, match="rescale"):
        pipe(LABELS, 3.0, num_steps=2, guider=Guider("tcfg"), guidance_rescale=0.5)
    with pytest.raises(UserError, match="no negative"):
        autoguidance = Guider("autoguidance", guide_model=tiny_model(arch, seed=1))
        pipe(LABELS, 3.0, num_steps=2, guider=autoguidance, negative_labels=1)
    student = make_pipeline(arch)
    student.model = make_student(pipe.model).eval()
    with pytest.raises(UserError, match="student"):
        student(LABELS, 3.0, num_steps=2, guider=Guider("tcfg"))
    student(LABELS, 3.0, num_steps=2, guidance_schedule="linear")  # a schedule only changes s: a student takes it


# --- distilling a guider ---------------------------------------------------------------------------


@pytest.mark.parametrize("spec, schedule", [("apg:eta=0,norm_threshold=2", "constant"), ("cfg-zero-star", "constant"),
                                            ("tcfg", "cosine"), ("cfg", "linear")])  # fmt: skip
def test_the_distillation_target_is_the_guiders_output(arch, spec, schedule):
    teacher = tiny_model(arch)
    x, t, y = inputs(teacher)
    s = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.5, 6.0])
    cfg = DistillConfig(guider=spec, schedule=schedule)
    with torch.no_grad():
        target = distillation_target(teacher, x, t, y, s, cfg, 1000)
        expected = guide_noise_pred(teacher, x, t, y, scheduled_scale(s, t, 1000, schedule), guider_from_spec(spec))
    # Plain CFG's target comes from guided_noise_pred, which runs both passes over every row in one batch;
    # the guider path skips the unconditional pass at s = 1, and another batch rounds the convolutions
    # differently (measured: at most 2e-6). The other rules share the guider path: exact.
    tolerance = 1e-5 if spec == "cfg" else 0
    torch.testing.assert_close(target, expected.eps, rtol=tolerance, atol=tolerance)
    with torch.no_grad():  # and the default target is plain CFG, as before
        assert torch.equal(distillation_target(teacher, x, t, y, s, DistillConfig(), 1000),
                           guided_noise_pred(teacher, x, t, y, s))  # fmt: skip


@pytest.mark.parametrize("spec", ["cfg++", "apg:momentum=-0.5", "cfg-zero-star:zero_init_steps=1", "autoguidance"])
def test_guiders_a_student_cannot_learn_are_refused(spec):
    with pytest.raises(UserError, match="distil"):
        distillation_target(tiny_model(), *inputs(tiny_model()), torch.ones(6), DistillConfig(guider=spec), 1000)
