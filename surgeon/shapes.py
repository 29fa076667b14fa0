"""Shape propagation without computing: parameter shapes with no real forward pass.

The graph is run by an interpreter that records ``node.meta['tensor_meta']`` for every
node, on meta tensors first (the parameters are swapped for meta copies for the duration,
no data is copied), then on fake tensors (a few ops have no meta kernel), and only then,
for models below ``REAL_FORWARD_MAX_PARAMS`` parameters, on real tensors. Every attempt runs
in eval mode: shapes do not depend on the mode, and the model's buffers are never written.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Callable, Sequence
from contextlib import contextmanager

import torch
from torch import fx
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from .errors import SurgeryError

REAL_FORWARD_MAX_PARAMS = 50_000_000  # fallback to a real CPU forward only below this size


def example_inputs_for(input_size: Sequence[int], batch: int = 2) -> tuple[torch.Tensor, ...]:
    """One float input of shape ``(batch, *input_size)``, deterministic."""
    g = torch.Generator().manual_seed(0)
    return (torch.randn(batch, *input_size, generator=g),)


class _NodeError(Exception):
    """A failure while running one node, named after the node."""

    def __init__(self, node: fx.Node, exc: BaseException) -> None:
        super().__init__(
            f"at node {node.name!r} ({node.op} {_target_name(node)}): {_first_line(exc)}"
        )
        self.node = node


def _on_cpu_zeros(module: torch.nn.Module, args: tuple, kwargs: dict):
    """Run ``module`` on zero-filled CPU copies of its meta inputs and parameters and return
    meta outputs: the same shapes, far faster for modules whose meta kernels are
    decomposed step by step (an ``nn.LSTM`` over a long sequence: seconds on meta)."""
    from torch.func import functional_call

    def real(t):
        if isinstance(t, torch.Tensor):
            return torch.zeros(t.shape, dtype=t.dtype) if t.is_meta else t
        return t

    tensors = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    with torch.no_grad():
        out = functional_call(
            module,
            {k: real(v) for k, v in tensors.items()},
            map_aggregate(args, real),
            map_aggregate(kwargs, real),
        )
    return map_aggregate(
        out, lambda t: torch.empty_like(t, device="meta") if isinstance(t, torch.Tensor) else t
    )


@functools.cache
def shape_preserving_types() -> tuple[type, ...]:
    """Norm layers whose output has their input's shape and dtype: on meta their result is
    ``empty(input.shape)`` (their meta kernels cost milliseconds per call in Python: a second
    for a model with hundreds of ``BatchNormAct2d``). They call no activation function (only
    activation modules, which are found by class). Built on first use: it imports timm."""
    types: list[type] = [
        torch.nn.modules.batchnorm._BatchNorm, torch.nn.LayerNorm, torch.nn.GroupNorm,
    ]  # fmt: skip
    try:
        from timm.layers import norm_act
    except ImportError:
        return tuple(types)
    for name in dir(norm_act):
        obj = getattr(norm_act, name)
        if (
            isinstance(obj, type)
            and issubclass(obj, torch.nn.Module)
            and obj.__module__ == norm_act.__name__
            and "Norm" in name
        ):
            types.append(obj)
    return tuple(types)


@functools.cache
def elementwise_modules() -> frozenset[type]:
    """Module classes (exact types) whose output has their input's shape and dtype."""
    nn = torch.nn
    types = {
        nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish,
        nn.Hardsigmoid, nn.Mish, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Softplus,
        nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    }  # fmt: skip
    try:
        from timm.layers import activations
    except ImportError:
        return frozenset(types)
    for obj in vars(activations).values():
        if (
            isinstance(obj, type)
            and issubclass(obj, nn.Module)
            and obj.__module__ == activations.__name__
            and "GLU" not in obj.__name__  # gated linear units halve a dim
        ):
            types.add(obj)
    return frozenset(types)


def _norm_functions() -> dict:
    """Normalisation functions -> a check that the real call would not fail; on meta they
    return ``empty(input.shape)`` (timm's LayerNorm subclasses call ``F.layer_norm``, 2-3 ms
    a call on meta)."""
    F = torch.nn.functional
    checks = {
        F.layer_norm: lambda x, shape, *a, **k: (
            tuple(x.shape[x.dim() - len(shape) :]) == tuple(shape)
        ),
        F.group_norm: lambda x, groups, *a, **k: x.dim() >= 2 and x.shape[1] % groups == 0,
    }
    if hasattr(F, "rms_norm"):
        checks[F.rms_norm] = checks[F.layer_norm]
    return checks


_NORM_FUNCTIONS = _norm_functions()


def _empty(x: torch.Tensor, shape: Sequence[int] | None = None) -> torch.Tensor:
    # contiguous: only shapes and dtypes are used, and a later .view() works on it wherever
    # it works on the real output
    return torch.empty(
        tuple(x.shape) if shape is None else tuple(shape), dtype=x.dtype, device="meta"
    )


