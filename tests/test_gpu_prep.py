"""Issue 28's CPU side: the CUDA-only speed switches (CUDA-graph compile modes, fused AdamW) are guarded on the
CPU, resume with changed switches, the GPU run picks what pays and fits its budget, and runs end to end (tiny)."""

from __future__ import annotations

import copy
import json
import math
import shutil
import tarfile
from pathlib import Path

import pytest
import torch

from benchmarks import end_to_end, gpu_run, train_throughput
from cfg_minimal import TeacherConfig, UserError, train_teacher, with_optim
from cfg_minimal.checkpoint import load_checkpoint
from cfg_minimal.loop import OptimConfig, compile_mode_on, fused_on, load_optimizer_state, make_optimizer, prepare
from cfg_minimal.models import build_model
from cfg_minimal.recipes import PROPOSED_GPU_RECIPES, recipe_flags, scaled_lr
from cfg_minimal.resume import resume_config

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # a device object needs no GPU; nothing runs on it here
MNIST_RAW = Path(__file__).resolve().parents[2] / "shared" / "data" / "MNIST" / "raw"


def test_a_cuda_graph_compile_mode_falls_back_to_default_on_the_cpu_with_one_line(capsys):
    graphs = OptimConfig(compile=True, compile_mode="reduce-overhead")
    assert compile_mode_on(CUDA, graphs) == "reduce-overhead"
    assert capsys.readouterr().out == ""
    assert compile_mode_on(CPU, graphs) == "default"
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "captures CUDA graphs, which need CUDA" in out and "'default'" in out
    assert compile_mode_on(CPU, OptimConfig(compile=True, compile_mode="max-autotune-no-cudagraphs")) == (
        "max-autotune-no-cudagraphs"
    )  # no graphs: the CPU takes it as asked
    assert compile_mode_on(CPU, OptimConfig()) is None  # no compile: today's eager network


def test_prepare_compiles_in_the_mode_the_guard_chose(monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "compile", lambda net, **kw: calls.append(kw) or net)
    model = build_model("unet-tiny", image_size=16)
    prepare(model, CPU, OptimConfig(compile=True, compile_mode="reduce-overhead"))
    prepare(model, CPU, OptimConfig(compile=True))
    assert prepare(model, CPU, OptimConfig()) is model
    assert calls == [{"mode": "default"}, {"mode": "default"}]


def test_a_compile_mode_is_checked_before_torch_sees_it(tmp_path):
    with pytest.raises(UserError, match="compile_mode=fast.*one of default, reduce-overhead"):
        compile_mode_on(CPU, OptimConfig(compile=True, compile_mode="fast"))
    with pytest.raises(UserError, match="compile_mode=reduce-overhead.*not 'default' without compile"):
        train_teacher(with_optim(TeacherConfig(arch="unet-tiny"), max_train_steps=1, compile_mode="reduce-overhead"),
                      tmp_path)  # fmt: skip
    assert not (tmp_path / "teacher.pt").exists()


def test_fused_adamw_only_on_cuda(capsys):
    fused = OptimConfig(fused=True)
    assert fused_on(CUDA, fused) and capsys.readouterr().out == ""
    assert not fused_on(CUDA, OptimConfig())
    assert not fused_on(CPU, fused)
    assert "fused AdamW is used on CUDA only" in capsys.readouterr().out
    opt = make_optimizer(build_model("unet-tiny", image_size=16), fused)
    assert not opt.param_groups[0]["fused"]  # torch has a CPU fused AdamW; the guard keeps it off


