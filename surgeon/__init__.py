"""fx-surgeon: insert learned shift/scale layers into any PyTorch model with torch.fx.

The public names below are imported on first use, so ``import surgeon`` (and the CLI's
``--help``) costs neither torch nor timm until a name that needs them is touched.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._lazy import lazy_exports
from ._version import __version__

# public name -> the module that defines it
_EXPORTS = {
    "SurgeonError": "errors",
    "FoldReport": "passes",
    "fold": "passes",
    "load": "adapters",
    "save": "io",
    "ChannelBatchNorm": "layers",
    "Scale": "layers",
    "Shift": "layers",
    "ShiftScale": "layers",
    "build_model": "models",
    "find_sites": "passes",
    "insert": "passes",
    "insert_batchnorm": "passes",
    "inserted_modules": "passes",
    "strip": "passes",
    "register_activation": "registry",
    "register_leaf_module": "registry",
    "register_norm_act": "registry",
    "replace_norm": "passes",
    "Site": "sites",
}

__all__ = [
    "ChannelBatchNorm", "FoldReport", "Scale", "Shift", "ShiftScale", "Site", "SurgeonError",
    "__version__", "build_model", "find_sites", "fold", "insert", "insert_batchnorm",
    "inserted_modules", "load", "register_activation", "register_leaf_module",
    "register_norm_act", "replace_norm", "save", "strip",
]  # fmt: skip


__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)


if TYPE_CHECKING:  # for type checkers and IDEs; never executed
    from .adapters import load
    from .errors import SurgeonError
    from .io import save
    from .layers import ChannelBatchNorm, Scale, Shift, ShiftScale
    from .models import build_model
    from .passes import (
        FoldReport,
        find_sites,
        fold,
        insert,
        insert_batchnorm,
        inserted_modules,
        replace_norm,
        strip,
    )  # fmt: skip
    from .registry import register_activation, register_leaf_module, register_norm_act
    from .sites import Site
