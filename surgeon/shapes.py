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
from contextlib import contextmanager, nullcontext
from types import BuiltinFunctionType

import torch
from torch import fx
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import TensorMetadata, _extract_tensor_metadata

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


def _empty(x: torch.Tensor, shape: Sequence[int] | None = None, dtype=None) -> torch.Tensor:
    # contiguous: only shapes and dtypes are used, and a later .view() works on it wherever
    # it works on the real output
    return torch.empty(
        tuple(x.shape) if shape is None else tuple(shape),
        dtype=x.dtype if dtype is None else dtype,
        device="meta",
    )


# ------------------------------------------------------------------ shape rules
# On meta, many kernels are Python decompositions that cost far more than the arithmetic
# of their output shape (0.1-3 ms a call: seconds for a model with thousands of nodes). A
# rule gives the output (``empty`` of the right shape and dtype) for the arguments it is
# sure of, and None for anything else (odd arguments, arguments the real op rejects), when
# the op runs as usual. tests/test_shape_rules.py checks every rule against the kernels.


def _layer_norm(x, normalized_shape, weight=None, bias=None, *a, **k):
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if not shape or tuple(x.shape[x.dim() - len(shape) :]) != shape or x.dim() < len(shape):
        return None
    for t in (weight, bias):
        if t is not None and (tuple(t.shape) != shape or t.dtype != x.dtype):
            return None
    return _empty(x)


def _group_norm(x, num_groups, weight=None, bias=None, eps=1e-5):
    if x.dim() < 2 or num_groups <= 0 or x.shape[1] % num_groups or x.numel() == 0:
        return None
    if x.numel() // num_groups <= 1:  # one value per group: an error
        return None
    for t in (weight, bias):
        if t is not None and (tuple(t.shape) != (x.shape[1],) or t.dtype != x.dtype):
            return None
    return _empty(x)


def _batch_norm(
    x, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5
):
    if x.dim() < 2 or not x.dtype.is_floating_point:
        return None
    c = x.shape[1]
    for t in (running_mean, running_var, weight, bias):
        if t is not None and (tuple(t.shape) != (c,) or t.dtype != x.dtype):
            return None
    if training:  # batch statistics need more than one value per channel
        if x.numel() // max(c, 1) <= 1:
            return None
    elif running_mean is None or running_var is None:
        return None
    return _empty(x)


def _normalize(x, p=2.0, dim=1, eps=1e-12, out=None):
    if out is not None or not x.dtype.is_floating_point or not -x.dim() <= dim < x.dim():
        return None
    return _empty(x)


def _sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    if enable_gqa or not (q.dim() == k.dim() == v.dim() >= 2):
        return None
    if not q.dtype.is_floating_point or not q.dtype == k.dtype == v.dtype:
        return None
    if q.shape[:-2] != k.shape[:-2] or k.shape[:-2] != v.shape[:-2]:
        return None
    if q.shape[-1] != k.shape[-1] or k.shape[-2] != v.shape[-2]:
        return None
    if attn_mask is not None:
        scores = (*q.shape[:-1], k.shape[-2])
        if is_causal or not isinstance(attn_mask, torch.Tensor) or not attn_mask.is_meta:
            return None
        if attn_mask.dtype not in (torch.bool, q.dtype):
            return None
        if torch.broadcast_shapes(attn_mask.shape, scores) != scores:
            return None
    return _empty(q, (*q.shape[:-1], v.shape[-1]))


def _binary(a, b, *, alpha=None):
    """``a + b`` and the like: broadcast shape, promoted dtype (floating results only)."""
    if (
        isinstance(a, bool)
        or isinstance(b, bool)
        or torch.bool in (getattr(a, "dtype", None), getattr(b, "dtype", None))
    ):
        return None  # bool arithmetic has its own rules (and no subtraction)
    if not isinstance(a, torch.Tensor):
        a, b = b, a
    if not isinstance(a, torch.Tensor) or not a.is_meta:
        return None
    if isinstance(b, torch.Tensor):
        if not b.is_meta:
            return None
        shape = torch.broadcast_shapes(a.shape, b.shape)
    elif type(b) in (int, float, bool):
        shape = a.shape
    else:
        return None
    dtype = torch.result_type(a, b)
    if not dtype.is_floating_point:
        return None  # integer division, integer overflow rules: let the kernel decide
    return _empty(a, shape, dtype)


