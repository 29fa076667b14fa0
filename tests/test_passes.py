"""The graph passes: insert (identity at init, gradients, the FX idiom, names, the caller's
model untouched), strip, mode dependence, and the batchnorm pass."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import surgeon
from surgeon import ShiftScale, SurgeonError
from surgeon.layers import MODES

COMBOS = list(itertools.product(MODES, MODES))
pytestmark = pytest.mark.usefixtures("seeded", "one_thread")

# one trace with the fast path's replays; the plain path always traces both modes
ONE_TRACE = 1 if __import__("surgeon._fx_fast", fromlist=["on"]).on("replays") else 2


@pytest.fixture(scope="module")
def allconv() -> nn.Module:
    return surgeon.build_model("allconv", {"width": 0.25})


@pytest.fixture(scope="module")
def mlp() -> nn.Module:
    return surgeon.build_model("mlp", {"hidden": [32, 16], "input_size": [3, 8, 8]})


def _check_identity_and_grads(model, max_abs_diff, params_without_grad, shift, scale, inputs):
    gm = surgeon.insert(model, shift, scale)
    mods = surgeon.inserted_modules(gm)
    if shift == scale == "none":
        assert mods == {}
    else:
        assert mods and all(isinstance(m, ShiftScale) for m in mods.values())
    assert max_abs_diff(model, gm, *inputs) == 0.0
    assert params_without_grad(gm, *inputs) == []
    return gm


@pytest.mark.parametrize(("shift", "scale"), COMBOS)
def test_allconv_all_16_combinations(allconv, max_abs_diff, params_without_grad, shift, scale):
    """Identity at init (max |Δ| == 0 exactly, fp32, eval mode) and a non-zero gradient on
    every inserted parameter, for all 16 shift x scale combinations."""
    x = torch.randn(2, 3, 32, 32)
    gm = _check_identity_and_grads(allconv, max_abs_diff, params_without_grad, shift, scale, (x,))
    if shift != "none" or scale != "none":
        assert len(surgeon.inserted_modules(gm)) == 9


@pytest.mark.parametrize(("shift", "scale"), COMBOS)
def test_mlp_all_16_combinations(mlp, max_abs_diff, params_without_grad, shift, scale):
    x = torch.randn(4, 3, 8, 8)
    _check_identity_and_grads(mlp, max_abs_diff, params_without_grad, shift, scale, (x,))


@pytest.mark.parametrize(("shift", "scale"), COMBOS)
@pytest.mark.parametrize("name", ["ConvNeXtBlock", "TokenMLP", "SqueezeExcite", "Branching"])
def test_hand_written_all_16_combinations(
    forms, max_abs_diff, params_without_grad, name, shift, scale
):
    """Channels-last (N,H,W,C), tokens (N,L,C), gates and branches, all 16 combinations."""
    model = getattr(forms, name)()
    x = torch.randn(8, *model.input_size)
    _check_identity_and_grads(model, max_abs_diff, params_without_grad, shift, scale, (x,))


@pytest.mark.parametrize("name", ["ModuleActs", "FunctionActs", "MethodActs", "TimmActs",
                                  "NormAct", "ModuleListLoop", "SoftmaxHead", "SigmoidHead",
                                  "ReluThenPool", "SiluWrittenOut", "PermutedRelu"])  # fmt: skip
@pytest.mark.parametrize(("shift", "scale"), [("channel", "channel"), ("element", "layer")])
def test_every_form_is_identity_with_gradients(
    forms, max_abs_diff, params_without_grad, name, shift, scale
):
    model = getattr(forms, name)()
    x = torch.randn(8, *model.input_size)
    _check_identity_and_grads(model, max_abs_diff, params_without_grad, shift, scale, (x,))


def test_both_users_of_a_branching_activation_read_the_inserted_output(forms) -> None:
    gm = surgeon.insert(forms.Branching(), "layer", "layer")
    nodes = {n.name: n for n in gm.graph.nodes}
    act, ss = nodes["act"], nodes["ss_act"]
    assert list(act.users) == [ss]  # only the inserted module reads the activation
    readers = {u.target for u in ss.users}
    assert readers == {"left", "right"}
    assert ss.args == (act,)  # and it does not consume itself


def test_inplace_activations_and_loops(forms) -> None:
    gm = surgeon.insert(forms.ModuleActs(), "channel", "none")
    assert list(surgeon.inserted_modules(gm)) == ["ss_x", "ss_act1", "ss_act2", "ss_act3"]
    loop = surgeon.insert(forms.ModuleListLoop(), "layer", "layer")
    assert list(surgeon.inserted_modules(loop)) == [
        "ss_x", "ss_blocks_0_1", "ss_blocks_1_1", "ss_blocks_2_1",
    ]  # fmt: skip


def test_inserted_modules_have_stable_names_and_follow_site_order(allconv) -> None:
    a = surgeon.insert(allconv, "channel", "layer")
    b = surgeon.insert(allconv, "channel", "layer")
    names = list(surgeon.inserted_modules(a))
    assert names == list(surgeon.inserted_modules(b))
    assert names == ["ss_x"] + [f"ss_features_{i}" for i in (1, 3, 5, 8, 10, 12, 15, 17)]
    sites = a.surgeon_record.to_dict()["sites"]
    assert [s["module"] for s in sites] == names
    assert all(s["module"] == "ss_" + s["name"] for s in sites)
    assert list(a.state_dict()) == list(b.state_dict())
    assert "ss_features_1.shift" in a.state_dict()


def test_names_stay_unique_when_the_model_already_uses_them() -> None:
    class Clash(nn.Module):
        input_size = (4,)

        def __init__(self) -> None:
            super().__init__()
            self.fc, self.ss_x = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.ss_x(F.relu(self.fc(x)))

    gm = surgeon.insert(Clash(), "layer", "layer")
    assert list(surgeon.inserted_modules(gm)) == ["ss_x_1", "ss_relu"]
    assert isinstance(gm.ss_x, nn.Linear)


@pytest.mark.parametrize("training", [True, False])
def test_the_callers_model_is_left_untouched(forms, training: bool) -> None:
    model = forms.SqueezeExcite().train(training)
    state = copy.deepcopy(model.state_dict())
    attrs = set(vars(model))
    gm = surgeon.insert(model, "element", "channel")
    assert model.training is training and gm.training is training
    assert set(vars(model)) == attrs
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert not any(isinstance(m, ShiftScale) for m in model.modules())
    with torch.no_grad():  # no shared parameters
        for p in gm.parameters():
            p.add_(1.0)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_a_graph_module_caller_keeps_its_graph(forms) -> None:
    traced = fx.symbolic_trace(forms.ModuleActs())
    code = traced.code
    gm = surgeon.insert(traced, "layer", "layer")
    assert traced.code == code and not any(isinstance(m, ShiftScale) for m in traced.modules())
    assert len(surgeon.inserted_modules(gm)) == 4


def test_the_result_lints_and_its_code_calls_the_inserted_modules(allconv) -> None:
    gm = surgeon.insert(allconv, "layer", "channel")
    gm.graph.lint()
    assert isinstance(gm, fx.GraphModule)
    for name in surgeon.inserted_modules(gm):
        assert f"self.{name}(" in gm.code
    assert fx.GraphModule(gm, gm.graph).code == gm.code


def test_the_record_lists_the_pass_and_the_sites(allconv) -> None:
    gm = surgeon.insert(allconv, "channel", "none", exclude=["input"], input_size="3,32,32")
    rec = gm.surgeon_record.to_dict()
    assert rec["source"] == {"spec": "allconv", "args": {"width": 0.25}}
    (p,) = rec["passes"]
    assert {k: p[k] for k in ("name", "shift", "scale", "include", "exclude", "input_size",
                              "leaf", "traced_in")} == {
        "name": "shift_scale", "shift": "channel", "scale": "none", "include": [],
        "exclude": ["input"], "input_size": [3, 32, 32], "leaf": [], "traced_in": "train",
    }  # fmt: skip
    assert [s["name"] for s in rec["sites"]] == [
        f"features_{i}" for i in (1, 3, 5, 8, 10, 12, 15, 17)
    ]
    assert rec["sites"][0]["shape"] == [-1, 24, 32, 32]


def test_deepcopy_keeps_the_record(allconv) -> None:
    gm = surgeon.insert(allconv, "layer", "layer")
    twin = copy.deepcopy(gm)
    assert twin.surgeon_record == gm.surgeon_record
    assert list(surgeon.inserted_modules(twin)) == list(surgeon.inserted_modules(gm))


def test_no_modes_inserts_nothing(allconv) -> None:
    gm = surgeon.insert(allconv, "none", "none")
    assert surgeon.inserted_modules(gm) == {} and gm.surgeon_record.to_dict()["sites"] == []
    assert not any(isinstance(m, ShiftScale) for m in gm.modules())


def test_bad_options_fail_before_any_work(allconv) -> None:
    with pytest.raises(SurgeonError, match="invalid shift mode 'channels'"):
        surgeon.insert(allconv, "channels", "layer")
    with pytest.raises(SurgeonError, match="invalid scale mode"):
        surgeon.insert(allconv, "layer", "Layer")
    with pytest.raises(SurgeonError, match="bad input size"):
        surgeon.insert(allconv, input_size="3,a,32")
    with pytest.raises(SurgeonError, match="bad input size"):
        surgeon.insert(allconv, input_size="3,,32")
    with pytest.raises(SurgeonError, match="bad input size"):
        surgeon.insert(allconv, input_size=[3, 0, 32])


def test_wrong_input_size_is_a_shape_error_with_hint() -> None:
    with pytest.raises(SurgeonError) as err:
        surgeon.insert(surgeon.build_model("mlp", {"hidden": [4]}), input_size="3,8,8")
    assert "shape propagation failed" in err.value.message
    assert "--input-size" in err.value.hint


def test_a_bf16_model_keeps_bf16_activations_and_fp32_parameters(forms) -> None:
    model = forms.ModuleActs().to(torch.bfloat16)
    gm = surgeon.insert(
        model, "channel", "element", example_inputs=(torch.randn(2, 3, 6, 6).bfloat16(),)
    )
    assert all(
        p.dtype == torch.float32
        for m in surgeon.inserted_modules(gm).values()
        for p in m.parameters()
    )
    x = torch.randn(2, 3, 6, 6).bfloat16()
    gm.eval()
    model.eval()
    with torch.no_grad():
        out = gm(x)
        assert out.dtype == torch.bfloat16 and torch.equal(out, model(x))


# ---------------------------------------------------------------- strip


@pytest.mark.parametrize(
    ("shift", "scale"), [("channel", "channel"), ("element", "none"), ("none", "layer")]
)
def test_strip_gives_back_the_original_computation(allconv, max_abs_diff, shift, scale) -> None:
    gm = surgeon.insert(allconv, shift, scale)
    with torch.no_grad():  # train the inserted modules a little: strip must drop them anyway
        for m in surgeon.inserted_modules(gm).values():
            for p in m.parameters():
                p.normal_()
    plain = surgeon.strip(gm)
    assert not any(isinstance(m, ShiftScale) for m in plain.modules())
    assert surgeon.inserted_modules(plain) == {}
    assert (
        plain.surgeon_record.to_dict()["passes"] == []
        and plain.surgeon_record.to_dict()["sites"] == []
    )
    assert set(plain.state_dict()) == set(allconv.state_dict())
    plain.graph.lint()
    assert max_abs_diff(allconv, plain, torch.randn(2, 3, 32, 32)) == 0.0
    assert surgeon.inserted_modules(gm)  # strip worked on a copy


def test_strip_refuses_a_plain_module(allconv) -> None:
    with pytest.raises(SurgeonError, match="strip"):
        surgeon.strip(allconv)


# ---------------------------------------------------------------- mode dependence


@pytest.mark.parametrize("training", [True, False])
def test_functional_dropout_follows_the_mode_at_run_time(forms, training: bool) -> None:
    model = forms.FunctionalDropout().train(training)
    gm = surgeon.insert(model, "layer", "layer")
    assert "warnings" not in gm.surgeon_record.to_dict()
    assert any(isinstance(m, nn.Dropout) for m in gm.modules())
    x = torch.randn(64, 6)
    gm.eval()
    model.eval()
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))  # eval: no dropout, whatever the trace mode
    gm.train()
    h = gm.ss_relu(F.relu(gm.fc1(x)))
    dropped = gm.dropout_mod(h)
    assert (dropped == 0).any() and not (h == 0).all()  # train: dropout is active


def test_other_self_training_branches_are_reported(forms, max_abs_diff) -> None:
    model = forms.AuxHead()
    gm = surgeon.insert(model, "layer", "layer")
    (warning,) = gm.surgeon_record.to_dict()["warnings"]
    assert "self.training" in warning and "train-mode" in warning and "--leaf" in warning
    eval_gm = surgeon.insert(model.eval(), "layer", "layer")
    assert eval_gm.surgeon_record.to_dict()["passes"][0]["traced_in"] == "eval"
    assert max_abs_diff(model, eval_gm, torch.randn(3, 6)) == 0.0


class _Block(nn.Module):
    """Reads ``self.training`` inside a submodule, the way timm's attention does."""

    def __init__(self, p: float = 0.0, branch: bool = False, functional: bool = False) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.p, self.branch, self.functional = p, branch, functional

    def forward(self, x):
        x = F.relu(self.fc(x)) * torch.arange(6.0)  # a parameter read and a new constant
        if self.functional:
            x = F.dropout(x, self.p, training=self.training)
        else:
            x = x * (1 - self.p if self.training else 1.0)
        if self.branch and self.training:
            x = x + 1
        return x


