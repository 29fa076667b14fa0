"""Tracing with an example call (surgeon.example_tracing): shape/dtype checks and decorated
root forwards, which stop the plain tracer, give an FX graph; data-dependent control flow
still does not."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import fx, nn

import surgeon
from surgeon import example_tracing
from surgeon.errors import TraceError
from surgeon.passes import fold as fold_pass


class ShapeChecks(nn.Module):
    """What transformers' forwards do: ask the input for its dtype and shape, branch on it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(8, 6), nn.GELU(), nn.Linear(6, 3)

    def forward(self, x):
        if x.dtype != self.fc1.weight.dtype:
            x = x.to(self.fc1.weight.dtype)
        if x.shape[-1] != 8:
            raise ValueError("expected 8 features")
        batch = x.shape[0]
        for i in range(len(x.shape) - 2):  # no-op loop over the example's rank
            x = x + 0 * i
        return self.fc2(self.act(self.fc1(x))).view(batch, -1)


def _keep_kwargs(fn):
    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        kwargs.pop("return_dict", None)
        return fn(self, *args, **kwargs)

    return wrapper


class Output(dict):
    """A dict subclass output, like transformers' ModelOutput."""


class Decorated(nn.Module):
    """A root forward behind a ``*args, **kwargs`` decorator, returning a dict subclass."""

    def __init__(self) -> None:
        super().__init__()
        self.body = ShapeChecks()

    @_keep_kwargs
    def forward(self, pixels, mask=None):
        return Output(logits=self.body(pixels))


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if self.fc(x).sum() > 0:
            return torch.relu(x)
        return torch.tanh(x)


def test_plain_tracer_fails_and_the_example_trace_gives_exact_sites() -> None:
    torch.manual_seed(0)
    model = ShapeChecks().eval()
    with pytest.raises((RuntimeError, fx.proxy.TraceError)):
        fx.symbolic_trace(model)
    gm = surgeon.insert(model, "layer", "channel", input_size=[8], fallback="never")
    rec = gm.surgeon_record
    assert rec.method == "fx"
    assert [(s.kind, s.name) for s in rec.sites] == [("input", "x"), ("activation", "act")]
    # x.dtype !=, x.shape[-1] !=, len(x.shape), the range() over it
    assert rec.traced_with == {"example_inputs": [[2, 8]], "decisions": 3}
    for batch in (1, 2, 7):  # the batch size stays a graph value (x.shape[0] is a node)
        x = torch.randn(batch, 8)
        with torch.no_grad():
            assert torch.equal(gm(x), model(x))


def test_each_decision_is_guarded_in_the_graph() -> None:
    """An input that would take another path fails loudly, naming the line that decided,
    instead of running the example's path."""
    gm = surgeon.insert(ShapeChecks().eval(), input_size=[8], fallback="never")
    asserts = [n for n in gm.graph.nodes if n.target is torch._assert]
    assert len(asserts) == gm.surgeon_record.traced_with["decisions"] == 3
    with pytest.raises(
        AssertionError, match=r"example call of \[\[2, 8\]\]; at .*test_example_tracing"
    ):
        gm(torch.randn(2, 4, 8))  # rank 3: len(x.shape) is not 2
    with pytest.raises(AssertionError, match="--input-size"):
        gm(torch.randn(2, 8, dtype=torch.float64))  # x.dtype != fc1.weight.dtype now
    assert gm(torch.randn(9, 8)).shape == (9, 3)


def test_a_decorated_root_forward_gets_its_own_input_names_and_output_type() -> None:
    model = Decorated().eval()
    gm = surgeon.insert(model, "layer", "layer", input_size=[8], fallback="never")
    assert [n.name for n in gm.graph.nodes if n.op == "placeholder"] == ["pixels"]
    x = torch.randn(3, 8)
    with torch.no_grad():
        out = gm(x)
        assert type(out) is Output and torch.equal(out["logits"], model(x)["logits"])


def test_data_dependent_control_flow_still_fails_and_falls_back() -> None:
    with pytest.raises(TraceError, match="control flow"):
        surgeon.insert(DataDependent(), input_size=[4], fallback="never")
    with pytest.warns(UserWarning, match="method: eager"):
        gm = surgeon.insert(DataDependent(), input_size=[4], fallback="auto")
    assert gm.surgeon_record.method == "eager"