def _conv_shape(x, w, bias, stride, padding, dilation, groups) -> tuple[int, ...] | None:
    n = w.dim() - 2
    if n < 1 or x.dim() != n + 2 or groups <= 0:
        return None
    if x.shape[1] != w.shape[1] * groups or w.shape[0] % groups:
        return None
    if not x.dtype.is_floating_point or x.dtype != w.dtype:
        return None
    if bias is not None and (tuple(bias.shape) != (w.shape[0],) or bias.dtype != x.dtype):
        return None

    def per_dim(v):
        v = (v,) * n if isinstance(v, int) else tuple(v)
        return v if len(v) == n and all(isinstance(i, int) for i in v) else None

    stride, dilation = per_dim(stride), per_dim(dilation)
    if stride is None or dilation is None or min(stride) < 1 or min(dilation) < 1:
        return None
    if padding == "same":
        if any(s != 1 for s in stride):
            return None
        return (x.shape[0], w.shape[0], *x.shape[2:])
    padding = per_dim(0 if padding == "valid" else padding)
    if padding is None or min(padding) < 0:
        return None
    out = []
    for size, k, s, p, d in zip(x.shape[2:], w.shape[2:], stride, padding, dilation, strict=True):
        span = size + 2 * p - d * (k - 1)
        if span < 1:
            return None
        out.append((span - 1) // s + 1)
    return (x.shape[0], w.shape[0], *out)


def _conv(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    shape = _conv_shape(x, weight, bias, stride, padding, dilation, groups)
    return None if shape is None else _empty(x, shape)


def _reduce(x, dim=None, keepdim=False, *, dtype=None):
    """``x.mean(dim)`` / ``x.sum(dim)`` of a floating tensor."""
    if dtype is not None or not x.dtype.is_floating_point or dim is None:
        return None
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    if not dims or not all(isinstance(d, int) for d in dims) or x.dim() == 0:
        return None
    if any(not -x.dim() <= d < x.dim() for d in dims):
        return None
    dims = {d % x.dim() for d in dims}
    if len(dims) != len(tuple(dim) if not isinstance(dim, int) else (dim,)):
        return None  # a repeated dim: an error
    if keepdim:
        shape = [1 if i in dims else s for i, s in enumerate(x.shape)]
    else:
        shape = [s for i, s in enumerate(x.shape) if i not in dims]
    return _empty(x, shape)


def _linear(x, weight, bias=None):
    if weight.dim() != 2 or x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        return None
    if not x.dtype.is_floating_point or x.dtype != weight.dtype:
        return None
    if bias is not None and (tuple(bias.shape) != (weight.shape[0],) or bias.dtype != x.dtype):
        return None
    return _empty(x, (*x.shape[:-1], weight.shape[0]))


def _number(v) -> bool:
    return type(v) in (int, float, bool)


def _activation(*extra: str, inplace: bool = True, check=None):
    """A rule for an elementwise activation ``f(x, <extra numbers>...[, inplace])``."""
    allowed = {*extra, "inplace"} if inplace else set(extra)

    def rule(x, *args, **kwargs):
        named = dict(zip(extra, args, strict=False))
        if len(args) > len(allowed) or set(named) & set(kwargs):
            return None
        if len(args) == len(extra) + 1:
            kwargs = {**kwargs, "inplace": args[-1]}
        named.update(kwargs)
        if set(named) - allowed or not x.dtype.is_floating_point:
            return None
        if not all(_number(v) for k, v in named.items() if k in extra):
            return None
        if check is not None and not check(**named):
            return None
        return _empty(x)

    return rule


def _gelu(x, *, approximate="none"):
    ok = x.dtype.is_floating_point and approximate in ("none", "tanh")
    return _empty(x) if ok else None


def _softmax(x, dim=None, _stacklevel=3, dtype=None):
    if dtype is not None or type(dim) is not int or not x.dtype.is_floating_point:
        return None
    return _empty(x) if -max(x.dim(), 1) <= dim < max(x.dim(), 1) else None


def _dropout(x, p=0.5, training=True, inplace=False):
    if not _number(p) or not 0.0 <= p <= 1.0 or not x.dtype.is_floating_point:
        return None
    return _empty(x)


def _activation_rules(F) -> dict:
    plain, only_x = _activation(), _activation(inplace=False)
    rules = {
        F.relu: plain, F.relu6: plain, F.silu: plain, F.mish: plain, F.hardswish: plain,
        F.hardsigmoid: plain, F.selu: plain, F.sigmoid: only_x, F.tanh: only_x,
        torch.relu: only_x, torch.sigmoid: only_x, torch.tanh: only_x, F.gelu: _gelu,
        F.leaky_relu: _activation("negative_slope"), F.elu: _activation("alpha"),
        F.celu: _activation("alpha"), F.softplus: _activation("beta", "threshold", inplace=False),
        F.hardtanh: _activation(
            "min_val", "max_val", check=lambda min_val=-1.0, max_val=1.0, **_: min_val <= max_val
        ),
        F.softmax: _softmax, torch.softmax: _softmax, F.dropout: _dropout,
    }  # fmt: skip
    return rules


def _function_rules() -> dict:
    F = torch.nn.functional
    import operator

    rules = {
        **_activation_rules(F),
        F.layer_norm: _layer_norm, F.group_norm: _group_norm, F.batch_norm: _batch_norm,
        F.normalize: _normalize, F.linear: _linear, F.conv1d: _conv, F.conv2d: _conv, F.conv3d: _conv,
        operator.add: _binary, operator.sub: _binary, operator.mul: _binary,
        operator.truediv: _binary, torch.add: _binary, torch.sub: _binary, torch.mul: _binary,
    }  # fmt: skip
    if hasattr(F, "rms_norm"):
        rules[F.rms_norm] = _layer_norm
    if hasattr(F, "scaled_dot_product_attention"):
        rules[F.scaled_dot_product_attention] = _sdpa
    return rules


FUNCTION_RULES = _function_rules()
METHOD_RULES = {
    "mean": _reduce, "sum": _reduce, "softmax": _softmax, "relu": _activation(inplace=False),
    "sigmoid": _activation(inplace=False), "tanh": _activation(inplace=False),
}  # fmt: skip
# the same rules as torch functions see them (a Tensor method is its function there)
_TORCH_FUNCTION_RULES = {
    **FUNCTION_RULES,
    **{getattr(torch.Tensor, name): r for name, r in METHOD_RULES.items()},
    **{getattr(torch.Tensor, f"__{op}__"): _binary for op in (
        "add", "radd", "sub", "rsub", "mul", "rmul", "truediv", "rtruediv")},
    **{getattr(torch.Tensor, op): _binary for op in ("add", "sub", "mul", "div")},
}  # fmt: skip


class RulesMode(torch.overrides.TorchFunctionMode):
    """Apply the shape rules to the torch calls inside code that runs as one node (leaf
    modules such as timm's ``ScaledStdConv2dSame``, functions FX keeps whole)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = ruled(_TORCH_FUNCTION_RULES, func, args, kwargs)
        return out if out is not None else func(*args, **kwargs)


def ruled(rules: dict, func, args, kwargs) -> torch.Tensor | None:
    """The output the rule of ``func`` in ``rules`` gives, or None (no rule, or it declines)."""
    try:
        rule = rules.get(func)
    except TypeError:  # an unhashable callable
        return None
    return None if rule is None else apply_rule(rule, args, kwargs)


def apply_rule(rule, args, kwargs) -> torch.Tensor | None:
    """The rule's output for meta arguments, or None (not meta, or the rule declines)."""
    if not args or not any(isinstance(a, torch.Tensor) and a.is_meta for a in args[:2]):
        return None
    if any(isinstance(a, torch.Tensor) and not a.is_meta for a in (*args, *kwargs.values())):
        return None
    try:
        return rule(*args, **kwargs)
    except Exception:  # odd arguments: the kernel decides
        return None


def _module_rule(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """Plain one-tensor calls of modules whose output shape is plain."""
    nn = torch.nn
    cls = type(module)
    if cls in elementwise_modules() or isinstance(module, shape_preserving_types()):
        return _empty(x)
    if cls is nn.Linear:
        return apply_rule(_linear, (x, module.weight, module.bias), {})
    if cls in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
        return apply_rule(
            _conv,
            (x, module.weight, module.bias, module.stride, module.padding, module.dilation),
            {"groups": module.groups},
        )
    return None


_MEMORY_FORMATS = {4: torch.channels_last, 5: torch.channels_last_3d}


def tensor_metadata(t: torch.Tensor) -> TensorMetadata:
    """``torch.fx.passes.shape_prop._extract_tensor_metadata`` for plain dense tensors,
    asking the tensor for its memory format (fx's version decides it in Python, a tenth
    of shape propagation)."""
    if (
        type(t) not in (torch.Tensor, torch.nn.Parameter)
        or t.is_quantized
        or t.layout != torch.strided
    ):
        return _extract_tensor_metadata(t)
    fmt = None
    if t.is_contiguous():
        fmt = torch.contiguous_format
    elif t.dim() in _MEMORY_FORMATS and t.is_contiguous(memory_format=_MEMORY_FORMATS[t.dim()]):
        fmt = _MEMORY_FORMATS[t.dim()]
    return TensorMetadata(t.shape, t.dtype, t.requires_grad, t.stride(), fmt, False, {})


def _any_meta(args) -> bool:
    return any(isinstance(a, torch.Tensor) and a.is_meta for a in args)


class _ShapeRecorder(fx.Interpreter):
    """Run the graph and record the tensor metadata of every node's result.

    On meta tensors, modules, functions and methods whose output shape is plain (norms,
    elementwise activations and arithmetic, linear and convolution layers, attention,
    reductions) are not run: see the shape rules above.
    """

    def call_function(self, target, args, kwargs):
        if (out := ruled(FUNCTION_RULES, target, args, kwargs)) is not None:
            return out
        if not isinstance(target, BuiltinFunctionType) and _any_meta(args):
            with RulesMode():  # a Python function FX kept whole
                return super().call_function(target, args, kwargs)
        return super().call_function(target, args, kwargs)

    def call_method(self, target, args, kwargs):
        if (out := ruled(METHOD_RULES, target, args, kwargs)) is not None:
            return out
        return super().call_method(target, args, kwargs)

    def call_module(self, target, args, kwargs):
        module = self.fetch_attr(target)
        if not _any_meta(args):
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
        if plain and (out := _module_rule(module, args[0])) is not None:
            return out
        with RulesMode():
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


def _on_meta(gm: fx.GraphModule, inputs: Sequence[torch.Tensor]) -> None:
    from torch.nn.utils.stateless import _reparametrize_module

    tensors = dict(gm.named_parameters(remove_duplicate=False))
    tensors.update(gm.named_buffers(remove_duplicate=False))
    swap = nullcontext()  # a model built on meta: nothing to swap
    if not all(t.is_meta for t in tensors.values()):
        meta = {k: torch.empty_like(v, device="meta") for k, v in tensors.items()}
        swap = _reparametrize_module(gm, meta)
    with _eval_mode(gm), swap:
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
