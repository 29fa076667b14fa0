"""The training engine: one run, from a resolved :class:`TrainConfig` to a run folder.

The loop is a plain PyTorch loop: data on the device as uint8 tensors (see
:mod:`surgeon.data`), bf16 autocast and channels_last on CUDA, optional ``torch.compile``,
DistributedDataParallel under torchrun (rank 0 alone writes). Per-step losses stay on the
device and are fetched in chunks, so the host syncs once every ``flush_every`` steps (every
step on CPU, where it costs nothing).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.markup import escape
from safetensors.torch import save_file
from torch import nn

from .. import rundir
from ..data import ImageData, Loader, load_data
from ..errors import TrainError
from ..io import write_model_files
from ..layers import ShiftScale
from . import distributed, parts
from .checkpoint import Found, check_checkpoint, find_checkpoint, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .optim import build_optimizer, decay_to_identity, lr_factor, set_lr
from .probe import Probe
from .progress import Reporter
from .variants import build_base, derive


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise TrainError(
                "--device cuda but no CUDA device is available", hint="use --device cpu"
            )
        return torch.device("cuda", local_rank)
    return torch.device(name)


def logits_of(out: Any) -> torch.Tensor:
    """The class scores of a model's output: the tensor itself, a ``logits`` field
    (transformers' ``ImageClassifierOutput``, a dict), or the first tensor of a tuple."""
    if isinstance(out, torch.Tensor):
        return out
    logits = out.get("logits") if isinstance(out, dict) else getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TrainError(
        f"the model returned {type(out).__name__}, not class scores",
        hint="return a tensor of logits (or an object with a .logits tensor)",
    )


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


def convert_sync_bn(model: nn.Module) -> nn.Module:
    """Swap the channel-dim-1 BatchNorms for SyncBatchNorm (the batchnorm variant under DDP)."""
    for name, child in list(model.named_children()):
        if (
            isinstance(child, nn.modules.batchnorm._BatchNorm)
            and getattr(child, "channel_dim", 1) == 1
        ):
            sync = nn.SyncBatchNorm(
                child.num_features,
                child.eps,
                child.momentum,
                child.affine,
                child.track_running_stats,
            )
            sync.load_state_dict(child.state_dict())
            setattr(model, name, sync.to(next(child.parameters()).device))
        else:
            convert_sync_bn(child)
    return model


@dataclass
class RunState:
    """What a checkpoint must restore besides weights, momentum and RNG."""

    step: int = 0  # optimiser steps
    epoch: int = 0  # completed epochs
    batch: int = 0  # micro-batches done in the current epoch (this rank)
    ema_loss: float | None = None
    loss_sum: float = 0.0  # current epoch's running sums (all ranks)
    correct: int = 0
    seen: int = 0
    best_val_err: float | None = None
    best_epoch: int = 0
    final_val_err: float | None = None
    history: list[float] = field(default_factory=list)  # val_err per epoch
    world_size: int = 1
    test_history: list[float] = field(default_factory=list)  # test_err per epoch

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


_NUMBER, _MAYBE = (float, int), (float, int, type(None))
# RunState's fields and the JSON types a checkpoint's state.json may hold for them
RUN_FIELDS: dict[str, tuple[type, ...]] = {
    "step": (int,), "epoch": (int,), "batch": (int,), "ema_loss": _MAYBE, "loss_sum": _NUMBER,
    "correct": (int,), "seen": (int,), "best_val_err": _MAYBE, "best_epoch": (int,),
    "final_val_err": _MAYBE, "history": (list,), "world_size": (int,), "test_history": (list,),
}  # fmt: skip
assert set(RUN_FIELDS) == set(RunState().to_dict())
# fields added after the first checkpoints were written: an older checkpoint lacks them and
# resumes with them rebuilt (test_history: from the epoch rows of metrics.jsonl)
ADDED_RUN_FIELDS = ("test_history",)


def _jsonable(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (tuples become lists)."""
    return json.loads(json.dumps(obj))


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run: the run folder and whether it holds a checkpoint to resume."""

    def __init__(self, run: Path, resumable: bool) -> None:
        super().__init__(str(run))
        self.run, self.resumable = run, resumable


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
        saved_config: TrainConfig | None = None,
        overrides: dict[str, Any] | None = None,
    ) -> None:
        self.cfg, self.out = cfg, Path(out)
        # resume: the run's config.json as found, and what the command line changed in it
        self.saved_config = saved_config or cfg
        self.overrides = dict(overrides or {})
        self.notices: list[str] = []  # lines for the reporter once it starts
        self.dist = distributed.env_info()
        self.device = resolve_device(cfg.device, self.dist.local_rank)
        self.dist = distributed.init(self.device.type)
        self.main = self.dist.is_main
        self.reporter = (reporter or Reporter()) if self.main else Reporter()
        if cfg.precision == "bf16" and self.device.type != "cuda":
            raise TrainError(
                "--precision bf16 needs a CUDA device", hint="the CPU path runs in fp32"
            )
        world = self.dist.world_size
        if cfg.batch_size % (world * cfg.accum_steps):
            raise TrainError(
                f"--batch-size {cfg.batch_size} does not split over {world} processes x {cfg.accum_steps} micro-batches",
                hint="use a batch size divisible by nproc * accum-steps",
            )
        self.micro = cfg.batch_size // (world * cfg.accum_steps)
        self.resume = resume
        self.stop_at_step = stop_at_step  # tests: simulate a process killed after this step
        self.fault = _fault_step(self.dist.rank)  # tests: this rank dies at this step
        self.data = data or load_data(
            cfg.data,
            cfg.data_root,
            cfg.download,
            limit_train=cfg.limit_train,
            limit_test=cfg.limit_test,
            val_size=cfg.val_size,
        )
        check_data(cfg, self.data)
        self.input_size = tuple(self.data.train_x.shape[1:])
        if base is None:
            base = build_base(cfg, self.data.num_classes, self.input_size)
        self.model = derive(base, cfg, self.input_size).to(self.device)
        cuda = self.device.type == "cuda"
        if cuda and cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.opt = build_optimizer(self.model, cfg)
        self._finetune_setup(base)
        net: nn.Module = self.model
        if self.dist.enabled:
            if cfg.sync_bn:
                convert_sync_bn(self.model)
            net = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if cuda else None
            )
        self.net = net
        self.forward: Callable = torch.compile(net) if cfg.compile else net
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
        shard = {"rank": self.dist.rank, "world_size": world}
        self.train_loader = Loader(
            self.data.train_x,
            self.data.train_y,
            self.micro,
            shuffle=True,
            augment=cfg.augment,
            drop_last=True,
            seed=cfg.seed,
            order=cfg.data_order,
            **loader_kw,
            **shard,
        )
        eval_batch = max(self.micro, 256)
        self.test_loader = Loader(
            self.data.test_x, self.data.test_y, eval_batch, **loader_kw, **shard
        )
        # model selection: the validation hold-out, or (without one) the test split as before
        self.val_loader = (
            Loader(self.data.val_x, self.data.val_y, eval_batch, **loader_kw, **shard)
            if self.data.has_val
            else self.test_loader
        )
        self.steps_per_epoch = len(self.train_loader) // cfg.accum_steps
        if self.steps_per_epoch == 0:
            raise TrainError(
                f"batch size {cfg.batch_size} is larger than the {len(self.data.train_x)} training images",
                hint="lower --batch-size",
            )
        self.flush_every = 1 if self.device.type == "cpu" else 25
        self.state = RunState(world_size=world)
        self.tb = (
            _tensorboard_writer(self.out / "tensorboard") if cfg.tensorboard and self.main else None
        )
        self.probe = Probe(self.model, self.input_size) if cfg.probe and self.main else None
        if self.probe is not None:  # a fixed, unaugmented batch of training images
            probe_loader = Loader(
                self.data.train_x[:256], self.data.train_y[:256], 256, **loader_kw
            )
            self.probe_batch = next(iter(probe_loader))

    # ---------------------------------------------------------------- files

    def _prepare_folder(self) -> None:
        """Create (rank 0) or reopen the run folder; every rank learns whether that worked."""
        error: Exception | None = None
        if self.main or self.resume:
            try:
                self._prepare_local()
            except Exception as exc:
                error = exc
        ok = distributed.broadcast_flag(error is None, self.dist, self.device)
        if error is not None:
            raise error
        if not ok:
            raise TrainError("rank 0 could not prepare the run folder", hint="see rank 0's error")

    def _prepare_local(self) -> None:
        if self.resume:
            self._reopen()
            return
        if self.out.exists() and any(self.out.iterdir()):
            raise TrainError(
                f"run folder {self.out} already exists",
                hint="pass --resume to continue it, or another --out",
            )
        created = not self.out.exists()
        try:
            self._create_folder()
        except BaseException:
            if created:  # no half-made run folder left behind
                shutil.rmtree(self.out, ignore_errors=True)
            raise

    def _create_folder(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / rundir.SNAPSHOTS_DIR).mkdir()
        rundir.write_config(self.out, {**self.cfg.to_dict(), "world_size": self.dist.world_size})
        rundir.write_data_info(
            self.out,
            {
                "source": self.data.source,
                "classes": self.data.classes,
                "mean": list(self.data.mean),
                "std": list(self.data.std),
                "train": len(self.data.train_x),
                "test": len(self.data.test_x),
                "val": len(self.data.val_y) if self.data.has_val else 0,
                "val_seed": self.data.val_seed,
            },
        )
        write_model_files(self.model, self.out, {"run": self.cfg.name})
        self._snapshot(0)
        self._log_probe()

    def _reopen(self) -> None:
        """Resume: the newest intact checkpoint, checked against the config and world size
        before anything is loaded; the command line's changes logged as events."""
        found = find_checkpoint(self.out / rundir.CHECKPOINTS_DIR, RUN_FIELDS, ADDED_RUN_FIELDS)
        changes = self._config_changes(found)
        saved = dict(found.state["run"])
        if "test_history" not in saved:
            saved["test_history"] = test_history_from_metrics(self.out, saved["epoch"])
        if saved["world_size"] != self.dist.world_size:
            raise TrainError(
                f"{self.out} was trained with {saved['world_size']} process(es), not {self.dist.world_size}",
                hint=f"resume with --nproc {saved['world_size']}",
            )
        load_checkpoint(found.path, self.model, self.opt)
        self.state = RunState(**saved)
        if not self.main:
            return
        st = self.state
        rundir.truncate_metrics(self.out, st.step, st.epoch)
        where = {"step": st.step, "epoch": st.epoch}
        events = []
        if found.notes:
            self.notices.append(found.notice() or "")
            events.append(
                {"type": "event", "event": "resume_fallback", "checkpoint": found.path.name,
                 "passed_over": found.notes, **where}
            )  # fmt: skip
        logged = {
            (r.get("event"), r.get("key"), json.dumps(r.get("new")), r.get("step"))
            for r in _event_rows(self.out)
        }
        for key, old, new in changes:
            if ("config_change", key, json.dumps(new), st.step) not in logged:
                events.append(
                    {"type": "event", "event": "config_change", "key": key, "old": old,
                     "new": new, **where}
                )  # fmt: skip
        self._log(events)
        if _jsonable(self.cfg.to_dict()) != _jsonable(self.saved_config.to_dict()):
            rundir.write_config(
                self.out, {**self.cfg.to_dict(), "world_size": self.dist.world_size}
            )

    def _config_changes(self, found: Found) -> list[tuple[str, Any, Any]]:
        """``(key, old, new)`` of the values the command line changes on resume. A value of
        ``config.json`` that differs from the config the checkpoint was written with, and
        that the command line does not give, is refused: the file was edited by hand."""
        base = _jsonable(self.saved_config.to_dict())
        new = _jsonable(self.cfg.to_dict())
        recorded = found.state.get("config", base)  # older checkpoints record no config
        recorded = {k: v for k, v in recorded.items() if k != "world_size"}
        edited = [
            k
            for k in sorted(set(base) | set(recorded))
            if base.get(k) != recorded.get(k) and k not in self.overrides and k != "variant"
        ]
        if edited:
            shown = ", ".join(
                f"{k} {json.dumps(recorded.get(k))} -> {json.dumps(base.get(k))}" for k in edited
            )
            raise TrainError(
                f"{self.out / rundir.CONFIG_FILE} differs from the config {found.path.name} was "
                f"written with: {shown}",
                hint="restore config.json (only --epochs and --device may change a resumed run, "
                "on the command line), or start a new run",
            )
        return [
            (k, recorded.get(k), new.get(k))
            for k in sorted(self.overrides)
            if recorded.get(k) != new.get(k)
        ]

    def _snapshot(self, epoch: int) -> None:
        """The shift/scale parameters after ``epoch``: a temp file, fsynced, renamed."""
        path = rundir.snapshot_path(self.out, epoch)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file(snapshot_tensors(self.model), tmp)
            rundir.follow_umask(tmp)  # mkstemp and safetensors make their files 0600
            rundir.fsync_file(tmp)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _log(self, rows: list[dict[str, Any]]) -> None:
        if self.main:
            rundir.append_metrics(self.out, rows)

    def _log_probe(self) -> None:
        if self.probe is not None:
            rows = self.probe.measure(*self.probe_batch)
            st = self.state
            self._log([{"type": "probe", "epoch": st.epoch, "step": st.step, **r} for r in rows])

    def _checkpoint(self) -> None:
        if self.main:
            config = _jsonable(self.cfg.to_dict())
            state = {"run": self.state.to_dict(), "step": self.state.step, "config": config}
            state["config_sha256"] = rundir.json_digest(config)
            save_checkpoint(self.out / rundir.CHECKPOINTS_DIR, self.model, self.opt, state)
        distributed.barrier(self.dist)

    # ---------------------------------------------------------------- loop

    @torch.no_grad()
    def evaluate(self, loader: Loader | None = None) -> tuple[float, float]:
        """``(loss, err)`` over ``loader`` (default: the selection split; sharded over ranks),
        in eval mode."""
        self.model.eval()
        sums = torch.zeros(3, device=self.device, dtype=torch.float64)  # loss, correct, count
        for x, y in loader or self.val_loader:
            with self.autocast:
                out = logits_of(self.model(x) if not self.cfg.compile else self.forward(x))
            sums[0] += F.cross_entropy(out.float(), y, reduction="sum").double()
            sums[1] += (out.argmax(1) == y).sum()
            sums[2] += len(y)
        distributed.all_reduce_sum(sums, self.dist)
        self.model.train()
        loss, correct, n = sums.tolist()
        return loss / n, 1.0 - correct / n

    def _flush(
        self, losses: list[torch.Tensor], lrs: list[float], first_step: int, epoch: int
    ) -> int | None:
        """Log pending step losses (mean over ranks); return the first non-finite step, if any."""
        if not losses:
            return None
        stacked = torch.stack(losses).float()
        if self.dist.enabled:
            stacked = distributed.all_reduce_sum(stacked, self.dist) / self.dist.world_size
        values = stacked.cpu().tolist()
        rows, st = [], self.state
        for i, (v, lr) in enumerate(zip(values, lrs, strict=True)):
            step = first_step + i
            if not math.isfinite(v):
                self._log(rows)
                return step
            st.ema_loss, shown = ema_update(st.ema_loss, v, step, self.cfg)
            rows.append(
                {
                    "type": "step",
                    "step": step,
                    "epoch": epoch,
                    "loss": v,
                    "ema_loss": shown,
                    "lr": lr,
                }
            )
            if self.tb is not None:
                for key in ("loss", "ema_loss", "lr"):
                    self.tb.add_scalar(f"train/{key}", rows[-1][key], step)
        self._log(rows)
        self.reporter.step(
            first_step + len(values) - 1, ema_value(st.ema_loss, st.step, self.cfg), lrs[-1]
        )
        return None

    def _train_step(
        self, batches: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """One optimiser step over ``accum_steps`` micro-batches: (mean loss, correct, images)."""
        cfg = self.cfg
        self.opt.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.int64)
        n = 0
        for i, (x, y) in enumerate(batches):
            last = i == len(batches) - 1
            sync = nullcontext() if (last or not self.dist.enabled) else self.net.no_sync()
            with sync:
                with self.autocast:
                    out = logits_of(self.forward(x))
                    loss = F.cross_entropy(out, y)
                (loss / len(batches)).backward()
            total += loss.detach().float() / len(batches)
            correct += (out.detach().argmax(1) == y).sum()
            n += len(y)
        if cfg.ss_decay_to == "identity":
            decay_to_identity(self.model, cfg.ss_wd)
        if self.probe is not None:
            self.probe.before_step()
        self.opt.step()
        if self.probe is not None:
            self.probe.after_step()
        return total, correct, n

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        self._prepare_folder()
        if not self.resume:  # dropout draws depend on the seed alone, not on earlier runs
            torch.manual_seed(cfg.seed)
        st = self.state
        accum = cfg.accum_steps
        self.reporter.start(
            cfg.name, cfg.epochs, self.steps_per_epoch, st.epoch, st.step, cfg.batch_size
        )
        for line in self.notices:
            self.reporter.message(escape(line))
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
                group: list[tuple[torch.Tensor, torch.Tensor]] = []
                end = self.steps_per_epoch * accum
                for x, y in self.train_loader.iter_from(st.batch):
                    group.append((x, y))
                    if len(group) < accum:
                        continue
                    lr = set_lr(self.opt, cfg, lr_factor(cfg, st.step, self.steps_per_epoch))
                    ss_warmup(self.opt, cfg, st.step, self.steps_per_epoch)
                    loss, ok, n = self._train_step(group)
                    group = []
                    st.step += 1
                    st.batch += accum
                    images += n * self.dist.world_size
                    pending.append(loss)
                    lrs.append(lr)
                    loss_sum += loss.double() * n
                    correct += ok
                    last = st.batch >= end
                    ckpt_now = (
                        bool(cfg.checkpoint_every)
                        and st.step % cfg.checkpoint_every == 0
                        and not last
                    )
                    if len(pending) >= self.flush_every or last or ckpt_now:
                        bad = self._flush(pending, lrs, st.step - len(pending) + 1, epoch)
                        pending, lrs = [], []
                        if bad is not None:
                            diverged_at = bad
                            raise _Diverged(bad, lr)
                        sums = distributed.all_reduce_sum(
                            torch.stack([loss_sum, correct.double()]), self.dist
                        )
                        st.loss_sum += sums[0].item()
                        st.correct += int(sums[1].item())
                        st.seen = st.batch * self.micro * self.dist.world_size
                        loss_sum.zero_()
                        correct.zero_()
                        if ckpt_now:
                            self._checkpoint()
                    if self.stop_at_step is not None and st.step >= self.stop_at_step:
                        raise _Stopped()
                    if self.fault is not None and st.step >= self.fault:
                        os._exit(3)  # fault injection for tests: this rank dies here
                    if last:
                        break
                train_time = time.perf_counter() - t0
                val_loss, val_err = self.evaluate()
                test_loss, test_err = (
                    self.evaluate(self.test_loader)
                    if self.val_loader is not self.test_loader
                    else (val_loss, val_err)
                )
                st.epoch += 1
                row = {
                    "type": "epoch", "epoch": st.epoch, "step": st.step,
                    "train_loss": st.loss_sum / max(st.seen, 1), "train_err": 1 - st.correct / max(st.seen, 1),
                    "train_acc": st.correct / max(st.seen, 1), "val_loss": val_loss, "val_err": val_err,
                    "val_acc": 1 - val_err, "time_s": train_time, "images_per_s": images / max(train_time, 1e-9),
                    "test_loss": test_loss, "test_err": test_err,
                    "select_split": "val" if self.data.has_val else "test",
                    "ema_loss": ema_value(st.ema_loss, st.step, cfg), "lr": lrs[-1] if lrs else set_lr(self.opt, cfg, lr_factor(cfg, st.step - 1, self.steps_per_epoch)),
                }  # fmt: skip
                if not math.isfinite(val_loss):
                    diverged_at = st.step
                    raise _Diverged(st.step, row["lr"])
                st.history.append(val_err)
                st.test_history.append(test_err)
                st.final_val_err = val_err
                if st.best_val_err is None or val_err < st.best_val_err:
                    st.best_val_err, st.best_epoch = val_err, st.epoch
                st.batch, st.loss_sum, st.correct, st.seen = 0, 0.0, 0, 0
                self._log([row])
                if self.tb is not None:
                    for key in (
                        "train_loss",
                        "train_err",
                        "val_loss",
                        "val_err",
                        "val_acc",
                        "images_per_s",
                    ):
                        self.tb.add_scalar(f"epoch/{key}", row[key], st.epoch)
                    self.tb.flush()
                self._log_probe()
                if self.main:
                    self._snapshot(st.epoch)
                self._checkpoint()
                self.reporter.epoch(row)
            if self.main:
                write_model_files(self.model, self.out, {"run": cfg.name})
                self._write_adapter()
        except _Diverged as exc:
            status = "diverged"
            kept = self._restore_last_good(exc.step) if self.main else "the last good weights"
            message = f"non-finite loss at step {exc.step} (lr {exc.lr:g}, variant {cfg.variant}); kept {kept}"
            self.reporter.message(f"[red]diverged:[/] {escape(message)}")
        except KeyboardInterrupt:
            self.reporter.stop()
            latest = self.out / rundir.CHECKPOINTS_DIR / rundir.LATEST_FILE
            raise RunInterrupted(self.out, latest.is_file()) from None
        except _Stopped:
            self.reporter.stop()
            return {"name": cfg.name, "status": "stopped", "steps": st.step}
        finally:
            self.reporter.stop()
        summary = {
            "name": cfg.name, "variant": cfg.variant, "lr": cfg.lr, "seed": cfg.seed, "status": status,
            "final_val_err": st.final_val_err, "best_val_err": st.best_val_err, "best_epoch": st.best_epoch,
            "epochs_run": st.epoch, "steps": st.step, "diverged_at_step": diverged_at, "message": message,
            **selection_summary(st, self.data.has_val),
        }  # fmt: skip
        summary.update(self.trainable)
        if self.main:
            rundir.write_summary(self.out, summary)
        distributed.barrier(self.dist)
        return summary

    # ---------------------------------------------------------------- fine-tuning

    def _finetune_setup(self, base: nn.Module) -> None:
        """Trainable counts (printed with ``--train-only``/``--init-from``, always in the
        summary) and the state-dict names an adapter of this run must hold."""
        cfg = self.cfg
        self.trainable = parts.counts(self.model)
        loaded, notes = getattr(base, "_surgeon_init_from", (None, []))
        if cfg.init_from is not None and loaded is None:  # a base built elsewhere
            raise TrainError(
                "--init-from needs the base model built by surgeon.train.build_base",
                hint="pass base=build_base(cfg, ...) or no base",
            )
        self.notices += notes
        # from the base file: the loaded tensors; without one: the base's seeded init
        self._base_keys = set(loaded) if loaded is not None else set(base.state_dict())
        if cfg.train_only or cfg.init_from is not None:
            t = self.trainable
            self.notices.append(
                f"trainable: {t['trainable_params']:,} of {t['total_params']:,} parameters "
                f"({100 * t['trainable_fraction']:.2f}%; --train-only {cfg.train_only or 'all'})"
            )

    def _adapter_names(self) -> list[str]:
        """The trained parameters, every tensor not from the base (inserted modules, a
        re-initialised head) and the running statistics of batch norms that trained."""
        names = {n for n, p in self.model.named_parameters() if p.requires_grad}
        state = self.model.state_dict()
        names |= {k for k in state if k not in self._base_keys}
        if "norm" in parts.parse_parts(self.cfg.train_only):
            for mname, m in self.model.named_modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    names |= {f"{mname}.{b}" for b, _ in m.named_buffers(recurse=False)}
        return [k for k in state if k in names]

    def _write_adapter(self) -> None:
        """``--train-only``: ``adapter.safetensors`` + ``adapter.json`` in the run folder,
        naming the ``--init-from`` file as the base (docs/finetune.md)."""
        if not self.cfg.train_only:
            return
        from ..adapters import ADAPTER_RECORD, save_adapter
        from .init_from import weights_file

        base = weights_file(self.cfg.init_from) if self.cfg.init_from is not None else None
        record = self.out / ADAPTER_RECORD
        created = not record.exists()
        if created:  # save_adapter writes into a folder that is empty or an adapter's
            record.write_text("{}")
        try:
            save_adapter(self.model, self.out, names=self._adapter_names(), base_weights=base)
        except BaseException:
            if created:
                record.unlink(missing_ok=True)
            raise

    def _restore_last_good(self, diverged_at: int) -> str:
        """After divergence the run folder's model is the last good checkpoint's weights;
        returns which weights were kept, in words.

        Good: an intact epoch-end checkpoint (its val loss was finite), or a mid-epoch one
        older than the step before ``diverged_at`` (the weights that gave the non-finite
        loss). With none, the folder keeps the initial weights written at the start. The
        weights are copied to a temp file in the run folder, fsynced and renamed into place.
        """
        folder = self.out / rundir.CHECKPOINTS_DIR
        for ckpt in sorted(folder.glob("step_*"), reverse=True):
            try:
                run = check_checkpoint(ckpt, RUN_FIELDS, ADDED_RUN_FIELDS)["run"]
            except TrainError:
                continue  # a damaged checkpoint is no good either
            if run["batch"] == 0 or run["step"] < diverged_at - 1:
                _replace_file(ckpt / rundir.WEIGHTS_FILE, self.out / rundir.WEIGHTS_FILE)
                epoch = run["epoch"] + (1 if run["batch"] else 0)
                return f"the checkpoint of epoch {epoch} / step {run['step']}"
        return "the initial weights"


