"""The dataset registry: one entry is all a new data set needs, and a bad entry fails when it is registered."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from cfg_minimal import (
    DATASETS,
    Dataset,
    DistillConfig,
    TeacherConfig,
    UserError,
    data,
    distill_student,
    load_checkpoint,
    load_dataset,
    load_pipeline,
    register_dataset,
    train_teacher,
)
from cfg_minimal.classifier import load_or_train_classifier
from cfg_minimal.recipes import GPU_RECIPES, recipe


def noise_loader(data_dir: str, train: bool, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """48 random 1x8x8 images in [0, 1], 3 classes told apart by their brightness."""
    g = torch.Generator().manual_seed(0 if train else 1)
    y = torch.arange(48) % 3  # (48,) int64
    return torch.rand(48, 1, 8, 8, generator=g) * 0.2 + 0.4 * y[:, None, None, None], y  # (48, 1, 8, 8)


NOISE = Dataset("test-noise", channels=1, image_size=8, num_classes=3, class_names=("dim", "mid", "bright"),
                loader=noise_loader, arch="unet-tiny", teacher_train_steps=6, distill_train_steps=4,
                classifier_train_steps=5)  # fmt: skip


@pytest.fixture(autouse=True)
def registry():
    """Every test leaves the registry as it found it: what a test registers stays in that test."""
    before = dict(data._REGISTRY)
    yield
    data._REGISTRY.clear()
    data._REGISTRY.update(before)


@pytest.fixture
def noise_dataset() -> Dataset:
    return register_dataset(NOISE)


def test_a_dataset_registered_here_alone_trains_samples_distils_and_judges(noise_dataset, tmp_path):
    # arch and train steps left out: the entry's recipe (unet-tiny, 6 teacher and 4 distillation train steps)
    teacher = train_teacher(TeacherConfig(dataset="test-noise"), tmp_path, progress=False)
    assert len(teacher.losses) == 0  # 6 train steps: no full logging window of 10
    ckpt = load_checkpoint(tmp_path / "teacher.pt", kind="teacher")
    assert (ckpt["train_step"], ckpt["model_config"]["arch"]) == (6, "unet-tiny")
    assert ckpt["class_names"] == ["dim", "mid", "bright"]
    pipe = load_pipeline(tmp_path / "teacher.pt")
    images = pipe([0, 1, 2], 3.0, num_steps=2, generator=torch.Generator().manual_seed(0))
    assert images.shape == (3, 1, 8, 8) and images.isfinite().all() and pipe.num_classes == 3
    assert pipe.class_names == NOISE.class_names

    distill_student(tmp_path / "teacher.pt", DistillConfig(), tmp_path, progress=False)
    assert load_checkpoint(tmp_path / "student.pt", kind="student")["train_step"] == 4
    student = load_pipeline(tmp_path / "student.pt")
    assert student([2], 2.0, num_steps=2).shape == (1, 1, 8, 8)

    classifier, accuracy = load_or_train_classifier("test-noise", tmp_path, tmp_path / "cache", progress=False)
    assert classifier(load_dataset("test-noise", train=False).images).shape == (48, 3) and 0 <= accuracy <= 1


@pytest.mark.parametrize(
    "changes,field",
    [
        (dict(name=""), "name"),
        (dict(name="two words"), "name"),
        (dict(channels=0), "channels"),
        (dict(image_size=None), "image_size"),
        (dict(num_classes="3"), "num_classes"),
        (dict(num_classes=True), "num_classes"),
        (dict(class_names=("dim", "bright")), "class_names"),
        (dict(class_names=["dim", "mid", "bright"]), "class_names"),
        (dict(class_names=(0, 1, 2)), "class_names"),
        (dict(loader=None), "loader"),
        (dict(loader="noise_loader"), "loader"),
        (dict(arch="resnet"), "arch"),
        (dict(teacher_train_steps=0), "teacher_train_steps"),
        (dict(distill_train_steps=1.5), "distill_train_steps"),
        (dict(classifier_train_steps=None), "classifier_train_steps"),
        (dict(arch_overrides={"resnet": {"distill_train_steps": 3}}), "arch_overrides"),
        (dict(arch_overrides={"dit": {"lr": 3}}), "arch_overrides"),
        (dict(arch_overrides={"dit": {"distill_train_steps": -3}}), "arch_overrides"),
        (dict(arch_overrides=[("dit", 3)]), "arch_overrides"),
        (dict(gpu_recipe={"batch_size": 0}), "gpu_recipe"),
        (dict(gpu_recipe={"epochs": 3}), "gpu_recipe"),
    ],
)
def test_a_bad_field_fails_at_registration_naming_the_field(changes, field):
    entry = replace(NOISE, **{"name": "test-bad", **changes})
    with pytest.raises(UserError, match=field):
        register_dataset(entry)
    assert entry.name not in DATASETS


def test_a_missing_field_a_non_entry_and_a_taken_name_are_refused():
    with pytest.raises(TypeError, match="loader"):  # a dataclass: a field left out fails where the entry is written
        Dataset("test-missing", 1, 8, 3, ("a", "b", "c"), arch="unet-tiny", teacher_train_steps=1,
                distill_train_steps=1, classifier_train_steps=1)  # fmt: skip
    with pytest.raises(UserError, match="Dataset"):
        register_dataset({"name": "test-dict"})
    with pytest.raises(UserError, match="already registered"):
        register_dataset(replace(NOISE, name="digits"))
    assert DATASETS["digits"].image_size == 16
    register_dataset(NOISE)
    assert register_dataset(replace(NOISE, image_size=16), replace=True) is DATASETS["test-noise"]
    assert DATASETS["test-noise"].image_size == 16
    with pytest.raises(TypeError):  # read-only: entries go in through register_dataset only
        DATASETS["test-direct"] = NOISE


def test_a_loader_that_returns_the_wrong_images_is_named():
    def raw_bytes(data_dir, train, download):  # 0..255, not [0, 1]
        x, y = noise_loader(data_dir, train, download)
        return x * 255, y

    register_dataset(replace(NOISE, name="test-raw-bytes", loader=raw_bytes))
    with pytest.raises(UserError, match=r"test-raw-bytes.*outside \[0, 1\]"):
        load_dataset("test-raw-bytes")
    register_dataset(replace(NOISE, name="test-wrong-size", image_size=16))
    with pytest.raises(UserError, match=r"test-wrong-size.*\(48, 1, 16, 16\)"):
        load_dataset("test-wrong-size")


def test_the_built_in_recipes_are_the_published_defaults():
    """The per-dataset numbers as published (README, docs/results.md): MNIST and Fashion-MNIST train the laptop
    recipe (a flow teacher at batch 64, 5,500 train steps: 30 minutes on the project's 2-core CPU)."""
    assert list(DATASETS) == ["digits", "mnist", "fashion-mnist", "cifar10"]
    expected = {"digits": ("unet", 700, 1300, 300), "mnist": ("unet", 5500, 5000, 1000),
                "fashion-mnist": ("unet", 5500, 5000, 1500),
                "cifar10": ("unet-cifar", 40000, 20000, 4000)}  # fmt: skip
    for name, (arch, teacher, distill, classifier) in expected.items():
        assert recipe(name) == dict(arch=arch, teacher_train_steps=teacher, distill_train_steps=distill)
        assert DATASETS[name].classifier_train_steps == classifier
    assert recipe("digits", "dit") == dict(arch="unet", teacher_train_steps=700, distill_train_steps=700)
    assert recipe("digits", "unet-tiny") == recipe("digits")
    laptop = {"prediction_type": "flow_prediction", "optim.batch_size": 64}
    assert {name: dict(d.teacher_settings) for name, d in DATASETS.items()} == {
        "digits": {}, "mnist": laptop, "fashion-mnist": laptop, "cifar10": {}}  # fmt: skip
    assert dict(GPU_RECIPES) == {
        "mnist": dict(teacher_train_steps=1500, distill_train_steps=600, round_train_steps=100, batch_size=1024)
    }
    with pytest.raises(UserError, match="unknown dataset 'imagenet'"):
        recipe("imagenet")
