"""One command that measures every GPU claim of the project and leaves every figure in files.

    mkdir -p .device && tar xzf ../shared/data/cifar10-jpg.tar.gz -C .device   # once, here
    PYTHONPATH=. timeout 560 python benchmarks/gpu_check.py --out "$OUT/gpu" --data .device/cifar10-jpg
    python benchmarks/gpu_check.py --cpu-smoke --out /tmp/smoke   # every section, toy sizes, CPU

Sections, each in its own function, each writing ``DIR/<section>.json`` (also while it runs,
so a killed run keeps what it had) and each catching its own failure:

1. ``triton``: the Triton kernels against the PyTorch op and fp64 (every mode pair, ReLU or
   not, fp32/bf16, NCHW / channels-last / (N, C) / (N, L, C) / (N, H, W, C), small and large
   shapes, forward and backward; ``check_triton.py`` in parallel worker processes), a
   micro-benchmark, and ``overhead.py``: All-CNN-C's step time with batch norm and with
   shift+scale per mode against the plain model, eager and torch.compile'd.
2. ``train_speed``: ``surgeon train``'s engine against a hand-written loop (All-CNN-C,
   batch 512, bf16, channels_last, eager and compiled) and the data loader alone
   (``train_speed.py``).
3. ``ddp``: DDP at world size 1 against no DDP, through the engine's own DDP path (a
   one-process group from MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE, no torchrun) and on bare
   training steps.
4. ``real_run``: All-CNN-C on the CIFAR-10 JPEG copy, 5 epochs, plain / batch norm /
   layer-wise shift+scale at ``ss_lr_mult`` 1 and 0.1, LR 0.04, through ``surgeon.train``:
   validation accuracy per epoch.
5. ``large_models``: images/s of the large-model recipes' models and variants for a few
   steps (``throughput.py``).

Then ``DIR/summary.json`` (environment, per-section status, every check against its target)
and a table. A global time budget (``--budget``) skips the sections it has no time left for
and says so; optional parts (the compiled runs) are dropped first. ``--cpu-smoke`` runs every
section at toy size on the CPU in about a minute (the CUDA-only parts say ``"skipped": "no
CUDA"``; torch.compile uses the "eager" backend, i.e. Dynamo without Inductor): its numbers
are smoke, not measurements. Exit status 1 when a section failed, else 0 (a missed target
is a finding, not a failure); a part of a section that fails (the micro-benchmark, the
compiled phase...) is recorded in its place and makes the section "partial" (also status
1). Needs nothing from the internet.
"""

from __future__ import annotations

import argparse
import copy
import functools
import gc
import json
import math
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

T0 = time.monotonic()  # the budget counts from here, imports included (as `timeout` does)
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from surgeon.data import ImageData, load_data  # noqa: E402
from surgeon.ops import fused as fused_op  # noqa: E402
from surgeon.train import TrainConfig, build_base, derive, load_recipe, run_configs  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))  # the benchmarks this check runs

import check_triton  # noqa: E402
import overhead  # noqa: E402
import throughput  # noqa: E402
import train_speed  # noqa: E402

TARGETS = {  # the project's claims (docs/performance.md, issues 3 and 7)
    "fused_eager_ratio": 1.20,  # fused shift+scale step time / plain, eager, at most
    "fused_compiled_ratio": 1.05,  # ... torch.compile'd, at most
    "tool_vs_hand": 0.95,  # surgeon train images/s / hand-written loop, at least
    "data_vs_model": 10.0,  # data path alone images/s / model images/s, at least
    "ddp_overhead": 0.03,  # 1 - DDP(world size 1) images/s / no-DDP images/s, at most
}
LARGE_RECIPES = ("large-c100-resnet50", "large-c100-convnext_tiny", "large-c100-vit_small")
MODES = ("element", "channel", "layer")


