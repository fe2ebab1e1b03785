"""Training throughput: images/s of one train step per architecture, image size, batch size and speed setting.

    python -m benchmarks.train_throughput --archs unet dit --sizes 16 28
    python -m benchmarks.train_throughput --archs unet --sizes 28 --batch-sizes 128 256 512 \
        --variants fp32 tf32 bf16 bf16+channels_last bf16+compile          # on a GPU: what pays

One train step as loop.fit takes it (the eps-prediction loss, backward, gradient clipping, AdamW, the
EMA update) on random data; the median of --repeats timed steps after warm-up steps (the first of
which, with +compile, includes the compilation: reported as its own column). Variants:
  fp32      float32 everywhere (TF32 off)
  tf32      float32 storage, TF32 matrix products and convolutions (CUDA)
  bf16      bf16 autocast as loop.fit uses on CUDA, TF32 for what stays float32
  +channels_last, +compile   loop.fit's OptimConfig.channels_last / .compile
  +reduce_overhead           compile in mode "reduce-overhead": forward and backward replayed as CUDA graphs
  +fused                     fused AdamW (OptimConfig.fused); these two are CUDA only
Prints a markdown table and writes its rows to OUT/train_throughput.json.
"""

from __future__ import annotations

import argparse
import statistics
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from benchmarks import harness
from cfg_minimal import ARCHITECTURES, UserError, build_model, pick_device
from cfg_minimal.distributed import device_name
from cfg_minimal.loop import OptimConfig, compile_mode_on, ema_update, make_optimizer

WARMUP_STEPS = 3
TABLE = harness.Table([("arch", "arch", "{}"), ("image", "image", "{}"), ("parameters", "parameters", "{:.2f}M"),
                       ("batch", "batch", "{:d}"), ("variant", "variant", "{}"),
                       ("images_per_s", "train images / s", "{:.0f}"),
                       ("first_step_seconds", "first step s", "{:.2f}")])  # fmt: skip


def one_config(
    arch: str, size: int, batch: int, variant: str, device: torch.device, repeats: int
) -> tuple[float, float]:
    """(images/s, seconds of the first step) of `variant` (e.g. 'bf16+channels_last')."""
    parts = variant.split("+")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = parts[0] != "fp32"
    layout = torch.channels_last if "channels_last" in parts else torch.contiguous_format
    model = build_model(arch, image_size=size).to(device, memory_format=layout).train()
    ema = build_model(arch, image_size=size).to(device).requires_grad_(False)
    graphs = "reduce_overhead" in parts  # as loop.fit compiles and builds its optimizer, from an OptimConfig
    optim = OptimConfig(lr=1e-4, compile="compile" in parts or graphs, fused="fused" in parts,
                        compile_mode="reduce-overhead" if graphs else "default")  # fmt: skip
    mode = compile_mode_on(device, optim)
    net = model if mode is None else torch.compile(model, mode=mode)
    opt = make_optimizer(model, optim)
    x = torch.randn(batch, 1, size, size, device=device).contiguous(memory_format=layout)  # (B, 1, H, W)
    t = torch.randint(0, 1000, (batch,), device=device)  # (B,)
    y = torch.randint(0, 10, (batch,), device=device)  # (B,)
    bf16 = parts[0] == "bf16" and device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else nullcontext()

    def step() -> None:
        with autocast:
            loss = F.mse_loss(net(x, t, y).float(), x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema_update(ema, model, 0.999)

    times = harness.time_repeated(step, device, WARMUP_STEPS + repeats, warmup=0)  # the first includes compiling
    return batch / statistics.median(times[WARMUP_STEPS:]), times[0]


PRECISIONS, SWITCHES = ("fp32", "tf32", "bf16"), ("channels_last", "compile", "reduce_overhead", "fused")
CUDA_SWITCHES = ("reduce_overhead", "fused")


def check_args(args: argparse.Namespace, device: torch.device) -> None:
    """Every --variants, --archs and --sizes means what it says on this device, before anything is timed."""
    harness.require_positive(args, "repeats", "batch_sizes", "sizes")
    for variant in args.variants:
        precision, *switches = variant.split("+")
        if precision not in PRECISIONS or not set(switches) <= set(SWITCHES) or len(set(switches)) < len(switches):
            raise UserError(f"--variants {variant!r}: a variant is one of {', '.join(PRECISIONS)}, optionally with "
                            f"+{' and +'.join(SWITCHES)} (e.g. bf16+channels_last)")  # fmt: skip
        if precision != "fp32" and device.type != "cuda":
            raise UserError(f"--variants {variant!r}: {precision} changes nothing on {device.type} (CUDA only), so "
                            "its row would be fp32 under another name; use fp32 there")  # fmt: skip
        if set(switches) & set(CUDA_SWITCHES) and device.type != "cuda":
            raise UserError(f"--variants {variant!r}: +{' and +'.join(CUDA_SWITCHES)} are CUDA only (on "
                            f"{device.type} the row would be another variant under another name)")  # fmt: skip
    for arch in args.archs:
        if arch not in ARCHITECTURES:
            raise UserError(f"--archs {arch!r}: unknown architecture; choose from {', '.join(ARCHITECTURES)}")
        for size in args.sizes:
            try:
                with torch.no_grad():
                    build_model(arch, image_size=size)(torch.zeros(1, 1, size, size), torch.zeros(1).long(),
                                                       torch.zeros(1).long())  # fmt: skip
            except (ValueError, RuntimeError) as err:
                raise UserError(f"--archs {arch} cannot take --sizes {size} ({str(err).splitlines()[0]})") from None


def run(args: argparse.Namespace) -> None:
    device = pick_device(args.device)
    check_args(args, device)
    out = harness.Outputs.of(args, "train_throughput.json")
    print(f"device {device_name(device)}")
    TABLE.header()
    rows = []
    for arch in args.archs:
        for size in args.sizes:
            params = sum(p.numel() for p in build_model(arch, image_size=size).parameters()) / 1e6
            for batch in args.batch_sizes:
                for variant in args.variants:
                    speed, first = one_config(arch, size, batch, variant, device, args.repeats)
                    rows.append(dict(arch=arch, image=f"{size}x{size}", parameters=params, batch=batch,
                                     variant=variant, images_per_s=speed, first_step_seconds=first))  # fmt: skip
                    TABLE.row(rows[-1])
    out.json("train_throughput.json", harness.record(args, device, rows=rows))


def build_parser() -> argparse.ArgumentParser:
    p = harness.parser("train_throughput", __doc__, n=None, data=False)
    p.add_argument("--archs", nargs="+", default=["unet", "dit"], help="default: unet dit")
    p.add_argument("--sizes", type=int, nargs="+", default=[16, 28], help="image sizes (default: 16 28)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[128], help="default: 128")
    p.add_argument("--variants", nargs="+", default=["fp32"], help="default: fp32")
    p.add_argument(
        "--repeats", type=int, default=5, help=f"timed steps after {WARMUP_STEPS} warm-up steps (default: 5)"
    )
    return p


main = harness.entry(build_parser, run, __name__)
