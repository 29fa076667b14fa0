"""Site discovery: exact site lists for the built-ins and for hand-written models in every
activation form, final and gate rules, channel axes, selection and leaf modules."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import surgeon
from surgeon import SurgeonError, registry

ALLCONV_SITES = [
    ("x", "input", "input", (-1, 3, 32, 32)),
    ("features_1", "activation", "nn.ReLU", (-1, 96, 32, 32)),
    ("features_3", "activation", "nn.ReLU", (-1, 96, 32, 32)),
    ("features_5", "activation", "nn.ReLU", (-1, 96, 16, 16)),
    ("features_8", "activation", "nn.ReLU", (-1, 192, 16, 16)),
    ("features_10", "activation", "nn.ReLU", (-1, 192, 16, 16)),
    ("features_12", "activation", "nn.ReLU", (-1, 192, 8, 8)),
    ("features_15", "activation", "nn.ReLU", (-1, 192, 6, 6)),
    ("features_17", "activation", "nn.ReLU", (-1, 192, 6, 6)),
]

pytestmark = pytest.mark.usefixtures("seeded", "one_thread")


def table(sites) -> list[tuple]:
    return [(s.name, s.kind, s.target, s.shape) for s in sites]


def test_allconv_is_the_input_plus_8_relus() -> None:
    sites = surgeon.find_sites(surgeon.build_model("allconv"))
    assert table(sites) == ALLCONV_SITES
    assert [s.channel_dim for s in sites] == [1] * 9
    assert [s.index for s in sites] == list(range(9))


def test_allconv_with_dropout_has_the_same_sites() -> None:
    sites = surgeon.find_sites(surgeon.build_model("allconv", {"dropout": True}))
    assert table(sites) == ALLCONV_SITES  # dropout slots are Identity without dropout
    assert [s.shape for s in sites] == [s[3] for s in ALLCONV_SITES]


def test_mlp_is_the_input_plus_each_hidden_relu() -> None:
    sites = surgeon.find_sites(surgeon.build_model("mlp"))
    assert table(sites) == [
        ("x", "input", "input", (-1, 3, 32, 32)),
        ("layers_3", "activation", "nn.ReLU", (-1, 1024)),
        ("layers_5", "activation", "nn.ReLU", (-1, 512)),
        ("layers_7", "activation", "nn.ReLU", (-1, 256)),
    ]
    assert [s.channel_dim for s in sites] == [1, 1, 1, 1]
    small = surgeon.find_sites(surgeon.build_model("mlp", {"hidden": [8, 4], "dropout": True}))
    assert table(small)[1:] == [
        ("layers_3", "activation", "nn.ReLU", (-1, 8)),
        ("layers_6", "activation", "nn.ReLU", (-1, 4)),
    ]


# (name, kind, target, shape, channel_dim) per hand-written model, input first
X = ("x", "input", "input", (-1, 3, 6, 6), 1)
FORM_SITES = {
    "ModuleActs": [
        X,
        ("act1", "activation", "nn.ReLU", (-1, 4, 6, 6), 1),
        ("act2", "activation", "nn.ReLU", (-1, 5, 6, 6), 1),
        ("act3", "activation", "nn.SiLU", (-1, 7, 6, 6), 1),
    ],
    "FunctionActs": [
        X,
        ("relu", "activation", "F.relu", (-1, 4, 6, 6), 1),
        ("relu_1", "activation", "torch.relu", (-1, 5, 6, 6), 1),
        ("gelu", "activation", "F.gelu", (-1, 7, 6, 6), 1),
        ("relu_2", "activation", "F.relu", (-1, 7, 6, 6), 1),
    ],
    "MethodActs": [
        X,
        ("relu", "activation", "Tensor.relu", (-1, 4, 6, 6), 1),
        ("relu_", "activation", "Tensor.relu_", (-1, 5, 6, 6), 1),
        ("sigmoid", "activation", "Tensor.sigmoid", (-1, 7, 6, 6), 1),
        ("tanh", "activation", "Tensor.tanh", (-1, 7, 6, 6), 1),
    ],
    "TimmActs": [
        X,
        ("act1", "activation", "timm.GELUTanh", (-1, 4, 6, 6), 1),
        ("act2", "activation", "timm.HardSwish", (-1, 5, 6, 6), 1),
    ],
    "NormAct": [X, ("bn1", "norm_act", "timm.BatchNormAct2d", (-1, 4, 6, 6), 1)],
    "Branching": [
        X,
        ("act", "activation", "nn.ReLU", (-1, 4, 6, 6), 1),
        ("relu", "activation", "F.relu", (-1, 5, 6, 6), 1),
    ],
    "ModuleListLoop": [
        ("x", "input", "input", (-1, 6), 1),
        ("blocks_0_1", "activation", "nn.ReLU", (-1, 6), 1),
        ("blocks_1_1", "activation", "nn.ReLU", (-1, 6), 1),
        ("blocks_2_1", "activation", "nn.ReLU", (-1, 6), 1),
    ],
    "SoftmaxHead": [
        ("x", "input", "input", (-1, 6), 1),
        ("relu", "activation", "F.relu", (-1, 5), 1),
    ],
    "SigmoidHead": [X, ("act", "activation", "nn.ReLU", (-1, 4, 6, 6), 1)],
    "ReluThenPool": [X, ("act", "activation", "nn.ReLU", (-1, 4, 6, 6), 1)],
    "SqueezeExcite": [
        X,
        ("act", "activation", "nn.ReLU", (-1, 8, 6, 6), 1),
        ("relu", "activation", "F.relu", (-1, 2, 1, 1), 1),
        ("sigmoid", "gate", "torch.sigmoid", (-1, 8, 1, 1), 1),
    ],
    "SiluWrittenOut": [X, ("mul", "activation", "x*torch.sigmoid(x)", (-1, 4, 6, 6), 1)],
    "ConvNeXtBlock": [X, ("act", "activation", "nn.GELU", (-1, 6, 6, 16), 3)],
    "PermutedRelu": [X, ("relu", "activation", "F.relu", (-1, 6, 6, 5), 3)],
    "TokenMLP": [
        ("x", "input", "input", (-1, 4, 6), 2),
        ("act", "activation", "nn.GELU", (-1, 4, 10), 2),
    ],
}


def test_every_form_has_an_expected_site_list(forms) -> None:
    assert sorted(FORM_SITES) == sorted(cls.__name__ for cls in forms.FORMS)


@pytest.mark.parametrize("name", sorted(FORM_SITES))
def test_exact_sites_of_hand_written_models(forms, name: str) -> None:
    sites = surgeon.find_sites(getattr(forms, name)())
    got = [(s.name, s.kind, s.target, s.shape, s.channel_dim) for s in sites]
    assert got == FORM_SITES[name]


def test_final_softmax_and_sigmoid_heads_are_excluded(forms) -> None:
    for cls in (forms.SoftmaxHead, forms.SigmoidHead):
        kinds = {s.target for s in surgeon.find_sites(cls())}
        assert not {"F.softmax", "torch.sigmoid"} & kinds


def test_relu_after_the_classifier_is_final_but_relu_before_it_is_not(forms) -> None:
    names = [s.name for s in surgeon.find_sites(forms.ReluThenPool())]
    assert names == ["x", "act"]  # the F.relu on the logits reaches the output directly


def test_a_non_final_softmax_is_a_site() -> None:
    class Attention(nn.Module):
        input_size = (4, 6)

        def __init__(self) -> None:
            super().__init__()
            self.qk, self.out = nn.Linear(6, 6), nn.Linear(6, 2)

        def forward(self, x):
            attn = torch.softmax(self.qk(x) @ x.transpose(1, 2), dim=-1)
            return self.out((attn @ x).mean(1))

    sites = surgeon.find_sites(Attention())
    assert [(s.name, s.kind) for s in sites] == [("x", "input"), ("softmax", "softmax")]


def test_only_float_inputs_are_sites(forms) -> None:
    model = forms.TwoInputs()
    inputs = (torch.randn(2, 3, 6, 6), torch.tensor([0, 2]))
    sites = surgeon.find_sites(model, example_inputs=inputs)
    assert [(s.name, s.kind) for s in sites] == [("x", "input"), ("relu", "activation")]


def test_channel_dim_comes_from_the_producer_not_the_rank(forms) -> None:
    """Same rank (4-D), different layouts: conv NCHW -> 1, permuted + Linear NHWC -> 3."""
    conv = {s.name: s for s in surgeon.find_sites(forms.ModuleActs())}
    convnext = {s.name: s for s in surgeon.find_sites(forms.ConvNeXtBlock())}
    assert conv["act1"].channel_dim == 1 and len(conv["act1"].shape) == 4
    assert convnext["act"].channel_dim == 3 and len(convnext["act"].shape) == 4
    gm = surgeon.insert(forms.ConvNeXtBlock(), "channel", "channel")
    assert gm.ss_act.shift.shape == (16,)  # the hidden width, not H or W (6)
    tokens = surgeon.insert(forms.TokenMLP(), "channel", "none")
    assert tokens.ss_act.shift.shape == (10,) and tokens.ss_x.shift.shape == (6,)


def test_timm_squeeze_excite_gates_and_norm_act() -> None:
    model = surgeon.build_model("timm:test_efficientnet")
    sites = surgeon.find_sites(model, input_size="3,32,32")
    kinds = {s.kind for s in sites}
    assert kinds == {"input", "norm_act", "activation", "gate"}
    gates = [s for s in sites if s.kind == "gate"]
    assert gates and all(s.name.endswith("se_gate") for s in gates)
    assert all(s.shape[2:] == (1, 1) for s in gates)  # one value per channel


def test_include_and_exclude_by_kind_and_glob() -> None:
    model = surgeon.build_model("allconv")
    names = lambda **kw: [s.name for s in surgeon.find_sites(model, **kw)]  # noqa: E731
    assert names(include=["input"]) == ["x"]
    assert names(exclude=["input"]) == [s[0] for s in ALLCONV_SITES[1:]]
    assert names(include=["features_1*"]) == ["features_1", "features_10", "features_12",
                                              "features_15", "features_17"]  # fmt: skip
    assert names(include=["activation"], exclude=["features_1?"]) == [
        "features_1", "features_3", "features_5", "features_8",
    ]  # fmt: skip
    assert names(include=["gate"]) == []
    with pytest.raises(SurgeonError, match="empty site pattern"):
        names(include=[""])


def test_select_by_kind_on_a_model_with_gates(forms) -> None:
    model = forms.SqueezeExcite()
    assert [s.name for s in surgeon.find_sites(model, include=["gate"])] == ["sigmoid"]
    assert "sigmoid" not in [s.name for s in surgeon.find_sites(model, exclude=["gate"])]


def test_leaf_modules_hide_their_insides(models_dir) -> None:
    model = surgeon.build_model(str(models_dir / "untraceable.py"))
    with pytest.raises(SurgeonError, match="cannot trace"):
        surgeon.find_sites(model, fallback="never")
    by_name = surgeon.find_sites(model, leaf=["DataDependentGate"])
    by_class = surgeon.find_sites(model, leaf=[type(model.gate)])
    assert [s.name for s in by_name] == [s.name for s in by_class] == ["x", "act"]


def test_leaf_makes_a_block_opaque(forms) -> None:
    model = forms.ModuleListLoop()
    assert len(surgeon.find_sites(model)) == 4
    assert [s.name for s in surgeon.find_sites(model, leaf=["Sequential"])] == ["x"]


def test_register_leaf_module_makes_a_class_opaque(forms, monkeypatch) -> None:
    monkeypatch.setattr(registry, "_LEAF_MODULES", set(registry.LEAF_MODULES))

    class Block(nn.Sequential):
        pass

    class Net(nn.Module):
        input_size = (4,)

        def __init__(self) -> None:
            super().__init__()
            self.block, self.head = Block(nn.Linear(4, 4), nn.ReLU()), nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.block(x))

    assert [s.name for s in surgeon.find_sites(Net())] == ["x", "block_1"]
    assert surgeon.register_leaf_module(Block) is Block
    gm = surgeon.insert(Net(), "layer", "layer")
    called = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert "block" in called and "block.1" not in called  # one opaque node
    # the ReLU inside is then reached at module level (a "hybrid" site), not through FX
    assert [s.name for s in surgeon.find_sites(Net())] == ["x", "block.1"]


def test_unknown_leaf_name_is_an_error_with_hint() -> None:
    with pytest.raises(SurgeonError) as err:
        surgeon.find_sites(surgeon.build_model("allconv"), leaf=["NoSuchBlock"])
    assert "NoSuchBlock" in err.value.message
    assert "Conv2d" in err.value.hint


def test_register_activation_extends_the_registry(monkeypatch) -> None:
    class Square(nn.Module):
        def forward(self, x):
            return x * x

    class Net(nn.Module):
        input_size = (4,)

        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.act, self.fc2 = nn.Linear(4, 3), Square(), nn.Linear(3, 2)

        def forward(self, x):
            return self.fc2(self.act(self.fc1(x)))

    monkeypatch.setattr(registry, "_ACT_MODULES", dict(registry.ACT_MODULES))
    monkeypatch.setattr(registry, "ACT_FUNCTIONS", dict(registry.ACT_FUNCTIONS))
    monkeypatch.setattr(registry, "ACT_METHODS", dict(registry.ACT_METHODS))
    monkeypatch.setattr(registry, "_LEAF_MODULES", set(registry.LEAF_MODULES))
    assert [s.name for s in surgeon.find_sites(Net())] == ["x"]
    surgeon.register_activation(Square)
    sites = surgeon.find_sites(Net())
    assert [(s.name, s.kind) for s in sites][1] == ("act", "activation")
    assert sites[1].target.endswith(".Square")
    surgeon.register_activation("square")  # a Tensor method

    class Method(Net):
        def forward(self, x):
            return self.fc2(self.fc1(x).square())

    assert [s.name for s in surgeon.find_sites(Method())] == ["x", "square"]
    with pytest.raises(SurgeonError, match="invalid activation kind"):
        surgeon.register_activation(Square, kind="input")


def test_untraceable_error_names_the_users_file_and_line(models_dir) -> None:
    path = models_dir / "untraceable.py"
    line = next(
        i for i, text in enumerate(path.read_text().splitlines(), 1) if "if x.mean() > 0" in text
    )
    model = surgeon.build_model(str(path))
    for call in (
        lambda: surgeon.find_sites(model, fallback="never"),
        lambda: surgeon.insert(model, fallback="never"),
    ):
        with pytest.raises(SurgeonError) as err:
            call()
        assert f"untraceable.py:{line}" in err.value.message
        assert "control flow" in err.value.message  # the tracer's own reason
        assert "--leaf" in err.value.hint


def test_the_final_rules_on_springenbergs_all_cnn_c(tmp_path) -> None:
    """Springenberg's net ends conv1x1 -> ReLU -> global pooling. By default that ReLU is
    final (its value reaches the output through no parametrised layer); under the thesis's
    rule only the output nonlinearity is final (the softmax, in the loss), so it gets a site."""
    model = surgeon.build_model("allconv", {"width": 0.25})
    assert isinstance(model.features[-1], nn.ReLU)
    default = [s.name for s in surgeon.find_sites(model)]
    thesis = [s.name for s in surgeon.find_sites(model, final="output")]
    assert thesis == [*default, "features_19"]
    gm = surgeon.insert(model, "layer", "layer", final="output")
    assert gm.surgeon_record.passes[-1].options["final"] == "output"
    assert gm.surgeon_record.finals == []
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(gm.eval()(x), model.eval()(x))
    loaded = surgeon.load(surgeon.save(gm, tmp_path / "m"))  # the rule is replayed
    assert [s.name for s in loaded.surgeon_record.sites] == thesis
    plain = surgeon.build_model("allconv", {"width": 0.25, "final_relu": False})
    assert [s.name for s in surgeon.find_sites(plain, final="output")] == default


def test_the_output_rule_keeps_a_softmax_head_final() -> None:
    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(6, 5), nn.Linear(5, 4)

        def forward(self, x):
            return torch.softmax(self.fc2(torch.relu(self.fc1(x))), -1).flatten(1)

    sites = surgeon.find_sites(Head(), final="output", input_size=[6])
    assert [(s.name, s.kind) for s in sites] == [("x", "input"), ("relu", "activation")]
    with pytest.raises(surgeon.SurgeonError, match="invalid final rule"):
        surgeon.find_sites(Head(), final="last", input_size=[6])


def test_batchnorm_follows_the_final_rule() -> None:
    model = surgeon.build_model("allconv", {"width": 0.25})
    default = surgeon.insert_batchnorm(model).surgeon_record.batchnorm
    thesis = surgeon.insert_batchnorm(model, final="output").surgeon_record.batchnorm
    assert thesis == [*default, "bn_features_19"]
