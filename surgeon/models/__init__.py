"""Model sources and the built-in models."""

from .builtin import BUILTINS, MLP, AllConvC, he_init
from .sources import SOURCES, build_model, default_input_size, parse_model_args, register_source

__all__ = [
    "BUILTINS", "MLP", "SOURCES", "AllConvC", "build_model", "default_input_size", "he_init",
    "parse_model_args", "register_source",
]  # fmt: skip