class WrongData(TrainError):
    """The data is not the dataset the config states: every run of a recipe would hit it."""


def check_data(cfg: TrainConfig, data: ImageData) -> None:
    """The data must have the class count the config states (``classes``; 0: any), so a
    recipe for CIFAR-100 cannot silently run on a CIFAR-10 folder."""
    if cfg.classes and data.num_classes != cfg.classes:
        raise WrongData(
            f"--data {cfg.data} has {data.num_classes} classes; this run is for {cfg.classes}",
            hint="pass data with that many classes (a recipe states its dataset), or --classes 0",
        )


def test_history_from_metrics(run: Path, epochs: int) -> list[float]:
    """The test error of epochs 1..``epochs`` from ``metrics.jsonl``'s epoch rows, for a
    checkpoint written before RunState kept them: ``test_err``, or ``val_err`` in rows
    written before the validation split (then the test split was the only one). Empty when
    an epoch is missing: the test error at the best epoch is then unknown, not wrong."""
    _, rows, _, _ = rundir.read_metrics(run)
    by_epoch = {}
    for row in rows:
        value = row.get("test_err", row.get("val_err") if "select_split" not in row else None)
        if isinstance(row.get("epoch"), int) and isinstance(value, (int, float)):
            by_epoch[row["epoch"]] = float(value)
    history = [by_epoch.get(e) for e in range(1, epochs + 1)]
    return [] if None in history else history