class _Net(nn.Module):
    input_size = (6,)

    def __init__(self, **block) -> None:
        super().__init__()
        self.a, self.b, self.head = _Block(**block), _Block(**block), nn.Linear(6, 2)

    def forward(self, x):
        return self.head(self.b(self.a(self.a(x))))  # ``a`` is called twice


@pytest.fixture
def traces(monkeypatch):
    """The number of whole-model traces each insert makes."""
    from surgeon.tracing import SurgeonTracer

    calls = []
    real = SurgeonTracer.trace
    monkeypatch.setattr(SurgeonTracer, "trace", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_one_trace_unless_a_module_reads_self_training(forms, traces) -> None:
    plain = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Dropout(0.5), nn.Linear(6, 2))
    gm = surgeon.insert(plain, "layer", "layer", input_size=(6,))
    assert (
        len(traces) == ONE_TRACE and "warnings" not in gm.surgeon_record.to_dict()
    )  # Dropout is a leaf
    traces.clear()
    surgeon.insert(forms.FunctionalDropout(), "layer", "layer")
    assert len(traces) == 2  # the root's forward reads self.training: the whole model again
    assert all(type(m).__module__ != "surgeon.tracing" for m in plain.modules())


def test_modules_that_read_self_training_are_traced_again_alone(traces) -> None:
    from surgeon.tracing import SurgeonTracer

    model = _Net()
    gm = surgeon.insert(model, "layer", "layer")
    assert (
        len(traces) == ONE_TRACE and "warnings" not in gm.surgeon_record.to_dict()
    )  # p = 0: either mode
    # the replays leave nothing behind: the graph is the plain trace's, name for name
    plain = SurgeonTracer().trace(_Net())
    traced = surgeon.tracing.trace(model)
    assert [(n.name, n.op, str(n.target)) for n in traced.graph.nodes] == [
        (n.name, n.op, str(n.target)) for n in plain.nodes
    ]
    traces.clear()
    dependent = surgeon.insert(_Net(p=0.5), "layer", "layer")
    (warning,) = dependent.surgeon_record.to_dict()["warnings"]  # x * (1 - p) in train mode only
    assert "self.training" in warning and len(traces) == ONE_TRACE
    traces.clear()
    branch = surgeon.insert(_Net(branch=True).eval(), "layer", "layer")
    assert branch.surgeon_record.to_dict()["warnings"] and len(traces) == ONE_TRACE


