"""Checking that a pass kept the model's function: max |Δoutput| on the same inputs."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


@torch.no_grad()
def compare_outputs(
    base: nn.Module, gm: nn.Module, inputs: tuple[torch.Tensor, ...]
) -> tuple[float, float | None]:
    """``(max |base(x) - gm(x)|, max |base(x)|)`` in fp32 eval mode on ``inputs``, from one
    call of each model (0.0 first means exact identity; the second is None when ``base``
    returns no non-empty tensor)."""
    was = base.training, gm.training
    base.eval()
    gm.eval()
    try:
        a, b = base(*inputs), gm(*inputs)
    finally:
        base.train(was[0])
        gm.train(was[1])
    flat_a, flat_b = flatten_tensors(a), flatten_tensors(b)
    top = max((x.abs().max().item() for x in flat_a if x.numel()), default=None)
    if len(flat_a) != len(flat_b):
        return float("inf"), top
    diffs = [
        (x.float() - y.float()).abs().max().item()
        for x, y in zip(flat_a, flat_b, strict=True)
        if x.numel()
    ]
    return max(diffs, default=0.0), top


def max_abs_diff_at_init(base: nn.Module, gm: nn.Module, inputs: tuple[torch.Tensor, ...]) -> float:
    """max |base(x) - gm(x)| in fp32 eval mode on ``inputs`` (0.0 means exact identity)."""
    return compare_outputs(base, gm, inputs)[0]


def flatten_tensors(out: Any) -> list[torch.Tensor]:
    """The tensors of a model's output: a tensor, or those in a (nested) dict, list or
    tuple (transformers' ``ModelOutput`` is a dict)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in flatten_tensors(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in flatten_tensors(v)]
    return []