@dataclass(frozen=True)
class Sizes:
    """What each section runs: the GPU's sizes or the CPU smoke's toy ones."""

    budget_s: float  # whole run, seconds
    width: float  # All-CNN-C width (sections 1-4)
    batch: int  # overhead, train speed and DDP batch
    triton_workers: int  # processes for the kernel comparisons
    triton_timeout_s: float  # the comparisons' share of the budget, at most
    overhead_steps: tuple[int, int, int]  # warm-up steps, rounds, steps per round
    compiled_variants: tuple[str, ...]  # overhead variants also compiled (plain always)
    speed_rounds: int  # timed epochs per loop (train speed, DDP through the engine)
    ddp_step_rounds: int  # interleaved rounds of bare steps, plain vs DDP
    ddp_steps: int  # steps per round
    limit_train: int | None  # class-balanced subset (sections 2-4)
    limit_test: int | None  # sections 2-3: one evaluation batch (one compiled eval graph)
    real_epochs: int
    real_batch: int
    large_steps: tuple[int, int]  # warm-up, timed
    large_batch: int | None  # None: the recipe's
    large_model_args: dict[str, dict] = field(default_factory=dict)
    reserve_s: dict[str, float] = field(default_factory=dict)  # least time a section needs


GPU = Sizes(
    budget_s=530,
    width=1.0,
    batch=512,
    triton_workers=min(15, os.cpu_count() or 1),
    triton_timeout_s=150,
    overhead_steps=(5, 5, 10),
    compiled_variants=("batchnorm", "element fused", "channel fused", "layer fused"),
    speed_rounds=3,
    ddp_step_rounds=3,
    ddp_steps=20,
    limit_train=None,
    limit_test=512,
    real_epochs=5,
    real_batch=128,
    large_steps=(3, 10),
    large_batch=None,
    reserve_s={"triton": 60, "train_speed": 40, "ddp": 25, "real_run": 100, "large_models": 45},
)
SMOKE = Sizes(
    budget_s=110,
    width=0.125,
    batch=16,
    triton_workers=2,
    triton_timeout_s=60,
    overhead_steps=(1, 2, 1),
    compiled_variants=("layer fused",),
    speed_rounds=1,
    ddp_step_rounds=1,
    ddp_steps=2,
    limit_train=160,
    limit_test=100,
    real_epochs=1,
    real_batch=32,
    large_steps=(1, 1),
    large_batch=2,
    large_model_args={  # the recipes' architectures, shrunk (timm constructor arguments)
        "large-c100-resnet50": {"layers": [1, 1, 1, 1]},
        "large-c100-convnext_tiny": {"depths": [1, 1, 1, 1], "dims": [16, 32, 64, 128]},
        "large-c100-vit_small": {"depth": 1, "embed_dim": 64, "num_heads": 2},
    },
    reserve_s={"triton": 5, "train_speed": 5, "ddp": 5, "real_run": 5, "large_models": 5},
)


@dataclass
class Context:
    """What a section gets: device, sizes, output folder, data, and its own deadline."""

    device: torch.device
    sizes: Sizes
    smoke: bool
    out: Path
    data: str  # an ImageFolder path, or "sample"
    until: float = 0.0  # time.monotonic() by which the section should be done
    section: str = ""
    _images: dict = field(default_factory=dict)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def left(self) -> float:
        """Seconds left of this section's share of the budget."""
        return self.until - time.monotonic()

    def images(self) -> ImageData:
        """The training data (decoded once, then from the project's cache)."""
        if "data" not in self._images:
            s = self.sizes
            self._images["data"] = load_data(
                self.data, limit_train=s.limit_train, limit_test=s.limit_test
            )
        return self._images["data"]

    def allconv(self, **changes: Any) -> TrainConfig:
        """The All-CNN-C configuration of sections 2 and 3 (plain, the section's batch)."""
        base = dict(
            model="allconv", model_args={"width": self.sizes.width}, shift="none",
            scale="none", data=self.data, batch_size=self.sizes.batch, lr=0.01,
            precision="bf16" if self.cuda else "fp32", device=self.device.type, augment=True,
            epochs=1, limit_train=self.sizes.limit_train, limit_test=self.sizes.limit_test,
        )  # fmt: skip
        return TrainConfig(**{**base, **changes})

    def part(self, result: dict, key: str, fn: Callable[[], Any]) -> Any:
        """``result[key] = fn()``; a failure is recorded there (and in ``result["errors"]``,
        which makes the section "partial") instead of ending the section."""
        t0 = time.monotonic()
        try:
            result[key] = fn()
            status = "done"
        except Exception as exc:
            msg = f"{type(exc).__name__}: {exc}"
            result[key] = {"error": msg, "traceback": traceback.format_exc()}
            result.setdefault("errors", []).append(f"{key}: {msg}")
            print(result[key]["traceback"], file=sys.stderr, flush=True)
            status = "FAILED"
        print(f"  {self.section}.{key}: {status} ({time.monotonic() - t0:.1f} s)", flush=True)
        self.save_partial(result)
        return result[key]

    def save_partial(self, result: dict) -> None:
        """Write the section's JSON now (status "running"), so a killed run keeps it."""
        write_json(self.out / f"{self.section}.json", {**result, "status": "running"})


