"""Guidance variants: each reduces to plain CFG at its neutral setting, matches its paper's formula,
and acts per sample; a distilled student refuses the ones it cannot do in one pass."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_model
from test_guidance import CountingModel, inputs
from test_sampling import LABELS, make_pipeline

from cfg_minimal import UserError
from cfg_minimal.distill import make_student
from cfg_minimal.guidance import CFG, cfg_combine, guided_noise_pred, interval_scale, rescale_guidance


def lin_et_al_rescale(x_cfg: np.ndarray, x_pos: np.ndarray, phi: float) -> np.ndarray:
    """Lin et al. 2024, Sec. 3.4, written out per sample in NumPy as the reference."""
    out = np.empty_like(x_cfg)
    for i in range(len(x_cfg)):
        rescaled = x_cfg[i] * (x_pos[i].std(ddof=1) / x_cfg[i].std(ddof=1))
        out[i] = phi * rescaled + (1 - phi) * x_cfg[i]
    return out


def test_rescale_matches_the_paper_and_is_neutral_at_phi0():
    g = torch.Generator().manual_seed(0)
    eps_u, eps_c = torch.randn(5, 1, 8, 8, generator=g), torch.randn(5, 1, 8, 8, generator=g) * 0.5
    guided = cfg_combine(eps_u, eps_c, 6.0)
    for phi in (0.3, 0.7, 1.0):
        reference = lin_et_al_rescale(guided.double().numpy(), eps_c.double().numpy(), phi)
        torch.testing.assert_close(rescale_guidance(guided, eps_c, phi), torch.from_numpy(reference).float())
    assert torch.equal(rescale_guidance(guided, eps_c, 0.0), guided)
    full = rescale_guidance(guided, eps_c, 1.0)  # phi = 1: the guided output takes eps_c's spread exactly
    torch.testing.assert_close(full.flatten(1).std(dim=1), eps_c.flatten(1).std(dim=1))


def test_rescaled_teacher_prediction_is_rescale_of_the_cfg_formula(arch):
    model = tiny_model(arch)
    x, t, y = inputs(model)
    scale = torch.tensor([0.0, 1.0, 2.0, 3.0, 5.0, 7.5])  # s = 0 still needs eps_c once rescale is on
    with torch.no_grad():
        eps_u, eps_c = model(x, t, torch.full_like(y, model.null_class)), model(x, t, y)
        got = guided_noise_pred(model, x, t, y, scale, guider=CFG(rescale=0.7))
    plain = cfg_combine(eps_u, eps_c, scale)
    torch.testing.assert_close(got, rescale_guidance(plain, eps_c, 0.7))
    assert not torch.allclose(got[2:], plain[2:], atol=1e-4)  # it does change the guided rows


def test_negative_class_replaces_the_unconditional_prediction(arch):
    model = tiny_model(arch)
    x, t, y = inputs(model)
    negative = (y + 1) % model.num_classes  # (B,) a different class per sample
    null = torch.full_like(y, model.null_class)
    with torch.no_grad():
        expected = cfg_combine(model(x, t, negative), model(x, t, y), 3.0)  # eps_neg + s (eps_c - eps_neg)
        torch.testing.assert_close(
            guided_noise_pred(model, x, t, y, 3.0, guider=CFG(negative_labels=negative)), expected
        )
        torch.testing.assert_close(guided_noise_pred(model, x, t, y, 3.0, guider=CFG(negative_labels=null)),
                                   guided_noise_pred(model, x, t, y, 3.0), rtol=0, atol=0)  # fmt: skip
        assert not torch.allclose(expected, guided_noise_pred(model, x, t, y, 3.0), atol=1e-4)


def test_interval_keeps_s_inside_and_uses_1_outside():
    scale, t = torch.tensor([3.0, 3.0, 3.0, 0.0]), torch.tensor([100, 500, 900, 950])
    assert interval_scale(scale, t, (200, 900)).tolist() == [1.0, 3.0, 3.0, 1.0]


@pytest.mark.parametrize("t, images", [(10, 4), (700, 8)])  # outside [500, 999]: the conditional pass alone
def test_outside_the_interval_a_step_costs_one_pass(t, images):
    """A sampler's step has one t for the whole batch: outside the interval it costs one pass."""
    model = CountingModel(tiny_model())
    x, _, y = inputs(model.model, batch=4)
    with torch.no_grad():
        guided_noise_pred(model, x, torch.full((4,), t), y, 3.0, guider=CFG(interval=(500, 999)))
    assert model.images == images


