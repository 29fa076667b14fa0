"""Training: configs, recipes, the engine and the grid runner."""

from .config import TrainConfig, parse_variant, variant_name
from .engine import Trainer, resume, train
from .recipes import Recipe, load_recipe
from .runner import run_configs, run_recipe
from .variants import build_base, derive

__all__ = [
    "Recipe", "TrainConfig", "Trainer", "build_base", "derive", "load_recipe", "parse_variant",
    "resume", "run_configs", "run_recipe", "train", "variant_name",
]  # fmt: skip
