"""surgeon.replace_norm / `surgeon insert --replace-norm`: BatchNorm becomes a channel
shift/scale equal to it in eval mode; the result has no batch statistics, trains at batch
size 1, and saves, loads and folds like any surgered model."""

from __future__ import annotations

import json

import pytest
import torch
from surgeon_cli.app import main
from torch import nn

import surgeon
from surgeon.errors import SurgeryError
from surgeon.layers import ShiftScale


@pytest.fixture(autouse=True)
def _threads(one_thread):
    torch.manual_seed(0)


def trained_stats(model: nn.Module) -> nn.Module:
    """Running statistics and affine parameters as after training (not the init's 0/1)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.3, 3.0)
                if m.affine:
                    m.weight.normal_(1.0, 0.4)
                    m.bias.normal_(0.0, 0.4)
    return model.eval()


def batchnorms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def check_equal_in_eval(base: nn.Module, out: nn.Module, size) -> None:
    x = torch.randn(2, *size)
    with torch.no_grad():
        a, b = base.eval()(x), out.eval()(x)
    assert torch.allclose(a, b, atol=1e-4 * max(1.0, a.abs().max().item()), rtol=1e-4), (
        (a - b).abs().max()
    )


def check_batch_one_training(out: nn.Module, size) -> None:
    """Train mode at batch 1: no batch statistics, so the same function as eval mode."""
    x = torch.randn(1, *size)
    out.train()
    y = out(x)
    y.sum().backward()
    with torch.no_grad():
        assert torch.allclose(y, out.eval()(x), atol=1e-5)


@pytest.mark.parametrize("spec", ["torchvision:resnet18", "timm:resnet10t"])
def test_resnets_function_equal_in_eval_mode(spec):
    size = (3, 32, 32)
    base = trained_stats(surgeon.build_model(spec, {"num_classes": 10}))
    n = len(batchnorms(base))
    out = surgeon.replace_norm(base, input_size=size)
    assert not batchnorms(out)
    assert len(out.surgeon_record.to_dict()["replace_norm"]["replaced"]) == n
    assert sum(isinstance(m, ShiftScale) for m in out.modules()) == n
    assert not any("running" in k for k in out.state_dict())  # no batch statistics left
    check_equal_in_eval(base, out, size)
    check_batch_one_training(out, size)
    assert len(batchnorms(base)) == n  # the caller's model is untouched


class Tiny(nn.Module):
    """BatchNorm1d on (N, C) and on (N, C, L), BatchNorm2d, one without affine parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn2 = nn.BatchNorm2d(4, affine=False)
        self.conv1d = nn.Conv1d(4, 5, 1)
        self.bn1l = nn.BatchNorm1d(5)
        self.fc = nn.Linear(5 * 16, 6)
        self.bn1 = nn.BatchNorm1d(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        x = torch.relu(self.bn2(self.conv(x))).flatten(2)
        x = torch.relu(self.bn1l(self.conv1d(x))).flatten(1)
        return self.head(torch.relu(self.bn1(self.fc(x))))


def test_batchnorm1d_and_2d_and_no_affine():
    size = (3, 6, 6)
    base = trained_stats(Tiny())
    out = surgeon.replace_norm(base, input_size=size)
    assert not batchnorms(out)
    check_equal_in_eval(base, out, size)
    check_batch_one_training(out, size)  # BatchNorm1d would raise here


def test_zero_gamma():
    """gamma = 0 with beta = 0 (zero-initialised residual branches) is exact; with beta != 0
    the constant output cannot be written as (x + shift) * scale: refused."""
    base = trained_stats(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)))
    with torch.no_grad():
        base[1].weight[:2] = 0.0
        base[1].bias[:2] = 0.0
    out = surgeon.replace_norm(base, input_size=(3, 4, 4))
    check_equal_in_eval(base, out, (3, 4, 4))
    with torch.no_grad():
        base[1].bias[0] = 0.5
    with pytest.raises(SurgeryError, match="gamma 0 and beta"):
        surgeon.replace_norm(base, input_size=(3, 4, 4))


def test_no_running_stats_is_refused():
    base = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False))
    with pytest.raises(SurgeryError, match="running statistics"):
        surgeon.replace_norm(base, input_size=(3, 4, 4))


def test_timm_batchnorm_act_keeps_its_activation(forms):
    base = trained_stats(forms.NormAct())
    size = getattr(base, "input_size", (3, 8, 8))
    out = surgeon.replace_norm(base, input_size=size)
    assert not batchnorms(out)
    check_equal_in_eval(base, out, size)
    acts = [n for n in out.graph.nodes if n.op == "call_module" and n.target.endswith("_act")]
    assert acts  # the fused activation is now its own module, after the shift/scale


def test_save_load_insert_and_fold(tmp_path):
    """replace_norm -> insert -> fold: saved and rebuilt by replaying the three passes; the
    BatchNorms end up folded into the convs before them."""
    base = trained_stats(surgeon.build_model("timm:resnet10t", {"num_classes": 10}))
    size = (3, 32, 32)
    out = surgeon.insert(surgeon.replace_norm(base, input_size=size), "none", "channel", input_size=size)  # fmt: skip
    surgeon.save(out, tmp_path / "rn")
    back = surgeon.load(tmp_path / "rn")
    check_equal_in_eval(base, back, size)
    folded, report = surgeon.fold(back)
    replaced = set(back.surgeon_record.to_dict()["replace_norm"]["replaced"])
    into = {e.module: e for e in report.entries}
    assert all(into[m].action == "folded" and into[m].direction == "preceding" for m in replaced)
    check_equal_in_eval(base, folded, size)
    surgeon.save(folded, tmp_path / "f")
    check_equal_in_eval(base, surgeon.load(tmp_path / "f"), size)


def test_cli_insert_replace_norm(tmp_path, capsys):
    out = tmp_path / "m"
    code = main(["insert", "timm:resnet10t", "--input-size", "3,32,32", "--replace-norm",
                 "--shift", "none", "--scale", "none", "-o", str(out), "--json"])  # fmt: skip
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert len(summary["replace_norm"]["replaced"]) == 14
    assert summary["replace_norm"]["max_abs_diff"] < 1e-5
    assert not batchnorms(surgeon.load(out))
