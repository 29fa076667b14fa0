"""The fast path's shape rules (surgeon._fast_shapes) against the kernels they stand for.

For random arguments a rule either declines (None) or gives exactly the shape and dtype
the real CPU kernel gives; wherever the kernel raises, the rule declines. Each rule must
also accept the plain cases it exists for (a rule that always declines would pass the
first check)."""

from __future__ import annotations

import operator
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from surgeon import _fast_shapes as rules
from surgeon import shapes

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.int64, torch.bool]
sizes = st.lists(st.integers(1, 3), min_size=0, max_size=4)


def _tensor(shape, dtype=torch.float32):
    if dtype == torch.bool:
        return torch.rand(shape) > 0.5
    if not dtype.is_floating_point:
        return torch.randint(1, 5, shape, dtype=dtype)
    return torch.randn(shape).to(dtype)


def _meta(obj):
    if isinstance(obj, torch.Tensor):
        return obj.to("meta")
    if isinstance(obj, (list, tuple)):
        return type(obj)(_meta(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _meta(v) for k, v in obj.items()}
    return obj


def check(rule, fn, args, kwargs=None):
    """The rule on meta copies agrees with ``fn`` on the real arguments; return whether
    the rule gave an answer."""
    kwargs = kwargs or {}
    out = rules.apply_rule(rule, _meta(args), _meta(kwargs))
    try:
        real = fn(*args, **kwargs)
    except Exception:
        assert out is None, "the kernel raises but the rule gave a result"
        return False
    if out is None:
        return False
    assert out.is_meta
    assert (tuple(out.shape), out.dtype) == (tuple(real.shape), real.dtype)
    return True


def _broadcastable(draw, shape):
    """A shape that usually broadcasts with ``shape`` (and sometimes does not)."""
    other = [draw(st.sampled_from([s, 1, s + 1])) for s in shape]
    return other[draw(st.integers(0, len(other))) :]


BINARY = [operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub]


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_binary_ops(data):
    fn = data.draw(st.sampled_from(BINARY))
    shape = data.draw(sizes)
    a = _tensor(shape, data.draw(st.sampled_from(DTYPES)))
    if data.draw(st.booleans()):
        b = _tensor(_broadcastable(data.draw, shape), data.draw(st.sampled_from(DTYPES)))
    else:
        b = data.draw(st.sampled_from([2, 0.5, True]))
    args = (a, b) if data.draw(st.booleans()) else (b, a)
    check(rules.FUNCTION_RULES[fn], fn, args)


def test_binary_ops_take_the_plain_cases():
    x, y = torch.randn(2, 3, 4), torch.randn(3, 1)
    for fn in BINARY:
        assert check(rules.FUNCTION_RULES[fn], fn, (x, y))
        assert check(rules.FUNCTION_RULES[fn], fn, (2.0, x))
    assert check(rules.FUNCTION_RULES[operator.mul], operator.mul, (x, y.half()))
    assert not check(rules.FUNCTION_RULES[operator.truediv], operator.truediv, (x.long(), 2))


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_convolutions(data):
    n = data.draw(st.integers(1, 3))
    groups = data.draw(st.sampled_from([1, 2]))
    cin = groups * data.draw(st.integers(1, 2)) + data.draw(st.sampled_from([0, 0, 1]))
    cout = groups * data.draw(st.integers(1, 2))
    k = tuple(data.draw(st.integers(1, 3)) for _ in range(n))
    spatial = [data.draw(st.integers(1, 6)) for _ in range(n)]
    batched = data.draw(st.booleans())
    x = _tensor(([2] if batched else []) + [cin] + spatial)
    w = _tensor([cout, max(cin // groups, 1), *k])
    bias = _tensor([cout]) if data.draw(st.booleans()) else None
    stride = data.draw(st.sampled_from([1, 2, (1,) * n, tuple(range(1, n + 1))]))
    padding = data.draw(st.sampled_from([0, 1, "same", "valid", (1,) * n, (0, 2, 1)[:n]]))
    dilation = data.draw(st.sampled_from([1, 2]))
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[n]
    check(rules.FUNCTION_RULES[conv], conv, (x, w, bias, stride, padding, dilation, groups))


def test_convolution_modules_take_the_plain_cases():
    for conv in (
        torch.nn.Conv1d(4, 6, 3, padding=1),
        torch.nn.Conv2d(4, 6, (3, 1), stride=2, dilation=(1, 2), groups=2),
        torch.nn.Conv2d(4, 4, 3, padding="same", padding_mode="reflect"),
        torch.nn.Conv3d(4, 2, 2, bias=False),
    ):
        x = torch.randn(2, 4, *[7] * (conv.weight.dim() - 2))
        out = rules.module_rule(conv.to("meta"), x.to("meta"), shapes.shape_preserving_types())
        real = conv.to_empty(device="cpu")(x)
        assert out is not None and tuple(out.shape) == tuple(real.shape)


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_linear(data):
    x = _tensor(data.draw(st.lists(st.integers(1, 3), min_size=1, max_size=3)))
    out_f = data.draw(st.integers(1, 3))
    w = _tensor([out_f, data.draw(st.sampled_from([x.shape[-1], x.shape[-1] + 1]))])
    bias = (
        _tensor([data.draw(st.sampled_from([out_f, out_f + 1]))])
        if data.draw(st.booleans())
        else None
    )
    check(rules.FUNCTION_RULES[F.linear], F.linear, (x, w, bias))
    assert check(rules.FUNCTION_RULES[F.linear], F.linear, (torch.randn(2, 5), torch.randn(3, 5)))


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_norms(data):
    shape = data.draw(st.lists(st.integers(1, 4), min_size=1, max_size=4))
    x = _tensor(shape, data.draw(st.sampled_from([torch.float32, torch.float64])))
    c = shape[1] if len(shape) > 1 else shape[0]
    affine = [_tensor([data.draw(st.sampled_from([c, c + 1]))]) for _ in range(2)]
    weight, bias = affine if data.draw(st.booleans()) else [None, None]
    kind = data.draw(st.sampled_from(["layer", "rms", "group", "batch", "normalize"]))
    if kind in ("layer", "rms"):
        k = data.draw(st.integers(1, len(shape)))
        norm = list(shape[-k:]) if data.draw(st.booleans()) else [shape[-1] + 1]
        w = _tensor(norm) if data.draw(st.booleans()) else None
        fn = F.layer_norm if kind == "layer" else F.rms_norm
        check(rules.FUNCTION_RULES[fn], fn, (x, norm, w))
    elif kind == "group":
        groups = data.draw(st.integers(1, 4))
        check(rules.FUNCTION_RULES[F.group_norm], F.group_norm, (x, groups, weight, bias))
    elif kind == "batch":
        training = data.draw(st.booleans())
        stats = [_tensor([c]), _tensor([c]).abs()] if data.draw(st.booleans()) else [None, None]
        check(rules.FUNCTION_RULES[F.batch_norm], F.batch_norm, (x, *stats, weight, bias, training))
    else:
        dim = data.draw(st.integers(-5, 4))
        check(rules.FUNCTION_RULES[F.normalize], F.normalize, (x,), {"dim": dim})


def test_norms_take_the_plain_cases():
    x = torch.randn(2, 4, 3, 3)
    table = rules.FUNCTION_RULES
    assert check(table[F.layer_norm], F.layer_norm, (x, [3, 3]))
    assert check(table[F.rms_norm], F.rms_norm, (x, [3], torch.ones(3)))
    assert check(table[F.group_norm], F.group_norm, (x, 2, torch.ones(4), torch.zeros(4)))
    stats = (torch.zeros(4), torch.ones(4))
    assert check(table[F.batch_norm], F.batch_norm, (x, *stats))
    w = torch.randn(1, 4, 27)  # timm's ScaledStdConv2d standardises its weight this way
    assert check(table[F.batch_norm], F.batch_norm, (w, None, None, torch.ones(4), None, True))
    assert check(table[F.normalize], F.normalize, (x,), {"dim": -1})


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_attention(data):
    batch = data.draw(st.lists(st.integers(1, 2), min_size=0, max_size=2))
    L, S, E, Ev = (data.draw(st.integers(1, 4)) for _ in range(4))
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64]))
    q = _tensor([*batch, L, E], dtype)
    k = _tensor([*batch, S, data.draw(st.sampled_from([E, E + 1]))], dtype)
    v = _tensor([*batch, data.draw(st.sampled_from([S, S + 1])), Ev], dtype)
    kwargs = {"is_causal": data.draw(st.booleans())}
    mask = data.draw(st.sampled_from(["none", "bool", "float", "bad"]))
    if mask == "bool":
        kwargs["attn_mask"] = torch.rand(L, S) > 0.3
    elif mask == "float":
        kwargs["attn_mask"] = _tensor([1] * len(batch) + [L, S], dtype)
    elif mask == "bad":
        kwargs["attn_mask"] = _tensor([L + 1, S], dtype)
    sdpa = F.scaled_dot_product_attention
    check(rules.FUNCTION_RULES[sdpa], sdpa, (q, k, v), kwargs)


def test_attention_takes_the_plain_cases():
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 4)
    sdpa = F.scaled_dot_product_attention
    assert check(rules.FUNCTION_RULES[sdpa], sdpa, (q, k, v))
    assert check(rules.FUNCTION_RULES[sdpa], sdpa, (q, k, v), {"attn_mask": torch.zeros(5, 7)})


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_reductions(data):
    shape = data.draw(st.lists(st.integers(1, 3), min_size=0, max_size=4))
    x = _tensor(shape, data.draw(st.sampled_from([torch.float32, torch.int64])))
    dims = data.draw(st.lists(st.integers(-5, 4), min_size=1, max_size=3))
    dim = dims[0] if len(dims) == 1 and data.draw(st.booleans()) else tuple(dims)
    keepdim = data.draw(st.booleans())
    for name in ("mean", "sum"):
        check(rules.METHOD_RULES[name], getattr(torch.Tensor, name), (x, dim, keepdim))


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_adaptive_average_pooling(data):
    dims = data.draw(st.integers(1, 3))
    fn = getattr(F, f"adaptive_avg_pool{dims}d")
    shape = data.draw(st.lists(st.integers(1, 4), min_size=dims, max_size=dims + 2))
    x = _tensor(shape, data.draw(st.sampled_from(DTYPES)))
    one = st.one_of(st.integers(1, 5), st.none())
    size = data.draw(
        st.one_of(st.integers(1, 5), st.tuples(*[one] * dims), st.lists(one, max_size=4))
    )
    check(rules.FUNCTION_RULES[fn], fn, (x, size))