def _adam_pair(fused_a: bool, fused_b: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Two steps of AdamW A, its state loaded into a fresh B (other kernel choice), one more step each."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(50))
    v = torch.nn.Parameter(w.detach().clone())
    a = torch.optim.AdamW([w], lr=1e-2, fused=fused_a or None)
    for _ in range(2):
        w.grad = torch.sin(w.detach() * 3)
        a.step()
    v.data.copy_(w.data)
    b = torch.optim.AdamW([v], lr=1e-2, fused=fused_b or None)
    load_optimizer_state(b, copy.deepcopy(a.state_dict()))  # as from a file: no tensor shared with A
    assert bool(b.param_groups[0]["fused"]) == fused_b  # the loading run's kernel choice, not the saved one
    for p, opt in ((w, a), (v, b)):
        p.grad = torch.sin(p.detach() * 3)
        opt.step()
    return w.detach(), v.detach()


@pytest.mark.parametrize("saved_fused, resumed_fused", [(True, False), (False, True)])
def test_an_optimizer_state_resumes_under_the_other_kernel_choice(saved_fused, resumed_fused):
    """A fused (CUDA) run resumed unfused (CPU), and back: same update, up to the kernels' rounding."""
    continued, resumed = _adam_pair(saved_fused, resumed_fused)
    torch.testing.assert_close(resumed, continued, rtol=1e-6, atol=1e-7)


@pytest.fixture(scope="module")
def short_teacher(tmp_path_factory):
    """A digits teacher interrupted at train step 4 (of 8)."""
    out = tmp_path_factory.mktemp("teacher")
    cfg = with_optim(TeacherConfig(arch="unet-tiny"), max_train_steps=4, batch_size=8, device="cpu")
    train_teacher(cfg, out, progress=False)
    return out, cfg


def test_resume_takes_the_speed_switches_of_the_command_and_continues_exactly(short_teacher, tmp_path):
    out, cfg = short_teacher
    ckpt = load_checkpoint(out / "teacher.pt")
    graphs = with_optim(cfg, max_train_steps=8, compile=True, compile_mode="reduce-overhead", fused=True)
    resumed = resume_config(TeacherConfig, ckpt, "teacher_config", graphs)
    assert (resumed.optim.compile_mode, resumed.optim.fused, resumed.optim.compile) == ("reduce-overhead", True, True)
    ckpt["teacher_config"]["optim"].update(compile=True, compile_mode="reduce-overhead", fused=True)
    plain = resume_config(TeacherConfig, ckpt, "teacher_config", with_optim(cfg, max_train_steps=8))
    assert (plain.optim.compile_mode, plain.optim.fused, plain.optim.compile) == ("default", False, False)

    shutil.copy(out / "teacher.pt", tmp_path / "teacher.pt")  # continue with fused asked (unfused on the CPU)
    train_teacher(with_optim(cfg, max_train_steps=8, fused=True), tmp_path, if_exists="resume", progress=False)
    whole = tmp_path / "whole"
    train_teacher(with_optim(cfg, max_train_steps=8), whole, progress=False)
    a, b = load_checkpoint(tmp_path / "teacher.pt"), load_checkpoint(whole / "teacher.pt")
    assert a["teacher_config"]["optim"]["fused"] is True
    for name in b["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name


def test_the_throughput_benchmark_refuses_cuda_switches_on_the_cpu():
    args = train_throughput.build_parser().parse_args(["--variants", "fp32+fused", "--archs", "unet-tiny"])
    with pytest.raises(UserError, match=r"\+reduce_overhead and \+fused are CUDA only"):
        train_throughput.check_args(args, CPU)


def test_end_to_end_flags_compile_mode_implies_compile_and_lr_scales_with_the_batch():
    args = end_to_end.fill_defaults(end_to_end.parse_args(["--compile-mode", "reduce-overhead", "--lr-scaling",
                                                           "sqrt", "--distill-lr", "1e-3"]), CUDA)  # fmt: skip
    assert args.compile and args.teacher_batch_size == 1024
    assert args.teacher_lr == pytest.approx(2e-3 * math.sqrt(1024 / 128))  # the stage's default batch: 128
    assert args.distill_lr == 1e-3  # given: not scaled
    assert end_to_end.fill_defaults(end_to_end.parse_args([]), CUDA).teacher_lr == 2e-3  # default: no scaling
    assert scaled_lr(1e-3, 512, 128, "linear") == pytest.approx(4e-3)
    with pytest.raises(UserError, match="lr scaling must be one of"):
        scaled_lr(1e-3, 512, 128, "cubic")


def test_the_proposed_recipes_are_valid_end_to_end_commands():
    for arch, recipe in PROPOSED_GPU_RECIPES["mnist"].items():
        args = end_to_end.fill_defaults(end_to_end.parse_args(["--dataset", "mnist", *recipe_flags(recipe)]), CUDA)
        end_to_end.check_args(args)
        assert args.teacher_train_steps == recipe["teacher_train_steps"]
        assert args.no_step_rounds == (arch == "dit")
        assert end_to_end.model_names(args)[:2] == ["teacher", "student"]
    flags = recipe_flags({"no_step_rounds": True, "arch": None, "teacher_lr": 0.001})
    assert flags == ["--no-step-rounds", "--teacher-lr", "0.001"]


def test_the_gpu_run_picks_the_variant_that_trains_fastest_with_its_compile_counted():
    rows = [dict(arch="unet", batch=1024, variant="bf16", images_per_s=25_000.0, first_step_seconds=0.5),
            dict(arch="unet", batch=1024, variant="bf16+fused", images_per_s=27_000.0, first_step_seconds=0.5),
            dict(arch="unet", batch=1024, variant="bf16+reduce_overhead+fused", images_per_s=80_000.0,
                 first_step_seconds=60.0)]  # fmt: skip
    flags, best = gpu_run.speed_flags(rows, 4500 * 1024)  # 184 s eager vs 58 + 60 s graphs
    assert flags == ["--compile-mode", "reduce-overhead", "--fused"] and best is rows[2]
    flags, best = gpu_run.speed_flags(rows, 100 * 1024)  # a short run: the compile does not pay
    assert flags == ["--fused"] and best is rows[1]
    assert gpu_run.speed_flags([], 1000) == ([], None)


def test_the_gpu_run_scales_a_recipe_down_to_its_time_never_up():
    recipe = dict(PROPOSED_GPU_RECIPES["mnist"]["unet"])
    images = sum(gpu_run.train_images(recipe).values())
    same, share = gpu_run.fit_recipe(dict(recipe), images / 10, seconds=20)  # 10 s needed, 20 s there
    assert share == 1.0 and same == recipe
    half, share = gpu_run.fit_recipe(dict(recipe), images / 10, seconds=5)
    assert share == 0.5 and half["teacher_train_steps"] == recipe["teacher_train_steps"] // 2
    assert half["round_train_steps"] == recipe["round_train_steps"] // 2


def test_the_tiny_gpu_run_writes_its_table_json_and_exports(tmp_path):
    """The device script end to end on the CPU: carried MNIST unpacked and read, every stage run, the summary."""
    carry = tmp_path / "carry"
    if MNIST_RAW.is_dir():
        carry.mkdir()
        for name in gpu_run.MNIST_FILES:
            shutil.copy(MNIST_RAW / f"{name}.gz", carry / f"{name}.gz")
    out = tmp_path / "out"
    argv = ["--tiny", "--out", str(out), "--work", str(tmp_path / "work"), "--data-dir", str(tmp_path / "data"),
            "--budget", "900", *(["--carry", str(carry)] if carry.is_dir() else [])]  # fmt: skip
    assert gpu_run.main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    stages = summary["stages"]
    if carry.is_dir():
        assert stages["setup"]["mnist_test_images"] == 10_000
    assert {r["arch"] for r in stages["throughput"]["rows"]} == {"unet-tiny", "dit-tiny"}
    for arch, models in (("unet", 3), ("dit", 2)):
        assert stages[arch]["rc"] == 0 and not stages[arch]["timed_out"]
        assert len(stages[arch]["exported"]) == models  # unet: teacher, student, 4-step student
        assert {q["scale"] for q in stages[arch]["report"]["quality"]} == {0.0, 3.0}
    assert "--no-step-rounds" in stages["dit"]["flags"]
    table = (out / "summary.md").read_text()
    assert "| must hold |" in table and "dit teacher accuracy at s = 3" in table
    with tarfile.open(out / "digits-dit-teacher.tar.gz") as tar:
        assert sorted(tar.getnames()) == ["digits-dit-teacher", "digits-dit-teacher/config.json",
                                          "digits-dit-teacher/model.safetensors"]  # fmt: skip
    with tarfile.open(out / "digits-unet-pretrained.tar.gz") as tar:
        assert "digits-student-4steps/config.json" in tar.getnames()
