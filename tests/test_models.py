"""Model-level behaviour for every architecture: label dropout, checkpoints, student initialisation."""

from __future__ import annotations

import pickle

import pytest
import torch
from conftest import tiny_model

from cfg_minimal import UserError, build_model, load_checkpoint, model_from_checkpoint, save_checkpoint
from cfg_minimal.distill import make_student


def test_label_dropout_rate_in_training_and_none_in_eval(arch):
    model = build_model(arch, image_size=16, p_uncond=0.25)
    labels = torch.randint(0, 10, (20000,))
    torch.manual_seed(0)
    dropped = model.cond.label.drop_labels(labels)
    rate = (dropped == model.null_class).float().mean().item()
    assert abs(rate - 0.25) < 0.015  # 4.6 standard errors at n = 20000
    assert torch.equal(dropped[dropped != model.null_class], labels[dropped != model.null_class])

    seen = []
    model.cond.label.table.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].clone()))
    x, t = torch.randn(512, 1, 16, 16), torch.randint(0, 1000, (512,))
    y = torch.randint(0, 10, (512,))
    model.train()(x, t, y)
    assert (seen[-1] == model.null_class).float().mean().item() > 0.15
    model.eval()(x, t, y)
    assert torch.equal(seen[-1], y)


def test_null_label_is_the_extra_row():
    model = build_model("unet-tiny", num_classes=7)
    assert model.null_class == 7 and model.cond.label.table.num_embeddings == 8


def test_checkpoint_round_trip_rebuilds_an_identical_model(arch, tmp_path):
    model = tiny_model(arch)
    save_checkpoint(tmp_path / "m.pt", {"kind": "teacher", "model_config": {"arch": arch, **model.config},
                                        "ema": model.state_dict()})  # fmt: skip
    rebuilt = model_from_checkpoint(load_checkpoint(tmp_path / "m.pt"))
    assert type(rebuilt) is type(model) and rebuilt.config == model.config
    x, t, y = torch.randn(3, 1, 16, 16), torch.tensor([1, 500, 999]), torch.tensor([0, 4, 10])
    with torch.no_grad():
        assert torch.equal(rebuilt(x, t, y), model(x, t, y))


def test_untrained_student_equals_the_teacher_cfg_prediction_at_s0_and_s1(arch):
    """Conditional prediction for every s >= 1 (s = 1 is exactly CFG); unconditional at s = 0."""
    teacher = tiny_model(arch)
    student = make_student(teacher).eval()
    assert student.is_student and not teacher.is_student
    x, t, y = torch.randn(4, 1, 16, 16), torch.tensor([3, 300, 600, 999]), torch.tensor([1, 2, 3, 10])
    with torch.no_grad():
        for s in [1.0, 3.0, 7.5]:
            assert torch.equal(student(x, t, y, guidance=torch.full((4,), s)), teacher(x, t, y))
        null = torch.full_like(y, teacher.null_class)
        assert torch.equal(student(x, t, y, guidance=torch.zeros(4)), teacher(x, t, null))
        assert not torch.allclose(teacher(x, t, null), teacher(x, t, y))


def test_student_and_teacher_refuse_the_wrong_call(arch):
    teacher = tiny_model(arch)
    student = make_student(teacher)
    x, t, y = torch.randn(2, 1, 16, 16), torch.tensor([1, 2]), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="needs `guidance`"):
        student(x, t, y)
    with pytest.raises(ValueError, match="takes no `guidance`"):
        teacher(x, t, y, guidance=torch.ones(2))
    with pytest.raises(UserError, match="already a guidance-distilled student"):
        make_student(student)


def test_unknown_architecture_names_the_choices():
    with pytest.raises(ValueError, match="unet"):
        build_model("resnet")


class Evil:
    def __reduce__(self):
        return (print, ("this would run code",))


def test_bad_checkpoints_get_clear_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    torch.save({"format": "cfg_minimal", "version": 1, "payload": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(UserError, match="pickled Python objects"):
        load_checkpoint(tmp_path / "evil.pt")
    (tmp_path / "pickle.pt").write_bytes(pickle.dumps({"format": "cfg_minimal"}))
    with pytest.raises(UserError, match="not a readable checkpoint|pickled"):
        load_checkpoint(tmp_path / "pickle.pt")
    model = tiny_model()
    save_checkpoint(tmp_path / "good.pt", {"kind": "teacher", "model_config": {"arch": "unet-tiny", **model.config},
                                           "ema": model.state_dict()})  # fmt: skip
    data = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated or corrupt"):
        load_checkpoint(tmp_path / "truncated.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="not a cfg_minimal checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(UserError, match="is a teacher checkpoint, but a student is needed"):
        load_checkpoint(tmp_path / "good.pt", kind="student")
    mismatched = {
        **load_checkpoint(tmp_path / "good.pt"),
        "model_config": {"arch": "unet-tiny", **model.config, "guidance_embed": True},
    }
    with pytest.raises(UserError, match="do not fit the model"):
        model_from_checkpoint(mismatched)
