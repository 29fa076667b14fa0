"""The configuration of one training run (defaults < recipe < flags), and variant names.

Torch-free: ``surgeon train --help`` builds its options from the fields' metadata.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from ..errors import TrainError
from ..modes import MODES
from ..rundir import check_name, run_name, variant_name

SCHEDULES = ("constant", "cosine", "step")
PRECISIONS = ("fp32", "bf16")
NORMS = ("none", "batchnorm")
DECAY_TARGETS = ("identity", "zero")
FINALS = ("parametrised", "output")
DATA_ORDERS = ("reshuffle", "fixed", "replacement")
DEVICES = ("auto", "cpu", "cuda")
PLACEMENTS = ("activations", "ssf")
TRAIN_PARTS = ("ss", "head", "norm", "bias")
WINDOW = 200  # online learning: samples in the windowed prequential accuracy

# the JSON values each field type accepts (bool is an int in Python: refused where not named)
_TYPES: dict[str, tuple[type, ...]] = {
    "bool": (bool,), "int": (int,), "float": (int, float), "str": (str,),
    "int | None": (int, type(None)), "str | None": (str, type(None)),
    "list[str]": (list,), "dict[str, Any]": (dict,),
}  # fmt: skip
_TYPE_WORDS = {
    "bool": "true or false", "int": "an integer", "float": "a number", "str": "a string",
    "int | None": "an integer or null", "str | None": "a string or null",
    "list[str]": "a list of strings", "dict[str, Any]": "a table of key = value",
}  # fmt: skip

VARIANT, DATA, OPTIM, RUN = "Model and variant", "Data", "Optimisation", "Run"


def _opt(default: Any = None, help: str = "", panel: str = RUN, **meta: Any) -> Any:
    """A field with its help text; ``surgeon train`` makes an option of it unless ``cli=False``.

    ``flag`` spells the option (``"--dropout/--no-dropout"``, ``"--model-arg"``), ``metavar``
    names its value in ``--help``; a list or dict default becomes a default factory.
    """
    metadata = {"help": help, "panel": panel, **meta}
    if isinstance(default, (list, dict)):
        return field(default_factory=type(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def _choices(values: tuple[str, ...]) -> str:
    return ", ".join(values[:-1]) + f" or {values[-1]}"


@dataclass
class TrainConfig:
    """Everything one run needs; the defaults follow the thesis. Each field's help is its
    ``surgeon train`` option's help (``metadata["help"]``)."""

    name: str = _opt(
        "", "run folder name (single runs; default: VARIANT_lrLR_sSEED)", metavar="NAME"
    )
    model: str = _opt(
        "allconv", "model spec: allconv, mlp, timm:NAME, torchvision:NAME, file.py[:name]",
        VARIANT, metavar="MODEL",
    )  # fmt: skip
    model_args: dict[str, Any] = _opt(
        {}, "key=value for the model constructor (repeatable)", VARIANT,
        flag="--model-arg", metavar="KEY=VALUE",
    )  # fmt: skip
    shift: str = _opt("layer", f"shift mode: {_choices(MODES)}", VARIANT, metavar="MODE")
    scale: str = _opt("layer", f"scale mode: {_choices(MODES)}", VARIANT, metavar="MODE")
    norm: str = _opt(
        "none", "none or batchnorm (before each non-final activation)", VARIANT, metavar="NORM"
    )
    dropout: bool = _opt(
        False, "the built-in models' dropout", VARIANT, flag="--dropout/--no-dropout"
    )
    final: str = _opt(
        "parametrised",
        "which activations get no site: parametrised (no parametrised layer between it and the "
        "output) or output (only the output nonlinearity; the thesis's rule), see docs/insert.md",
        VARIANT, metavar="RULE",
    )  # fmt: skip
    include: list[str] = _opt([], "keep only these sites (kind or node-name glob)", cli=False)
    exclude: list[str] = _opt([], "drop these sites (kind or node-name glob)", cli=False)
    data: str = _opt(
        "sample", "sample, cifar10, cifar100 or an ImageFolder path", DATA, metavar="DATA"
    )
    classes: int = _opt(
        0, "the class count the data must have (0: any); recipes state theirs", DATA,
        metavar="N",
    )  # fmt: skip
    data_root: str | None = _opt(
        None, "where torchvision's CIFAR files live (default ./data)", DATA, metavar="DIR"
    )
    download: bool = _opt(False, "let torchvision download CIFAR", DATA, flag="--download")
    augment: bool = _opt(
        False, "random crop (pad 4) + horizontal flip, as batch tensor ops (the thesis: off)", DATA,
        flag="--augment/--no-augment",
    )  # fmt: skip
    limit_train: int | None = _opt(
        None, "class-balanced subset of the training split", DATA, metavar="N"
    )
    limit_test: int | None = _opt(
        None, "class-balanced subset of the test split", DATA, metavar="N"
    )
    val_size: int = _opt(
        0, "class-balanced, seeded hold-out of N training images for model selection "
        "(0: none; then 'best' is picked on the test split)", DATA, metavar="N",
    )  # fmt: skip
    data_order: str = _opt(
        "reshuffle", "reshuffle (a new permutation each epoch), fixed (one permutation for every "
        "epoch) or replacement (batches drawn with replacement)", DATA, metavar="ORDER",
    )  # fmt: skip
    epochs: int = _opt(10, "epochs", OPTIM, metavar="N")
    batch_size: int = _opt(128, "batch size (one optimiser step, all ranks)", OPTIM, metavar="N")
    lr: float = _opt(
        0.04, "learning rate of the weights (thesis: 0.02, 0.04, 0.08)", OPTIM, metavar="LR"
    )
    momentum: float = _opt(0.9, "SGD momentum", OPTIM, metavar="M")
    nesterov: bool = _opt(False, "Nesterov momentum", OPTIM, flag="--nesterov")
    wd: float = _opt(0.0, "weight decay of the weights", OPTIM, metavar="WD")
    ss_lr_mult: float = _opt(
        0.1, "LR multiplier of the shift/scale parameters (the thesis: 1; see docs/training.md)",
        OPTIM,
        metavar="X",
    )  # fmt: skip
    ss_wd: float = _opt(0.0, "weight decay of the shift/scale parameters", OPTIM, metavar="WD")
    ss_decay_to: str = _opt(
        "identity", "identity (shift->0, scale->1) or zero", OPTIM, metavar="TARGET"
    )
    schedule: str = _opt("constant", f"LR schedule: {_choices(SCHEDULES)}", OPTIM, metavar="NAME")
    step_size: int = _opt(0, "step schedule: epochs per decay (0: a third of the run)", cli=False)
    gamma: float = _opt(0.1, "step schedule: decay factor", cli=False)
    warmup_epochs: float = _opt(0.0, "linear warm-up, in epochs", OPTIM, metavar="EPOCHS")
    ss_warmup_epochs: float = _opt(
        0.0, "linear warm-up of the shift/scale parameters' LR alone (from 0 to LR x "
        "ss-lr-mult), in epochs", OPTIM, metavar="EPOCHS",
    )  # fmt: skip
    seed: int = _opt(0, "seed of the init and the data order", RUN, metavar="N")
    precision: str = _opt("fp32", "fp32 or bf16 (CUDA autocast)", RUN, metavar="NAME")
    compile: bool = _opt(False, "torch.compile the model", RUN, flag="--compile")
    channels_last: bool = _opt(True, "channels_last memory format (CUDA only)", cli=False)
    ema: float = _opt(0.99, "coefficient of the training-loss EMA", RUN, metavar="X")
    ema_bias_correction: bool = _opt(
        False, "divide the loss EMA by 1 - ema^t (Adam's correction: no weight on a start value)",
        RUN, flag="--ema-bias-correction/--no-ema-bias-correction",
    )  # fmt: skip
    device: str = _opt("auto", f"{_choices(DEVICES)}", RUN, metavar="DEVICE")
    probe: bool = _opt(
        False, "log per-site activation stats and gradient norms, once per epoch", RUN,
        flag="--probe",
    )  # fmt: skip
    checkpoint_every: int = _opt(
        0, "steps between mid-epoch checkpoints (0: end of each epoch only)", RUN, metavar="N"
    )
    accum_steps: int = _opt(1, "micro-batches per optimiser step", RUN, metavar="N")
    sync_bn: bool = _opt(
        False, "SyncBatchNorm for the batchnorm variant under DDP", RUN, flag="--sync-bn"
    )
    pretrained: bool = _opt(
        False, "timm/torchvision pretrained weights (downloads)", VARIANT, flag="--pretrained"
    )
    init_from: str | None = _opt(
        None, "the base model's weights from a local .safetensors file or saved folder "
        "(see docs/finetune.md)", VARIANT, metavar="PATH",
    )  # fmt: skip
    train_only: str = _opt(
        "", "train only these parts, a comma list of ss, head, norm, bias (default: all)",
        VARIANT, metavar="PARTS",
    )  # fmt: skip
    placement: str = _opt(
        "activations", "where the shift/scale sites go: activations (the thesis's) or ssf "
        "(after every linear, conv and norm layer but the classifier)", VARIANT, metavar="WHERE",
    )  # fmt: skip
    ssf_init_std: float = _opt(
        0.0, "init of the inserted layers: 0 = identity; else scale ~ N(1, std), "
        "shift ~ N(0, std) as in SSF", VARIANT, metavar="STD",
    )  # fmt: skip
    tensorboard: bool = _opt(
        False, "also write TensorBoard event files (needs tensorboard)", RUN, flag="--tensorboard"
    )
    variant: str = _opt("", "filled in from norm, shift and scale", cli=False)
    tag: str = _opt("", "the recipe case this run belongs to (its name's suffix)", cli=False)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for f in dataclasses.fields(self):  # a recipe or a config.json may hold any JSON
            allowed, value = _TYPES[f.type], getattr(self, f.name)
            if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
                raise TrainError(
                    f"invalid {f.name} {value!r}", hint=f"{f.name} is {_TYPE_WORDS[f.type]}"
                )
        if self.name:
            check_name(self.name, "run name", TrainError)
        for what, value in (("shift", self.shift), ("scale", self.scale)):
            if value not in MODES:
                raise TrainError(
                    f"invalid --{what} {value!r}", hint=f"choose one of {', '.join(MODES)}"
                )
        checks = (
            ("norm", self.norm, NORMS),
            ("schedule", self.schedule, SCHEDULES),
            ("precision", self.precision, PRECISIONS),
            ("ss-decay-to", self.ss_decay_to, DECAY_TARGETS),
            ("device", self.device, DEVICES),
            ("final", self.final, FINALS),
            ("data-order", self.data_order, DATA_ORDERS),
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
        if self.classes < 0:
            raise TrainError(f"--classes must be >= 0, got {self.classes}", hint="0: any")
        if self.val_size < 0:
            raise TrainError(
                f"--val-size must be >= 0, got {self.val_size}", hint="0 turns the split off"
            )
        if self.ss_warmup_epochs < 0:
            raise TrainError(
                f"--ss-warmup-epochs must be >= 0, got {self.ss_warmup_epochs}",
                hint="0 turns the warm-up off",
            )
        if self.ss_lr_mult < 0 or self.ss_wd < 0 or self.wd < 0:
            raise TrainError(
                "learning-rate multipliers and weight decays must be >= 0",
                hint="check --ss-lr-mult, --ss-wd, --wd",
            )
        self._check_finetune()
        self.variant = variant_name(self.norm, self.shift, self.scale)
        if self.tag:
            check_name(self.tag, "case tag", TrainError)
        if not self.name:
            suffix = f"_{self.tag}" if self.tag else ""
            self.name = check_name(
                run_name(self.variant, self.lr, self.seed) + suffix, "run name", TrainError
            )

    def _check_finetune(self) -> None:
        """``train_only``, ``placement``, ``ssf_init_std``, ``init_from`` (docs/finetune.md)."""
        parts = [p.strip() for p in self.train_only.split(",") if p.strip()]
        bad = [p for p in parts if p not in TRAIN_PARTS]
        if bad:
            raise TrainError(
                f"invalid --train-only part(s) {', '.join(bad)}",
                hint=f"a comma list of {', '.join(TRAIN_PARTS)} (empty: everything trains)",
            )
        if self.placement not in PLACEMENTS:
            raise TrainError(
                f"invalid --placement {self.placement!r}",
                hint=f"choose one of {', '.join(PLACEMENTS)}",
            )
        if self.ssf_init_std < 0:
            raise TrainError(
                f"--ssf-init-std must be >= 0, got {self.ssf_init_std}", hint="0 is the identity"
            )
        if self.init_from is not None and self.pretrained:
            raise TrainError(
                "--init-from and --pretrained both give the base weights",
                hint="keep one of them",
            )

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