def check(name: str, value: float | None, target: float | None, at_least: bool) -> dict:
    """One claim: its measured value against its target (``ok`` None without a value)."""
    ok = None
    if value is not None and target is not None and math.isfinite(value):
        ok = value >= target if at_least else value <= target
    sign = ">=" if at_least else "<="
    return {
        "name": name,
        "value": None if value is None else round(value, 4),
        "target": None if target is None else f"{sign} {target:g}",
        "ok": ok,
    }


# ---------------------------------------------------------------- 1. Triton kernels


def section_triton(ctx: Context) -> dict:
    """Kernel correctness (parallel workers), the micro-benchmark, the overhead ratios."""
    s = ctx.sizes
    res: dict[str, Any] = {"fused_backend": overhead._fused_backend(ctx.device)}
    checks = []
    has_triton = fused_op._triton() is not None
    if ctx.cuda and has_triton:
        timeout = min(s.triton_timeout_s, max(20.0, 0.45 * ctx.left()))
        ctx.part(
            res,
            "correctness",
            lambda: check_triton.parallel_check(
                "cuda", s.triton_workers, big=True, timeout_s=timeout, log_dir=ctx.out / "logs"
            ),
        )
        ctx.part(res, "micro", lambda: check_triton.micro("cuda"))
    else:
        why = "no CUDA" if not ctx.cuda else "triton not importable"
        res["correctness"] = {"skipped": why}
        res["micro"] = {"skipped": why}
        if has_triton:  # the same worker path, Triton's interpreter, a subset
            ctx.part(
                res,
                "interpreter",
                lambda: check_triton.parallel_check(
                    "cpu", s.triton_workers, quick=True, timeout_s=s.triton_timeout_s
                ),
            )
        else:
            res["interpreter"] = {"skipped": "triton not importable"}
    for key in ("correctness", "interpreter"):
        r = res.get(key, {})
        if "cases" in r:
            value = f"{r['cases']} cases, {len(r['failures'])} failures"
            done = "" if r["complete"] else " (cut by the time budget)"
            ok = r["passed"] if r["complete"] else (False if r["failures"] else None)
            checks.append(
                {"name": f"triton {key}", "value": value + done, "target": "all pass", "ok": ok}
            )

    warmup, rounds, iters = s.overhead_steps
    kw = dict(width=s.width, batch_size=s.batch, warmup=warmup, rounds=rounds, iters=iters)
    eager = overhead.default_args(ctx.device.type, **kw)
    deadline = ctx.until - 0.3 * ctx.left()  # the rest for the compiled phase
    ctx.part(res, "overhead_eager", lambda: overhead.run(eager, deadline=deadline))
    compiled = overhead.default_args(
        ctx.device.type, compile=True, skip_eager=True, only=list(s.compiled_variants), **kw
    )
    ctx.part(res, "overhead_compiled", lambda: overhead.run(compiled, deadline=ctx.until))
    for phase in ("eager", "compiled"):
        rows = {r["variant"]: r for r in res[f"overhead_{phase}"].get("results", [])}
        target = TARGETS[f"fused_{phase}_ratio"]
        for mode in MODES:
            r = rows.get(f"ss-{mode} fused")
            checks.append(
                check(f"fused {mode} step / plain, {phase}", r and r["ratio"], target, False)
            )
        bn = rows.get("batchnorm")
        checks.append(check(f"batchnorm step / plain, {phase}", bn and bn["ratio"], None, False))
    res["checks"] = checks
    return res


# ---------------------------------------------------------------- 2. surgeon train's speed


