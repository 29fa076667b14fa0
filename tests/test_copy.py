"""deepcopy_module: the same result as copy.deepcopy for module trees."""

from __future__ import annotations

import copy
from collections import OrderedDict

import torch
from torch import nn

from surgeon._copy import deepcopy_module


class Custom(nn.Module):
    """Deep-copied through its own ``__deepcopy__``: the fast path must defer to it."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.copies = 0

    def __deepcopy__(self, memo):
        new = Custom()
        new.lin = copy.deepcopy(self.lin, memo)
        new.copies = self.copies + 1
        return new


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(4, 3)
        self.b.weight = nn.Parameter(self.a.weight.detach().t().clone())
        self.tied = nn.Linear(3, 4)
        self.tied.weight = self.a.weight  # a tied parameter
        self.shared = nn.Sequential(self.a, nn.ReLU())  # a submodule registered twice
        self.register_buffer("steps", torch.arange(3))
        self.peer = self.b  # a plain reference to a submodule (through __setattr__: registered)
        self.__dict__["plain_ref"] = self.a  # a reference outside _modules
        self.table = {"w": self.a.weight, "k": [1, 2, (3, self.steps)]}
        self.names = {"x", "y"}
        self.pair = (1, "two")
        self.custom = Custom()
        self.a.register_forward_hook(lambda m, i, o: o)


def test_same_structure_and_sharing_as_deepcopy():
    net = Net()
    ref, fast = copy.deepcopy(net), deepcopy_module(net)
    assert type(fast) is Net
    assert list(fast.__dict__) == list(ref.__dict__)
    assert [n for n, _ in fast.named_modules(remove_duplicate=False)] == [
        n for n, _ in ref.named_modules(remove_duplicate=False)
    ]
    for (n1, p1), (n2, p2) in zip(
        fast.named_parameters(remove_duplicate=False),
        net.named_parameters(remove_duplicate=False),
        strict=True,
    ):
        assert n1 == n2 and p1 is not p2 and torch.equal(p1, p2)
        assert type(p1) is nn.Parameter and p1.requires_grad
    # sharing inside the model maps to sharing inside the copy, never to the original
    assert fast.tied.weight is fast.a.weight and fast.shared[0] is fast.a
    assert fast.peer is fast.b and fast.plain_ref is fast.a
    assert fast.table["w"] is fast.a.weight and fast.table["k"][2][1] is fast.steps
    assert fast.steps is not net.steps and torch.equal(fast.steps, net.steps)
    assert fast.names == {"x", "y"} and fast.names is not net.names
    assert fast.pair is net.pair  # an immutable tuple of atoms is kept, as deepcopy does
    assert fast.custom.copies == 1  # the class's own __deepcopy__ ran
    assert len(fast.a._forward_hooks) == 1 and fast.a._forward_hooks is not net.a._forward_hooks
    assert isinstance(fast._forward_hooks, OrderedDict)


def test_copy_is_independent_and_computes_the_same():
    torch.manual_seed(0)
    net = Net()
    fast = deepcopy_module(net)
    x = torch.randn(5, 3)
    assert torch.equal(fast.b(fast.a(x)), net.b(net.a(x)))
    with torch.no_grad():
        fast.a.weight.add_(1.0)
    assert not torch.equal(fast.a.weight, net.a.weight)
    assert torch.equal(fast.tied.weight, fast.a.weight)
    fast.a.register_forward_hook(lambda m, i, o: o)
    assert len(net.a._forward_hooks) == 1


def test_timm_model_copies_compute_the_same():
    timm = __import__("timm")
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=5).eval()
    fast = deepcopy_module(model)
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(fast(x), model(x))
    assert {id(p) for p in fast.parameters()}.isdisjoint(id(p) for p in model.parameters())
