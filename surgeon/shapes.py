"""Shape propagation without computing: parameter shapes with no real forward pass.

The graph is run by an interpreter that records ``node.meta['tensor_meta']`` for every
node, on meta tensors first (the parameters are swapped for meta copies for the duration,
no data is copied), then on fake tensors (a few ops have no meta kernel), and only then,
for models below ``REAL_FORWARD_MAX_PARAMS`` parameters, on real tensors. Every attempt runs
in eval mode: shapes do not depend on the mode, and the model's buffers are never written.
Torch's own kernels give the shapes; on the fast path the rules of
``surgeon._fast_shapes`` answer for the common ops on meta tensors.
"""

from __future__ import annotations

import functools
import logging
import sys
import warnings
from collections.abc import Callable, Sequence
from contextlib import contextmanager, nullcontext
from types import BuiltinFunctionType

import torch
from torch import fx
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import TensorMetadata, _extract_tensor_metadata

from . import _fast_shapes, _fx_fast
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


def shape_preserving_types() -> tuple[type, ...]:
    """Norm layers whose output has their input's shape and dtype: on meta their result is
    ``empty(input.shape)`` (their meta kernels cost milliseconds per call in Python: a second
    for a model with hundreds of ``BatchNormAct2d``). They call no activation function (only
    activation modules, which are found by class). timm's count once timm is imported."""
    return _shape_preserving_types("timm" in sys.modules)


@functools.cache
def _shape_preserving_types(with_timm: bool) -> tuple[type, ...]:
    types: list[type] = [
        torch.nn.modules.batchnorm._BatchNorm, torch.nn.LayerNorm, torch.nn.GroupNorm,
    ]  # fmt: skip
    if not with_timm:
        return tuple(types)
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


def tensor_metadata(t: torch.Tensor) -> TensorMetadata:
    """What ``torch.fx.passes.shape_prop.ShapeProp`` records for a tensor."""
    return _extract_tensor_metadata(t)


def _any_meta(args) -> bool:
    return any(isinstance(a, torch.Tensor) and a.is_meta for a in args)


class _ShapeRecorder(fx.Interpreter):
    """Run the graph and record the tensor metadata of every node's result.

    RNNs on meta tensors run on zero-filled CPU copies (:func:`_on_cpu_zeros`). With
    ``rules`` (the fast path), functions, methods and modules whose output shape is plain
    (norms, elementwise activations and arithmetic, linear and convolution layers,
    attention, reductions) are not run on meta tensors (``surgeon._fast_shapes``), also
    inside leaf modules and functions FX keeps whole.
    """

    def __init__(self, gm: fx.GraphModule, rules: bool = False) -> None:
        super().__init__(gm)
        self.rules = rules

    def call_function(self, target, args, kwargs):
        if not self.rules or not _any_meta(args):
            return super().call_function(target, args, kwargs)
        if (
            out := _fast_shapes.ruled(_fast_shapes.FUNCTION_RULES, target, args, kwargs)
        ) is not None:
            return out
        if not isinstance(target, BuiltinFunctionType):
            with _fast_shapes.RulesMode():  # a Python function FX kept whole
                return super().call_function(target, args, kwargs)
        return super().call_function(target, args, kwargs)

    def call_method(self, target, args, kwargs):
        if self.rules:
            out = _fast_shapes.ruled(_fast_shapes.METHOD_RULES, target, args, kwargs)
            if out is not None:
                return out
        return super().call_method(target, args, kwargs)

    def call_module(self, target, args, kwargs):
        module = self.fetch_attr(target)
        if not _any_meta(args):
            return super().call_module(target, args, kwargs)
        if isinstance(module, torch.nn.RNNBase):
            return _on_cpu_zeros(module, args, kwargs)
        if not self.rules:
            return super().call_module(target, args, kwargs)
        plain = (
            len(args) == 1
            and not kwargs
            and isinstance(args[0], torch.Tensor)
            and not module._forward_hooks
            and not module._forward_pre_hooks
        )
        if plain:
            out = _fast_shapes.module_rule(module, args[0], shape_preserving_types())
            if out is not None:
                return out
        with _fast_shapes.RulesMode():
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
                return tensor_metadata(obj)
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


Run = Callable[[torch.nn.Module, Sequence[torch.Tensor], str], None]


def _on_meta(module: torch.nn.Module, inputs: Sequence[torch.Tensor], run: Run) -> None:
    from torch.nn.utils.stateless import _reparametrize_module

    tensors = dict(module.named_parameters(remove_duplicate=False))
    tensors.update(module.named_buffers(remove_duplicate=False))
    swap = nullcontext()  # a model built on meta: nothing to swap
    if not all(t.is_meta for t in tensors.values()):
        meta = {k: torch.empty_like(v, device="meta") for k, v in tensors.items()}
        swap = _reparametrize_module(module, meta)
    with _eval_mode(module), swap:
        run(module, [t.to("meta") for t in inputs], "meta")


def _on_fake(module: torch.nn.Module, inputs: Sequence[torch.Tensor], run: Run) -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    log = logging.getLogger("torch._subclasses.fake_tensor")  # logs each failing op
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        with _eval_mode(module), fake_mode:
            run(module, [fake_mode.from_tensor(t) for t in inputs], "fake")
    finally:
        log.setLevel(level)


def _on_real(module: torch.nn.Module, inputs: Sequence[torch.Tensor], run: Run) -> None:
    tensors = list(module.parameters()) + list(module.buffers())
    devices = {t.device for t in tensors}
    device = devices.pop() if len(devices) == 1 else torch.device("cpu")
    with _eval_mode(module):
        run(module, [t.to(device) for t in inputs], "real")


def first_that_runs(
    module: torch.nn.Module,
    inputs: Sequence[torch.Tensor],
    run: Run,
    what: str,
    before_each: Callable[[], None] | None = None,
) -> None:
    """``run(module, inputs, kind)`` on meta tensors, else fake tensors, else (below
    ``REAL_FORWARD_MAX_PARAMS`` parameters) real ones, in eval mode without grad; the last
    failure as one error line ``{what} failed ...``."""
    attempts: list[Callable] = [_on_meta, _on_fake]
    if sum(p.numel() for p in module.parameters()) <= REAL_FORWARD_MAX_PARAMS:
        attempts.append(_on_real)
    errors: list[BaseException] = []
    for attempt in attempts:
        if before_each is not None:
            before_each()
        try:
            attempt(module, inputs, run)
            return
        except Exception as exc:  # an op without a meta/fake kernel, a data-dependent branch
            errors.append(exc)
    exc = errors[-1]
    line = _first_line(exc)
    raise SurgeryError(
        f"{what} failed{' ' if line.startswith('at node') else ': '}{line}",
        hint="check --input-size (C,H,W) matches what the model expects",
    ) from exc


def record_shapes(gm: fx.GraphModule, inputs: Sequence[torch.Tensor], kind: str) -> None:
    """One run of ``gm`` that stores each node's tensor metadata (shape rules on meta)."""
    _ShapeRecorder(gm, rules=kind == "meta" and _fx_fast.on("rules")).run(*inputs)


def propagate(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor]) -> None:
    """Fill ``node.meta['tensor_meta']`` for every node: meta, then fake, then real tensors."""
    first_that_runs(gm, example_inputs, record_shapes, "shape propagation")


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
