"""Training: configs, recipes, the engine and the grid runner.

The names below are imported on first use, so ``surgeon.train.config`` (what the CLI's
``--help`` reads) costs no torch import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

# public name -> the module that defines it
_EXPORTS = {
    "TrainConfig": "config",
    "parse_variant": "config",
    "variant_name": "config",
    "Trainer": "engine",
    "resume": "engine",
    "train": "engine",
    "Recipe": "recipes",
    "load_recipe": "recipes",
    "run_configs": "runner",
    "run_recipe": "runner",
    "build_base": "variants",
    "derive": "variants",
}

__all__ = [
    "Recipe", "TrainConfig", "Trainer", "build_base", "derive", "load_recipe", "parse_variant",
    "resume", "run_configs", "run_recipe", "train", "variant_name",
]  # fmt: skip


__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)


if TYPE_CHECKING:  # for type checkers and IDEs; never executed
    from .config import TrainConfig, parse_variant, variant_name
    from .engine import Trainer, resume, train
    from .recipes import Recipe, load_recipe
    from .runner import run_configs, run_recipe
    from .variants import build_base, derive
