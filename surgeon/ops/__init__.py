"""Tensor ops with no dependency on the rest of :mod:`surgeon` (the model layers build on them)."""

from .fused import relu_shift_scale, shift_scale

__all__ = ["relu_shift_scale", "shift_scale"]
