"""Shape propagation on fake tensors: parameter shapes with no real forward pass."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import fx
from torch.fx.passes.shape_prop import ShapeProp

from .errors import SurgeryError

REAL_FORWARD_MAX_PARAMS = 50_000_000  # fallback to a real CPU forward only below this size


def example_inputs_for(input_size: Sequence[int], batch: int = 2) -> tuple[torch.Tensor, ...]:
    """One float input of shape ``(batch, *input_size)``, deterministic."""
    g = torch.Generator().manual_seed(0)
    return (torch.randn(batch, *input_size, generator=g),)


def propagate(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor]) -> None:
    """Fill ``node.meta['tensor_meta']`` for every node, on fake tensors when possible."""
    try:
        from torch._subclasses.fake_tensor import FakeTensorMode

        fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ShapeProp(gm, fake_mode=fake_mode).propagate(*example_inputs)
        return
    except Exception as fake_exc:  # fake tensors don't cover every op; try a real forward
        n_params = sum(p.numel() for p in gm.parameters())
        if n_params > REAL_FORWARD_MAX_PARAMS:
            raise SurgeryError(
                f"shape propagation failed on fake tensors: {_first_line(fake_exc)}",
                hint="check --input-size (C,H,W) matches what the model expects",
            ) from fake_exc
    params = [p for p in gm.parameters()] + [b for b in gm.buffers()]
    devices = {t.device for t in params if t.device.type != "meta"}
    device = devices.pop() if len(devices) == 1 else torch.device("cpu")
    was_training = gm.training
    gm.eval()
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*(t.to(device) for t in example_inputs))
    except Exception as exc:
        raise SurgeryError(
            f"shape propagation failed: {_first_line(exc)}",
            hint="check --input-size (C,H,W) matches what the model expects",
        ) from exc
    finally:
        gm.train(was_training)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def node_shape(node: fx.Node) -> tuple[int, ...] | None:
    tm = node.meta.get("tensor_meta")
    shape = getattr(tm, "shape", None)
    return tuple(int(s) for s in shape) if shape is not None else None


def node_dtype(node: fx.Node) -> torch.dtype | None:
    return getattr(node.meta.get("tensor_meta"), "dtype", None)