def section_train_speed(ctx: Context) -> dict:
    """The engine against a hand-written loop, eager then compiled; the data path alone."""
    data = ctx.images()
    res: dict[str, Any] = {
        "data": ctx.data, "train_images": len(data.train_x), "width": ctx.sizes.width,
        "batch_size": ctx.sizes.batch, "precision": "bf16" if ctx.cuda else "fp32",
        "channels_last": ctx.cuda,
    }  # fmt: skip
    if not ctx.cuda:
        res["bf16"] = {"skipped": "no CUDA"}
    rounds = ctx.sizes.speed_rounds
    t0 = time.monotonic()
    measure = functools.partial(train_speed.measure, data=data, rounds=rounds, interleave=False)
    ctx.part(res, "eager", lambda: measure(ctx.allconv()))
    eager_s = time.monotonic() - t0
    if ctx.left() > eager_s + (5 if ctx.smoke else 60):  # + compiling train and eval graphs
        ctx.part(res, "compiled", lambda: measure(ctx.allconv(compile=True)))
    else:
        res["compiled"] = {"skipped": f"time budget ({ctx.left():.0f} s left of the section)"}
    checks = []
    for phase in ("eager", "compiled"):
        value = res[phase].get("tool_vs_hand")
        checks.append(
            check(f"surgeon train / hand loop, {phase}", value, TARGETS["tool_vs_hand"], True)
        )
    value = res["eager"].get("data_vs_model")
    checks.append(check("data path / model images/s", value, TARGETS["data_vs_model"], True))
    res["checks"] = checks
    return res


# ---------------------------------------------------------------- 3. DDP at world size 1


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def one_process_group(device: torch.device) -> Iterator[dict]:
    """A torch.distributed group of one process, joined the way ``surgeon train`` joins
    torchrun's (``surgeon.train.distributed.init``: NCCL on CUDA, gloo on CPU); the
    environment and the group are undone on exit."""
    import torch.distributed as dist

    from surgeon.train import distributed

    env = {
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0",
        "WORLD_SIZE": "1", "LOCAL_RANK": "0",
    }  # fmt: skip
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        info = distributed.init(device.type)
        yield {"backend": dist.get_backend(), "world_size": info.world_size, "ddp": info.enabled}
    finally:
        gc.collect()  # the DDP wrappers hold the group: let them go first
        if dist.is_initialized():
            dist.destroy_process_group()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def section_ddp(ctx: Context) -> dict:
    """The engine with and without DDP (world size 1), then bare steps, plain vs DDP."""
    data = ctx.images()
    s = ctx.sizes
    cfg = ctx.allconv()
    size = tuple(data.train_x.shape[1:])
    base = build_base(cfg, data.num_classes, size)
    res: dict[str, Any] = {"batch_size": s.batch, "precision": cfg.precision}
    rates: dict[str, list[float]] = {}
    ctx.part(res, "engine_no_ddp", lambda: train_speed.tool_rates(cfg, data, base, s.speed_rounds))

    def bare_steps() -> dict:
        """Two copies of one model on a fixed batch, one wrapped in DDP, rounds interleaved."""
        plain = derive(base, cfg, size).to(ctx.device)
        if ctx.cuda:
            plain = plain.to(memory_format=torch.channels_last)
        wrapped = torch.nn.parallel.DistributedDataParallel(
            copy.deepcopy(plain), device_ids=[ctx.device.index or 0] if ctx.cuda else None
        )
        x = torch.randn(s.batch, *size, device=ctx.device)
        if ctx.cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, data.num_classes, (s.batch,), device=ctx.device)
        out: dict[str, list[float]] = {"no_ddp_images_per_s": [], "ddp_images_per_s": []}
        for _ in range(s.ddp_step_rounds):
            for model, key in ((plain, "no_ddp_images_per_s"), (wrapped, "ddp_images_per_s")):
                out[key].append(
                    throughput.step_rate(model, x, y, s.ddp_steps, 3, ctx.cuda, ctx.device)
                )
        ratios = zip(out["ddp_images_per_s"], out["no_ddp_images_per_s"], strict=True)
        return {**out, "overhead": 1 - statistics.median([d / p for d, p in ratios])}

    with one_process_group(ctx.device) as group:
        res["group"] = group
        ctx.part(res, "engine_ddp", lambda: train_speed.tool_rates(cfg, data, base, s.speed_rounds))
        ctx.part(res, "steps", bare_steps)
    for key in ("engine_no_ddp", "engine_ddp"):
        if isinstance(res[key], list):
            rates[key] = res.pop(key)
    res["engine"] = {"error": "see errors"}
    if len(rates) == 2:
        plain, ddp = rates["engine_no_ddp"], rates["engine_ddp"]
        res["engine"] = {
            "no_ddp_images_per_s": plain, "ddp_images_per_s": ddp,
            "overhead": 1 - statistics.median(ddp) / statistics.median(plain),
        }  # fmt: skip
    target = TARGETS["ddp_overhead"]
    res["checks"] = [
        check("DDP overhead, surgeon train", res["engine"].get("overhead"), target, False),
        check("DDP overhead, bare steps", res["steps"].get("overhead"), target, False),
    ]
    return res


