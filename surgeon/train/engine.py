"""The training engine: one run, from a resolved :class:`TrainConfig` to a run folder.

The loop is a plain PyTorch loop: data on the device as uint8 tensors (see
:mod:`surgeon.data`), bf16 autocast and channels_last on CUDA, optional ``torch.compile``.
Per-step losses stay on the device and are fetched in chunks, so the host syncs once
every ``flush_every`` steps (every step on CPU, where it costs nothing).
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from ..data import ImageData, Loader, load_data
from ..errors import TrainError
from ..io import write_json_atomic, write_model_files
from ..layers import ShiftScale
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .optim import build_optimizer, decay_to_identity, lr_factor, set_lr
from .probe import Probe
from .progress import Reporter
from .variants import build_base, derive

SUMMARY_FIELDS = (
    "name", "variant", "lr", "seed", "status", "final_val_err", "best_val_err", "best_epoch",
    "epochs_run", "steps", "diverged_at_step", "message",
)  # fmt: skip


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainError("--device cuda but no CUDA device is available", hint="use --device cpu")
    return torch.device(name)


def snapshot_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every shift/scale parameter, keyed ``<module>.shift`` / ``<module>.scale``."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, ShiftScale):
            for pname in ("shift", "scale"):
                p = getattr(m, pname)
                if p is not None:
                    out[f"{name}.{pname}"] = p.detach().float().cpu().contiguous().clone()
    return out


@dataclass
class RunState:
    """What a checkpoint must restore besides weights, momentum and RNG."""

    step: int = 0
    epoch: int = 0  # completed epochs
    batch: int = 0  # batches done in the current epoch
    ema_loss: float | None = None
    loss_sum: float = 0.0  # current epoch's running sums
    correct: int = 0
    seen: int = 0
    best_val_err: float | None = None
    best_epoch: int = 0
    final_val_err: float | None = None
    history: list[float] = field(default_factory=list)  # val_err per epoch

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Trainer:
    """Trains one run into ``out``; ``run()`` returns its summary (never raises on divergence)."""

    def __init__(
        self,
        cfg: TrainConfig,
        out: Path,
        *,
        data: ImageData | None = None,
        base: nn.Module | None = None,
        reporter: Reporter | None = None,
        resume: bool = False,
        stop_at_step: int | None = None,
    ) -> None:
        self.cfg, self.out = cfg, Path(out)
        self.reporter = reporter or Reporter()
        self.device = resolve_device(cfg.device)
        if cfg.precision == "bf16" and self.device.type != "cuda":
            raise TrainError(
                "--precision bf16 needs a CUDA device", hint="the CPU path runs in fp32"
            )
        self.resume = resume
        self.stop_at_step = stop_at_step  # tests: simulate a process killed after this step
        self.data = data or load_data(
            cfg.data,
            cfg.data_root,
            cfg.download,
            limit_train=cfg.limit_train,
            limit_test=cfg.limit_test,
        )
        self.input_size = tuple(self.data.train_x.shape[1:])
        if base is None:
            base = build_base(cfg, self.data.num_classes, self.input_size)
        self.model = derive(base, cfg, self.input_size).to(self.device)
        cuda = self.device.type == "cuda"
        if cuda and cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.opt = build_optimizer(self.model, cfg)
        self.forward: Callable = torch.compile(self.model) if cfg.compile else self.model
        self.autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16)
            if cfg.precision == "bf16"
            else nullcontext()
        )
        loader_kw = {
            "mean": self.data.mean,
            "std": self.data.std,
            "device": self.device,
            "channels_last": cuda and cfg.channels_last,
        }
        self.train_loader = Loader(
            self.data.train_x,
            self.data.train_y,
            cfg.batch_size,
            shuffle=True,
            augment=cfg.augment,
            drop_last=True,
            seed=cfg.seed,
            **loader_kw,
        )
        self.val_loader = Loader(
            self.data.test_x, self.data.test_y, max(cfg.batch_size, 256), **loader_kw
        )
        if len(self.train_loader) == 0:
            raise TrainError(
                f"batch size {cfg.batch_size} is larger than the {len(self.data.train_x)} training images",
                hint="lower --batch-size",
            )
        self.flush_every = 1 if self.device.type == "cpu" else 25
        self.state = RunState()
        self.probe = Probe(self.model, self.input_size) if cfg.probe else None
        if self.probe is not None:  # a fixed, unaugmented batch of training images
            probe_loader = Loader(
                self.data.train_x[:256], self.data.train_y[:256], 256, **loader_kw
            )
            self.probe_batch = next(iter(probe_loader))

    # ---------------------------------------------------------------- files

    def _prepare_folder(self) -> None:
        ckpt = latest_checkpoint(self.out / "checkpoints")
        if self.resume:
            if ckpt is None:
                raise TrainError(
                    f"nothing to resume in {self.out}: no checkpoint",
                    hint="start a new run without --resume",
                )
            self.state = RunState(**load_checkpoint(ckpt, self.model, self.opt)["run"])
            self._truncate_metrics(self.state.step, self.state.epoch)
            return
        if self.out.exists() and any(self.out.iterdir()):
            raise TrainError(
                f"run folder {self.out} already exists",
                hint="pass --resume to continue it, or another --out",
            )
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "snapshots").mkdir()
        write_json_atomic(self.out / "config.json", self.cfg.to_dict())
        write_json_atomic(
            self.out / "data.json",
            {
                "source": self.data.source,
                "classes": self.data.classes,
                "mean": list(self.data.mean),
                "std": list(self.data.std),
                "train": len(self.data.train_x),
                "test": len(self.data.test_x),
            },
        )
        write_model_files(self.model, self.out, {"run": self.cfg.name})
        save_file(
            snapshot_tensors(self.model), str(self.out / "snapshots" / "epoch_0000.safetensors")
        )

    def _truncate_metrics(self, step: int, epoch: int) -> None:
        """Drop metric lines written after the checkpoint (a killed run may have logged more)."""
        path = self.out / "metrics.jsonl"
        if not path.exists():
            return
        keep = []
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if (row["type"] == "step" and row["step"] <= step) or (
                row["type"] != "step" and row["epoch"] <= epoch
            ):
                keep.append(line)
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(k + "\n" for k in keep))
        tmp.replace(path)

    def _log(self, rows: list[dict[str, Any]]) -> None:
        with open(self.out / "metrics.jsonl", "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")

    def _log_probe(self) -> None:
        if self.probe is not None:
            rows = self.probe.measure(*self.probe_batch)
            st = self.state
            self._log([{"type": "probe", "epoch": st.epoch, "step": st.step, **r} for r in rows])

    def _checkpoint(self) -> None:
        save_checkpoint(
            self.out / "checkpoints",
            self.model,
            self.opt,
            {"run": self.state.to_dict(), "step": self.state.step},
        )

    # ---------------------------------------------------------------- loop

    @torch.no_grad()
    def evaluate(self) -> tuple[float, float]:
        """``(val_loss, val_err)`` over the whole test split, in eval mode."""
        self.model.eval()
        loss = torch.zeros((), device=self.device, dtype=torch.float64)
        correct = torch.zeros((), device=self.device, dtype=torch.int64)
        n = 0
        for x, y in self.val_loader:
            with self.autocast:
                out = self.forward(x)
            loss += F.cross_entropy(out.float(), y, reduction="sum").double()
            correct += (out.argmax(1) == y).sum()
            n += len(y)
        self.model.train()
        return loss.item() / n, 1.0 - correct.item() / n

    def _flush(
        self, losses: list[torch.Tensor], lrs: list[float], first_step: int, epoch: int
    ) -> int | None:
        """Log pending step losses; return the first step with a non-finite loss, if any."""
        if not losses:
            return None
        values = torch.stack(losses).float().cpu().tolist()
        rows, st = [], self.state
        for i, (v, lr) in enumerate(zip(values, lrs, strict=True)):
            step = first_step + i
            if not math.isfinite(v):
                self._log(rows)
                return step
            st.ema_loss = (
                v if st.ema_loss is None else self.cfg.ema * st.ema_loss + (1 - self.cfg.ema) * v
            )
            rows.append(
                {
                    "type": "step",
                    "step": step,
                    "epoch": epoch,
                    "loss": v,
                    "ema_loss": st.ema_loss,
                    "lr": lr,
                }
            )
        self._log(rows)
        self.reporter.step(first_step + len(values) - 1, st.ema_loss, lrs[-1])
        return None

    def run(self) -> dict[str, Any]:
        cfg, st = self.cfg, self.state
        self._prepare_folder()
        st = self.state
        steps_per_epoch = len(self.train_loader)
        self.reporter.start(cfg.name, cfg.epochs, steps_per_epoch, st.epoch, st.step)
        status, message, diverged_at = "ok", None, None
        self.model.train()
        try:
            while st.epoch < cfg.epochs:
                epoch = st.epoch
                self.train_loader.set_epoch(epoch)
                t0, images = time.perf_counter(), 0
                loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
                correct = torch.zeros((), device=self.device, dtype=torch.int64)
                pending: list[torch.Tensor] = []
                lrs: list[float] = []
                for x, y in self.train_loader.iter_from(st.batch):
                    lr = set_lr(self.opt, cfg, lr_factor(cfg, st.step, steps_per_epoch))
                    with self.autocast:
                        out = self.forward(x)
                        loss = F.cross_entropy(out, y)
                    self.opt.zero_grad(set_to_none=True)
                    loss.backward()
                    if cfg.ss_decay_to == "identity":
                        decay_to_identity(self.model, cfg.ss_wd)
                    self.opt.step()
                    st.step += 1
                    st.batch += 1
                    images += len(y)
                    d = loss.detach()
                    pending.append(d)
                    lrs.append(lr)
                    loss_sum += d.double() * len(y)
                    correct += (out.detach().argmax(1) == y).sum()
                    last = st.batch == steps_per_epoch
                    if (
                        len(pending) >= self.flush_every
                        or last
                        or (cfg.checkpoint_every and st.step % cfg.checkpoint_every == 0)
                    ):
                        bad = self._flush(pending, lrs, st.step - len(pending) + 1, epoch)
                        pending, lrs = [], []
                        if bad is not None:
                            diverged_at = bad
                            raise _Diverged(bad, lr)
                        st.loss_sum += loss_sum.item()
                        st.correct += int(correct.item())
                        st.seen = st.batch * cfg.batch_size
                        loss_sum.zero_()
                        correct.zero_()
                        if (
                            cfg.checkpoint_every
                            and st.step % cfg.checkpoint_every == 0
                            and not last
                        ):
                            self._checkpoint()
                    if self.stop_at_step is not None and st.step >= self.stop_at_step:
                        raise _Stopped()
                train_time = time.perf_counter() - t0
                val_loss, val_err = self.evaluate()
                st.epoch += 1
                row = {
                    "type": "epoch", "epoch": st.epoch, "step": st.step,
                    "train_loss": st.loss_sum / max(st.seen, 1), "train_err": 1 - st.correct / max(st.seen, 1),
                    "train_acc": st.correct / max(st.seen, 1), "val_loss": val_loss, "val_err": val_err,
                    "val_acc": 1 - val_err, "time_s": train_time, "images_per_s": images / max(train_time, 1e-9),
                    "ema_loss": st.ema_loss, "lr": lrs[-1] if lrs else set_lr(self.opt, cfg, lr_factor(cfg, st.step - 1, steps_per_epoch)),
                }  # fmt: skip
                if not math.isfinite(val_loss):
                    diverged_at = st.step
                    raise _Diverged(st.step, row["lr"])
                st.history.append(val_err)
                st.final_val_err = val_err
                if st.best_val_err is None or val_err < st.best_val_err:
                    st.best_val_err, st.best_epoch = val_err, st.epoch
                st.batch, st.loss_sum, st.correct, st.seen = 0, 0.0, 0, 0
                self._log([row])
                self._log_probe()
                save_file(
                    snapshot_tensors(self.model),
                    str(self.out / "snapshots" / f"epoch_{st.epoch:04d}.safetensors"),
                )
                self._checkpoint()
                self.reporter.epoch(row)
            write_model_files(self.model, self.out, {"run": cfg.name})
        except _Diverged as exc:
            status = "diverged"
            message = f"non-finite loss at step {exc.step} (lr {exc.lr:g}, variant {cfg.variant}); kept the last good checkpoint"
            self.reporter.message(f"[red]diverged:[/] {message}")
            self._restore_last_good()
        except _Stopped:
            self.reporter.stop()
            return {"name": cfg.name, "status": "stopped", "steps": st.step}
        finally:
            self.reporter.stop()
        summary = {
            "name": cfg.name, "variant": cfg.variant, "lr": cfg.lr, "seed": cfg.seed, "status": status,
            "final_val_err": st.final_val_err, "best_val_err": st.best_val_err, "best_epoch": st.best_epoch,
            "epochs_run": st.epoch, "steps": st.step, "diverged_at_step": diverged_at, "message": message,
        }  # fmt: skip
        write_summary(self.out, summary)
        return summary

    def _restore_last_good(self) -> None:
        """After divergence the run folder's model is the last good checkpoint's weights."""
        ckpt = latest_checkpoint(self.out / "checkpoints")
        if ckpt is not None:
            shutil.copyfile(ckpt / "model.safetensors", self.out / "model.safetensors")


class _Diverged(Exception):
    def __init__(self, step: int, lr: float) -> None:
        self.step, self.lr = step, lr


class _Stopped(Exception):
    pass


def write_summary(out: Path, summary: dict[str, Any]) -> None:
    write_json_atomic(out / "summary.json", summary)
    tmp = out / ".summary.csv.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=SUMMARY_FIELDS)
        w.writeheader()
        w.writerow({k: summary.get(k) for k in SUMMARY_FIELDS})
    tmp.replace(out / "summary.csv")


def train(cfg: TrainConfig, out: str | Path, **kwargs: Any) -> dict[str, Any]:
    """Train one run into ``out`` (a new folder, or an existing one with ``resume=True``)."""
    return Trainer(cfg, Path(out), **kwargs).run()


def resume(run: str | Path, **kwargs: Any) -> dict[str, Any]:
    """Continue the run in folder ``run`` from its latest checkpoint, with its saved config."""
    run = Path(run)
    path = run / "config.json"
    if not path.is_file():
        raise TrainError(
            f"{run} is not a run folder (no config.json)", hint="pass the folder a run wrote"
        )
    cfg = TrainConfig.from_dict(json.loads(path.read_text()))
    overrides = kwargs.pop("overrides", {})
    if overrides:
        cfg = cfg.replace(**overrides)
    return Trainer(cfg, run, resume=True, **kwargs).run()
