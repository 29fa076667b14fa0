"""The fast path's shape rules: output shapes of common ops on meta tensors, without the
kernels.

On meta, many of torch's kernels are Python decompositions that cost far more than the
arithmetic of their output shape (0.1-3 ms a call: seconds for a model with thousands of
nodes). A rule gives the output (``empty`` of the right shape and dtype) for the arguments
it is sure of, and None for anything else (odd arguments, arguments the real op rejects),
when the kernel runs as usual. ``surgeon.shapes`` asks them only while
``surgeon._fx_fast.on("rules")``: written for torch 2.14, checked against its CPU kernels
by tests/test_shape_rules.py.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Sequence

import torch


def elementwise_modules() -> frozenset[type]:
    """Module classes (exact types) whose output has their input's shape and dtype (timm's
    activations once timm is imported)."""
    return _elementwise_modules("timm" in sys.modules)


@functools.cache
def _elementwise_modules(with_timm: bool) -> frozenset[type]:
    nn = torch.nn
    types = {
        nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish,
        nn.Hardsigmoid, nn.Mish, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Softplus,
        nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    }  # fmt: skip
    if not with_timm:
        return frozenset(types)
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


def _adaptive_pool(dims: int):
    """``adaptive_avg_pool{dims}d``: the spatial dims become ``output_size`` (None keeps one)."""

    def rule(x, output_size):
        if not x.is_floating_point() or x.dim() not in (dims + 1, dims + 2) or x.numel() == 0:
            return None
        size = (output_size,) * dims if isinstance(output_size, int) else tuple(output_size)
        if len(size) != dims or (dims == 1 and None in size):  # 1d takes no None
            return None
        out = [s if o is None else o for o, s in zip(size, x.shape[-dims:])]
        if any(isinstance(o, bool) or not isinstance(o, int) or o <= 0 for o in out):
            return None
        return _empty(x, (*x.shape[:-dims], *out))

    return rule


def _function_rules() -> dict:
    F = torch.nn.functional
    import operator

    rules = {
        **_activation_rules(F),
        F.layer_norm: _layer_norm, F.group_norm: _group_norm, F.batch_norm: _batch_norm,
        F.normalize: _normalize, F.linear: _linear, F.conv1d: _conv, F.conv2d: _conv, F.conv3d: _conv,
        operator.add: _binary, operator.sub: _binary, operator.mul: _binary,
        operator.truediv: _binary, torch.add: _binary, torch.sub: _binary, torch.mul: _binary,
        F.adaptive_avg_pool1d: _adaptive_pool(1), F.adaptive_avg_pool2d: _adaptive_pool(2),
        F.adaptive_avg_pool3d: _adaptive_pool(3),
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


def module_rule(
    module: torch.nn.Module, x: torch.Tensor, preserving: tuple[type, ...]
) -> torch.Tensor | None:
    """Plain one-tensor calls of modules whose output shape is plain: elementwise modules,
    the ``preserving`` norm classes, ``Linear`` and convolutions."""
    nn = torch.nn
    cls = type(module)
    if cls in elementwise_modules() or isinstance(module, preserving):
        return _empty(x)
    if cls is nn.Linear:
        return apply_rule(_linear, (x, module.weight, module.bias), {})
    if cls in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
        return apply_rule(
            _conv,
            (x, module.weight, module.bias, module.stride, module.padding, module.dilation),
            {"groups": module.groups},
        )
    pools = {nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3}
    if cls in pools:  # their meta kernel imports torch._dynamo (seconds) on its first call
        return apply_rule(_adaptive_pool(pools[cls]), (x, module.output_size), {})
    return None