# ---------------------------------------------------------------- 4. a short real run

REAL_VARIANTS = {  # run name -> config changes; LR 0.04 for all
    "plain": {},
    "batchnorm": {"norm": "batchnorm"},
    "shift-layer+scale-layer_mult1": {"shift": "layer", "scale": "layer", "ss_lr_mult": 1.0},
    "shift-layer+scale-layer_mult0.1": {"shift": "layer", "scale": "layer", "ss_lr_mult": 0.1},
}


def section_real_run(ctx: Context) -> dict:
    """All-CNN-C on CIFAR-10 (the thesis-1 recipe's setting), four variants, through
    ``surgeon.train.run_configs``; per-epoch validation accuracy."""
    s = ctx.sizes
    if ctx.data == "sample" and not ctx.smoke:
        return {"skipped": "no CIFAR-10 JPEG copy (pass --data or --data-tar)"}
    thesis = load_recipe(str(ROOT / "recipes" / "thesis-1-c10-allconv.toml"))
    base = {
        **thesis.base, "data": ctx.data, "epochs": s.real_epochs, "lr": 0.04,
        "batch_size": s.real_batch, "device": ctx.device.type,
        "precision": "bf16" if ctx.cuda else "fp32", "limit_train": s.limit_train,
        "limit_test": s.limit_test if ctx.smoke else None, "shift": "none", "scale": "none",
        **({"val_size": 0} if ctx.smoke else {}),  # the smoke's few images: no hold-out
    }  # fmt: skip
    if s.width != 1.0:
        base["model_args"] = {"width": s.width}
    res: dict[str, Any] = {"config": {k: v for k, v in base.items() if k != "name"}, "runs": {}}
    runs_out = ctx.out / "real_run"
    last_s = 0.0
    for name, changes in REAL_VARIANTS.items():
        if last_s and ctx.left() < 1.1 * last_s:
            res["runs"][name] = {"skipped": f"time budget ({ctx.left():.0f} s left)"}
            continue
        t0 = time.monotonic()
        cfg = TrainConfig.from_dict({**base, **changes, "name": name})
        tmp = Path(tempfile.mkdtemp(prefix="gpu_check_run_"))
        try:
            summary = run_configs([cfg], tmp)[0]
            run_dir = tmp / name
            rows = []
            if (run_dir / "metrics.jsonl").is_file():
                rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
                keep = runs_out / name
                keep.mkdir(parents=True, exist_ok=True)
                for f in ("config.json", "data.json", "summary.json", "metrics.jsonl"):
                    if (run_dir / f).is_file():
                        shutil.copy(run_dir / f, keep / f)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        epochs = [r for r in rows if r["type"] == "epoch"]
        last_s = time.monotonic() - t0
        res["runs"][name] = {
            "status": summary["status"], "message": summary.get("message"),
            "val_acc": [r["val_acc"] for r in epochs],
            "train_loss": [r["train_loss"] for r in epochs],
            "images_per_s": [r["images_per_s"] for r in epochs],
            "ss_lr_mult": cfg.ss_lr_mult, "wall_s": round(last_s, 1),
        }  # fmt: skip
        accs = " ".join(f"{r['val_acc']:.3f}" for r in epochs)
        print(f"  real_run.{name}: {summary['status']}, val acc {accs} ({last_s:.1f} s)")
        ctx.save_partial(res)
    res["checks"] = [
        check(f"{name}: final val acc", (r.get("val_acc") or [None])[-1], None, True)
        for name, r in res["runs"].items()
    ]
    return res


# ---------------------------------------------------------------- 5. large-model recipes