@pytest.mark.parametrize("training", [True, False])
def test_functional_dropout_in_a_submodule_follows_the_mode(traces, training: bool) -> None:
    model = _Net(p=0.5, functional=True).train(training)
    gm = surgeon.insert(model, "layer", "layer")
    assert len(traces) == ONE_TRACE and "warnings" not in gm.surgeon_record.to_dict()
    drops = [m for m in gm.modules() if isinstance(m, nn.Dropout)]
    assert len(drops) == 3  # a twice, b once
    x = torch.randn(64, 6)
    with torch.no_grad():
        assert torch.equal(gm.eval()(x), model.eval()(x))
        gm.train()
        assert not torch.equal(gm(x), gm(x))  # dropout is active in train mode


def test_without_replays_the_whole_model_is_traced_again(traces, monkeypatch) -> None:
    from surgeon import _fx_fast

    monkeypatch.setattr(_fx_fast.Replaying, "_can_replay", lambda self: False)  # another torch
    gm = surgeon.insert(_Net(p=0.5, functional=True), "layer", "layer")
    assert len(traces) == 2 and "warnings" not in gm.surgeon_record.to_dict()
    assert len([m for m in gm.modules() if isinstance(m, nn.Dropout)]) == 3
    assert surgeon.insert(_Net(p=0.5), "layer", "layer").surgeon_record.to_dict()["warnings"]