def test_adaptive_average_pooling_takes_the_plain_cases():
    x = torch.randn(2, 8, 5, 7)
    assert check(rules.FUNCTION_RULES[F.adaptive_avg_pool2d], F.adaptive_avg_pool2d, (x, 1))
    assert check(rules.FUNCTION_RULES[F.adaptive_avg_pool2d], F.adaptive_avg_pool2d, (x, (3, None)))
    out = rules.module_rule(torch.nn.AdaptiveAvgPool2d((1, 1)), x.to("meta"), ())
    assert out is not None and tuple(out.shape) == (2, 8, 1, 1)


@pytest.mark.parametrize("name", ["mean", "sum"])
def test_reductions_take_the_plain_cases(name):
    x, fn = torch.randn(2, 4, 3, 3), getattr(torch.Tensor, name)
    assert check(rules.METHOD_RULES[name], fn, (x, (2, 3), True))
    assert check(rules.METHOD_RULES[name], fn, (x, -1))


ACTIVATIONS = [
    (F.relu, []), (F.relu6, []), (F.silu, []), (F.mish, []), (F.hardswish, []),
    (F.hardsigmoid, []), (F.selu, []), (F.sigmoid, []), (F.tanh, []), (torch.relu, []),
    (torch.sigmoid, []), (torch.tanh, []), (F.gelu, ["approximate"]),
    (F.leaky_relu, ["negative_slope"]), (F.elu, ["alpha"]), (F.celu, ["alpha"]),
    (F.softplus, ["beta", "threshold"]), (F.hardtanh, ["min_val", "max_val"]),
    (F.softmax, ["dim"]), (torch.softmax, ["dim"]), (F.dropout, ["p", "training"]),
]  # fmt: skip
VALUES = {
    "approximate": ["none", "tanh", "bad"], "negative_slope": [0.1, 2], "alpha": [1.0, 0.5],
    "beta": [1.0, 2], "threshold": [20.0], "min_val": [-1.0, 2.0], "max_val": [1.0, 0.0],
    "dim": [0, -1, 3, -4, None], "p": [0.0, 0.5, 1.5], "training": [True, False],
}  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_activations(data):
    fn, names = data.draw(st.sampled_from(ACTIVATIONS))
    shape = data.draw(st.lists(st.integers(1, 3), min_size=0, max_size=3))
    x = _tensor(shape, data.draw(st.sampled_from([torch.float32, torch.float64, torch.int64])))
    kwargs = {n: data.draw(st.sampled_from(VALUES[n])) for n in names if data.draw(st.booleans())}
    if data.draw(st.booleans()):  # whether or not the function takes it
        kwargs["inplace"] = data.draw(st.booleans())
    positional = data.draw(st.booleans()) and list(kwargs) == [*names, "inplace"][: len(kwargs)]
    args = (x, *kwargs.values()) if positional else (x,)
    check(rules.FUNCTION_RULES[fn], fn, args, {} if positional else kwargs)


