"""Guiders beyond plain CFG: parity with diffusers' guiders where diffusers has the method, the paper's
formula written out otherwise, plain CFG exactly at each neutral setting, per-sample behaviour, the
distillation target of a guider, and a guider defined in this file alone that samples and distils."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from conftest import randomize, tiny_model
from test_guidance import CountingModel, inputs
from test_sampling import LABELS, make_pipeline

from cfg_minimal import TeacherConfig, UserError, distill_student, load_checkpoint, train_teacher, with_optim
from cfg_minimal.distill import (
    DistillConfig,
    distillation_loss,
    distillation_target,
    make_student,
    target_guider,
)
from cfg_minimal.guidance import CFG, Guider, GuiderState, cfg_combine, guided_noise_pred, guider_from_spec
from cfg_minimal.guiders import (
    APG,
    Autoguidance,
    CFGZeroStar,
    TangentialCFG,
    apg,
    cfg_zero_star,
    scheduled_scale,
    tangential_cfg,
)
from cfg_minimal.models import build_model
from cfg_minimal.schedulers import DDIMCFGPPScheduler, DDPMScheduler


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
        ours = guided_noise_pred(model, x, t, y, 2.5, guider=Autoguidance(guide_model=weak))
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


def test_cfg_plus_plus_sampler_is_ddim_renoised_with_eps_u(arch):
    """Chung et al. 2025, Algorithm 1: x_0 from the guided eps (clipped, as the sampler does), then
    x_t' = sqrt(abar_t') x_0 + sqrt(1 - abar_t') eps_u; three steps by hand against the pipeline."""
    pipe = make_pipeline(arch)
    pipe.scheduler = DDIMCFGPPScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
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
        ours = pipe(LABELS, 0.6, num_steps=3, x_T=x_T)
        # with another rule, the sampler re-noises with that rule's guiding pass: APG's neutral setting is CFG
        assert torch.equal(pipe(LABELS, 0.6, num_steps=3, x_T=x_T, guider=APG()), ours)
    torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours, make_pipeline(arch)(LABELS, 0.6, num_steps=3, x_T=x_T), atol=1e-3)


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
    assert torch.equal(CFGZeroStar(optimized_scale=False).combine(eps_u, eps_c, s, GuiderState()), plain)
    assert torch.equal(CFG().combine(eps_u, eps_c, s, GuiderState()), plain)
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
        for guider in (APG(eta=0.0, norm_threshold=2.0), CFGZeroStar(), TangentialCFG(), CFG(rescale=0.5),
                       Autoguidance(guide_model=tiny_model(arch, seed=1))):  # fmt: skip
            model.images = 0
            assert torch.equal(guided_noise_pred(model, x, t, y, 1.0, guider=guider), conditional), guider.name
            assert model.images == len(x), guider.name  # one pass per sample


def test_autoguidance_with_the_null_label_as_its_weak_model_is_plain_cfg(arch):
    model = tiny_model(arch)
    x, t, y = inputs(model)

    class NullLabel(torch.nn.Module):  # the same network, always shown the null label
        def forward(self, x, t, y):
            return model(x, t, torch.full_like(y, model.null_class))

    guider = Autoguidance.__new__(Autoguidance)  # skips the DiffusionModel check: the stand-in is not one
    object.__setattr__(guider, "guide_model", NullLabel())
    with torch.no_grad():
        ours = guided_noise_pred(model, x, t, y, 3.0, guider=guider)
        assert torch.equal(ours, guided_noise_pred(model, x, t, y, 3.0, batched=False))


def test_cfg_plus_plus_at_s0_is_unconditional_ddim():
    pipe, plain = make_pipeline(), make_pipeline()
    pipe.scheduler = DDIMCFGPPScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=False)
    plain.scheduler.clip_sample = False  # the sampler re-derives eps from a clipped x_0; CFG++ keeps eps_u
    x_T = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    ours = pipe(LABELS, 0.0, num_steps=5, x_T=x_T)
    torch.testing.assert_close(ours, plain(LABELS, 0.0, num_steps=5, x_T=x_T), rtol=1e-5, atol=1e-5)


# --- per sample, and state across sampling steps -----------------------------------------------------


@pytest.mark.parametrize("spec", ["apg:eta=0,norm_threshold=3,momentum=-0.5", "cfg-zero-star", "tcfg", "cfg",
                                  "autoguidance"])  # fmt: skip
