"""Online learning: batch size 1, one pass over a stream, prequential (test-then-train)
evaluation, then the test split. Variants: the usual ones plus ``batchnorm-frozen`` and
``replace-norm``; a variant that fails at batch 1 is recorded with its message. The run
folder and the variants are described in docs/online.md.
"""

from __future__ import annotations

import copy
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from .. import rundir
from ..data import ImageData, Loader, load_data
from ..errors import TrainError
from ..io import write_model_files
from ..passes import insert, insert_batchnorm, replace_norm
from .config import WINDOW, TrainConfig, parse_variant, run_name, variant_name
from .engine import resolve_device
from .optim import build_optimizer, decay_to_identity
from .recipes import Recipe
from .variants import build_base

NORMS = ("none", "batchnorm", "batchnorm-frozen", "replace-norm")
WARM_BATCH = 64  # warm start: mini-batch size
WARM_LR = 0.04  # warm start: SGD learning rate (momentum 0.9), the thesis's middle LR
ONLINE_FIELDS = (
    "online_acc", "online_acc_last_window", "test_acc", "test_acc_train_mode_b1", "samples",
    "samples_per_s", "warm_start_epochs", "warm_start_test_acc",
)  # fmt: skip


# ---------------------------------------------------------------- variants


@dataclass(frozen=True)
class OnlineVariant:
    norm: str  # none | batchnorm | batchnorm-frozen | replace-norm
    shift: str
    scale: str

    @property
    def name(self) -> str:
        rest = variant_name("none", self.shift, self.scale)
        if self.norm == "none":
            return rest
        return self.norm if rest == "plain" else f"{self.norm}+{rest}"

    @property
    def has_bn(self) -> bool:
        return self.norm != "none"


def parse_online_variant(name: str) -> OnlineVariant:
    """``plain``, ``batchnorm``, ``batchnorm-frozen``, ``replace-norm``, each optionally
    ``+shift-MODE``/``+scale-MODE``."""
    head, _, rest = name.partition("+")
    if head in ("batchnorm-frozen", "replace-norm"):
        v = parse_variant(rest or "plain")
        return OnlineVariant(head, v["shift"], v["scale"])
    try:
        v = parse_variant(name)
    except TrainError:
        raise TrainError(
            f"unknown online variant {name!r}",
            hint="use plain, batchnorm, batchnorm-frozen, replace-norm, shift-MODE, scale-MODE, joined by +",
        ) from None
    return OnlineVariant(v["norm"], v["shift"], v["scale"])


def plan(
    recipe: Recipe,
    overrides: dict[str, Any] | None = None,
    *,
    variants: Sequence[str] = (),
    replace_norm_too: bool = True,
    warm_start: int = 0,
) -> list[tuple[TrainConfig, OnlineVariant]]:
    """The runs of an online recipe: ``(config, variant)`` per grid point.

    ``variants`` replace the recipe's; otherwise, with ``replace_norm_too``, every
    batchnorm variant gets a ``replace-norm`` sibling. With ``warm_start`` the default
    variants are the three BN ones (``batchnorm``, ``batchnorm-frozen``, ``replace-norm``).
    """
    configs = recipe.configs(overrides)
    for c in configs:
        check_config(c)
    out: list[tuple[TrainConfig, OnlineVariant]] = []
    if variants or warm_start:
        names = list(variants) or ["batchnorm", "batchnorm-frozen", "replace-norm"]
        parsed = [parse_online_variant(n) for n in names]
        if warm_start and not all(v.has_bn for v in parsed):
            bad = [v.name for v in parsed if not v.has_bn]
            raise TrainError(
                f"--warm-start pretrains a batchnorm model; {', '.join(bad)} has no BatchNorm",
                hint="use batchnorm, batchnorm-frozen or replace-norm variants with --warm-start",
            )
        seen = set()
        for c in configs:
            key = (c.lr, c.seed)
            if key in seen:
                continue
            seen.add(key)
            out += [(c, v) for v in parsed]
    else:
        for c in configs:
            v = OnlineVariant(c.norm, c.shift, c.scale)
            out.append((c, v))
            if replace_norm_too and c.norm == "batchnorm":
                out.append((c, OnlineVariant("replace-norm", c.shift, c.scale)))
    return out


