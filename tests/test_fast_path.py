"""surgeon._fx_fast: on only for the torch it was written for, and the same results as the
plain path (graphs, mode handling, shapes, sites) wherever it is on."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import surgeon
from surgeon import _fx_fast, shapes, tracing
from surgeon.tracing import SurgeonTracer


@pytest.fixture
def traces(monkeypatch):
    """The number of whole-model traces."""
    calls = []
    real = SurgeonTracer.trace
    monkeypatch.setattr(SurgeonTracer, "trace", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


# ---------------------------------------------------------------- the door


def test_on_for_the_torch_it_was_written_for(monkeypatch):
    assert _fx_fast.why_off() is None, _fx_fast.why_off()  # torch 2.14 here
    monkeypatch.setenv("SURGEON_FAST", "0")
    assert not _fx_fast.active() and not _fx_fast.on("tracer")
    monkeypatch.setenv("SURGEON_FAST", "1")
    monkeypatch.setenv("SURGEON_FAST_SKIP", "rules,codegen")
    assert _fx_fast.active() and _fx_fast.on("tracer") and not _fx_fast.on("rules")


@pytest.mark.parametrize(
    ("version", "off"),
    [("2.10.2", True), ("2.11.0", False), ("2.14.1+cu130", False), ("2.15.0.dev2026", True)],
)
def test_off_outside_the_tested_torch_versions(monkeypatch, version, off):
    monkeypatch.setattr(torch, "__version__", version)
    reason = _fx_fast._check()
    assert (reason is not None) is off
    if off:
        assert version in reason


def test_off_when_a_private_part_is_gone(monkeypatch):
    monkeypatch.delattr(fx.Tracer, "_qualname_counter")
    assert "_qualname_counter" in _fx_fast._check()
    monkeypatch.undo()
    monkeypatch.setattr(fx.Proxy, "__iter__", lambda self: iter(()))  # another way to unpack
    assert "Proxy.__iter__" in _fx_fast._check()


# ---------------------------------------------------------------- the same results


class _Block(nn.Module):
    """Reads ``self.training`` inside a submodule, the way timm's attention does."""

    def __init__(self, p: float = 0.0, functional: bool = False) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.p, self.functional = p, functional

    def forward(self, x):
        x = torch.relu(self.fc(x))
        if self.functional:
            return F.dropout(x, self.p, training=self.training)
        return x * (1 - self.p if self.training else 1.0)


class _Net(nn.Module):
    input_size = (6,)

    def __init__(self, **block) -> None:
        super().__init__()
        self.a, self.b, self.head = _Block(**block), _Block(**block), nn.Linear(6, 2)

    def forward(self, x):
        return self.head(self.b(self.a(self.a(x))))  # ``a`` is called twice


class _RootReads(nn.Module):
    input_size = (6,)

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x):
        return F.dropout(torch.relu(self.fc(x)), 0.5, training=self.training)


def _models():
    import timm

    vit = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
    return {
        "plain": (nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Dropout(0.5)), (6,)),
        "reads_in_a_module": (_Net(), (6,)),
        "mode_dependent": (_Net(p=0.5), (6,)),
        "functional_dropout": (_Net(p=0.5, functional=True), (6,)),
        "root_reads": (_RootReads(), (6,)),
        "vit": (timm.create_model("vit_tiny_patch16_224", num_classes=3, **vit), (3, 32, 32)),
        "vit_attn_drop": (
            timm.create_model("vit_tiny_patch16_224", num_classes=3, attn_drop_rate=0.1, **vit),
            (3, 32, 32),
        ),
        "resnet": (timm.create_model("resnet18", num_classes=3), (3, 32, 32)),
        "coat": (timm.create_model("coat_lite_tiny", num_classes=3, img_size=64), (3, 64, 64)),
    }


def _result(model: nn.Module, size: tuple[int, ...]) -> dict:
    gm = tracing.trace(model, compile=False)
    shapes.propagate(gm, shapes.example_inputs_for(size))
    return {
        "nodes": [(n.name, n.op, str(n.target), shapes.node_shape(n)) for n in gm.graph.nodes],
        "dependent": gm.surgeon_mode_dependent,
        "dropouts": sorted(n for n, m in gm.named_modules() if isinstance(m, nn.Dropout)),
        "sites": [s.name for s in surgeon.find_sites(model, input_size=size)],
    }


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_fast_and_plain_paths_give_the_same_graph_shapes_and_sites(monkeypatch, fast, mode):
    for name, (model, size) in _models().items():
        model.train(mode == "train")
        with monkeypatch.context() as m:
            m.setenv("SURGEON_FAST", "0")
            plain = _result(model, size)
        assert _result(model, size) == plain, name
        for skip in _fx_fast.SPEEDUPS if mode == "train" else ():  # each speed-up alone off
            with monkeypatch.context() as m:
                m.setenv("SURGEON_FAST_SKIP", skip)
                assert _result(model, size) == plain, (name, skip)


def test_the_plain_path_traces_twice_the_fast_path_once(monkeypatch, fast, traces):
    models = _models()
    for name in ("plain", "reads_in_a_module", "mode_dependent", "functional_dropout", "vit"):
        traces.clear()
        tracing.trace(models[name][0])
        assert len(traces) == 1, name  # replays answer reads inside module calls
    traces.clear()
    tracing.trace(models["root_reads"][0])
    assert len(traces) == 2  # the root's own forward reads it: the whole model again
    monkeypatch.setenv("SURGEON_FAST", "0")
    traces.clear()
    tracing.trace(models["plain"][0])
    assert len(traces) == 2


def test_without_replays_the_whole_model_is_traced_again(monkeypatch, fast, traces):
    monkeypatch.setattr(_fx_fast.Replaying, "_can_replay", lambda self: False)  # another torch
    gm = tracing.trace(_Net(p=0.5, functional=True))
    assert len(traces) == 2 and not gm.surgeon_mode_dependent
    assert len([m for m in gm.modules() if isinstance(m, nn.Dropout)]) == 3
    assert tracing.trace(_Net(p=0.5)).surgeon_mode_dependent


def test_replays_leave_the_model_and_the_graph_as_a_plain_trace(fast):
    model = _Net()
    traced = tracing.trace(model, copy_model=False)
    assert all(type(m).__module__ != "surgeon._fx_fast" for m in model.modules())
    plain = SurgeonTracer().trace(_Net())
    assert [(n.name, n.op, str(n.target)) for n in traced.graph.nodes] == [
        (n.name, n.op, str(n.target)) for n in plain.nodes
    ]


def test_code_is_generated_once_on_the_fast_path(monkeypatch, fast):
    model = _Net().eval()
    lazy = tracing.trace(model, compile=False)
    assert not hasattr(lazy, "_code")
    monkeypatch.setenv("SURGEON_FAST", "0")
    eager = tracing.trace(model, compile=False)
    assert hasattr(eager, "_code")  # the plain path: fx.GraphModule as it is
    x = torch.randn(3, 6)
    assert torch.equal(lazy(x), model(x)) and torch.equal(eager(x), model(x))


def test_deepcopy_module_is_copy_deepcopy():
    model = _Net()
    model.b.fc = model.a.fc  # shared: stays shared in the copy
    twin = tracing.deepcopy_module(model)
    assert twin.b.fc is twin.a.fc and twin.a.fc is not model.a.fc
    assert torch.equal(twin.a.fc.weight, model.a.fc.weight)