@pytest.mark.parametrize("keep_guide_pass", [False, True])  # True: as under the CFG++ sampler
def test_each_row_of_a_mixed_batch_is_the_row_alone(arch, spec, keep_guide_pass):
    """Mixed scales (0 and 1 included) and timesteps; two steps, so momentum counts."""
    model = tiny_model(arch)
    guider = guider_from_spec(spec, tiny_model(arch, seed=1) if spec == "autoguidance" else None)
    x, t, y = inputs(model)
    scale = torch.tensor([0.0, 1.0, 2.0, 3.5, 6.0, 1.5])
    state = GuiderState(keep_guide_pass=keep_guide_pass)
    alone_states = [GuiderState(keep_guide_pass=keep_guide_pass) for _ in range(len(x))]
    with torch.no_grad():
        for step in range(2):
            x_step = x + 0.1 * step
            together = guided_noise_pred(model, x_step, t, y, scale, guider=guider, state=state)
            for i in range(len(x)):
                one = slice(i, i + 1)
                alone = guided_noise_pred(
                    model, x_step[one], t[one], y[one], scale[one], guider=guider, state=alone_states[i]
                )
                torch.testing.assert_close(together[one], alone, rtol=1e-5, atol=1e-5)
                if keep_guide_pass:
                    torch.testing.assert_close(state.guide_pred[one], alone_states[i].guide_pred, rtol=1e-5, atol=1e-5)


def test_cfg_zero_star_zero_init_costs_no_evaluation_then_guides(arch):
    model = CountingModel(tiny_model(arch))
    x, t, y = inputs(model.model)
    guider, state = CFGZeroStar(zero_init_steps=2), GuiderState()
    with torch.no_grad():
        for step in range(3):
            eps = guided_noise_pred(model, x, t, y, 3.0, guider=guider, state=state)
            assert torch.equal(eps, torch.zeros_like(x)) == (step < 2)
        assert model.images == 2 * len(x)  # only the third step evaluated the network, both passes
        eps_u = model.model(x, t, torch.full_like(y, model.model.null_class))
        torch.testing.assert_close(eps, cfg_zero_star(eps_u, model.model(x, t, y), 3.0))


def test_apg_momentum_is_state_of_one_sampling_run():
    """Two pipeline calls give the same images: the momentum starts afresh in each run."""
    pipe = make_pipeline()
    guider = APG(eta=0.0, momentum=-0.5)
    x_T = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    first = pipe(LABELS, 3.0, num_steps=4, x_T=x_T, guider=guider)
    assert torch.equal(pipe(LABELS, 3.0, num_steps=4, x_T=x_T, guider=guider), first)
    assert not torch.allclose(first, pipe(LABELS, 3.0, num_steps=4, x_T=x_T, guider=APG(eta=0.0)), atol=1e-4)


# --- what is refused ---------------------------------------------------------------------------------


def test_mistakes_are_user_errors(arch):
    pipe = make_pipeline(arch)
    mistakes = [("apg:eta", "name=value"), ("apg:zero_init_steps=1", "eta, norm_threshold, momentum"),
                ("apg:eta=zero", "a finite float"), ("apg:eta=nan", "a finite float"), ("nope", "unknown guider"),
                ("autoguidance", "guiding model"), ("cfg++", "sampler"), ("apg:norm_threshold=-1", ">= 0"),
                ("cfg-zero-star:zero_init_steps=-1", ">= 0")]  # fmt: skip
    for spec, match in mistakes:
        with pytest.raises(UserError, match=match):
            guider_from_spec(spec)
    with pytest.raises(UserError, match="schedule"):
        pipe(LABELS, 3.0, num_steps=2, guidance_schedule="exponential")
    with pytest.raises(UserError, match="Guider"):
        pipe(LABELS, 3.0, num_steps=2, guider={"eta": 0.0})
    x_T = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    by_spec = pipe(LABELS, 3.0, 2, x_T=x_T, guider="apg:eta=0")  # a spec is taken where a guider is
    assert torch.equal(by_spec, pipe(LABELS, 3.0, 2, x_T=x_T, guider=APG(0.0)))
    with pytest.raises(UserError, match="same dataset"):
        small = randomize(build_model(arch, image_size=8)).eval()  # a digits model of another size
        pipe(LABELS, 3.0, num_steps=2, guider=Autoguidance(guide_model=small))
    student = make_pipeline(arch)
    student.model = make_student(pipe.model).eval()
    for guider in (TangentialCFG(), CFG(rescale=0.5), CFG(negative_labels=1)):
        with pytest.raises(UserError, match="student"):
            student(LABELS, 3.0, num_steps=2, guider=guider)
    student(LABELS, 3.0, num_steps=2, guidance_schedule="linear")  # a schedule only changes s: a student takes it
    student(LABELS, 3.0, num_steps=2, guider=CFG(interval=(0, 500)))  # and so does CFG's interval


# --- distilling a guider ---------------------------------------------------------------------------


def by_hand(model, guider, x, t, y, s):
    """The rule applied to the two passes computed one by one: pred_c = model(x, t, y), pred_u = model(x, t, null)."""
    pred_c, pred_u = model(x, t, y), model(x, t, torch.full_like(y, model.null_class))
    return guider.combine(pred_u, pred_c, s, GuiderState())


TARGETS = [("apg:eta=0,norm_threshold=2", "constant"), ("cfg-zero-star", "constant"), ("tcfg", "cosine"),
           ("cfg", "linear"), ("cfg:rescale=0.7", "constant")]  # fmt: skip