def test_timm_attention_reads_dropout_rate_per_mode(traces) -> None:
    timm = pytest.importorskip("timm")
    kw = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
    plain = timm.create_model("vit_tiny_patch16_224", num_classes=3, **kw)
    gm = surgeon.insert(plain, "layer", "layer", input_size=(3, 32, 32))
    assert len(traces) == ONE_TRACE  # only the attention modules read self.training: replayed alone
    assert "warnings" not in gm.surgeon_record.to_dict()
    traces.clear()
    dropping = timm.create_model("vit_tiny_patch16_224", num_classes=3, attn_drop_rate=0.1, **kw)
    gm = surgeon.insert(dropping.eval(), "layer", "layer", input_size=(3, 32, 32))
    assert gm.surgeon_record.to_dict()["warnings"]  # sdpa's dropout_p is 0.1 in train mode only


def test_watch_training_records_reads_and_restores_classes() -> None:
    from surgeon.tracing import watch_training

    class Reader(nn.Module):
        def forward(self, x):
            return x * 2 if self.training else x

    class OwnFlag(nn.Module):
        @property
        def training(self):  # a class that makes training its own: never swapped
            return True

        @training.setter
        def training(self, value):
            pass

    model = nn.Sequential(nn.Linear(2, 2), Reader()).eval()
    with watch_training(model) as reads:
        assert type(model[1]).__name__ == "Reader" and isinstance(model[1], Reader)
        assert not reads.seen
        model[1].train()  # setting is not reading
        assert not reads.seen
        assert torch.equal(model[1](torch.ones(1)), torch.full((1,), 2.0))  # the real value
        assert reads.seen and reads.by == ["Reader"]
    assert type(model[1]) is Reader and type(model[0]) is nn.Linear
    assert model[1].__dict__["training"] is True
    with pytest.raises(RuntimeError), watch_training(model):
        raise RuntimeError("boom")
    assert type(model[1]) is Reader  # restored on errors too
    with watch_training(nn.Sequential(OwnFlag())) as reads:
        assert reads.seen  # cannot be watched: assume it reads