def section_large_models(ctx: Context) -> dict:
    """images/s of the large recipes' models, each variant of their grids."""
    s = ctx.sizes
    res: dict[str, Any] = {"models": {}}
    checks = []
    last_s = 0.0
    for recipe in LARGE_RECIPES:
        if last_s and ctx.left() < 1.1 * last_s:
            res["models"][recipe] = {"skipped": f"time budget ({ctx.left():.0f} s left)"}
            continue
        t0 = time.monotonic()
        try:
            r = throughput.recipe_rates(
                recipe, ctx.device, steps=s.large_steps[1], warmup=s.large_steps[0],
                bf16=ctx.cuda, batch_size=s.large_batch,
                model_args=s.large_model_args.get(recipe),
            )  # fmt: skip
        except Exception as exc:  # one model's failure must not hide the others
            r = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        last_s = time.monotonic() - t0
        r["wall_s"] = round(last_s, 1)
        res["models"][recipe] = r
        rates = " ".join(f"{k} {v:.0f}" for k, v in r.get("images_per_s", {}).items())
        print(f"  large_models.{recipe}: {r.get('error') or rates} images/s ({last_s:.1f} s)")
        for variant, ratio in r.get("ratio_vs_plain", {}).items():
            if variant != "plain":
                short = recipe.removeprefix("large-c100-")
                checks.append(check(f"{short}: {variant} / plain images/s", ratio, None, True))
        for variant, err in r.get("errors", {}).items():
            checks.append({"name": f"{recipe}: {variant}", "value": err, "target": None,
                           "ok": False})  # fmt: skip
        if "error" in r:
            checks.append({"name": recipe, "value": r["error"], "target": None, "ok": False})
        ctx.save_partial(res)
    if not ctx.cuda:
        res["bf16"] = {"skipped": "no CUDA"}
    res["checks"] = checks
    return res


SECTIONS: dict[str, Callable[[Context], dict]] = {
    "triton": section_triton,
    "train_speed": section_train_speed,
    "ddp": section_ddp,
    "real_run": section_real_run,
    "large_models": section_large_models,
}


# ---------------------------------------------------------------- driver


