"""SurgeonTracer, plain and with the fast path's overrides, gives the graph torch.fx's own
tracer gives."""

from __future__ import annotations

import pytest
import torch
from torch import fx, nn

from surgeon.tracing import SurgeonTracer, _FastTracer

TRACERS = pytest.mark.parametrize("tracer", [SurgeonTracer, _FastTracer], ids=["plain", "fast"])


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight  # one parameter, two names
        self.register_buffer("offset", torch.arange(4.0))
        self.gain = nn.Parameter(torch.ones(4))
        self.const = torch.full((4,), 2.0)  # a plain tensor attribute, not a buffer

    def forward(self, x):
        x = torch.nn.functional.linear(x, self.b.weight) * self.gain
        x = x + self.offset + self.const
        lo, hi = x.chunk(2, dim=1)  # unpacking a proxy
        if not hasattr(self, "late"):
            self.register_buffer("late", torch.ones(2), persistent=False)
        return torch.cat([hi, lo + self.late], dim=1) + torch.add(x, self.offset)


def _summary(graph: fx.Graph) -> list[tuple[str, str]]:
    return [(n.op, str(n.target)) for n in graph.nodes]


@TRACERS
def test_same_graph_as_fx_tracer(tracer):
    mine = tracer().trace(Tied())
    theirs = fx.Tracer().trace(Tied())
    assert _summary(mine) == _summary(theirs)
    attrs = [n.target for n in mine.nodes if n.op == "get_attr"]
    assert "a.weight" in attrs and "b.weight" not in attrs  # first name of a tied parameter
    assert {"gain", "offset", "late"} <= set(attrs)


class Constants(nn.Module):
    """Tensors that are no parameter or buffer when the trace begins."""

    def __init__(self) -> None:
        super().__init__()
        self.freqs = torch.arange(4.0)  # a plain attribute
        self.register_buffer("cache", torch.zeros(4))
        self.blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))

    def forward(self, x):
        for i, block in enumerate(self.blocks):
            rope = torch.cos(self.freqs * (i + 1))  # computed eagerly: a new constant each
            x = block(x) * rope + self.freqs
        self.cache = torch.ones(4)  # a buffer replaced during the trace
        return x + self.cache


@TRACERS
def test_constants_get_the_names_fx_gives(tracer):
    def attrs(graph):
        return [n.target for n in graph.nodes if n.op == "get_attr"]

    mine = tracer().trace(Constants())
    theirs = fx.Tracer().trace(Constants())
    assert _summary(mine) == _summary(theirs)
    assert attrs(mine) == attrs(theirs)
    assert "cache" in attrs(mine) and "freqs" in attrs(mine)
    assert sum(a.startswith("_tensor_constant") for a in attrs(mine)) == 3


@TRACERS
def test_traced_module_computes_the_same(tracer):
    torch.manual_seed(0)
    m = Tied()
    gm = fx.GraphModule(m, tracer().trace(m))
    x = torch.randn(3, 4)
    torch.testing.assert_close(gm(x), m(x), rtol=0, atol=0)


@TRACERS
def test_iterating_a_proxy_still_fails_clearly(tracer):
    class Loop(nn.Module):
        def forward(self, x):
            return sum(t for t in x)

    with pytest.raises(fx.proxy.TraceError, match="iterated"):
        tracer().trace(Loop())


class Recurrent(nn.Module):
    def __init__(self, rnn: nn.Module) -> None:
        super().__init__()
        self.proj = nn.Linear(6, 8)
        self.rnn = rnn
        self.head = nn.Linear(2 * 5, 3)

    def forward(self, x):
        out, _ = self.rnn(torch.relu(self.proj(x)))
        return self.head(torch.relu(out[:, -1]))


@pytest.mark.parametrize(
    "rnn",
    [
        nn.LSTM(8, 5, batch_first=True, bidirectional=True),
        nn.GRU(8, 5, num_layers=2, bidirectional=True, batch_first=True),
    ],
    ids=["lstm", "gru"],
)
def test_recurrent_layers_propagate_on_meta_with_real_shapes(rnn, monkeypatch):
    """RNNs run on zero-filled CPU copies during meta shape propagation (their meta kernels
    are decomposed step by step); the shapes must be those of a real forward."""
    from surgeon import shapes, tracing

    model = Recurrent(rnn).eval()
    gm = tracing.trace(model)
    calls = []
    run = shapes._on_cpu_zeros
    monkeypatch.setattr(shapes, "_on_cpu_zeros", lambda m, *a: calls.append(m) or run(m, *a))
    shapes._on_meta(gm, (torch.randn(2, 7, 6),), shapes.record_shapes)
    assert calls == [gm.rnn]
    got = {n.name: shapes.node_shape(n) for n in gm.graph.nodes}
    gm_real = tracing.trace(model)
    shapes._on_real(gm_real, (torch.randn(2, 7, 6),), shapes.record_shapes)
    want = {n.name: shapes.node_shape(n) for n in gm_real.graph.nodes}
    assert got == want and got["rnn"] is None  # a tuple output has no single shape
    getitem = next(n for n in gm.graph.nodes if n.op == "call_function" and n.args[0].name == "rnn")
    assert getitem.meta["tensor_meta"].shape == (2, 7, 10)
    assert all(p.device.type == "cpu" for p in model.parameters())  # nothing moved


