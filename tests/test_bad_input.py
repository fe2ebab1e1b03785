"""A probe suite: what a careless or hostile user tries, one case per hole found (issue 20).

Every refusal must exit 2 with one line naming the problem and the fix, never a traceback, and leave
the files in --out as they were. The CLIs run in-process (their `main`), on a tiny digits run.
"""

from __future__ import annotations

import hashlib
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_model
from test_sampling import LABELS, make_pipeline

import sample
import train_mnist
from cfg_minimal import (
    DistillConfig,
    OptimConfig,
    TeacherConfig,
    UserError,
    distill_student,
    load_checkpoint,
    load_pipeline,
    save_checkpoint,
    train_teacher,
    with_optim,
)
from cfg_minimal import evaluate as evaluate_cli
from cfg_minimal.checkpoint import output_lock
from cfg_minimal.data import load_dataset
from cfg_minimal.errors import user_message
from cfg_minimal.guidance import CFG
from cfg_minimal.loop import fit
from cfg_minimal.models import build_model

TINY = ["--arch", "unet-tiny", "--teacher-train-steps", "4", "--teacher-batch-size", "8", "--distill-train-steps",
        "4", "--distill-batch-size", "8", "--sampling-steps", "2", "--eval-n", "20", "--device", "cpu",
        "--no-progress"]  # fmt: skip