def selection_summary(st: RunState, has_val: bool) -> dict[str, Any]:
    """The summary's split-aware keys: the split the best epoch was chosen on, the test error
    at that epoch and at the last one. Without a validation split, ``best_val_err`` and
    ``final_val_err`` are test errors (the folders written before the split existed)."""
    tests = st.test_history
    at_best = tests[st.best_epoch - 1] if 0 < st.best_epoch <= len(tests) else None
    return {
        "selected_on": "val" if has_val else "test",
        "test_err_at_best": at_best,
        "final_test_err": tests[-1] if tests else None,
    }


def ema_update(raw: float | None, value: float, step: int, cfg: TrainConfig) -> tuple[float, float]:
    """``(state, shown)`` after one loss ``value`` at 1-based ``step``. Without bias correction
    the EMA starts at the first loss (the thesis's curves); with it, the state starts at 0 and
    the shown value is ``state / (1 - ema**step)`` (Adam's correction), so no single early
    loss keeps a fixed weight."""
    if cfg.ema_bias_correction:
        state = (0.0 if raw is None else raw) * cfg.ema + (1 - cfg.ema) * value
        return state, ema_value(state, step, cfg)
    state = value if raw is None else cfg.ema * raw + (1 - cfg.ema) * value
    return state, state


def ema_value(raw: float | None, step: int, cfg: TrainConfig) -> float | None:
    """The EMA as logged: ``raw``, or ``raw / (1 - ema**step)`` with bias correction."""
    if raw is None or not cfg.ema_bias_correction or step < 1:
        return raw
    return raw / (1 - cfg.ema**step)