class Norms(nn.Module):
    def __init__(self) -> None:
        from timm.layers import BatchNormAct2d, LayerNorm

        super().__init__()
        self.tln = LayerNorm(8)  # traced through: an F.layer_norm node
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.bn_act = BatchNormAct2d(8, act_layer=nn.ReLU)
        self.bn_only = BatchNormAct2d(8, apply_act=False)
        self.ln = nn.LayerNorm(8)
        self.gn = nn.GroupNorm(2, 8)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        x = self.bn_only(self.bn_act(self.bn(self.conv(x))))
        x = self.gn(self.tln(self.ln(x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2))
        return self.fc(torch.relu(x).mean((2, 3)))


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_norm_layers_skip_their_meta_kernels_with_the_same_metadata(
    channels_last, monkeypatch, fast
):
    """On meta, norm layers and functions, activations and Linear give ``empty`` of their
    output shape without running (their meta kernels are slow): the shapes and dtypes of
    running them, on meta or for real."""
    import torch.nn.functional as F

    from surgeon import _fast_shapes as rules
    from surgeon import shapes, tracing
    from surgeon.passes import find_sites

    model = Norms().eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 5, 5)
    x = x.to(memory_format=torch.channels_last) if channels_last else x

    def metas(gm):
        return {
            n.name: (tuple(m.shape), m.dtype)
            for n in gm.graph.nodes
            if (m := n.meta.get("tensor_meta")) is not None and hasattr(m, "stride")
        }

    real = tracing.trace(model)
    shapes._on_real(real, (x,), shapes.record_shapes)
    slow = tracing.trace(model)
    with monkeypatch.context() as m:
        m.setenv("SURGEON_FAST_SKIP", "rules")  # every layer and function runs its kernel
        shapes._on_meta(slow, (x,), shapes.record_shapes)
    meta = tracing.trace(model)
    layer_norm, hits = F.layer_norm, []
    table = {
        f: (lambda *a, f=f, r=r, **k: hits.append(f) or r(*a, **k))
        for f, r in rules.FUNCTION_RULES.items()
    }
    monkeypatch.setattr(rules, "FUNCTION_RULES", table)
    calls = []
    for name in ("batch_norm", "layer_norm", "group_norm", "linear", "relu", "conv2d"):
        fn = getattr(F, name)
        monkeypatch.setattr(F, name, lambda *a, fn=fn, **k: calls.append(fn) or fn(*a, **k))
    shapes._on_meta(meta, (x,), shapes.record_shapes)
    assert calls == [] and hits == [layer_norm, torch.relu]  # timm LayerNorm: F.layer_norm
    assert metas(meta) == metas(slow) == metas(real)
    assert len(metas(meta)) == len(meta.graph.nodes)  # every node has its metadata
    names = [s.name for s in find_sites(model, input_size=(3, 5, 5))]
    assert names == ["x", "bn_act", "relu"]  # bn_only applies no activation: not a site


def test_uncompiled_graph_module_generates_its_code_on_first_call(fast):
    from surgeon.tracing import graph_module

    model = Tied().eval()
    graph = SurgeonTracer().trace(model)
    gm = graph_module(model, graph, "Tied", compile=False)
    assert not hasattr(gm, "_code")  # nothing generated yet
    other = graph_module(model, SurgeonTracer().trace(model), "Tied")
    assert hasattr(other, "_code") and not hasattr(gm, "_code")  # one class per instance
    x = torch.randn(3, 4)
    assert torch.equal(gm(x), model(x))
    assert "def forward" in gm.code and torch.equal(gm(x), other(x))
    assert isinstance(gm, fx.GraphModule) and type(gm).__name__ == "Tied"


def test_module_stack_names_the_model_classes_while_watched(fast):
    from surgeon.tracing import watch_training

    class Reader(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(2, 2)

        def forward(self, x):
            return self.fc(x) * 2 if self.training else x

    model = nn.Sequential(Reader())
    with watch_training(model) as reads:
        graph = _FastTracer(reads=reads).trace(model)
    assert reads.seen
    stacks = [n.meta["nn_module_stack"] for n in graph.nodes if "nn_module_stack" in n.meta]
    assert stacks and all(type(s) is __import__("collections").OrderedDict for s in stacks)
    assert {cls for s in stacks for _, cls in s.values()} == {Reader, nn.Linear}