def check_config(cfg: TrainConfig) -> None:
    """Online learning means batch size 1 and one pass; refuse anything else."""
    if cfg.batch_size != 1 or cfg.epochs != 1 or cfg.accum_steps != 1:
        raise TrainError(
            f"online learning trains with batch size 1 for one pass, not batch {cfg.batch_size} x {cfg.epochs} epochs",
            hint="set batch_size = 1 and epochs = 1 (see recipes/online.toml)",
        )
    if cfg.schedule != "constant" or cfg.warmup_epochs:
        raise TrainError(
            "online learning uses a constant learning rate", hint="drop schedule and warm-up"
        )


def online_model(
    base: nn.Module, variant: OnlineVariant, input_size: tuple[int, ...], *, bn_inserted: bool
) -> fx.GraphModule:
    """The variant's model from ``base`` (left untouched); ``bn_inserted``: base already has
    its BatchNorm (a warm-started model)."""
    model: nn.Module = copy.deepcopy(base)
    if variant.has_bn and not bn_inserted:
        model = insert_batchnorm(model, input_size=input_size)
    if variant.norm == "replace-norm":
        model = replace_norm(model, input_size=input_size)
    return insert(model, variant.shift, variant.scale, input_size=input_size)


def _freeze_bn(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


# ---------------------------------------------------------------- data


@dataclass
class Stream:
    """The normalised stream, its held-back pool (warm start) and the test split."""

    x: torch.Tensor
    y: torch.Tensor
    pool: torch.Tensor  # indices into the training split not in the stream
    test_x: torch.Tensor
    test_y: torch.Tensor
    data: ImageData


def normalise(x: torch.Tensor, data: ImageData) -> torch.Tensor:
    mean = torch.tensor(data.mean).view(1, -1, 1, 1)
    std = torch.tensor(data.std).view(1, -1, 1, 1)
    return (x.float() / 255.0 - mean) / std


def make_stream(data: ImageData, length: int | None, seed: int) -> Stream:
    """A fixed order of the training split, drawn once from ``seed``; the first ``length``."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(data.train_x), generator=g)
    n = len(order) if length is None else min(int(length), len(order))
    idx = order[:n]
    return Stream(
        normalise(data.train_x[idx], data),
        data.train_y[idx].clone(),
        order[n:],
        normalise(data.test_x, data),
        data.test_y.clone(),
        data,
    )


@torch.no_grad()
def test_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """``(loss, accuracy)`` on ``(x, y)`` in eval mode."""
    was = model.training
    model.eval()
    loss, correct = 0.0, 0
    try:
        for i in range(0, len(x), 256):
            out = model(x[i : i + 256])
            loss += F.cross_entropy(out, y[i : i + 256], reduction="sum").item()
            correct += int((out.argmax(1) == y[i : i + 256]).sum())
    finally:
        model.train(was)
    return loss / max(len(x), 1), correct / max(len(x), 1)


@torch.no_grad()
def train_mode_accuracy_b1(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Accuracy of one-sample forwards in train mode (on a copy: BN statistics change)."""
    m = copy.deepcopy(model).train()
    correct = sum(int(m(x[i : i + 1]).argmax(1).item() == int(y[i])) for i in range(len(x)))
    return correct / max(len(x), 1)


# ---------------------------------------------------------------- warm start


def warm_start_model(
    cfg: TrainConfig, stream: Stream, epochs: int, log: Callable[[str], None] | None = None
) -> fx.GraphModule:
    """A batchnorm model trained with mini-batches on the pool (the images not streamed)."""
    data = stream.data
    size = tuple(data.train_x.shape[1:])
    if len(stream.pool) < WARM_BATCH:
        raise TrainError(
            f"--warm-start needs training images outside the stream; {len(stream.pool)} are left",
            hint="stream fewer samples (--stream)",
        )
    base = build_base(cfg, data.num_classes, size)
    model = insert_batchnorm(base, input_size=size)
    model = insert(model, "none", "none", input_size=size)
    wcfg = cfg.replace(lr=WARM_LR, momentum=0.9, batch_size=WARM_BATCH)
    opt = build_optimizer(model, wcfg)
    pool = stream.pool
    loader = Loader(
        data.train_x[pool], data.train_y[pool], WARM_BATCH, mean=data.mean, std=data.std,
        shuffle=True, drop_last=True, seed=cfg.seed,
    )  # fmt: skip
    torch.manual_seed(cfg.seed)
    model.train()
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if log:
            _, acc = test_accuracy(model, stream.test_x, stream.test_y)
            log(f"warm start epoch {epoch + 1}/{epochs}: test acc {acc:.4f}")
    return model


# ---------------------------------------------------------------- the loop


def run_online(
    cfg: TrainConfig,
    out: str | Path,
    variant: OnlineVariant | str | None = None,
    *,
    stream: Stream | None = None,
    base: nn.Module | None = None,
    warm: fx.GraphModule | None = None,
    warm_start_epochs: int = 0,
    window: int = WINDOW,
    log: Callable[[str], None] | None = None,
    log_every: int = 500,
) -> dict[str, Any]:
    """Train one variant online into run folder ``out``; return its summary.

    ``stream``/``base`` share the data and the init between variants; ``warm`` is a
    warm-started batchnorm model to continue from (see :func:`warm_start_model`).
    """
    check_config(cfg)
    if variant is None:
        variant = OnlineVariant(cfg.norm, cfg.shift, cfg.scale)
    elif isinstance(variant, str):
        variant = parse_online_variant(variant)
    if window < 1:
        raise TrainError(f"--window must be >= 1, got {window}", hint="e.g. 200")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise TrainError(f"run folder {out} already exists", hint="pass another --out")
    device = resolve_device(cfg.device)
    if stream is None:
        data = load_data(cfg.data, cfg.data_root, cfg.download, limit_test=cfg.limit_test)
        stream = make_stream(data, cfg.limit_train, cfg.seed)
    data = stream.data
    size = tuple(data.train_x.shape[1:])
    if warm is not None:
        model = online_model(warm, variant, size, bn_inserted=True)
    else:
        if base is None:
            base = build_base(cfg, data.num_classes, size)
        model = online_model(base, variant, size, bn_inserted=False)
    model = model.to(device)
    name = run_name(variant.name, cfg.lr, cfg.seed)
    config = {**cfg.to_dict(), "name": name, "variant": variant.name, "batch_size": 1}
    config["online"] = {
        "norm": variant.norm, "stream": len(stream.x), "window": window,
        "warm_start_epochs": warm_start_epochs, "order_seed": cfg.seed,
    }  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    rundir.write_config(out, config)
    rundir.write_data_info(
        out,
        {"source": data.source, "classes": data.classes, "stream": len(stream.x),
         "test": len(stream.test_x), "mean": list(data.mean), "std": list(data.std)},
    )  # fmt: skip
    summary: dict[str, Any] = {k: None for k in (*rundir.SUMMARY_FIELDS, *ONLINE_FIELDS)}
    summary.update(name=name, variant=variant.name, lr=cfg.lr, seed=cfg.seed, epochs_run=0)
    summary.update(warm_start_epochs=warm_start_epochs)
    if warm is not None:
        summary["warm_start_test_acc"] = test_accuracy(warm, stream.test_x, stream.test_y)[1]
    opt = build_optimizer(model, cfg)
    torch.manual_seed(cfg.seed)
    model.train()
    if variant.norm == "batchnorm-frozen":
        _freeze_bn(model)
    recent: deque[int] = deque(maxlen=window)
    correct = seen = 0
    loss_sum, ema = 0.0, None
    rows: list[dict[str, Any]] = []
    status, message, diverged_at = "ok", None, None
    metrics = open(out / rundir.METRICS_FILE, "w")  # noqa: SIM115 (closed in finally)
    t0 = time.perf_counter()
    try:
        for i in range(len(stream.x)):
            x = stream.x[i : i + 1].to(device)
            y = stream.y[i : i + 1].to(device)
            try:
                logits = model(x)
            except (ValueError, RuntimeError) as exc:
                if i > 0:
                    raise
                status = "failed"
                message = f"batch 1 in train mode: {str(exc).strip().splitlines()[0]}"
                break
            hit = int(logits.argmax(1).item() == y.item())  # predicted before training on it
            loss = F.cross_entropy(logits, y)
            value = loss.item()
            if not math.isfinite(value):
                status, diverged_at = "diverged", i + 1
                message = (
                    f"non-finite loss at sample {i + 1} (lr {cfg.lr:g}, variant {variant.name})"
                )
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.ss_decay_to == "identity":
                decay_to_identity(model, cfg.ss_wd)
            opt.step()
            seen += 1
            correct += hit
            recent.append(hit)
            loss_sum += value
            ema = value if ema is None else cfg.ema * ema + (1 - cfg.ema) * value
            rows.append({
                "type": "step", "step": seen, "epoch": 0, "loss": value, "ema_loss": ema,
                "lr": cfg.lr, "online_acc": correct / seen, "online_acc_window": sum(recent) / len(recent),
            })  # fmt: skip
            if len(rows) >= 100:
                metrics.write("".join(map(rundir.metrics_line, rows)))
                rows = []
            if log and seen % log_every == 0:
                log(f"[{name}] {seen}/{len(stream.x)} online acc {correct / seen:.4f} "
                    f"(last {len(recent)}: {sum(recent) / len(recent):.4f}) ema loss {ema:.4f}")  # fmt: skip
        elapsed = time.perf_counter() - t0
        if status != "failed":
            val_loss, test_acc = test_accuracy(model, stream.test_x, stream.test_y)
            epoch_row = {
                "type": "epoch", "epoch": 1, "step": seen, "train_loss": loss_sum / max(seen, 1),
                "train_err": 1 - correct / max(seen, 1), "train_acc": correct / max(seen, 1),
                "val_loss": val_loss, "val_err": 1 - test_acc, "val_acc": test_acc, "time_s": elapsed,
                "images_per_s": seen / max(elapsed, 1e-9), "ema_loss": ema, "lr": cfg.lr,
                "online_acc": correct / max(seen, 1),
            }  # fmt: skip
            rows.append(epoch_row)
            summary.update(
                final_val_err=1 - test_acc, best_val_err=1 - test_acc, best_epoch=1, epochs_run=1,
                test_acc=test_acc, online_acc=correct / max(seen, 1),
                online_acc_last_window=sum(recent) / max(len(recent), 1),
                samples_per_s=seen / max(elapsed, 1e-9),
            )  # fmt: skip
            if variant.norm == "batchnorm":  # how it behaved while it learned: batch-1 stats
                summary["test_acc_train_mode_b1"] = train_mode_accuracy_b1(
                    model, stream.test_x, stream.test_y
                )
            write_model_files(model.cpu().eval(), out, {"run": name})
    finally:
        metrics.write("".join(map(rundir.metrics_line, rows)))
        metrics.close()
    summary.update(
        status=status, message=message, steps=seen, samples=seen, diverged_at_step=diverged_at
    )
    rundir.write_summary(out, summary)  # summary.json holds the online fields too
    if log:
        log(_summary_line(summary))
    return summary


def _summary_line(s: dict[str, Any]) -> str:
    if s["status"] == "failed":
        return f"[{s['name']}] failed: {s['message']}"
    acc = f"online acc {s['online_acc']:.4f}" if s.get("online_acc") is not None else ""
    test = f"test acc {s['test_acc']:.4f}" if s.get("test_acc") is not None else ""
    return f"[{s['name']}] {s['status']}: {acc} {test} over {s['samples']} samples".strip()


def run_plan(
    runs: list[tuple[TrainConfig, OnlineVariant]],
    out: str | Path,
    *,
    recipe_name: str = "",
    warm_start: int = 0,
    window: int = WINDOW,
    log: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Run every ``(config, variant)`` into ``out/<run name>``; one stream and one init per
    (data, seed, model); write ``results.json``."""
    from .runner import write_results

    out = Path(out)
    for cfg, v in runs:  # every folder is free before anything runs
        run_dir = out / run_name(v.name, cfg.lr, cfg.seed)
        if run_dir.exists() and any(run_dir.iterdir()):
            raise TrainError(f"run folder {run_dir} already exists", hint="pass another --out")
    streams: dict[tuple, Stream] = {}
    bases: dict[tuple, nn.Module] = {}
    warms: dict[tuple, fx.GraphModule] = {}
    results = []
    order = [run_name(v.name, cfg.lr, cfg.seed) for cfg, v in runs]
    for cfg, v in runs:
        skey = (cfg.data, cfg.data_root, cfg.limit_train, cfg.limit_test, cfg.seed)
        if skey not in streams:
            data = load_data(cfg.data, cfg.data_root, cfg.download, limit_test=cfg.limit_test)
            streams[skey] = make_stream(data, cfg.limit_train, cfg.seed)
        stream = streams[skey]
        size = tuple(stream.data.train_x.shape[1:])
        bkey = (*skey, cfg.model, repr(sorted(cfg.model_args.items())), cfg.dropout)
        warm = None
        if warm_start:
            if bkey not in warms:
                warms[bkey] = warm_start_model(cfg, stream, warm_start, log)
            warm = warms[bkey]
        elif bkey not in bases:
            bases[bkey] = build_base(cfg, stream.data.num_classes, size)
        summary = run_online(
            cfg, out / run_name(v.name, cfg.lr, cfg.seed), v, stream=stream,
            base=bases.get(bkey), warm=warm, warm_start_epochs=warm_start, window=window, log=log,
        )  # fmt: skip
        results.append(summary)
        write_results(out, recipe_name, results, order)
    return results
