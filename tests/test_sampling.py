"""CFG identities over whole sampling trajectories, and the Pipeline's determinism and errors."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import tiny_model

from cfg_minimal import DDIMScheduler, DDPMScheduler, Pipeline, UserError, guided_noise_pred
from cfg_minimal.schedulers import DPMSolverMultistepScheduler

SAMPLERS = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler, "dpmsolver++": DPMSolverMultistepScheduler}


def make_pipeline(arch: str = "unet-tiny", sampler: str = "ddim", **model_kwargs) -> Pipeline:
    model = tiny_model(arch, **model_kwargs)
    scheduler = SAMPLERS[sampler](num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    return Pipeline(model, scheduler, dataset="digits", image_size=16, channels=1, class_names=tuple("0123456789"))


LABELS = [0, 3, 7, 9]


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_s0_equals_sampling_with_null_labels(arch, sampler):
    pipe = make_pipeline(arch, sampler)
    null = [pipe.null_class] * len(LABELS)

    def run(labels, scale):
        return pipe(labels, scale, num_steps=10, generator=torch.Generator().manual_seed(0))

    at_s0 = run(LABELS, 0.0)
    torch.testing.assert_close(at_s0, run(null, 1.0), rtol=0, atol=1e-6)
    torch.testing.assert_close(at_s0, run(null, 4.0), rtol=0, atol=1e-6)  # null vs null: guidance does nothing
    assert not torch.allclose(at_s0, run(LABELS, 1.0), atol=1e-3)  # the label matters, so this is not vacuous


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_s1_equals_the_plain_conditional_sampler(arch, sampler):
    pipe = make_pipeline(arch, sampler)
    labels = torch.tensor(LABELS)
    x_T = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    guided = pipe(labels, 1.0, num_steps=8, x_T=x_T, generator=torch.Generator().manual_seed(2))

    generator, x = torch.Generator().manual_seed(2), x_T.clone()  # the textbook loop, no guidance code
    pipe.scheduler.set_timesteps(8)
    with torch.no_grad():
        for t in pipe.scheduler.timesteps:
            eps = pipe.model(x, torch.full((4,), int(t)), labels)
            step_kwargs = {"use_clipped_model_output": True} if sampler == "ddim" else {}  # as the pipeline does
            x = pipe.scheduler.step(eps, t, x, generator=generator, **step_kwargs).prev_sample
    torch.testing.assert_close(guided, x, rtol=0, atol=1e-6)


def test_per_sample_scales_equal_sampling_each_scale_alone(arch):
    pipe = make_pipeline(arch)
    scales = torch.tensor([0.0, 1.0, 3.0, 5.0])
    x_T = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    together = pipe(LABELS, scales, num_steps=10, x_T=x_T)
    for i, s in enumerate(scales.tolist()):
        alone = pipe(LABELS[i : i + 1], s, num_steps=10, x_T=x_T[i : i + 1])
        torch.testing.assert_close(together[i : i + 1], alone, rtol=1e-5, atol=1e-5)


def test_batched_and_two_pass_sampling_agree():
    pipe = make_pipeline()
    x_T = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(4))
    a = pipe(LABELS, 3.0, num_steps=10, x_T=x_T, batched=True)
    b = pipe(LABELS, 3.0, num_steps=10, x_T=x_T, batched=False)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_sampling_is_deterministic_given_a_generator(sampler):
    pipe = make_pipeline(sampler=sampler)

    def run(seed):
        return pipe(LABELS, 2.0, num_steps=5, generator=torch.Generator().manual_seed(seed))

    first = run(0)
    assert torch.equal(first, run(0))
    assert not torch.allclose(first, run(1))
    assert first.shape == (4, 1, 16, 16)


@pytest.mark.parametrize(
    "labels, scale, steps, message",
    [
        ([0, 11], 1.0, 5, "out of range"),
        ([-1], 1.0, 5, "out of range"),
        ([0.5, 1.0], 1.0, 5, "integers"),
        ([], 1.0, 5, "non-empty"),
        ([1, 2], float("nan"), 5, "finite"),
        ([1, 2], float("inf"), 5, "finite"),
        ([1, 2], torch.tensor([1.0, 2.0, 3.0]), 5, "shape"),
        ([1, 2], 1.0, 0, "positive integer"),
        ([1, 2], 1.0, -3, "positive integer"),
        ([1, 2], 1.0, 2.5, "positive integer"),
    ],
)
def test_bad_input_gets_a_clear_error(labels, scale, steps, message):
    with pytest.raises(UserError, match=message):
        make_pipeline()(labels, scale, num_steps=steps)


def test_the_callback_sees_every_step_and_its_last_sample_is_the_image(arch):
    pipe = make_pipeline(arch)
    x_T = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(5))
    seen = []
    images = pipe(LABELS, 3.0, num_steps=6, x_T=x_T, callback=lambda i, t, x, x0: seen.append((i, t, x, x0)))
    assert [i for i, *_ in seen] == list(range(6))
    assert [t for _, t, *_ in seen] == pipe.scheduler.timesteps.tolist()
    assert torch.equal(seen[-1][2], images)
    t0 = seen[0][1]  # the first step, taken by hand: the callback gets its new sample and its predicted x_0
    with torch.no_grad():
        eps = guided_noise_pred(pipe.model, x_T, torch.full((4,), t0), torch.tensor(LABELS), 3.0)
    first = pipe.scheduler.step(eps, t0, x_T, use_clipped_model_output=True)
    torch.testing.assert_close(seen[0][2], first.prev_sample, rtol=0, atol=1e-6)
    torch.testing.assert_close(seen[0][3], first.pred_original_sample, rtol=0, atol=1e-6)


def test_diffusers_schedulers_drop_into_the_pipeline():
    """diffusers' DDIM and DPM-Solver++ through the same Pipeline give this project's samples (its
    protocol: init_noise_sigma, scale_model_input, step's keyword arguments)."""
    diffusers = pytest.importorskip("diffusers")
    pipe = make_pipeline()
    x_T = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(6))
    kw = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    pairs = [
        (DDIMScheduler(**kw), diffusers.DDIMScheduler(**kw)),
        (DPMSolverMultistepScheduler(**kw, clip_sample=False, lambda_min_clipped=-5.1),
         diffusers.DPMSolverMultistepScheduler(**kw, lambda_min_clipped=-5.1)),
    ]  # fmt: skip
    for ours, theirs in pairs:
        a = replace(pipe, scheduler=ours)(LABELS, 3.0, num_steps=8, x_T=x_T)
        b = replace(pipe, scheduler=theirs)(LABELS, 3.0, num_steps=8, x_T=x_T)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_a_seed_ties_each_samples_noise_to_its_index():
    """Sample i's x_T depends on (seed, i) alone: any split into calls gives the same rows, seeds differ."""
    pipe = make_pipeline()
    whole = pipe.initial_noise(10, 3)  # (10, 1, 16, 16)
    parts = torch.cat([pipe.initial_noise(4, 3), pipe.initial_noise(6, 3, start=4)])
    assert torch.equal(whole, parts)
    other = pipe.initial_noise(10, 4)
    assert not any(torch.allclose(a, b) for a in whole for b in other)  # no row shared with another seed
    assert len({tuple(row.flatten()[:4].tolist()) for row in whole}) == 10  # the rows differ


def test_evaluation_images_do_not_depend_on_the_batch_split():
    """The same seed gives the same images whether sampled 10 at once or 3 at a time."""
    from cfg_minimal.evaluate import generate

    pipe = make_pipeline()
    a, labels_a, _ = generate(pipe, 10, 3.0, 4, seed=1, batch_size=10)
    b, labels_b, _ = generate(pipe, 10, 3.0, 4, seed=1, batch_size=3)
    assert torch.equal(labels_a, labels_b)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
