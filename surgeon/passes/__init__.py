"""The passes. Each takes an ``nn.Module`` and returns a new one, records itself in the
model's :class:`surgeon.record.SurgeryRecord`, and registers how :func:`surgeon.load`
replays it.

- :mod:`.shift_scale`: ``insert`` (shift/scale after the input and every non-final
  activation), ``insert_batchnorm``, ``strip``, ``find_sites``;
- :mod:`.replace_norm`: BatchNorm becomes an equal channel shift/scale;
- :mod:`.fold`: shift/scale merged into adjacent layers where exact;
- :mod:`.fuse_relu`: ReLU + shift/scale as one fused module, and back.
"""

from .fold import FoldEntry, FoldReport, fold
from .fuse_relu import fuse_relu, set_fused, unfuse_relu
from .replace_norm import replace_norm
from .shift_scale import find_sites, insert, insert_batchnorm, inserted_modules, strip

__all__ = [
    "FoldEntry", "FoldReport", "find_sites", "fold", "fuse_relu", "insert", "insert_batchnorm",
    "inserted_modules", "replace_norm", "set_fused", "strip", "unfuse_relu",
]  # fmt: skip