def test_activations_take_the_plain_cases():
    x = torch.randn(2, 3)
    for fn, names in ACTIVATIONS:
        kwargs = {"dim": -1} if "dim" in names else {}
        assert check(rules.FUNCTION_RULES[fn], fn, (x,), kwargs), fn
    assert check(rules.FUNCTION_RULES[F.relu], F.relu, (x,), {"inplace": True})
    assert check(rules.FUNCTION_RULES[F.leaky_relu], F.leaky_relu, (x, 0.2, True))


def test_rules_apply_inside_leaf_modules(monkeypatch, fast):
    """timm's ScaledStdConv2dSame is a leaf: its F.batch_norm (weight standardisation),
    padding and F.conv2d run under the rules, with the shapes of a real forward."""
    from timm.layers import ScaledStdConv2dSame

    from surgeon import tracing

    model = torch.nn.Sequential(
        ScaledStdConv2dSame(3, 8, 3, stride=2, padding="same"), torch.nn.GELU()
    ).eval()
    real = tracing.trace(model)
    shapes._on_real(real, (torch.randn(2, 3, 9, 7),), shapes.record_shapes)
    meta = tracing.trace(model.to("meta"))
    seen = []
    rule = rules._TORCH_FUNCTION_RULES[F.batch_norm]
    monkeypatch.setitem(
        rules._TORCH_FUNCTION_RULES, F.batch_norm, lambda *a, **k: seen.append(1) or rule(*a, **k)
    )
    shapes._on_meta(meta, (torch.randn(2, 3, 9, 7),), shapes.record_shapes)
    assert seen == [1]
    got = [shapes.node_shape(n) for n in meta.graph.nodes]
    assert got == [shapes.node_shape(n) for n in real.graph.nodes]
    assert got[1] == (2, 8, 5, 4)


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_rules_mode_takes_operators_and_methods(data):
    """Inside leaves the rules see ``a * b`` as Tensor.__mul__ and ``a.mul(b)`` as
    Tensor.mul: the same shapes and dtypes as the kernels, or the kernel's error."""
    forms = {
        "a+b": lambda a, b: a + b, "b-a": lambda a, b: b - a, "a*b": lambda a, b: a * b,
        "b/a": lambda a, b: b / a, "a.sub(b)": lambda a, b: a.sub(b),
        "a.div(b)": lambda a, b: a.div(b), "floor": lambda a, b: a.div(b, rounding_mode="floor"),
        "2-a": lambda a, b: 2 - a, "a.mean": lambda a, b: a.mean(-1),
    }  # fmt: skip
    form = forms[data.draw(st.sampled_from(sorted(forms)))]
    shape = data.draw(sizes)
    a = _tensor(shape, data.draw(st.sampled_from(DTYPES)))
    b = _tensor(_broadcastable(data.draw, shape), data.draw(st.sampled_from(DTYPES)))
    answers = []
    apply = rules.apply_rule

    def spy(*args):
        out = apply(*args)
        answers.append(out is not None)
        return out

    with mock.patch.object(rules, "apply_rule", spy), rules.RulesMode():
        try:
            out = form(a.to("meta"), b.to("meta"))
        except Exception:
            out = None  # the meta kernel raised
    try:
        real = form(a, b)
    except Exception:
        assert not any(answers), "the kernel raises but a rule gave a result"
        return
    assert (tuple(out.shape), out.dtype) == (tuple(real.shape), real.dtype)


def test_rules_mode_answers_operators_without_kernels(monkeypatch):
    seen = []
    wrapped = {
        f: (lambda *a, r=r, **k: seen.append(1) or r(*a, **k))
        for f, r in rules._TORCH_FUNCTION_RULES.items()
    }
    monkeypatch.setattr(rules, "_TORCH_FUNCTION_RULES", wrapped)
    a, b = torch.empty(2, 3, device="meta"), torch.empty(3, device="meta")
    with rules.RulesMode():
        a * b, 1 - a, a.sub(b), a / 2, a.mean(0), F.gelu(a)
    assert len(seen) == 6