def clean(obj: Any) -> Any:
    """JSON-safe: non-finite floats become null, unknown objects their str()."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    return str(obj)


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(clean(obj), indent=2) + "\n")
    os.replace(tmp, path)


def environment(device: torch.device) -> dict:
    def version(module: str) -> str | None:
        try:
            return __import__(module).__version__
        except Exception:
            return None

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except Exception:
        commit = ""
    return {
        "device": overhead.device_name(device), "device_type": device.type,
        "torch": torch.__version__, "cuda": torch.version.cuda, "triton": version("triton"),
        "timm": version("timm"), "python": platform.python_version(),
        "cpus": os.cpu_count(), "threads": torch.get_num_threads(), "commit": commit or None,
    }  # fmt: skip


@contextmanager
def compile_backend(backend: str | None) -> Iterator[None]:
    """Every ``torch.compile`` inside uses ``backend`` (the CPU smoke: "eager", Dynamo's
    tracing without Inductor's code generation: seconds instead of minutes on two cores)."""
    if backend is None:
        yield
        return
    original = torch.compile
    torch.compile = functools.partial(original, backend=backend)
    try:
        yield
    finally:
        torch.compile = original


def prepare_data(data: str, tar: str | None) -> tuple[str, dict]:
    """The ImageFolder path to train on ("sample" when there is none), extracting ``tar``
    into the folder above ``data`` when ``data`` does not exist yet."""
    info: dict[str, Any] = {"requested": data}
    path = Path(data)
    if not path.is_dir() and tar:
        t0 = time.monotonic()
        path.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(tar) as tf:
            if hasattr(tarfile, "data_filter"):
                tf.extractall(path.parent, filter="data")
            else:  # pragma: no cover - Pythons without extraction filters
                tf.extractall(path.parent)  # noqa: S202 (our own data file)
        info["extracted_s"] = round(time.monotonic() - t0, 1)
    if not (path / "train").is_dir():
        info["used"] = "sample"
        info["note"] = f"{data} is not an ImageFolder tree with train/ and test/"
        return "sample", info
    info["used"] = str(path.resolve())
    return str(path.resolve()), info


def run_section(name: str, ctx: Context, budget_end: float, later_reserve: float) -> dict:
    """Run one section inside its share of the budget; never raises."""
    reserve = ctx.sizes.reserve_s.get(name, 0.0)
    left = budget_end - time.monotonic()
    result: dict[str, Any] = {"section": name, "smoke": ctx.smoke}
    if left < reserve:
        result.update(status="skipped", skipped=f"time budget: {max(left, 0):.0f} s left")
        return result
    ctx.until = time.monotonic() + max(reserve, left - later_reserve)
    ctx.section = name
    print(f"\n=== {name} ({ctx.until - time.monotonic():.0f} s) ===", flush=True)
    t0 = time.monotonic()
    try:
        out = SECTIONS[name](ctx)
        if "skipped" in out and len(out) == 1:
            result.update(status="skipped", skipped=out["skipped"])
        else:
            result.update(status="partial" if out.get("errors") else "ok", **out)
    except Exception as exc:
        result.update(
            status="failed", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc()
        )
        print(result["traceback"], file=sys.stderr, flush=True)
    finally:
        if ctx.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
    result["wall_s"] = round(time.monotonic() - t0, 2)
    return result


def summary_table(summary: dict) -> str:
    lines = [
        f"gpu_check: {summary['env']['device']} | torch {summary['env']['torch']} | "
        f"{summary['wall_s']:.0f} s of {summary['budget_s']:.0f}"
        + (" | CPU SMOKE: toy sizes, not measurements" if summary["smoke"] else ""),
        f"{'section':14s} {'status':8s} {'wall s':>7s}  note",
    ]
    for name, sec in summary["sections"].items():
        note = sec.get("error") or "; ".join(sec.get("errors", [])) or sec.get("skipped") or ""
        lines.append(f"{name:14s} {sec['status']:8s} {sec.get('wall_s', 0):7.1f}  {note[:70]}")
    lines.append("")
    lines.append(f"{'check':58s} {'value':>14s} {'target':>9s}  ok")
    for c in summary["checks"]:
        value = c["value"]
        value = "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)
        ok = {True: "yes", False: "NO", None: "-"}[c["ok"]]
        lines.append(f"{c['name'][:58]:58s} {value:>14s} {c['target'] or '-':>9s}  {ok}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for the JSON files")
    ap.add_argument("--cpu-smoke", action="store_true", help="every section, toy sizes, CPU")
    ap.add_argument("--data", default=".device/cifar10-jpg", help="CIFAR-10 ImageFolder tree")
    ap.add_argument("--data-tar", default=None, help="extract this tar when --data is missing")
    ap.add_argument("--budget", type=float, default=None, help="seconds (GPU 530, smoke 110)")
    ap.add_argument(
        "--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS), metavar="NAME"
    )
    args = ap.parse_args()
    t_start = T0
    smoke = args.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        print("no CUDA device: pass --cpu-smoke for the CPU smoke run", file=sys.stderr)
        return 2
    sizes = SMOKE if smoke else GPU
    budget = args.budget or sizes.budget_s
    device = torch.device("cpu" if smoke else "cuda", None if smoke else 0)
    if smoke:
        torch.set_num_threads(1)  # a shared 2-core box thrashes with more
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data, data_info = (
        ("sample", {"used": "sample"}) if smoke else prepare_data(args.data, args.data_tar)
    )
    ctx = Context(device=device, sizes=sizes, smoke=smoke, out=out, data=data)
    summary: dict[str, Any] = {
        "benchmark": "gpu_check", "smoke": smoke,
        "note": "CPU smoke run: toy sizes, numbers are not measurements" if smoke else None,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "budget_s": budget, "env": environment(device),
        "data": data_info, "targets": TARGETS, "sizes": asdict(sizes), "sections": {},
        "checks": [], "wall_s": 0.0,
    }  # fmt: skip
    budget_end = t_start + budget
    with compile_backend("eager" if smoke else None):
        for i, name in enumerate(args.sections):
            later = sum(sizes.reserve_s.get(n, 0.0) for n in args.sections[i + 1 :])
            result = run_section(name, ctx, budget_end, later)
            write_json(out / f"{name}.json", result)
            summary["sections"][name] = {
                k: result[k]
                for k in ("status", "wall_s", "error", "errors", "skipped")
                if k in result
            }
            summary["checks"] += [{"section": name, **c} for c in result.get("checks", [])]
            summary["wall_s"] = round(time.monotonic() - t_start, 1)
            write_json(out / "summary.json", summary)
    print("\n" + summary_table(clean(summary)), flush=True)
    print(f"wrote {out}/", flush=True)
    broken = ("failed", "partial")
    return 1 if any(s["status"] in broken for s in summary["sections"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
