"""Training-loop speed: `surgeon train`'s loop against a minimal hand-written loop, and the
data path alone against the model, in one process, on the same model and data.

    python benchmarks/train_speed.py                      # CPU: narrow All-CNN-C on the sample
    python benchmarks/train_speed.py --device cuda --batch-size 512 --precision bf16 --width 1
    python benchmarks/train_speed.py ... --compile        # both loops torch.compile'd

Targets (issue 3): the tool's loop reaches >= 95% of the hand-written loop's images/s, and the
data path alone runs >= 10x the model's images/s. Results go to benchmarks/results/.
From Python (``benchmarks/gpu_check.py``): ``measure(cfg, data)`` returns the same figures.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from surgeon.data import ImageData, Loader, load_data
from surgeon.train import TrainConfig, Trainer, build_base, derive


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def hand_loop(
    model,
    loader: Loader,
    epochs: int,
    lr: float,
    device: torch.device,
    precision: str,
    warmup: bool = True,
) -> float:
    """The loop a careful researcher would write: images/s over ``epochs`` epochs."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    )
    model.train()
    n, t = 0, 0.0
    for epoch in range(0 if warmup else 1, epochs + 1):  # epoch 0 warms up
        loader.set_epoch(epoch)
        sync(device)
        t0 = time.perf_counter()
        for x, y in loader:
            with autocast:
                loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if epoch:
                n += len(y)
        sync(device)
        if epoch:
            t += time.perf_counter() - t0
    return n / t


def data_only(loader: Loader, epochs: int, device: torch.device) -> float:
    n = 0
    sync(device)
    t0 = time.perf_counter()
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for x, _ in loader:
            n += len(x)
    sync(device)
    return n / (time.perf_counter() - t0)


def train_loader(cfg: TrainConfig, data: ImageData, device: torch.device) -> Loader:
    """The training loader the engine builds for ``cfg`` (single process)."""
    cuda = device.type == "cuda"
    return Loader(
        data.train_x, data.train_y, cfg.batch_size, mean=data.mean, std=data.std, shuffle=True,
        augment=cfg.augment, drop_last=True, seed=cfg.seed, device=device,
        channels_last=cuda and cfg.channels_last,
    )  # fmt: skip


def tool_rates(
    cfg: TrainConfig, data: ImageData, base, epochs: int, warmup: int = 1
) -> list[float]:
    """images/s of each epoch of ``surgeon train``'s engine after ``warmup`` epochs (which hold
    torch.compile's compilation and cuDNN's first calls), read from the run's metrics."""
    out = Path(tempfile.mkdtemp(prefix="train_speed_"))
    try:
        run_cfg = cfg.replace(epochs=warmup + epochs, name="bench")
        Trainer(run_cfg, out / "run", data=data, base=base).run()
        rows = [json.loads(line) for line in (out / "run" / "metrics.jsonl").open()]
        rates = [r["images_per_s"] for r in rows if r["type"] == "epoch"]
    finally:
        shutil.rmtree(out, ignore_errors=True)
    if len(rates) < warmup + epochs:
        raise RuntimeError(f"the run stopped after {len(rates)} epochs (diverged?)")
    return rates[warmup:]


def measure(
    cfg: TrainConfig,
    data: ImageData,
    *,
    rounds: int = 3,
    interleave: bool = True,
    data_epochs: int = 2,
) -> dict:
    """The hand-written loop against the engine on ``cfg`` (``cfg.compile`` compiles both),
    then the data path alone. ``interleave``: one hand epoch, then a fresh 2-epoch run of the
    engine (its 2nd epoch timed), ``rounds`` times, so load from other processes hits both
    alike; else ``rounds`` hand epochs, then one engine run of ``1 + rounds`` epochs (one
    compilation each: the GPU setting). Ratios are per round; the result is their median."""
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if cfg.device == "auto" else cfg.device)
    size = tuple(data.train_x.shape[1:])
    base = build_base(cfg, data.num_classes, size)
    loader = train_loader(cfg, data, device)
    model = derive(base, cfg, size).to(device)
    if device.type == "cuda" and cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    fn = torch.compile(model) if cfg.compile else model
    t0 = time.perf_counter()
    hand_loop(fn, loader, 1, cfg.lr, device, cfg.precision, warmup=False)  # warm-up, compile
    warmup_s = time.perf_counter() - t0
    hands, tools = [], []
    if interleave:
        for _ in range(rounds):
            hands.append(hand_loop(fn, loader, 1, cfg.lr, device, cfg.precision, warmup=False))
            tools.extend(tool_rates(cfg, data, base, 1))
    else:
        hands = [
            hand_loop(fn, loader, 1, cfg.lr, device, cfg.precision, warmup=False)
            for _ in range(rounds)
        ]
        tools = tool_rates(cfg, data, base, rounds)
    ratios = [t / h for t, h in zip(tools, hands, strict=True)]
    hand, tool = statistics.median(hands), statistics.median(tools)
    data_rate = data_only(loader, max(data_epochs, 1), device)
    return {
        "hand_loop_images_per_s": hand, "tool_loop_images_per_s": tool,
        "hand_per_round": hands, "tool_per_round": tools,
        "tool_vs_hand_per_round": ratios, "tool_vs_hand": statistics.median(ratios),
        "data_only_images_per_s": data_rate, "data_vs_model": data_rate / hand,
        "hand_warmup_epoch_s": warmup_s, "steps_per_epoch": len(loader),
        "compile": cfg.compile, "interleaved": interleave, "rounds": rounds,
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="sample")
    ap.add_argument("--model", default="allconv")
    ap.add_argument("--width", type=float, default=0.25, help="All-CNN-C width multiplier")
    ap.add_argument(
        "--variant",
        default="plain",
        choices=["plain", "ss"],
        help="plain, or layer-wise shift+scale",
    )
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=2, help="epochs of the data-only timing")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved hand/tool epoch pairs")
    ap.add_argument("--limit-train", type=int, default=None)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--compile", action="store_true", help="torch.compile both loops")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    device = torch.device(args.device)
    model_args = {"width": args.width} if args.model == "allconv" else {}
    ss = "layer" if args.variant == "ss" else "none"
    cfg = TrainConfig(
        model=args.model,
        model_args=model_args,
        shift=ss,
        scale=ss,
        data=args.data,
        epochs=args.epochs + 1,
        batch_size=args.batch_size,
        precision=args.precision,
        device=args.device,
        augment=True,
        limit_train=args.limit_train,
        limit_test=1000,
        compile=args.compile,
    )
    data = load_data(cfg.data, limit_train=cfg.limit_train, limit_test=cfg.limit_test)
    m = measure(cfg, data, rounds=args.rounds, data_epochs=args.epochs)
    cuda = device.type == "cuda"
    result = {
        "benchmark": "train_speed", "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "torch": torch.__version__, "threads": torch.get_num_threads(), "model": args.model, "width": args.width,
        "variant": args.variant, "batch_size": args.batch_size, "precision": args.precision, "data": args.data,
        "train_images": len(data.train_x), **m,
    }  # fmt: skip
    print(json.dumps(result, indent=2))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    tag = f"{device.type}_{args.model}_{args.variant}_bs{args.batch_size}_{args.precision}"
    tag += "_compiled" if args.compile else ""
    (Path(args.out) / f"train_speed_{tag}.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