def ss_warmup(opt: torch.optim.Optimizer, cfg: TrainConfig, step: int, per_epoch: int) -> None:
    """Scale the shift/scale group's LR by ``(step + 1) / W`` for the first ``W`` steps
    (``W = ss_warmup_epochs`` epochs); the weights' LR is left as the schedule set it."""
    warm = int(cfg.ss_warmup_epochs * per_epoch)
    if step >= warm:
        return
    for g in opt.param_groups:
        if g.get("name") == "shift_scale":
            g["lr"] *= (step + 1) / warm


def _replace_file(src: Path, dst: Path) -> None:
    """Copy ``src`` over ``dst`` atomically: a temp file next to ``dst``, fsynced, renamed."""
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out, open(src, "rb") as f:
            shutil.copyfileobj(f, out)
            out.flush()
            os.fsync(out.fileno())
        rundir.follow_umask(tmp)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    rundir.fsync_dir(dst.parent)


def _event_rows(run: Path) -> list[dict[str, Any]]:
    path = run / rundir.METRICS_FILE
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and row.get("type") == "event":
            rows.append(row)
    return rows


def _tensorboard_writer(folder: Path):
    """A SummaryWriter when tensorboard is installed; else a warning and None (the run folder's
    metrics.jsonl stays the source of truth either way)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        warnings.warn(
            "--tensorboard: the tensorboard package is not installed; writing metrics.jsonl only (pip install tensorboard)",
            stacklevel=2,
        )
        return None
    return SummaryWriter(str(folder))


def _fault_step(rank: int) -> int | None:
    """``SURGEON_FAULT=RANK:STEP`` makes that rank exit abruptly after STEP (tests only)."""
    spec = os.environ.get("SURGEON_FAULT", "")
    if not spec:
        return None
    r, _, step = spec.partition(":")
    return int(step) if int(r) == rank else None


class _Diverged(Exception):
    def __init__(self, step: int, lr: float) -> None:
        self.step, self.lr = step, lr


class _Stopped(Exception):
    pass


def train(cfg: TrainConfig, out: str | Path, **kwargs: Any) -> dict[str, Any]:
    """Train one run into ``out`` (a new folder, or an existing one with ``resume=True``)."""
    return Trainer(cfg, Path(out), **kwargs).run()


def resume(
    run: str | Path, *, overrides: dict[str, Any] | None = None, **kwargs: Any
) -> dict[str, Any]:
    """Continue the run in folder ``run`` from its newest intact checkpoint, with its saved
    config; ``overrides`` (e.g. ``{"epochs": 20}``) change it, and each change is logged in
    ``metrics.jsonl``. A ``config.json`` edited since the checkpoint is refused."""
    run = Path(run)
    path = run / rundir.CONFIG_FILE
    if not path.is_file():
        raise TrainError(
            f"{run} is not a run folder (no {rundir.CONFIG_FILE})",
            hint="pass the folder a run wrote",
        )
    saved = rundir.read_config(run, TrainError)
    saved.pop("world_size", None)
    try:
        cfg = TrainConfig.from_dict(saved)
    except TrainError as exc:
        raise TrainError(f"{path}: {exc.message}", hint=exc.hint) from None
    except (TypeError, ValueError) as exc:  # a value of the wrong type, edited by hand
        raise TrainError(f"{path} holds a bad value ({exc})", hint="restore config.json") from None
    new = cfg.replace(**overrides) if overrides else cfg
    trainer = Trainer(new, run, resume=True, saved_config=cfg, overrides=overrides or {}, **kwargs)
    return trainer.run()
