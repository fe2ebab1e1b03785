"""Pretrained folders (config.json + model.safetensors) and the weights shipped in pretrained/."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import REPO, SHARED_DATA, needs_mnist

from cfg_minimal import TeacherConfig, UserError, load_checkpoint, load_pipeline, train_teacher, with_optim
from cfg_minimal.pretrained import CONFIG, WEIGHTS, save_pretrained

SHIPPED = REPO / "pretrained"


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg = with_optim(TeacherConfig(arch="unet-tiny"), max_train_steps=20, batch_size=16, device="cpu")
    train_teacher(cfg, out, progress=False)
    return out / "teacher.pt"


def test_a_pretrained_folder_samples_exactly_like_its_checkpoint(teacher_ckpt, tmp_path):
    folder = save_pretrained(load_checkpoint(teacher_ckpt), tmp_path / "digits-teacher", command="python x.py")
    config = json.loads((folder / CONFIG).read_text())
    assert config["command"] == "python x.py" and config["kind"] == "teacher" and "optimizer" not in config
    a, b = load_pipeline(teacher_ckpt), load_pipeline(folder)
    x_T = a.initial_noise(6, 0)
    assert torch.equal(a([0, 1, 2, 3, 4, 5], 3.0, 4, x_T=x_T), b([0, 1, 2, 3, 4, 5], 3.0, 4, x_T=x_T))


def test_damaged_or_incomplete_folders_are_clear_errors(teacher_ckpt, tmp_path):
    with pytest.raises(UserError, match="is a folder, not a checkpoint.*config.json"):
        load_pipeline(tmp_path)
    folder = save_pretrained(load_checkpoint(teacher_ckpt), tmp_path / "m")
    (folder / WEIGHTS).write_bytes((folder / WEIGHTS).read_bytes()[:100])
    with pytest.raises(UserError, match="damaged"):
        load_pipeline(folder)


def shipped(name: str):
    path = SHIPPED / name
    if not (path / WEIGHTS).is_file():
        pytest.skip(f"{path} is not in this checkout")
    return load_pipeline(path)


def test_the_shipped_teacher_at_s0_is_its_null_label_sampler():
    teacher = shipped("mnist-teacher")
    x_T = teacher.initial_noise(10, 0)
    null = [teacher.null_class] * 10
    assert torch.equal(teacher(list(range(10)), 0.0, 8, x_T=x_T), teacher(null, 1.0, 8, x_T=x_T))


@needs_mnist()
@pytest.mark.parametrize("scale, max_rel_l2, min_agreement", [(0.0, 0.2, 0.75), (1.0, 0.2, 0.85), (3.0, 0.2, 0.95)])
def test_the_shipped_student_matches_its_teacher(scale, max_rel_l2, min_agreement):
    """Teacher (two passes per step) and student (one) from the same noise, 16 DDIM steps, 40 images.

    Measured on these weights (n = 100, seeds 0-2): mean relative L2 0.10-0.15 at every scale (0.11-0.16
    over the first 40), and the classifier's labels agree on 0.83-0.97 (s = 0, where the label is
    ignored and nothing pins the class), 0.94-0.95 (s = 1) and 1.00 (s = 3) of the pairs. The teacher's
    own samples of the same labels from other noise (seed 1) are 0.67-0.81 apart. The bounds leave room
    for other CPUs' rounding, not for a student that drifts."""
    from cfg_minimal.classifier import load_or_train_classifier
    from cfg_minimal.evaluate import CACHE_DIR, relative_l2
    from cfg_minimal.metrics import classifier_stats

    teacher, student = shipped("mnist-teacher"), shipped("mnist-student")
    labels, x_T = torch.arange(40) % 10, teacher.initial_noise(40, 0)
    a, b = teacher(labels, scale, 16, x_T=x_T), student(labels, scale, 16, x_T=x_T)
    classifier, _ = load_or_train_classifier("mnist", SHARED_DATA, CACHE_DIR, progress=False)
    agree = (classifier_stats(classifier, a).preds == classifier_stats(classifier, b).preds).float().mean()
    assert relative_l2(b, a) < max_rel_l2 and agree >= min_agreement, (relative_l2(b, a), agree)


def test_sample_py_draws_a_grid_from_the_shipped_student(tmp_path):
    """A fresh clone, no data, no training: the README's first command writes a grid."""
    import sample

    shipped("mnist-student")
    out = tmp_path / "grid.png"
    assert sample.main([str(SHIPPED / "mnist-student"), "--scales", "0", "1", "3", "--n-per-class", "2",
                        "--sampling-steps", "8", "--device", "cpu", "--out", str(out)]) == 0  # fmt: skip
    assert out.stat().st_size > 10_000