class _ShapeRecorder(fx.Interpreter):
    """Run the graph and record the tensor metadata of every node's result.

    On meta tensors, modules and functions whose output shape is plain (norms, elementwise
    activations, ``nn.Linear``) are not run: their meta kernels are Python and cost far
    more than the arithmetic of their shape.
    """

    def call_function(self, target, args, kwargs):
        try:
            check = _NORM_FUNCTIONS.get(target)
        except TypeError:  # an unhashable callable
            check = None
        if check is not None and args and isinstance(args[0], torch.Tensor) and args[0].is_meta:
            try:
                ok = check(*args, **kwargs)
            except Exception:  # odd arguments: let the real call decide
                ok = False
            if ok:
                return _empty(args[0])
        return super().call_function(target, args, kwargs)

    def call_module(self, target, args, kwargs):
        module = self.fetch_attr(target)
        if not any(isinstance(a, torch.Tensor) and a.is_meta for a in args):
            return super().call_module(target, args, kwargs)
        if isinstance(module, torch.nn.RNNBase):
            return _on_cpu_zeros(module, args, kwargs)
        plain = (
            len(args) == 1
            and not kwargs
            and isinstance(args[0], torch.Tensor)
            and not module._forward_hooks
            and not module._forward_pre_hooks
        )
        if not plain:
            return super().call_module(target, args, kwargs)
        x = args[0]
        if type(module) in elementwise_modules() or isinstance(module, shape_preserving_types()):
            return _empty(x)
        if (
            type(module) is torch.nn.Linear
            and x.dim() >= 1
            and x.shape[-1] == module.in_features
            and x.dtype == module.weight.dtype
        ):
            return _empty(x, (*x.shape[:-1], module.out_features))
        return super().call_module(target, args, kwargs)

    def run_node(self, n: fx.Node):
        try:
            result = super().run_node(n)
        except Exception as exc:
            raise _NodeError(n, exc) from exc
        found = False

        def meta(obj):
            nonlocal found
            if isinstance(obj, torch.Tensor):
                found = True
                return _extract_tensor_metadata(obj)
            return obj

        tm = map_aggregate(result, meta)
        if found:
            n.meta["tensor_meta"] = tm
        n.meta["type"] = type(result)
        return result


@contextmanager
def _eval_mode(gm: fx.GraphModule):
    was_training = gm.training
    gm.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        gm.train(was_training)


def _on_meta(gm: fx.GraphModule, inputs: Sequence[torch.Tensor]) -> None:
    from torch.nn.utils.stateless import _reparametrize_module

    tensors = dict(gm.named_parameters(remove_duplicate=False))
    tensors.update(gm.named_buffers(remove_duplicate=False))
    meta = {k: torch.empty_like(v, device="meta") for k, v in tensors.items()}
    with _eval_mode(gm), _reparametrize_module(gm, meta):
        _ShapeRecorder(gm).run(*(t.to("meta") for t in inputs))


def _on_fake(gm: fx.GraphModule, inputs: Sequence[torch.Tensor]) -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    log = logging.getLogger("torch._subclasses.fake_tensor")  # logs each failing op
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        with _eval_mode(gm), fake_mode:
            _ShapeRecorder(gm).run(*(fake_mode.from_tensor(t) for t in inputs))
    finally:
        log.setLevel(level)


def _on_real(gm: fx.GraphModule, inputs: Sequence[torch.Tensor]) -> None:
    tensors = list(gm.parameters()) + list(gm.buffers())
    devices = {t.device for t in tensors}
    device = devices.pop() if len(devices) == 1 else torch.device("cpu")
    with _eval_mode(gm):
        _ShapeRecorder(gm).run(*(t.to(device) for t in inputs))


def propagate(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor]) -> None:
    """Fill ``node.meta['tensor_meta']`` for every node: meta, then fake, then real tensors."""
    attempts: list[Callable] = [_on_meta, _on_fake]
    if sum(p.numel() for p in gm.parameters()) <= REAL_FORWARD_MAX_PARAMS:
        attempts.append(_on_real)
    errors: list[BaseException] = []
    for attempt in attempts:
        try:
            attempt(gm, example_inputs)
            return
        except Exception as exc:  # an op without a meta/fake kernel: try the next way
            errors.append(exc)
    exc = errors[-1]
    raise SurgeryError(
        f"shape propagation failed {_first_line(exc)}",
        hint="check --input-size (C,H,W) matches what the model expects",
    ) from exc


def _target_name(node: fx.Node) -> str:
    t = node.target
    return t if isinstance(t, str) else getattr(t, "__name__", repr(t))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def node_shape(node: fx.Node) -> tuple[int, ...] | None:
    tm = node.meta.get("tensor_meta")
    shape = getattr(tm, "shape", None)
    return tuple(int(s) for s in shape) if shape is not None else None


def node_dtype(node: fx.Node) -> torch.dtype | None:
    return getattr(node.meta.get("tensor_meta"), "dtype", None)
