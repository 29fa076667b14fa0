"""The resolved configuration of one training run, and variant names.

A run's configuration comes from three layers: the defaults below, a recipe (``[base]``
plus one point of its grid), then command-line flags. The result is saved as the run's
``config.json``.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from ..errors import TrainError
from ..layers import MODES

SCHEDULES = ("constant", "cosine", "step")
PRECISIONS = ("fp32", "bf16")
NORMS = ("none", "batchnorm")


@dataclass
class TrainConfig:
    """Everything one run needs. Units in comments; defaults follow the thesis."""

    name: str = ""  # run folder name; derived from variant, lr and seed when empty
    model: str = "allconv"  # model spec, as for `surgeon insert`
    model_args: dict[str, Any] = field(default_factory=dict)
    shift: str = "layer"  # none | element | channel | layer
    scale: str = "layer"
    norm: str = "none"  # none | batchnorm (inserted before each non-final activation)
    dropout: bool = False  # built-in models only
    include: list[str] = field(default_factory=list)  # site selection, as for insert
    exclude: list[str] = field(default_factory=list)
    data: str = "sample"  # sample | cifar10 | cifar100 | path to an ImageFolder tree
    data_root: str | None = None
    download: bool = False
    augment: bool = True  # random crop (pad 4) + horizontal flip, as batch tensor ops
    limit_train: int | None = None  # class-balanced subset sizes (quick runs, tests)
    limit_test: int | None = None
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.04  # the thesis's LRs: 0.02, 0.04, 0.08
    momentum: float = 0.9
    nesterov: bool = False
    wd: float = 0.0  # weight decay of the model's own weights
    ss_lr_mult: float = 0.1  # LR multiplier of the shift/scale group (see docs/training.md)
    ss_wd: float = 0.0  # weight decay of the shift/scale group
    ss_decay_to: str = "identity"  # identity (shift->0, scale->1) | zero
    schedule: str = "constant"  # constant | cosine | step
    step_size: int = 0  # step schedule: epochs per decay (0: a third of the run)
    gamma: float = 0.1  # step schedule: decay factor
    warmup_epochs: float = 0.0  # linear warm-up, in epochs
    seed: int = 0
    precision: str = "fp32"  # fp32 | bf16 (autocast, CUDA only)
    compile: bool = False
    channels_last: bool = True  # CUDA only
    ema: float = 0.99  # coefficient of the training-loss EMA
    device: str = "auto"  # auto | cpu | cuda
    probe: bool = False  # per-site activation stats and gradient norms, once per epoch
    checkpoint_every: int = 0  # steps between mid-epoch checkpoints (0: end of each epoch only)
    accum_steps: int = 1  # micro-batches per optimiser step (batch_size is per step, all ranks)
    sync_bn: bool = False  # SyncBatchNorm for the batchnorm variant under DDP
    pretrained: bool = False  # timm/torchvision pretrained weights (needs internet or a cache)
    tensorboard: bool = False
    variant: str = ""  # filled in from norm/shift/scale

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for what, value in (("shift", self.shift), ("scale", self.scale)):
            if value not in MODES:
                raise TrainError(
                    f"invalid --{what} {value!r}", hint=f"choose one of {', '.join(MODES)}"
                )
        checks = (
            ("norm", self.norm, NORMS),
            ("schedule", self.schedule, SCHEDULES),
            ("precision", self.precision, PRECISIONS),
            ("ss-decay-to", self.ss_decay_to, ("identity", "zero")),
            ("device", self.device, ("auto", "cpu", "cuda")),
        )
        for what, value, allowed in checks:
            if value not in allowed:
                raise TrainError(
                    f"invalid --{what} {value!r}", hint=f"choose one of {', '.join(allowed)}"
                )
        positive = (("epochs", self.epochs), ("batch-size", self.batch_size), ("lr", self.lr))
        for what, value in positive:
            if not value > 0:
                raise TrainError(
                    f"--{what} must be positive, got {value}", hint=f"pass --{what} > 0"
                )
        if self.accum_steps < 1 or self.batch_size % self.accum_steps:
            raise TrainError(
                f"--batch-size {self.batch_size} is not a multiple of --accum-steps {self.accum_steps}",
                hint="the batch size counts all micro-batches of one optimiser step",
            )
        if not 0 <= self.ema < 1:
            raise TrainError(
                f"--ema must be in [0, 1), got {self.ema}", hint="the thesis uses 0.99"
            )
        if self.ss_lr_mult < 0 or self.ss_wd < 0 or self.wd < 0:
            raise TrainError(
                "learning-rate multipliers and weight decays must be >= 0",
                hint="check --ss-lr-mult, --ss-wd, --wd",
            )
        self.variant = variant_name(self.norm, self.shift, self.scale)
        if not self.name:
            self.name = run_name(self.variant, self.lr, self.seed)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise TrainError(
                f"unknown config key(s): {', '.join(unknown)}",
                hint=f"valid keys: {', '.join(sorted(known))}",
            )
        return cls(**d)

    def replace(self, **changes: Any) -> TrainConfig:
        d = self.to_dict()
        d.update(changes)
        if "name" not in changes and any(
            k in changes for k in ("lr", "seed", "shift", "scale", "norm")
        ):
            d["name"] = ""
        return TrainConfig.from_dict(d)


def variant_name(norm: str, shift: str, scale: str) -> str:
    """``plain``, ``batchnorm``, ``shift-layer+scale-layer``, ``batchnorm+scale-channel``..."""
    parts = ["batchnorm"] if norm == "batchnorm" else []
    if shift != "none":
        parts.append(f"shift-{shift}")
    if scale != "none":
        parts.append(f"scale-{scale}")
    return "+".join(parts) or "plain"


def parse_variant(name: str) -> dict[str, str]:
    """The inverse of :func:`variant_name`: ``{"norm", "shift", "scale"}``."""
    out = {"norm": "none", "shift": "none", "scale": "none"}
    if name in ("plain", "none"):
        return out
    for token in name.split("+"):
        m = re.fullmatch(r"(shift|scale)-(element|channel|layer)", token)
        if token == "batchnorm":
            out["norm"] = "batchnorm"
        elif m:
            out[m.group(1)] = m.group(2)
        else:
            raise TrainError(
                f"unknown variant {name!r}",
                hint="use plain, batchnorm, shift-MODE, scale-MODE or shift-MODE+scale-MODE",
            )
    return out


def run_name(variant: str, lr: float, seed: int) -> str:
    return f"{variant}_lr{lr:g}_s{seed}"
