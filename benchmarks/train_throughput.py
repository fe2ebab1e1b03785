"""Training throughput of the registered architectures: parameters and images/s per training step.

    python -m benchmarks.train_throughput --archs unet dit --sizes 16 28

One AdamW step on the eps-prediction loss at batch --batch-size; median of --repeats timed steps
after two warm-up steps. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from cfg_minimal import build_model, pick_device


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", nargs="+", default=["unet", "dit"])
    p.add_argument("--sizes", type=int, nargs="+", default=[16, 28])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    device = pick_device(args.device)
    print(f"device {device} ({torch.get_num_threads()} threads), batch {args.batch_size}\n")
    print("| arch | image | parameters | train images / s |")
    print("|---|---:|---:|---:|")
    for arch in args.archs:
        for size in args.sizes:
            model = build_model(arch, image_size=size).to(device).train()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            x = torch.randn(args.batch_size, 1, size, size, device=device)
            t = torch.randint(0, 1000, (args.batch_size,), device=device)
            y = torch.randint(0, 10, (args.batch_size,), device=device)
            times = []
            for i in range(args.repeats + 2):
                start = time.perf_counter()
                loss = F.mse_loss(model(x, t, y), x)
                opt.zero_grad()
                loss.backward()
                opt.step()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if i >= 2:
                    times.append(time.perf_counter() - start)
            params = sum(p.numel() for p in model.parameters()) / 1e6
            speed = args.batch_size / statistics.median(times)
            print(f"| {arch} | {size}x{size} | {params:.2f}M | {speed:.0f} |")


if __name__ == "__main__":
    main()
