"""One base model, one init, every variant by surgery.

The base model is built once from a seed (He init for the built-ins); each variant is a
deep copy of it with BatchNorm and/or shift/scale inserted by the graph passes, so the
weights the variants share are bit-identical at step 0.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import fx, nn

from ..errors import TrainError
from ..models import BUILTINS, build_model
from ..passes import insert, insert_batchnorm
from .config import TrainConfig
from .init_from import load_base_weights


def model_args_for(
    cfg: TrainConfig, num_classes: int, input_size: tuple[int, ...]
) -> dict[str, Any]:
    """The model's constructor arguments: the data's class count, dropout for built-ins."""
    args = dict(cfg.model_args)
    spec = cfg.model
    if spec in BUILTINS or spec.startswith(("timm:", "torchvision:")):
        args.setdefault("num_classes", num_classes)
    if spec == "mlp":
        args.setdefault("input_size", tuple(input_size))
    if cfg.pretrained:
        if spec.startswith("timm:"):
            args["pretrained"] = True
        elif spec.startswith("torchvision:"):
            args["weights"] = "DEFAULT"
        else:
            raise TrainError(
                f"--pretrained applies to timm and torchvision models, not {spec}",
                hint="drop --pretrained",
            )
    if cfg.dropout:
        if spec not in BUILTINS:
            raise TrainError(
                f"--dropout applies to the built-in models, not {spec}",
                hint="set the model's own dropout with --model-arg (e.g. drop_rate=0.5 for timm)",
            )
        args["dropout"] = True
    return args


def build_base(cfg: TrainConfig, num_classes: int, input_size: tuple[int, ...]) -> nn.Module:
    """The base model, initialised from ``cfg.seed`` on the CPU."""
    torch.manual_seed(cfg.seed)
    base = build_model(cfg.model, model_args_for(cfg, num_classes, input_size))
    if cfg.init_from is not None:  # the names loaded and the notes, for the Trainer
        base._surgeon_init_from = load_base_weights(base, cfg.init_from)
    return base


def derive(base: nn.Module, cfg: TrainConfig, input_size: tuple[int, ...]) -> fx.GraphModule:
    """The variant ``cfg`` names, derived from ``base`` (left untouched)."""
    model: nn.Module = copy.deepcopy(base)
    opts = {"include": cfg.include, "exclude": cfg.exclude, "input_size": input_size}
    if cfg.norm == "batchnorm":
        model = insert_batchnorm(model, final=cfg.final, **opts)
    # the plain variant is traced too (shift=scale=none), so every variant is a GraphModule
    if cfg.placement != "activations" or cfg.ssf_init_std:
        return _insert_ssf(model, cfg, opts)
    return insert(model, cfg.shift, cfg.scale, final=cfg.final, **opts)


def _insert_ssf(model: nn.Module, cfg: TrainConfig, opts: dict[str, Any]) -> fx.GraphModule:
    """``insert`` with ``cfg.placement`` and ``cfg.ssf_init_std`` (a random init drawn from
    ``cfg.seed``, apart from the global RNG)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return insert(
            model, cfg.shift, cfg.scale, final=cfg.final, placement=cfg.placement,
            init_std=cfg.ssf_init_std, **opts,
        )  # fmt: skip
