"""CFG identities at the level of one network evaluation."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from test_sampling import LABELS, make_pipeline

from cfg_minimal import UserError
from cfg_minimal.checks import check_scale
from cfg_minimal.guidance import cfg_combine, guided_noise_pred, s_to_w, w_to_s


def inputs(model, batch: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 1, 16, 16, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    y = torch.randint(0, model.num_classes, (batch,), generator=g)
    return x, t, y


def test_cfg_combine_is_affine_in_s():
    g = torch.Generator().manual_seed(0)
    eps_u, eps_c = torch.randn(3, 1, 4, 4, generator=g), torch.randn(3, 1, 4, 4, generator=g)
    for a, b, lam in [(0.0, 1.0, 0.3), (1.0, 5.0, 0.25), (-2.0, 7.5, 0.8)]:
        mix = cfg_combine(eps_u, eps_c, lam * a + (1 - lam) * b)
        torch.testing.assert_close(mix, lam * cfg_combine(eps_u, eps_c, a) + (1 - lam) * cfg_combine(eps_u, eps_c, b))
    assert torch.equal(cfg_combine(eps_u, eps_c, 0.0), eps_u)
    torch.testing.assert_close(cfg_combine(eps_u, eps_c, 1.0), eps_c)  # exact only when the pass is skipped
    per_sample = cfg_combine(eps_u, eps_c, torch.tensor([0.0, 1.0, 3.0]))
    torch.testing.assert_close(per_sample[2], cfg_combine(eps_u[2], eps_c[2], 3.0))


def test_w_and_s_converters_invert_each_other():
    assert w_to_s(0.0) == 1.0 and s_to_w(1.0) == 0.0  # w = 0 (Ho & Salimans) is plain conditional
    assert s_to_w(w_to_s(2.5)) == 2.5


def test_s0_is_the_unconditional_and_s1_the_conditional_prediction(arch):
    model = tiny_model(arch)
    x, t, y = inputs(model)
    with torch.no_grad():
        null = torch.full_like(y, model.null_class)
        assert torch.equal(guided_noise_pred(model, x, t, y, 0.0), model(x, t, null))
        assert torch.equal(guided_noise_pred(model, x, t, y, 1.0), model(x, t, y))
        assert not torch.allclose(model(x, t, null), model(x, t, y))  # so the identities are not vacuous


@pytest.mark.parametrize("scale", [3.0, torch.tensor([0.0, 1.0, 2.0, 3.0, 5.0, -1.0])])
def test_batched_equals_two_pass_equals_the_formula(arch, scale):
    model = tiny_model(arch)
    x, t, y = inputs(model)
    with torch.no_grad():
        by_formula = cfg_combine(model(x, t, torch.full_like(y, model.null_class)), model(x, t, y), scale)
        batched = guided_noise_pred(model, x, t, y, scale, batched=True)
        two_pass = guided_noise_pred(model, x, t, y, scale, batched=False)
    torch.testing.assert_close(batched, two_pass, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(batched, by_formula, rtol=1e-5, atol=1e-6)


class CountingModel(torch.nn.Module):
    """Wraps a model and counts the images it is evaluated on."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls, self.images = model, 0, 0
        self.null_class, self.num_classes, self.is_student = model.null_class, model.num_classes, False

    def forward(self, x, t, y, guidance=None):
        self.calls += 1
        self.images += len(x)
        return self.model(x, t, y)


@pytest.mark.parametrize(
    "scale, batched, calls, images",
    [(0.0, True, 1, 4), (1.0, True, 1, 4), (3.0, True, 1, 8), (3.0, False, 2, 8),
     (torch.tensor([0.0, 1.0, 3.0, 3.0]), True, 1, 8)],
)  # fmt: skip
def test_no_wasted_pass_at_s0_or_s1(scale, batched, calls, images):
    """A number 0 or 1 skips a pass; a per-sample tensor runs both for every row (a batch of fixed shape,
    which a GPU needs to run ahead of the host) and selects rows exactly (the test below)."""
    model = CountingModel(tiny_model())
    x, t, y = inputs(model.model, batch=4)
    with torch.no_grad():
        guided_noise_pred(model, x, t, y, scale, batched=batched)
    assert (model.calls, model.images) == (calls, images)


def test_per_sample_rows_at_s0_and_s1_are_exactly_one_pass(arch):
    """With a (B,) scale both passes run over every row; a row at s = 0 (1) is that pass's row, bit for bit."""
    model = tiny_model(arch)
    x, t, y = inputs(model, batch=4)
    scale = torch.tensor([0.0, 1.0, 3.0, 0.0])
    null = torch.full_like(y, model.null_class)
    with torch.no_grad():
        eps_c, eps_u = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])).chunk(2)  # one 2B forward
        batched = guided_noise_pred(model, x, t, y, scale, batched=True)
        two_pass = guided_noise_pred(model, x, t, y, scale, batched=False)
        eps_c_alone, eps_u_alone = model(x, t, y), model(x, t, null)  # two B forwards
    for got, cond, uncond in [(batched, eps_c, eps_u), (two_pass, eps_c_alone, eps_u_alone)]:
        assert torch.equal(got[[0, 3]], uncond[[0, 3]]) and torch.equal(got[1], cond[1])


BAD_SCALES = [float("nan"), float("inf"), torch.tensor([1.0, float("nan"), 1.0, 1.0]), "3"]


@pytest.mark.parametrize("bad", BAD_SCALES)
def test_non_finite_or_non_numeric_scale_is_refused(bad):
    """Scales are checked where they enter (checks.check_scale, which the Pipeline calls), not per step."""
    with pytest.raises(UserError, match="guidance_scale"):
        check_scale(bad, 4)
    with pytest.raises(UserError, match="guidance_scale"):
        make_pipeline()(LABELS, bad, num_steps=2)
