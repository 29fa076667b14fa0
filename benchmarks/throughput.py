"""Images/s of one model with and without shift/scale, and DDP's overhead at world size 1.

    python benchmarks/throughput.py --model timm:resnet50 --device cuda --batch-size 256 --bf16
    torchrun --nproc-per-node 1 benchmarks/throughput.py --ddp ...   # the same step wrapped in DDP

Run both commands on the same machine: the JSON files in benchmarks/results/ hold the
no-DDP and the DDP-at-world-size-1 numbers; their ratio is the DDP overhead (target <= 1.03).

    python benchmarks/throughput.py --recipe large-c100-resnet50 --device cuda --bf16

measures a recipe's model and variants (its batch size, CIFAR-100's 100 classes).
From Python (``benchmarks/gpu_check.py``): ``step_rate`` and ``recipe_rates``.
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


def recipe_rates(
    recipe: str,
    device: torch.device,
    *,
    steps: int,
    warmup: int,
    bf16: bool,
    batch_size: int | None = None,
    model_args: dict | None = None,
    variants: list[str] | None = None,
) -> dict:
    """images/s of each variant of ``recipe``'s grid: its model built and derived the way
    ``surgeon train`` does (one base, one init), on a fixed random batch of the recipe's size
    (``batch_size`` overrides it, ``model_args`` update the model's). A variant that fails is
    recorded with its error; the others go on."""
    from surgeon.train import build_base, derive, load_recipe

    shipped = Path(__file__).resolve().parents[1] / "recipes" / f"{recipe}.toml"
    # by path: with PYTHONPATH=. (no pip install) the surgeon_recipes package is not importable
    rec = load_recipe(str(shipped) if shipped.is_file() else recipe)
    base_cfg = dict(rec.base, device=device.type)
    if model_args:
        base_cfg["model_args"] = {**base_cfg.get("model_args", {}), **model_args}
    cfg = rec.configs(base_cfg)[0]
    classes = 100 if cfg.data == "cifar100" else 10
    size = (3, 32, 32)
    batch = batch_size or cfg.batch_size
    t0 = time.perf_counter()
    base = build_base(cfg, classes, size)
    out = {
        "recipe": recipe, "model": cfg.model, "model_args": cfg.model_args, "batch_size": batch,
        "bf16": bf16, "steps": steps, "warmup": warmup, "build_s": time.perf_counter() - t0,
        "images_per_s": {}, "errors": {},
    }  # fmt: skip
    torch.manual_seed(0)
    x = torch.randn(batch, *size, device=device)
    y = torch.randint(0, classes, (batch,), device=device)
    cuda = device.type == "cuda"
    if cuda and cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    for vcfg in rec.configs(base_cfg):
        if variants is not None and vcfg.variant not in variants:
            continue
        try:
            model = derive(base, vcfg, size).to(device)
            if cuda and cfg.channels_last:
                model = model.to(memory_format=torch.channels_last)
            rate = step_rate(model, x, y, steps, warmup, bf16, device)
            out["images_per_s"][vcfg.variant] = rate
            del model
        except Exception as exc:  # one variant's failure must not hide the others
            out["errors"][vcfg.variant] = f"{type(exc).__name__}: {exc}"
    plain = out["images_per_s"].get("plain")
    out["ratio_vs_plain"] = {k: v / plain for k, v in out["images_per_s"].items()} if plain else {}
    if cuda:
        torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="allconv")
    ap.add_argument("--model-arg", action="append", default=[])
    ap.add_argument("--recipe", default=None, help="measure this recipe's model and variants")
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
    if args.recipe:
        result = recipe_rates(
            args.recipe, device, steps=args.steps, warmup=args.warmup, bf16=args.bf16
        )
        print(json.dumps(result, indent=2))
        Path(args.out).mkdir(parents=True, exist_ok=True)
        path = Path(args.out) / f"throughput_{device.type}_{args.recipe}.json"
        path.write_text(json.dumps(result, indent=2) + "\n")
        return
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