OPTIM = dict(max_train_steps=4, batch_size=8, device="cpu")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A finished tiny teacher and student in one folder, and another teacher (seed 1) in run/other."""
    out = tmp_path_factory.mktemp("run")
    train_teacher(with_optim(TeacherConfig(arch="unet-tiny"), **OPTIM), out, progress=False)
    distill_student(out / "teacher.pt", with_optim(DistillConfig(), **OPTIM), out, progress=False)
    train_teacher(with_optim(TeacherConfig(arch="unet-tiny"), **OPTIM, seed=1), out / "other", progress=False)
    return out


def call(main, args, capsys) -> tuple[int, str, str]:
    """A CLI's main, in-process -> (exit code, stdout, stderr); argparse's own refusals exit via SystemExit."""
    try:
        code = main([str(a) for a in args])
    except SystemExit as stop:
        code = stop.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_refused(code: int, err: str, message: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert message in lines[-1], err
    assert len(lines) == 1 or lines[0].startswith("usage:"), err  # one line, or argparse's usage + one line


def snapshot(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.pt"))}


# Data loss and silent wrong results


def test_a_finished_run_is_never_overwritten_by_accident(run, tmp_path, capsys):
    before = snapshot(run)
    assert_refused(*call(train_mnist.main, ["--stage", "teacher", "--out", run, *TINY], capsys)[::2], "already exists")
    assert snapshot(run) == before
    copy = shutil.copytree(run, tmp_path / "copy", ignore=shutil.ignore_patterns("other"))
    code, _, err = call(train_mnist.main, ["--stage", "teacher", "--overwrite", "--seed", "3", "--out", copy, *TINY],
                        capsys)  # fmt: skip
    assert code == 0, err
    assert snapshot(copy)["teacher.pt"] != before["teacher.pt"]  # asked for, so replaced


def test_a_second_run_into_a_locked_folder_is_refused(tmp_path, capsys):
    with output_lock(tmp_path):
        code, _, err = call(train_mnist.main, ["--stage", "teacher", "--out", tmp_path, *TINY], capsys)
    assert_refused(code, err, "another run is writing into")
    assert not (tmp_path / "teacher.pt").exists()


def test_resuming_a_student_on_another_teacher_is_refused(run, capsys):
    before = snapshot(run)
    args = ["--stage", "distill", "--resume", "--teacher", run / "other" / "teacher.pt", "--out", run, *TINY]
    assert_refused(*call(train_mnist.main, args, capsys)[::2], "was distilled from another teacher")
    assert snapshot(run) == before


def test_non_finite_weights_and_noise_are_refused(run, tmp_path, capsys):
    ckpt = load_checkpoint(run / "teacher.pt")
    name = next(iter(ckpt["ema"]))
    ckpt["ema"][name] = ckpt["ema"][name].clone()
    ckpt["ema"][name].view(-1)[0] = float("nan")  # one NaN is enough
    save_checkpoint(tmp_path / "nan.pt", {k: v for k, v in ckpt.items() if k not in ("format", "version")})
    code, _, err = call(sample.main, [tmp_path / "nan.pt", "--out", tmp_path / "g.png", "--device", "cpu"], capsys)
    assert_refused(code, err, "hold NaN or inf")
    assert not (tmp_path / "g.png").exists()
    pipe = load_pipeline(run / "teacher.pt")
    for bad in (float("nan"), float("inf")):
        x_T = pipe.initial_noise(2, 0)
        x_T[0, 0, 0, 0] = bad
        with pytest.raises(UserError, match="x_T holds NaN or inf"):
            pipe([1, 2], 3.0, num_steps=2, x_T=x_T)


def test_a_sampler_that_produces_nan_is_an_error_not_an_image():
    pipe = make_pipeline()
    pipe.model.register_forward_hook(lambda module, args, output: output * float("inf"))
    with pytest.raises(UserError, match="NaN or inf"):
        pipe(LABELS, 3.0, num_steps=2)


def test_a_guidance_interval_outside_the_timesteps_is_refused(run, tmp_path, capsys):
    args = [run / "teacher.pt", "--guidance-interval", "2000", "3000", "--out", tmp_path / "g.png", "--device", "cpu"]
    assert_refused(*call(sample.main, args, capsys)[::2], "0 <= t_lo <= t_hi < 1000")


def test_resume_takes_new_paths_and_more_train_steps_and_refuses_other_changes(tmp_path, capsys):
    cfg = with_optim(TeacherConfig(arch="unet-tiny", data_dir=str(tmp_path / "a")), **OPTIM)
    train_teacher(cfg, tmp_path, progress=False)
    moved = with_optim(TeacherConfig(arch="unet-tiny", data_dir=str(tmp_path / "b")), **{**OPTIM, "max_train_steps": 6})
    train_teacher(moved, tmp_path, if_exists="resume", progress=False)
    ckpt = load_checkpoint(tmp_path / "teacher.pt")
    assert ckpt["train_step"] == 6 and ckpt["teacher_config"]["data_dir"] == str(tmp_path / "b")
    assert "resuming at train step 4 of 6" in capsys.readouterr().out
    with pytest.raises(UserError, match=r"optim\.batch_size=8.*asks for optim\.batch_size=16"):
        train_teacher(with_optim(moved, batch_size=16), tmp_path, if_exists="resume", progress=False)
    train_teacher(
        with_optim(moved, max_train_steps=None), tmp_path, if_exists="resume", progress=False
    )  # no count given
    assert load_checkpoint(tmp_path / "teacher.pt")["train_step"] == 6  # the stored 6, not the digits default 700
    with pytest.raises(UserError, match="already at train step 6"):
        train_teacher(with_optim(moved, max_train_steps=3), tmp_path, if_exists="resume", progress=False)
    assert load_checkpoint(tmp_path / "teacher.pt")["train_step"] == 6


# Tracebacks for user mistakes


@pytest.mark.parametrize(
    "args, message",
    [
        (["--eval-n", "5"], "--eval-n must be at least two samples per class (20)"),
        (["--device", "meta"], "unsupported device 'meta'"),
        (["--device", "cuda:7"], "cuda"),
        (["--teacher-lr", "nan"], "--teacher-lr must be a positive number"),
        (["--distill-lr", "-1"], "--distill-lr must be a positive number"),
        (["--round-lr", "inf"], "--round-lr must be a positive number"),
        (["--s-max", "inf"], "s_max < inf"),
        (["--s-min", "2"], "0 <= s_min <= 1 <= s_max"),
        (["--sampling-steps", "5000"], "--sampling-steps must be at most 1000"),
        (["--resume", "--overwrite"], "pass one of them"),
    ],
)
def test_bad_training_flags_fail_before_any_training(args, message, tmp_path, capsys):
    code, _, err = call(train_mnist.main, ["--out", tmp_path, *TINY, *args], capsys)
    assert_refused(code, err, message)
    assert not list(tmp_path.glob("*.pt"))  # refused before the teacher trained


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has an Apple GPU")
def test_mps_without_an_apple_gpu_is_refused(tmp_path, capsys):
    assert_refused(*call(train_mnist.main, ["--out", tmp_path, *TINY, "--device", "mps"], capsys)[::2], "no usable")


def test_a_checkpoint_path_taken_by_a_folder_is_refused(tmp_path, capsys):
    (tmp_path / "teacher.pt").mkdir()
    args = ["--stage", "teacher", "--out", tmp_path, *TINY]
    assert_refused(*call(train_mnist.main, args, capsys)[::2], "is a folder")


def test_a_folder_that_stops_taking_writes_keeps_the_last_checkpoint(tmp_path, capsys, monkeypatch):
    save, calls = torch.save, []

    def failing_save(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) > 1:
            raise OSError(28, "No space left on device")
        return save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", failing_save)
    args = ["--stage", "teacher", "--out", tmp_path, *TINY, "--checkpoint-every", "2"]
    assert_refused(*call(train_mnist.main, args, capsys)[::2], "The last good checkpoint there is kept")
    assert load_checkpoint(tmp_path / "teacher.pt")["train_step"] == 2
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize(
    "out, extra, message",
    [
        ("g.xyz", [], "cannot write a figure as '.xyz'"),
        (".", [], "is a folder; give a file name"),
        ("g.png", ["--n-per-class", "100000"], "--n-per-class must be between 1 and 64"),
    ],
)
def test_sample_refuses_an_output_it_cannot_write(run, tmp_path, capsys, out, extra, message):
    args = [run / "teacher.pt", "--out", tmp_path / out, "--sampling-steps", "2", "--device", "cpu", *extra]
    assert_refused(*call(sample.main, args, capsys)[::2], message)


def test_sample_names_the_file_it_wrote(run, tmp_path, capsys):
    code, out, err = call(sample.main, [run / "teacher.pt", "--out", tmp_path / "grid", "--sampling-steps", "2",
                                        "--n-per-class", "1", "--device", "cpu"], capsys)  # fmt: skip
    assert code == 0, err
    assert (tmp_path / "grid.png").is_file() and f"wrote {tmp_path / 'grid.png'}:" in out


def test_evaluate_refuses_too_few_samples_and_an_unwritable_out(run, tmp_path, capsys):
    args = ["--ckpt", run / "teacher.pt", "--sampling-steps", "2", "--device", "cpu"]
    assert_refused(*call(evaluate_cli.main, [*args, "--n", "5"], capsys)[::2], "at least two samples per class (20)")
    (tmp_path / "file").write_text("not a folder")
    code, _, err = call(evaluate_cli.main, [*args, "--n", "20", "--out", tmp_path / "file"], capsys)
    assert_refused(code, err, "cannot write to --out")
    assert (tmp_path / "file").read_text() == "not a folder"


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c.pop("model_config"), "lacks model_config"),
        (lambda c: c.pop("scheduler_config"), "lacks scheduler_config"),
        (lambda c: c["model_config"].update(arch="resnet"), "does not describe a model this code builds"),
        (lambda c: c["model_config"].update(base_channels=16), "do not fit the model"),
    ],
)
def test_damaged_checkpoints_are_one_line(run, tmp_path, capsys, change, message):
    ckpt = {k: v for k, v in load_checkpoint(run / "teacher.pt").items() if k not in ("format", "version")}
    ckpt["model_config"] = dict(ckpt["model_config"])
    change(ckpt)
    save_checkpoint(tmp_path / "bad.pt", ckpt)
    code, _, err = call(sample.main, [tmp_path / "bad.pt", "--out", tmp_path / "g.png", "--device", "cpu"], capsys)
    assert_refused(code, err, message)
    assert len(err) < 400  # no wall of key names


def write_idx(path: Path, array: np.ndarray) -> None:
    """The MNIST file format: a magic number (0x08 = unsigned bytes, then the rank), the sizes, the bytes."""
    path.write_bytes(struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
                     + array.astype(np.uint8).tobytes())  # fmt: skip


def test_data_with_labels_out_of_range_is_refused(tmp_path, capsys):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for split in ("train", "t10k"):
        write_idx(raw / f"{split}-images-idx3-ubyte", np.zeros((4, 28, 28)))
        write_idx(raw / f"{split}-labels-idx1-ubyte", np.array([0, 1, 12, 3]))
    with pytest.raises(UserError, match=r"labels outside 0\.\.9"):
        load_dataset("mnist", tmp_path)
    args = ["--dataset", "mnist", "--data-dir", tmp_path, "--out", tmp_path / "out", *TINY]
    assert_refused(*call(train_mnist.main, args, capsys)[::2], "labels outside 0..9")


def test_the_pipeline_takes_arrays_and_numpy_scalars_and_refuses_what_it_cannot_use(run):
    pipe = load_pipeline(run / "teacher.pt")
    x_T = pipe.initial_noise(2, 0)
    plain = pipe([1, 2], 3.0, num_steps=2, x_T=x_T, guider=CFG(interval=(100, 900)))
    assert torch.equal(pipe(np.array([1, 2]), np.float32(3.0), num_steps=2, x_T=x_T.double().numpy(),
                            guider=CFG(interval=(np.int64(100), np.int64(900)))), plain)  # fmt: skip
    with pytest.raises(UserError, match="labels must be integer class ids"):
        pipe(["one", "two"], 3.0, num_steps=2)
    with pytest.raises(UserError, match="unknown or unsupported device"):
        load_pipeline(run / "teacher.pt", device="nonsense")
    with pytest.raises(UserError, match="weights must be 'ema'"):
        load_pipeline(run / "teacher.pt", weights="foo")


def test_many_labels_are_sampled_in_chunks_with_the_same_result():
    pipe = make_pipeline()
    labels, x_T = torch.arange(10) % 10, torch.randn(10, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    whole = pipe(labels, torch.linspace(0, 4, 10), num_steps=3, x_T=x_T, guider=CFG(negative_labels=10))
    rows = []
    pipe.model.register_forward_hook(lambda module, args, output: rows.append(len(args[0])))
    pipe.max_batch_size = 4
    chunked = pipe(labels, torch.linspace(0, 4, 10), num_steps=3, x_T=x_T, guider=CFG(negative_labels=10))
    assert max(rows) <= 2 * 4  # a forward never sees more than one chunk (both CFG passes batched)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)


# Misleading messages


def test_a_loss_that_is_never_finite_says_no_checkpoint_was_written(tmp_path):
    def loss_fn(model, x0, y):
        return model(x0, torch.zeros(len(y), dtype=torch.long), y).sum() * float("inf")

    optim = OptimConfig(max_train_steps=5, batch_size=4, checkpoint_every=2, device="cpu")
    with pytest.raises(UserError, match="no checkpoint of this run was written"):
        fit(build_model("unet-tiny"), loss_fn, load_dataset("digits"), tmp_path / "t.pt", {}, optim, progress=False)


def test_the_pickle_refusal_is_a_whole_sentence_without_terminal_codes(tmp_path, capsys):
    torch.save({"model": build_model("unet-tiny")}, tmp_path / "whole_model.pt")  # what `torch.save(model)` users do
    code, _, err = call(sample.main, [tmp_path / "whole_model.pt", "--out", tmp_path / "g.png"], capsys)
    assert_refused(code, err, "only tensors, numbers and strings.")
    assert "\x1b" not in err


def test_a_folder_given_as_a_checkpoint_is_called_a_folder(run, tmp_path, capsys):
    assert_refused(*call(sample.main, [run, "--out", tmp_path / "g.png"], capsys)[::2], "is a folder, not a checkpoint")


def test_numpy_scales_are_accepted_by_guided_noise_pred():
    from cfg_minimal import guided_noise_pred

    model = tiny_model()
    x, t, y = torch.randn(2, 1, 16, 16), torch.tensor([10, 500]), torch.tensor([1, 2])
    with torch.no_grad():
        assert torch.equal(guided_noise_pred(model, x, t, y, np.float32(2.5)), guided_noise_pred(model, x, t, y, 2.5))


def test_a_temporary_file_left_by_a_killed_save_is_removed(tmp_path, capsys):
    (tmp_path / "teacher.ptabc123.tmp").write_bytes(b"half a checkpoint")
    code, _, err = call(train_mnist.main, ["--stage", "teacher", "--out", tmp_path, *TINY], capsys)
    assert code == 0, err
    assert not list(tmp_path.glob("*.tmp"))


def test_running_out_of_memory_or_space_is_a_line_and_a_bug_is_a_traceback():
    """A batch size of 10^8 makes the CPU allocator fail with this message (tried: train_mnist.py
    --teacher-batch-size 100000000); the CLIs print the line, while other errors keep their traceback."""
    oom = RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried ...")
    assert "lower the batch size" in user_message(oom)
    assert "lower the batch size" in user_message(torch.OutOfMemoryError("CUDA out of memory"))
    assert "grid.png (No space left on device)" in user_message(OSError(28, "No space left on device", "grid.png"))
    assert user_message(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None