def test_drop_path_and_stochastic_depth_are_leaves() -> None:
    from timm.layers import DropPath
    from torchvision.ops import StochasticDepth

    class Residual(nn.Module):
        input_size = (4,)

        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.dp, self.sd = DropPath(0.5), StochasticDepth(0.5, "row")
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head(x + self.sd(self.dp(F.relu(self.fc(x)))))

    gm = surgeon.insert(Residual(), "layer", "layer")
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    assert {"dp", "sd"} <= called
    assert "warnings" not in gm.surgeon_record.to_dict()


# ---------------------------------------------------------------- batchnorm pass


def test_insert_batchnorm_before_each_activation(forms) -> None:
    model = forms.ConvNeXtBlock()
    gm = surgeon.insert_batchnorm(model)
    assert gm.surgeon_record.to_dict()["batchnorm"] == ["bn_act"]
    assert gm.bn_act.num_features == 16 and gm.bn_act.channel_dim == 3
    nodes = {n.name: n for n in gm.graph.nodes}
    assert nodes["act"].args[0].target == "bn_act"
    both = surgeon.insert(gm, "channel", "channel")
    assert [p["name"] for p in both.surgeon_record.to_dict()["passes"]] == [
        "batchnorm",
        "shift_scale",
    ]
    gm.graph.lint()
    assert gm(torch.randn(2, 3, 6, 6)).shape == (2, 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_insert_on_a_cuda_model_puts_the_modules_on_cuda(forms, max_abs_diff) -> None:
    model = forms.ConvNeXtBlock().cuda()
    gm = surgeon.insert(model, "channel", "element")
    assert all(p.is_cuda for p in gm.parameters())
    assert max_abs_diff(model, gm, torch.randn(2, 3, 6, 6, device="cuda")) == 0.0
