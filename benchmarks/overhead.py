"""Overhead of the inserted layers: step time and peak memory of All-CNN-C plain, with batch
norm, and with shift+scale (element, channel, layer; unfused, fused, fused with the ReLU),
eager and compiled, as ratios against the plain model measured in the same run.

    python benchmarks/overhead.py                                 # CPU: width 0.5, batch 64
    python benchmarks/overhead.py --device cuda --compile         # GPU: width 1, batch 512,
                                                                  # bf16 autocast, channels_last

A step is forward + cross-entropy + backward + SGD (momentum 0.9) on a fixed random batch.
Variants run round-robin (``--rounds`` rounds of ``--iters`` steps each, after ``--warmup``
steps) and each variant's time is the median over rounds, so load that drifts during the run
hits all variants alike. Peak memory is CUDA's ``max_memory_allocated`` during one step minus
what was allocated before it (activations, gradients, temporaries); on CPU it is not
measured (null). Targets (issue 7): fused shift+scale eager <= 1.20x plain (cheaper than
batch norm), compiled <= 1.05x on an H100. Results: benchmarks/results/overhead_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import surgeon  # noqa: E402
from surgeon.models.builtin import AllConvC  # noqa: E402
from surgeon.passes import fuse_relu  # noqa: E402

MODES = ("element", "channel", "layer")


def variants(args) -> dict[str, tuple[str, callable]]:
    """name -> (group, builder(model) -> model)."""
    out = {
        "plain": ("plain", lambda m: m),
        "batchnorm": ("batchnorm", lambda m: surgeon.insert_batchnorm(m)),
    }
    for mode in args.modes:
        out[f"ss-{mode} unfused"] = (mode, lambda m, mode=mode: surgeon.insert(m, mode, mode))
        out[f"ss-{mode} fused"] = (
            mode,
            lambda m, mode=mode: surgeon.insert(m, mode, mode, fused=True),
        )
        out[f"ss-{mode} relu-fused"] = (
            mode,
            lambda m, mode=mode: fuse_relu(surgeon.insert(m, mode, mode, fused=True)),
        )
    return out


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Runner:
    """One variant: its model, optimiser and step."""

    def __init__(self, name, model, args, device, x, y, compiled: bool) -> None:
        self.name, self.x, self.y, self.device = name, x, y, device
        self.model = model.to(device).train()
        if args.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-3, momentum=0.9)
        self.fn = torch.compile(self.model) if compiled else self.model
        self.autocast = (
            torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else nullcontext()
        )
        self.times: list[float] = []
        self.peak_mb: float | None = None
        self.compile_s: float | None = None

    def step(self) -> None:
        with self.autocast:
            loss = F.cross_entropy(self.fn(self.x), self.y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    def warmup(self, n: int) -> None:
        t0 = time.perf_counter()
        self.step()
        sync(self.device)
        self.compile_s = time.perf_counter() - t0
        for _ in range(n - 1):
            self.step()
        sync(self.device)

    def timed(self, n: int) -> None:
        sync(self.device)
        t0 = time.perf_counter()
        for _ in range(n):
            self.step()
        sync(self.device)
        self.times.append((time.perf_counter() - t0) / n * 1e3)

    def peak(self) -> None:
        if self.device.type != "cuda":
            return
        self.opt.zero_grad(set_to_none=True)
        sync(self.device)
        before = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.step()
        sync(self.device)
        self.peak_mb = (torch.cuda.max_memory_allocated(self.device) - before) / 2**20


def run(args, save=lambda report: None, deadline: float | None = None) -> dict:
    """Measure; ``save(report)`` after each phase (eager, compiled) so a timeout keeps the first.

    ``args`` as from :func:`default_args`. With ``deadline`` (a ``time.monotonic()`` value) a
    variant not yet warmed up when it passes is dropped and listed under ``"skipped"``, and
    the compiled phase is not started; ``plain`` is always warmed up first."""
    device = torch.device(args.device)
    skipped: list[str] = []
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, 3, 32, 32, device=device)
    if args.channels_last:
        x = x.to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch_size,), device=device)
    results = []
    phases = ([] if getattr(args, "skip_eager", False) else [False]) + (
        [True] if args.compile else []
    )
    for compiled in phases:
        tag = "compiled" if compiled else "eager"
        if deadline is not None and time.monotonic() > deadline:
            skipped.append(f"{tag} phase (time budget)")
            continue
        runners = []
        for name, (group, build) in variants(args).items():
            if args.only and not any(s in name for s in args.only):
                continue
            torch.manual_seed(0)
            model = build(AllConvC(width=args.width))
            runners.append((group, Runner(name, model, args, device, x, y, compiled)))
        warm = []
        for group, r in runners:
            if deadline is not None and r.name != "plain" and time.monotonic() > deadline:
                skipped.append(f"{r.name} {tag} (time budget)")
                continue
            r.warmup(args.warmup)
            warm.append((group, r))
            print(f"  {tag:8s} {r.name:24s} warm ({r.compile_s:.1f}s first step)", flush=True)
        runners = warm
        for _ in range(args.rounds):
            for _, r in runners:
                r.timed(args.iters)
        for _, r in runners:
            r.peak()
        base = next(r for _, r in runners if r.name == "plain")
        base_ms = statistics.median(base.times)
        for group, r in runners:
            ms = statistics.median(r.times)
            mem_ratio = None
            if r.peak_mb is not None and base.peak_mb:
                mem_ratio = r.peak_mb / base.peak_mb
            results.append(
                {
                    "variant": r.name,
                    "mode": group,
                    "compiled": compiled,
                    "step_ms": round(ms, 3),
                    "ratio": round(ms / base_ms, 3),
                    "step_ms_rounds": [round(t, 3) for t in r.times],
                    "peak_mb": None if r.peak_mb is None else round(r.peak_mb, 1),
                    "mem_ratio": None if mem_ratio is None else round(mem_ratio, 3),
                    "first_step_s": round(r.compile_s, 2),
                }
            )
        del runners
        save(_report(args, device, results, skipped))
    return _report(args, device, results, skipped)


def _report(args, device: torch.device, results: list[dict], skipped=()) -> dict:
    return {
        "benchmark": "overhead",
        "device": device.type,
        "device_name": device_name(device),
        "torch": torch.__version__,
        "triton": _triton_version(),
        "threads": torch.get_num_threads(),
        "config": {
            "model": "allconv",
            "width": args.width,
            "batch_size": args.batch_size,
            "bf16_autocast": args.bf16,
            "channels_last": args.channels_last,
            "warmup": args.warmup,
            "rounds": args.rounds,
            "iters": args.iters,
            "step": "forward + cross-entropy + backward + SGD(momentum 0.9)",
        },
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "fused_backend": _fused_backend(device),
        "results": results,
        "skipped": list(skipped),
    }


def _fused_backend(device: torch.device) -> str:
    """What ``fused=True`` runs on this device: "triton" or "torch"."""
    from surgeon.ops import fused as op

    if op.BACKEND == "torch" or (op.BACKEND == "auto" and device.type != "cuda"):
        return "torch"
    return "triton" if op._triton() is not None else "torch"


def _triton_version() -> str | None:
    try:
        import triton

        return triton.__version__
    except Exception:
        return None


def table(report: dict) -> str:
    lines = [
        f"{report['device_name']} | torch {report['torch']} | "
        + ", ".join(f"{k}={v}" for k, v in report["config"].items() if k != "step"),
        f"{'variant':26s} {'mode':9s} {'step ms':>9s} {'ratio':>7s} {'peak MB':>9s} {'mem':>6s}",
    ]
    for compiled in (False, True):
        rows = [r for r in report["results"] if r["compiled"] == compiled]
        if not rows:
            continue
        lines.append("-- compiled --" if compiled else "-- eager --")
        for r in rows:
            peak = "-" if r["peak_mb"] is None else f"{r['peak_mb']:.0f}"
            mem = "-" if r["mem_ratio"] is None else f"{r['mem_ratio']:.2f}x"
            lines.append(
                f"{r['variant']:26s} {r['mode']:9s} {r['step_ms']:9.2f} "
                f"{r['ratio']:6.2f}x {peak:>9s} {mem:>6s}"
            )
    return "\n".join(lines)


DEFAULTS = {  # option: (CPU, CUDA)
    "width": (0.5, 1.0),
    "batch_size": (64, 512),
    "warmup": (2, 10),
    "rounds": (3, 5),
    "iters": (3, 20),
    "bf16": (False, True),
    "channels_last": (False, True),
}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--width", type=float, default=None, help="All-CNN-C width (CPU 0.5, CUDA 1)")
    ap.add_argument("--batch-size", type=int, default=None, help="CPU 64, CUDA 512")
    ap.add_argument("--compile", action="store_true", help="also torch.compile each variant")
    ap.add_argument("--warmup", type=int, default=None, help="steps before timing (CPU 2, CUDA 10)")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds (CPU 3, CUDA 5)")
    ap.add_argument("--iters", type=int, default=None, help="steps per round (CPU 3, CUDA 20)")
    ap.add_argument(
        "--threads", type=int, default=None, help="CPU threads (default 1: a shared CPU thrashes)"
    )
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--only", nargs="*", default=[], help="variants whose name contains these")
    ap.add_argument("--no-bf16", dest="bf16", action="store_false", default=None)
    ap.add_argument("--no-channels-last", dest="channels_last", action="store_false", default=None)
    ap.add_argument(
        "--out", default=None, help="JSON path (default results/overhead_<device>.json)"
    )
    return ap


def default_args(device: str = "cpu", **options) -> argparse.Namespace:
    """The command line's arguments as a namespace, the device's defaults filled in;
    ``options`` set any of them (``only=[...]``, ``compile=True``, ``skip_eager=True``...)."""
    args = parser().parse_args(["--device", device])
    for key, value in options.items():
        setattr(args, key, value)
    return fill_defaults(args)


def fill_defaults(args: argparse.Namespace) -> argparse.Namespace:
    cuda = args.device.startswith("cuda")
    for key, (cpu_default, cuda_default) in DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, cuda_default if cuda else cpu_default)
    if args.only and "plain" not in args.only:
        args.only = [*args.only, "plain"]
    return args


def main() -> None:
    args = fill_defaults(parser().parse_args())
    cuda = args.device.startswith("cuda")
    if args.threads or not cuda:
        torch.set_num_threads(args.threads or 1)
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results"
    if not args.out:
        out = out / f"overhead_{torch.device(args.device).type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    def save(report: dict) -> None:
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(table(report), flush=True)
        print(f"wrote {out}", flush=True)

    run(args, save)


if __name__ == "__main__":
    main()
