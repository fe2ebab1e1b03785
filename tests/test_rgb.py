"""RGB at 32x32, CIFAR-10's shape, on random data (CIFAR-10 itself cannot be downloaded here):
a tiny teacher trains, samples with CFG and draws colour grids, and a student distils from it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import cfg_minimal.distill as distill
import cfg_minimal.train as train
from cfg_minimal import TeacherConfig, load_checkpoint, load_pipeline, sample_scale_grid, train_teacher, with_optim
from cfg_minimal.checkpoint import model_from_checkpoint
from cfg_minimal.data import DATASETS, ImageData
from cfg_minimal.distill import DistillConfig, distill_student, make_student
from cfg_minimal.guidance import guided_noise_pred
from cfg_minimal.plotting import save_scale_grid, tile
from cfg_minimal.schedulers import DDPMScheduler

# One colour per class, plus noise: random images in which the channels carry the label.
COLORS = 0.8 * torch.tensor(
    [[1, -1, -1], [-1, 1, -1], [-1, -1, 1], [1, 1, -1], [1, -1, 1], [-1, 1, 1], [1, 1, 1], [-1, -1, -1], [1, 0, 0],
     [0, 0, 1]], dtype=torch.float32
)  # (10, 3)  # fmt: skip


def random_cifar(name: str = "cifar10", data_dir: str = "", train: bool = True, download: bool = True) -> ImageData:
    """Stands in for load_dataset: 256 images (256, 3, 32, 32) in [-1, 1] labelled as CIFAR-10."""
    g = torch.Generator().manual_seed(0 if train else 1)
    y = torch.arange(256) % 10  # (N,)
    x = COLORS[y][:, :, None, None] + 0.2 * torch.randn(256, 3, 32, 32, generator=g)  # (N, 3, 32, 32)
    return ImageData(images=x.clamp(-1, 1), labels=y, info=DATASETS["cifar10"], name="cifar10")


@pytest.fixture(scope="module")
def rgb_run(tmp_path_factory):
    """A unet-tiny teacher (60 train steps) on random RGB data, and the student distilled from it (60 train steps)."""
    out = tmp_path_factory.mktemp("rgb")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "load_dataset", random_cifar)
        mp.setattr(distill, "load_dataset", random_cifar)
        cfg = with_optim(TeacherConfig(dataset="cifar10", arch="unet-tiny"), max_train_steps=60, batch_size=16,
                         lr=3e-3, warmup_steps=10, device="cpu")  # fmt: skip
        teacher = train_teacher(cfg, out, progress=False)
        student_cfg = with_optim(DistillConfig(), max_train_steps=60, batch_size=16, lr=3e-3, warmup_steps=5,
                                 device="cpu")  # fmt: skip
        student = distill_student(out / "teacher.pt", student_cfg, out, progress=False)
    return out, teacher, student


def test_the_teacher_learns_and_its_checkpoint_is_rgb_32(rgb_run):
    out, teacher, _ = rgb_run
    assert teacher.losses[-1] < 0.5 * teacher.losses[0], teacher.losses
    ckpt = load_checkpoint(out / "teacher.pt", kind="teacher")
    assert (ckpt["dataset"], ckpt["channels"], ckpt["image_size"]) == ("cifar10", 3, 32)
    assert ckpt["model_config"]["in_channels"] == 3


def test_cfg_samples_are_rgb_and_s0_is_the_null_label_sampler(rgb_run):
    out, _, _ = rgb_run
    pipe = load_pipeline(out / "teacher.pt")
    labels, null = [0, 2, 5, 9], [pipe.null_class] * 4

    def run(y, s):
        return pipe(y, s, num_steps=8, generator=torch.Generator().manual_seed(0))

    guided = run(labels, 3.0)
    assert guided.shape == (4, 3, 32, 32) and torch.isfinite(guided).all()
    assert guided.min() >= -1 and guided.max() <= 1
    torch.testing.assert_close(run(labels, 0.0), run(null, 1.0), rtol=0, atol=1e-6)
    assert not torch.allclose(run(labels, 0.0), guided, atol=1e-3)  # the label matters: not vacuous


def test_grids_keep_the_colour_channels(rgb_run, tmp_path):
    red = -torch.ones(1, 1, 3, 4, 4)
    red[:, :, 0] = 1.0  # (R=1, K=1, C=3, H, W): pure red
    assert tile(red)[2, 2].tolist() == [1.0, 0.0, 0.0]  # (H', W', C) in [0, 1], channels last, in order

    out, _, _ = rgb_run
    pipe = load_pipeline(out / "teacher.pt")
    grid = sample_scale_grid(pipe, (0.0, 3.0), num_steps=4)
    assert grid.shape == (10, 2, 1, 3, 32, 32)
    save_scale_grid(grid, (0.0, 3.0), pipe.class_names, tmp_path / "grid.png", title="rgb")
    pixels = np.asarray(Image.open(tmp_path / "grid.png").convert("RGB")).astype(int)  # (H, W, 3)
    assert np.abs(pixels[..., 0] - pixels[..., 1]).max() > 100  # a colour figure, not a grey one


def test_the_student_starts_as_the_teacher_and_distils_towards_cfg(rgb_run):
    out, _, student = rgb_run
    teacher = model_from_checkpoint(load_checkpoint(out / "teacher.pt"), "ema")
    init = make_student(teacher).eval()
    g = torch.Generator().manual_seed(123)
    n = 64
    x0 = random_cifar(train=False).images[:n]  # (n, 3, 32, 32)
    t = torch.randint(0, 1000, (n,), generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    x_t = DDPMScheduler(beta_schedule="squaredcos_cap_v2").add_noise(x0, torch.randn(x0.shape, generator=g), t)
    with torch.no_grad():
        torch.testing.assert_close(init(x_t, t, y, guidance=torch.ones(n)), teacher(x_t, t, y), rtol=0, atol=1e-6)
        for s in (3.0, 5.0):  # where the untrained student (= eps_c) is wrong
            target = guided_noise_pred(teacher, x_t, t, y, s)  # (n, 3, 32, 32)
            scale = torch.full((n,), s)
            before = (init(x_t, t, y, guidance=scale) - target).pow(2).mean()
            after = (student.ema(x_t, t, y, guidance=scale) - target).pow(2).mean()
            assert after < 0.8 * before, (s, after.item(), before.item())


def test_cifar10_defaults_to_the_wider_unet(monkeypatch, tmp_path):
    captured = {}

    def no_training(model, loss_fn, data, path, metadata, optim, *args, **kwargs):
        captured.update(model=model, train_steps=optim.max_train_steps, metadata=metadata)

    monkeypatch.setattr(train, "load_dataset", random_cifar)
    monkeypatch.setattr(train, "fit", no_training)
    train_teacher(TeacherConfig(dataset="cifar10"), tmp_path, progress=False)
    model = captured["model"]
    assert model.arch == "unet-cifar" and captured["train_steps"] == 40000
    assert captured["metadata"]["teacher_config"]["arch"] == "unet-cifar"  # resolved, so --resume compares names
    assert 4e6 < sum(p.numel() for p in model.parameters()) < 6e6
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 3, 32, 32), torch.tensor([0, 999]), torch.tensor([1, 10])).shape == (
            2, 3, 32, 32)  # fmt: skip