def test_the_example_call_leaves_the_model_as_it_was() -> None:
    """Batch norm in training mode, dropout: the example call updates no statistics and
    draws no random numbers the caller would see."""

    class Net(ShapeChecks):
        def __init__(self) -> None:
            super().__init__()
            self.bn, self.drop = nn.BatchNorm1d(8), nn.Dropout(0.5)

        def forward(self, x):
            return super().forward(self.drop(self.bn(x)))

    model = Net().train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    gm = surgeon.insert(model, input_size=[8], fallback="never", inplace=True)
    assert torch.equal(torch.rand(3), expected)
    for k, v in state.items():
        assert torch.equal(gm.state_dict()[k], v), k
    assert gm.surgeon_record.method == "fx" and gm.training


def test_iterating_a_proxy_unpacks_by_the_example() -> None:
    class Unpack(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.act = nn.Linear(6, 6), nn.ReLU()

        def forward(self, x):
            a, b, c = self.fc(x).chunk(3, dim=-1)
            parts = [p * 2 for p in torch.stack([a, b, c])]  # iterating a tensor: dim 0
            return self.act(sum(parts))

    model = Unpack().eval()
    gm = surgeon.insert(model, input_size=[6], fallback="never")
    x = torch.randn(4, 6)
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))


def test_metadata_reads_do_not_block_a_fold() -> None:
    """The input's shift/scale feeds fc1 and ``x.shape[0]``: the shape read is no use of its
    values, so the shift/scale folds into fc1, exactly."""
    torch.manual_seed(0)
    gm = surgeon.insert(ShapeChecks().eval(), "channel", "channel", input_size=[8])
    with torch.no_grad():
        for m in gm.modules():
            if type(m).__name__ == "ShiftScale":
                m.scale.uniform_(0.5, 1.5)
                m.shift.normal_()
    folded, report = fold_pass(gm)
    assert {e.module: e.action for e in report.entries} == {"ss_x": "folded", "ss_act": "folded"}
    x = torch.randn(5, 8)
    with torch.no_grad():
        assert torch.allclose(folded(x), gm(x), atol=1e-5)


def test_reads_metadata_only() -> None:
    graph = fx.Graph()
    x = graph.placeholder("x")
    shape = graph.call_function(getattr, (x, "shape"))
    data = graph.call_function(getattr, (x, "T"))
    size = graph.call_method("size", (x, 0))
    add = graph.call_method("add", (x, x))
    graph.output((shape, data, size, add))
    got = [example_tracing.reads_metadata_only(n, x) for n in (shape, data, size, add)]
    assert got == [True, False, True, False]


class MyDropPath(nn.Module):
    """Stochastic depth as transformers writes it: a branch on self.training, no parameters."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        keep = (torch.rand(x.shape[0], 1, device=x.device) > self.p).to(x.dtype)
        return x * keep / (1 - self.p)


class WithDropPath(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)
        self.drop = MyDropPath(0.5)

    def forward(self, x):
        if x.shape[-1] != 8:
            raise ValueError("expected 8 features")
        h = self.act(self.fc1(x))
        return self.fc2(h + self.drop(h))


def test_a_drop_path_module_stays_a_module_and_follows_the_mode() -> None:
    """Traced in training mode, a drop-path module kept as a leaf: the graph is exact in eval
    mode and draws the same masks as the model in training mode; no mode warning."""
    torch.manual_seed(0)
    model = WithDropPath().train()
    gm = surgeon.insert(model, "layer", "layer", input_size=[8], fallback="never")
    assert ("call_module", "drop") in [(n.op, n.target) for n in gm.graph.nodes]
    assert not gm.surgeon_record.warnings
    x = torch.randn(6, 8)
    with torch.no_grad():
        assert torch.equal(gm.eval()(x), model.eval()(x))
        gm.train(), model.train()
        torch.manual_seed(1)
        a = gm(x)
        torch.manual_seed(1)
        assert torch.equal(a, model(x))