def test_every_variant_acts_per_sample_as_alone(arch):
    """A batch mixing scales, negative labels and timesteps inside / outside the interval gives each
    sample the result it gets alone."""
    model = tiny_model(arch)
    x, t, y = inputs(model)
    t = torch.tensor([50, 300, 600, 900, 999, 450])
    scale = torch.tensor([3.0, 0.0, 1.0, 2.5, 5.0, 4.0])
    negative = torch.tensor([model.null_class, 1, 2, model.null_class, 4, 5])
    variants = dict(negative_labels=negative, rescale=0.5, interval=(200, 950))
    with torch.no_grad():
        together = guided_noise_pred(model, x, t, y, scale, guider=CFG(**variants))
        for i in range(len(x)):
            one = slice(i, i + 1)
            mine = CFG(**{**variants, "negative_labels": negative[one]})
            alone = guided_noise_pred(model, x[one], t[one], y[one], scale[one], guider=mine)
            torch.testing.assert_close(together[one], alone, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sampler", ["ddim", "dpmsolver++"])
def test_interval_covering_every_step_is_plain_cfg_and_an_empty_one_is_conditional(arch, sampler):
    pipe = make_pipeline(arch, sampler)

    def run(scale, guider=None):
        return pipe(LABELS, scale, num_steps=10, generator=torch.Generator().manual_seed(0), guider=guider)

    plain = run(3.0)
    assert torch.equal(run(3.0, CFG(interval=(0, 999))), plain)
    top, second = pipe.scheduler.timesteps[:2].tolist()  # DDIM: 900, 800; DPM-Solver++: 999, 899
    never = run(3.0, CFG(interval=(second + 1, top - 1)))  # between two grid points: no step inside
    assert torch.equal(never, run(1.0))
    assert not torch.allclose(never, plain, atol=1e-3)


def test_a_student_refuses_what_needs_a_second_pass_and_accepts_the_interval(arch):
    teacher = make_pipeline(arch)
    student = make_pipeline(arch)
    student.model = make_student(teacher.model).eval()
    null = student.null_class
    with pytest.raises(UserError, match="student"):
        student(LABELS, 3.0, num_steps=2, guider=CFG(negative_labels=1))
    with pytest.raises(UserError, match="student.*rescale"):
        student(LABELS, 3.0, num_steps=2, guider=CFG(rescale=0.7))
    with pytest.raises(UserError, match="student"):  # even the null label: a student takes no negative labels
        student(LABELS, 3.0, num_steps=2, guider=CFG(negative_labels=null))
    x_T = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    plain = student(LABELS, 3.0, num_steps=4, x_T=x_T)
    assert torch.equal(student(LABELS, 3.0, num_steps=4, x_T=x_T, guider=CFG()), plain)
    assert torch.equal(student(LABELS, 3.0, num_steps=4, x_T=x_T, guider=CFG(interval=(950, 999))),
                       student(LABELS, 1.0, num_steps=4, x_T=x_T))  # fmt: skip
    teacher(LABELS, 3.0, num_steps=2, guider=CFG(negative_labels=1, rescale=0.7))  # the teacher can do both


RESCALE, INTERVAL = "CFG's rescale must be a (finite )?number", "CFG's interval must be timesteps"


@pytest.mark.parametrize(
    "options, message",
    [(dict(negative_labels=11), "label 11 is out of range"), (dict(negative_labels=[1, 2]), "one per label"),
     (dict(rescale=float("nan")), RESCALE), (dict(rescale=1.5), RESCALE),
     (dict(interval=(600, 200)), INTERVAL), (dict(interval=(0.5, 900)), INTERVAL), (dict(interval=5), INTERVAL),
     (dict(rescale=True), RESCALE)],
)  # fmt: skip
def test_bad_variant_arguments_are_clear_errors(options, message):
    with pytest.raises(UserError, match=message):
        make_pipeline()(LABELS, 3.0, num_steps=2, guider=CFG(**options))