@pytest.mark.parametrize("spec, schedule", TARGETS)
def test_the_distillation_target_is_the_guiders_output(arch, spec, schedule):
    teacher = tiny_model(arch)
    x, t, y = inputs(teacher)
    s = torch.tensor([0.0, 1.5, 2.0, 3.0, 4.5, 6.0])
    guider = target_guider(DistillConfig(guider=spec, schedule=schedule))
    with torch.no_grad():
        target = distillation_target(teacher, x, t, y, s, guider, schedule, 1000)
        expected = by_hand(teacher, guider, x, t, y, scheduled_scale(s, t, 1000, schedule))
    torch.testing.assert_close(target, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec", ["apg:momentum=-0.5", "cfg-zero-star:zero_init_steps=1", "autoguidance", "cfg++"])
def test_guiders_a_student_cannot_learn_are_refused(spec):
    with pytest.raises(UserError, match="distil|sampler"):
        target_guider(DistillConfig(guider=spec))


# --- a guider defined here, outside the package ------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Sharpened(Guider):
    """A rule of this test file alone: CFG with the guidance direction raised to a power, pred_c + (s - 1) D |D|^(p-1)
    with D = pred_c - pred_u (p = 1 is CFG)."""

    name: ClassVar[str] = "test-sharpened"
    power: float = 1.0

    def combine(self, pred_g, pred_c, s, state):
        d = pred_c - pred_g
        return pred_c + (s.view(-1, 1, 1, 1) - 1) * d * d.abs().pow(self.power - 1)


def test_a_guider_defined_outside_the_package_samples(arch):
    """Sampled through the Pipeline, found by its spec, and equal to its rule applied step by step by hand."""
    pipe = make_pipeline(arch)
    guider = guider_from_spec("test-sharpened:power=1.5")
    assert isinstance(guider, Sharpened) and guider.power == 1.5
    x_T = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    sched, x, labels = make_pipeline(arch).scheduler, x_T.clone(), torch.tensor(LABELS)
    sched.set_timesteps(3)
    with torch.no_grad():
        for t in sched.timesteps.tolist():
            pred = by_hand(pipe.model, guider, x, torch.full((4,), t), labels, torch.full((4,), 3.0))
            x = sched.step(pred, t, x, use_clipped_model_output=True).prev_sample
    ours = pipe(LABELS, 3.0, num_steps=3, x_T=x_T, guider=guider)
    torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours, pipe(LABELS, 3.0, num_steps=3, x_T=x_T), atol=1e-3)  # not plain CFG
    p1 = pipe(LABELS, 3.0, num_steps=3, x_T=x_T, guider=Sharpened(power=1.0))  # p = 1 is CFG, written otherwise
    torch.testing.assert_close(p1, pipe(LABELS, 3.0, num_steps=3, x_T=x_T), rtol=1e-5, atol=1e-5)


def test_a_guider_defined_outside_the_package_distils(tmp_path):
    """distill_student learns the rule by its spec: the checkpoint records it, and the loss it minimises is the
    student's distance to the rule's output (a student that predicts the rule exactly has zero loss)."""
    teacher_cfg = with_optim(TeacherConfig(arch="unet-tiny"), max_train_steps=2)
    train_teacher(teacher_cfg, tmp_path, progress=False)
    spec = "test-sharpened:power=2.0"
    cfg = with_optim(DistillConfig(guider=spec), max_train_steps=3, batch_size=8)
    result = distill_student(tmp_path / "teacher.pt", cfg, tmp_path, progress=False)
    assert load_checkpoint(tmp_path / "student.pt")["distill_config"]["guider"] == spec
    assert len(result.losses) == 0 or all(math.isfinite(v) for v in result.losses)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    teacher = tiny_model()  # random weights: its two passes differ, so the rules do

    class Oracle(torch.nn.Module):  # predicts the rule's output exactly, from the s it is given
        def forward(self, x, t, y, guidance):
            with torch.no_grad():
                return by_hand(teacher, Sharpened(power=2.0), x, t, y, guidance)

    loss_fn = distillation_loss(teacher, scheduler, cfg)
    x0, y = torch.rand(8, 1, 16, 16) * 2 - 1, torch.arange(8)
    torch.manual_seed(0)
    assert loss_fn(Oracle(), x0, y).item() < 1e-10
    torch.manual_seed(0)
    assert loss_fn(lambda x, t, y, guidance: by_hand(teacher, CFG(), x, t, y, guidance), x0, y).item() > 1e-6
    with pytest.raises(UserError, match="distil"):
        target_guider(DistillConfig(guider="test-stateful"))


@dataclass(frozen=True, eq=False)
class Stateful(Guider):
    """A rule that says a student cannot learn it."""

    name: ClassVar[str] = "test-stateful"

    @property
    def distillable(self) -> bool:
        return False

    def combine(self, pred_g, pred_c, s, state):
        return cfg_combine(pred_g, pred_c, s)
