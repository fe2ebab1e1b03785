"""Hostile files: checkpoints, pretrained folders and their configs that are damaged, edited or misused.

Each test is a probe for one way a file once loaded silently, lost a user's work or ended in a traceback
(issue 26: export over an existing folder, corrupt weights, edited config.json values, full disks). A
mistake is one line on stderr and exit code 2 from the CLI (a UserError from the API), and no file changes.
"""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import REPO
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from cfg_minimal import TeacherConfig, UserError, load_checkpoint, load_pipeline, pretrained, train_teacher, with_optim
from cfg_minimal.checkpoint import save_checkpoint, weights_checksum, weights_fingerprint
from cfg_minimal.pretrained import CONFIG, WEIGHTS, save_pretrained

SHIPPED = REPO / "pretrained"
COMMAND = "python train_mnist.py --dataset digits --arch unet-tiny"


@pytest.fixture(scope="module")
def teacher_pt(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    cfg = with_optim(TeacherConfig(arch="unet-tiny"), max_train_steps=4, batch_size=8, device="cpu")
    train_teacher(cfg, out, progress=False)
    return out / "teacher.pt"


@pytest.fixture
def folder(teacher_pt, tmp_path) -> Path:
    """A fresh export of the tiny teacher, trained by COMMAND."""
    return save_pretrained(load_checkpoint(teacher_pt), tmp_path / "digits-teacher", command=COMMAND)


def shipped(name: str) -> Path:
    path = SHIPPED / name
    if not (path / WEIGHTS).is_file():
        pytest.skip(f"{path} is not in this checkout")
    return path


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def export(capsys, *args) -> tuple[int, str]:
    code = pretrained.main([str(a) for a in args])
    return code, capsys.readouterr().err


def assert_one_line(code: int, err: str, match: str) -> None:
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, (code, err)
    assert match in err, err


def read_config(folder: Path) -> dict:
    return json.loads((folder / CONFIG).read_text())


def write_config(folder: Path, config: dict) -> None:
    (folder / CONFIG).write_text(json.dumps(config, indent=2))


def flip_inside_a_tensor(path: Path, tensor_bytes: bytes, count: int = 64) -> None:
    """Invert `count` bytes in the middle of the first place `tensor_bytes` occurs in the file."""
    data = bytearray(path.read_bytes())
    start = data.find(tensor_bytes) + len(tensor_bytes) // 2
    assert start > len(tensor_bytes) // 2
    for i in range(start, start + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def biggest(state: dict[str, torch.Tensor]) -> str:
    return max(state, key=lambda name: state[name].numel())


# --- 1. Export never loses work ------------------------------------------------------------------------------


def test_export_refuses_an_existing_export_folder(teacher_pt, folder, tmp_path, capsys):
    """A student over a teacher folder, a teacher over a copy of the shipped MNIST teacher: refused, unchanged."""
    shipped_copy = shutil.copytree(shipped("mnist-teacher"), tmp_path / "pretrained" / "mnist-teacher")
    for target in (folder, shipped_copy):
        before = snapshot(target)
        assert_one_line(*export(capsys, teacher_pt, target), "already holds an exported model; pass --overwrite")
        assert snapshot(target) == before
    assert export(capsys, teacher_pt, shipped_copy, "--overwrite")[0] == 0  # asked for: replaced
    assert read_config(shipped_copy)["dataset"] == "digits"


def test_export_refuses_a_folder_holding_other_files(teacher_pt, capsys):
    run = teacher_pt.parent  # the run folder itself: teacher.pt, the lock
    before = snapshot(run)
    for flags in ((), ("--overwrite",)):
        assert_one_line(*export(capsys, teacher_pt, run, *flags), "holds other files")
    assert snapshot(run) == before


def test_exporting_a_folder_keeps_its_command(folder, tmp_path, capsys):
    assert export(capsys, folder, tmp_path / "copy")[0] == 0
    assert read_config(tmp_path / "copy")["command"] == COMMAND
    before = snapshot(folder)
    assert export(capsys, folder, folder, "--overwrite")[0] == 0  # to itself: the same two files
    assert snapshot(folder) == before
    assert export(capsys, folder, tmp_path / "other", "--command", "python other.py")[0] == 0
    assert read_config(tmp_path / "other")["command"] == "python other.py"


def test_exporting_an_unfinished_checkpoint_needs_a_flag(teacher_pt, tmp_path, capsys):
    ckpt = load_checkpoint(teacher_pt)
    save_checkpoint(tmp_path / "stopped.pt", {**ckpt, "train_step": 2})  # as Ctrl-C at train step 2 of 4 leaves it
    assert_one_line(*export(capsys, tmp_path / "stopped.pt", tmp_path / "out"), "unfinished (train step 2 of 4)")
    assert not (tmp_path / "out").exists()
    assert export(capsys, tmp_path / "stopped.pt", tmp_path / "out", "--allow-unfinished")[0] == 0


def test_a_full_disk_during_export_leaves_no_partial_folder(teacher_pt, folder, tmp_path, monkeypatch, capsys):
    def full_disk(tensors, path, metadata=None):
        Path(path).write_bytes(b"\0" * 100)  # half a file, then the disk is full
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(pretrained, "save_file", full_disk)
    new = tmp_path / "new" / "deeper"
    assert_one_line(*export(capsys, teacher_pt, new), f"could not export to {str(new)!r}")
    assert not (tmp_path / "new").exists()
    before = snapshot(folder)
    assert_one_line(*export(capsys, teacher_pt, folder, "--overwrite"), "No space left on device")
    assert snapshot(folder) == before


# --- 2. Checksums: damaged weights never load ----------------------------------------------------------------


def test_every_checkpoint_and_export_stores_a_checksum_of_its_weights(teacher_pt, folder):
    ckpt = load_checkpoint(teacher_pt)
    assert ckpt["checksums"] == {key: weights_checksum(ckpt[key]) for key in ("ema", "model")}
    assert len(ckpt["checksums"]["ema"]) == 64  # a full sha256
    assert read_config(folder)["checksums"] == {"ema": weights_checksum(load_file(folder / WEIGHTS))}


@pytest.mark.parametrize("name", ["mnist-teacher", "mnist-student", "mnist-student-8steps"])
def test_the_shipped_folders_are_verified_by_their_checksum(name, tmp_path):
    path = shipped(name)
    assert read_config(path)["checksums"]["ema"] == weights_checksum(load_file(path / WEIGHTS))
    copy = shutil.copytree(path, tmp_path / name)
    weights = load_file(copy / WEIGHTS)
    flip_inside_a_tensor(copy / WEIGHTS, weights[biggest(weights)].numpy().tobytes(), count=1000)
    with pytest.raises(UserError, match=r"model.safetensors' is damaged: the weights do not match their checksum"):
        load_pipeline(copy)


def test_flipped_bytes_in_a_folder_or_a_pt_are_refused(teacher_pt, folder, tmp_path, capsys):
    weights = load_file(folder / WEIGHTS)
    flip_inside_a_tensor(folder / WEIGHTS, weights[biggest(weights)].numpy().tobytes())
    assert_one_line(*export(capsys, folder, tmp_path / "a"), "damaged: the weights do not match their checksum")
    pt = Path(shutil.copy(teacher_pt, tmp_path / "teacher.pt"))
    ema = load_checkpoint(pt)["ema"]
    flip_inside_a_tensor(pt, ema[biggest(ema)].numpy().tobytes())
    assert_one_line(*export(capsys, pt, tmp_path / "b"), "damaged")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_weights_edited_and_saved_again_do_not_match_their_checksum(teacher_pt, tmp_path):
    """A valid zip (torch.save recomputes its CRCs) whose weights are no longer the ones its checksum names."""
    ckpt = load_checkpoint(teacher_pt)
    name = biggest(ckpt["ema"])
    ckpt["ema"][name] = ckpt["ema"][name] + 1e-3
    torch.save(ckpt, tmp_path / "edited.pt")
    with pytest.raises(UserError, match=r"edited.pt' is damaged: the weights do not match their checksum"):
        load_checkpoint(tmp_path / "edited.pt")


def test_files_without_a_checksum_still_load(teacher_pt, folder, tmp_path):
    config = read_config(folder)
    del config["checksums"]
    write_config(folder, config)
    ckpt = load_checkpoint(teacher_pt)
    del ckpt["checksums"]
    torch.save(ckpt, tmp_path / "old.pt")
    for path in (folder, tmp_path / "old.pt"):
        assert load_pipeline(path)([1], 2.0, num_steps=2).shape == (1, 1, 16, 16)


# --- 3. Edited configs: checked once, where they are read ----------------------------------------------------


def edit(folder: Path, **changes) -> Path:
    config = read_config(folder)
    for key, value in changes.items():
        section, _, name = key.partition("__")
        if name:
            config[section][name] = value
        elif value is DELETE:
            del config[section]
        else:
            config[section] = value
    write_config(folder, config)
    return folder


DELETE = object()
EDITS = {
    "num_train_timesteps 10": ({"scheduler_config__num_train_timesteps": 10}, "trained with 1000"),
    "num_train_timesteps 10 (no record)": (
        {"scheduler_config__num_train_timesteps": 1.5, "teacher_config": DELETE}, "must be a whole number"),
    "beta_schedule": ({"scheduler_config__beta_schedule": "linear"}, "trained with 'squaredcos_cap_v2'"),
    "prediction_type": ({"scheduler_config__prediction_type": "v_prediction"}, "trained with 'epsilon'"),
    "betas outside (0, 1)": ({"scheduler_config__beta_end": 5.0, "scheduler_config__beta_schedule": "linear",
                              "teacher_config": DELETE}, "betas must lie in (0, 1)"),
    "image_size 28": ({"image_size": 28}, "says image_size 28, but its model"),
    "image_size 28 everywhere": ({"image_size": 28, "model_config__image_size": 28}, "says dataset 'digits' (16"),
    "channels 3": ({"channels": 3}, "says channels 3, but its model (model_config's in_channels) has 1"),
    "channels 3 everywhere": ({"channels": 3, "model_config__in_channels": 3, "dataset": "own",
                               "teacher_config__dataset": "own"}, "weights do not fit"),
    "dataset mnist": ({"dataset": "mnist"}, "says dataset 'mnist', but its teacher was trained on 'digits'"),
    "dataset mnist, no record": ({"dataset": "mnist", "teacher_config": DELETE}, "says dataset 'mnist' (28"),
    "unknown model_config key": ({"model_config__heads": 4}, "unknown setting 'heads'"),
    "model_config a string": ({"model_config": "unet"}, "model_config must be a mapping"),
    "model_config type": ({"model_config__p_uncond": "0.1"}, "p_uncond is '0.1', but it must be a number"),
    "channel_mults empty": ({"model_config__channel_mults": []}, "list of 1 to 8 whole numbers"),
    "a 100-GB model": ({"model_config__base_channels": 60000}, "weights do not fit"),
    "three class_names": ({"class_names": ["a", "b", "c"]}, "class_names must be a list of 10 names"),
    "kind": ({"kind": "critic"}, "kind must be 'teacher' or 'student'"),
    "a student's embedder": ({"kind": "student"}, "says it is a student, but its model_config has guidance_embed"),
    "guidance_range on a teacher": ({"guidance_range": [0.0, 6.0]}, "guidance_range must be a student's"),
    "sampling_steps on a teacher": ({"sampling_steps": 8}, "on a step-distilled student (this is a teacher)"),
    "unknown stage setting": ({"teacher_config__lr": 1.0}, "teacher_config has an unknown setting 'lr'"),
    "stage config a string": ({"teacher_config": "digits"}, "teacher_config must be a mapping"),
    "train_step text": ({"train_step": "4"}, "train_step must be a whole number"),
    "checksums a list": ({"checksums": ["x"]}, "checksums entry is not a mapping"),
    "checksum edited": ({"checksums": {"ema": "0" * 64}}, "do not match their checksum"),
    "weights model": ({"weights": "model"}, "says weights 'model'"),
    "optimizer in config": ({"optimizer": {}}, "holds 'optimizer', which a config never does"),
    "command a number": ({"command": 5}, "command must be the text of a command"),
}  # fmt: skip


@pytest.mark.parametrize("changes, message", EDITS.values(), ids=EDITS.keys())
def test_an_edited_config_is_one_line(folder, tmp_path, capsys, changes, message):
    edit(folder, **changes)
    assert_one_line(*export(capsys, folder, tmp_path / "out"), message)
    assert not (tmp_path / "out").exists()


def test_step_distilled_configs_over_other_weights(tmp_path):
    student, eight = shipped("mnist-student"), shipped("mnist-student-8steps")
    mixed = shutil.copytree(student, tmp_path / "mixed")
    shutil.copy(eight / CONFIG, mixed / CONFIG)  # the 8-step config over the plain student's weights
    with pytest.raises(UserError, match="damaged: the weights do not match their checksum"):
        load_pipeline(mixed)
    config = read_config(eight)
    del config["checksums"]
    config["previous_fingerprint"] = weights_fingerprint(load_file(mixed / WEIGHTS))  # over the model it halved
    write_config(mixed, config)
    with pytest.raises(UserError, match="its weights are those of the model it was distilled from"):
        load_pipeline(mixed)
    for i, (changes, message) in enumerate([
        ({"sampling_steps": 4}, "its last step-distillation round .* ended at 8"),
        ({"scheduler_config__aligned_base": 12}, "has no grid they lie on"),
        ({"guidance_range": [0.0, float("nan")]}, "guidance_range must be a student's"),
        ({"guidance_range": [0.0, 5.0]}, "is not the range distill_config trained, 0.0 to 6.0"),
    ]):  # fmt: skip
        with pytest.raises(UserError, match=message):
            load_pipeline(edit(shutil.copytree(eight, tmp_path / f"edit{i}"), **changes))
    plain = edit(shutil.copytree(student, tmp_path / "plain"), sampling_steps=8)  # no aligned grid, no rounds
    with pytest.raises(UserError, match="has no grid they lie on"):
        load_pipeline(plain)


@pytest.mark.parametrize("kind", ["int32", "all zero", "int32 header"])
def test_non_float_or_all_zero_weights_are_refused(folder, kind, capsys, tmp_path):
    weights = load_file(folder / WEIGHTS)
    config = read_config(folder)
    del config["checksums"]  # as in a file from before checksums: the weights' types are checked all the same
    write_config(folder, config)
    if kind == "int32 header":  # the dtype in the safetensors header edited: the same bytes read as integers
        data = (folder / WEIGHTS).read_bytes()
        (folder / WEIGHTS).write_bytes(data.replace(b'"F32"', b'"I32"', 1))
        message = "non-float tensor"
    else:
        weights = {n: t.to(torch.int32) if kind == "int32" else torch.zeros_like(t) for n, t in weights.items()}
        save_file(weights, folder / WEIGHTS)
        message = "non-float tensor" if kind == "int32" else "weights are all zero"
    assert_one_line(*export(capsys, folder, tmp_path / "out"), message)


# --- 4. One line, never a traceback ----------------------------------------------------------------------------


def test_a_full_disk_during_a_checkpoint_save_keeps_the_last_one(teacher_pt, tmp_path, monkeypatch):
    path = Path(shutil.copy(teacher_pt, tmp_path / "teacher.pt"))
    before = path.read_bytes()

    def full_disk(obj, f):
        Path(f).write_bytes(b"PK\3\4 half a file")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    monkeypatch.setattr(torch, "save", full_disk)
    message = rf"could not write the checkpoint {str(path)!r} \(torch.save failed: .*is the disk full\?\)\. The last"
    with pytest.raises(UserError, match=message) as err:
        save_checkpoint(path, load_checkpoint(teacher_pt))
    assert "\n" not in str(err.value)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["teacher.pt"]


@pytest.mark.parametrize("path", [123, None, b"teacher.pt", "", "  "])
def test_a_path_that_is_not_a_path(path):
    with pytest.raises(UserError, match="must be a path|path is empty"):
        load_pipeline(path)


def test_raw_weights_from_a_folder_say_the_folder_has_only_ema(folder, teacher_pt):
    with pytest.raises(UserError, match="holds only its EMA weights.*use weights='ema'"):
        load_pipeline(folder, weights="model")
    assert load_pipeline(teacher_pt, weights="model").model is not None  # a .pt has them
    with pytest.raises(UserError, match="must be 'ema' .* or 'model' .*, got 'raw'"):
        load_pipeline(teacher_pt, weights="raw")


def test_a_corrupted_pickle_is_damaged_not_a_code_execution_risk(teacher_pt, tmp_path):
    """Bytes of the pickled index changed: with a valid CRC (rewritten zip) and without (flipped in place)."""
    source = zipfile.ZipFile(teacher_pt)
    with zipfile.ZipFile(tmp_path / "rewritten.pt", "w") as out:
        for info in source.infolist():
            data = source.read(info.filename)
            if info.filename.endswith("data.pkl"):
                i = data.index(b"format")
                data = data[: i - 6] + b"\xee" + data[i - 5 :]  # an opcode no pickle has
            out.writestr(info.filename, data)
    pt = tmp_path / "flipped.pt"
    pt.write_bytes(teacher_pt.read_bytes())
    flip_inside_a_tensor(pt, source.read(next(n for n in source.namelist() if n.endswith("data.pkl"))), count=8)
    for path in (tmp_path / "rewritten.pt", pt):
        with pytest.raises(UserError, match="is not a readable checkpoint \\(damaged") as err:
            load_checkpoint(path)
        assert "pickled Python objects" not in str(err.value)


def test_python_m_cfg_minimal_pretrained_prints_no_runtime_warning():
    result = subprocess.run([sys.executable, "-m", "cfg_minimal.pretrained", "--help"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0 and "--overwrite" in result.stdout
    assert "Warning" not in result.stderr, result.stderr


# --- More hostile files ----------------------------------------------------------------------------------------


def test_more_hostile_folders(folder, tmp_path, capsys):
    text = (folder / CONFIG).read_text()
    (folder / CONFIG).write_bytes(b"\xef\xbb\xbf" + text.encode())  # saved by an editor that adds a BOM: fine
    assert load_pipeline(folder).num_classes == 10
    (folder / CONFIG).write_text(text.replace('"kind": "teacher",', '"kind": "teacher",\n  "kind": "student",'))
    assert_one_line(*export(capsys, folder, tmp_path / "o"), "gives 'kind' twice")
    (folder / CONFIG).write_text("[" * 100_000 + "]" * 100_000)  # nested past Python's recursion limit
    assert_one_line(*export(capsys, folder, tmp_path / "o"), "damaged config.json")
    (folder / CONFIG).write_text(text.replace('"guidance_embed": false', '"guidance_embed": NaN'))
    assert_one_line(*export(capsys, folder, tmp_path / "o"), "guidance_embed is nan, but it must be true or false")
    (folder / CONFIG).write_text(text)
    (folder / WEIGHTS).unlink()
    assert_one_line(*export(capsys, folder, tmp_path / "o"), "lacks model.safetensors")
    for name in (CONFIG, WEIGHTS):  # one file of a folder, given as the checkpoint
        (folder / WEIGHTS).write_bytes(b"")
        assert_one_line(*export(capsys, folder / name, tmp_path / "o"), "pass the folder")
    assert not (tmp_path / "o").exists()


def test_more_hostile_pt_files(teacher_pt, tmp_path, capsys):
    ckpt = load_checkpoint(teacher_pt)
    cases = {
        "ema a tensor": ({**ckpt, "ema": torch.zeros(3)}, "ema weights are not a mapping of names to tensors"),
        "ema holds a list": ({**ckpt, "ema": {**ckpt["ema"], "x": [1]}}, "not a mapping of names to tensors"),
        "complex weights": (
            {**ckpt, "model": {n: t.to(torch.complex64) for n, t in ckpt["model"].items()}}, "non-float tensor"),
        "distill_config unknown": ({**ckpt, "distill_config": {"s_max": 6.0, "sigma": 1, "optim": {}}},
                                   "distill_config has an unknown setting 'sigma'"),
        "teacher_config without optim": ({**ckpt, "teacher_config": {"dataset": "digits"}}, "an 'optim' mapping"),
    }  # fmt: skip
    for name, (bad, message) in cases.items():
        torch.save({k: v for k, v in bad.items() if k != "checksums"}, tmp_path / "bad.pt")
        code, err = export(capsys, tmp_path / "bad.pt", tmp_path / "o")
        assert code == 2 and err.count("\n") == 1 and message in err, (name, err)
    assert not (tmp_path / "o").exists()


def test_export_to_a_file_or_an_empty_name(teacher_pt, tmp_path, capsys):
    assert_one_line(*export(capsys, teacher_pt, teacher_pt), "is a file, not a folder; export into a new folder")
    assert_one_line(*export(capsys, teacher_pt, teacher_pt / "sub"), "is a file, not a folder")
    assert_one_line(*export(capsys, teacher_pt, ""), "export folder path is empty")
    (tmp_path / "empty").mkdir()  # an empty folder is fine
    assert export(capsys, teacher_pt, tmp_path / "empty")[0] == 0


def test_a_full_disk_while_saving_a_figure_is_one_line_and_leaves_no_truncated_image(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from cfg_minimal.plotting import save_figure

    def full(self, fname, *args, **kwargs):
        Path(fname).write_bytes(b"\x89PNG half")  # what a full disk leaves behind
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(plt.Figure, "savefig", full)
    target = tmp_path / "grid.png"
    with pytest.raises(UserError, match=r"could not write the figure .*grid\.png.*No space left"):
        save_figure(plt.figure(), target)
    assert list(tmp_path.iterdir()) == []  # neither the figure nor a temporary file
