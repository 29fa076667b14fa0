"""Images/s of one model with and without shift/scale, and DDP's overhead at world size 1.

    python benchmarks/throughput.py --model timm:resnet50 --device cuda --batch-size 256 --bf16
    torchrun --nproc-per-node 1 benchmarks/throughput.py --ddp ...   # the same step wrapped in DDP

Run both commands on the same machine: the JSON files in benchmarks/results/ hold the
no-DDP and the DDP-at-world-size-1 numbers; `--compare` prints the ratio (target <= 1.03).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

import surgeon
from surgeon.models import parse_model_args


def step_rate(model, x, y, steps: int, warmup: int, bf16: bool, device: torch.device) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    ac = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else nullcontext()
    for i in range(warmup + steps):
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        with ac:
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * len(x) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="allconv")
    ap.add_argument("--model-arg", action="append", default=[])
    ap.add_argument("--input-size", default="3,32,32")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument(
        "--ddp", action="store_true", help="wrap in DistributedDataParallel (run under torchrun)"
    )
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    size = tuple(int(s) for s in args.input_size.split(","))
    device = torch.device(args.device)
    if args.ddp:
        import torch.distributed as dist

        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    torch.manual_seed(0)
    base = surgeon.build_model(args.model, parse_model_args(args.model_arg))
    x = torch.randn(args.batch_size, *size, device=device)
    y = torch.randint(0, 10, (args.batch_size,), device=device)
    rates = {}
    for variant, (shift, scale) in {
        "plain": ("none", "none"),
        "shift-layer+scale-layer": ("layer", "layer"),
        "shift-channel+scale-channel": ("channel", "channel"),
    }.items():
        model = surgeon.insert(base, shift, scale, input_size=size).to(device)
        if device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        if args.ddp:
            model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index or 0] if device.type == "cuda" else None
            )
        rates[variant] = step_rate(model, x, y, args.steps, args.warmup, args.bf16, device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    result = {
        "benchmark": "throughput", "model": args.model, "model_args": args.model_arg, "device": name,
        "torch": torch.__version__, "batch_size": args.batch_size, "bf16": args.bf16, "ddp_world_size_1": args.ddp,
        "images_per_s": rates, "ratio_vs_plain": {k: v / rates["plain"] for k, v in rates.items()},
    }  # fmt: skip
    if int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps(result, indent=2))
        Path(args.out).mkdir(parents=True, exist_ok=True)
        tag = f"{device.type}_{args.model.replace(':', '-')}_{'ddp' if args.ddp else 'noddp'}"
        (Path(args.out) / f"throughput_{tag}.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
