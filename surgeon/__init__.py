"""fx-surgeon: insert learned shift/scale layers into any PyTorch model with torch.fx."""

__version__ = "0.1.0"

from .errors import SurgeonError  # noqa: E402
from .fold import FoldReport, fold  # noqa: E402
from .io import load, save  # noqa: E402
from .layers import ChannelBatchNorm, Scale, Shift, ShiftScale  # noqa: E402
from .models import build_model  # noqa: E402
from .passes import find_sites, insert, insert_batchnorm, inserted_modules, strip  # noqa: E402
from .registry import register_activation, register_leaf_module, register_norm_act  # noqa: E402
from .replace_norm import replace_norm  # noqa: E402
from .sites import Site  # noqa: E402

__all__ = [
    "ChannelBatchNorm", "FoldReport", "Scale", "Shift", "ShiftScale", "Site", "SurgeonError",
    "__version__", "build_model", "find_sites", "fold", "insert", "insert_batchnorm",
    "inserted_modules", "load", "register_activation", "register_leaf_module",
    "register_norm_act", "replace_norm", "save", "strip",
]  # fmt: skip
