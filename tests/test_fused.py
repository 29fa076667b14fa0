"""surgeon.ops and the fuse_relu pass: the one-pass shift-scale op (PyTorch path; the Triton path is checked by
benchmarks/check_triton.py on a GPU, and here in Triton's interpreter by one slow test)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import fx, nn

import surgeon
from surgeon.layers import MODES, ReLUShiftScale, ShiftScale
from surgeon.ops import fused as op
from surgeon.ops import relu_shift_scale, shift_scale
from surgeon.passes import fuse_relu, set_fused, unfuse_relu

PAIRS = [(s, c) for s in MODES for c in MODES if (s, c) != ("none", "none")]
# (name, shape, channel dim, memory format)
LAYOUTS = [
    ("nchw", (2, 3, 2, 3), 1, None),
    ("channels_last", (2, 3, 2, 3), 1, torch.channels_last),
    ("nc", (3, 4), 1, None),
    ("nlc", (2, 3, 4), 2, None),
    ("nhwc", (2, 2, 3, 4), 3, None),
]


def same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape and memory layout; the stride of a size-1 dim is arbitrary."""
    return a.shape == b.shape and all(
        sa == sb for sa, sb, n in zip(a.stride(), b.stride(), a.shape, strict=True) if n > 1
    )


@pytest.fixture(autouse=True)
def torch_backend():
    """CPU tests exercise the PyTorch path whatever SURGEON_FUSED_BACKEND says."""
    old, op.BACKEND = op.BACKEND, "torch"
    yield
    op.BACKEND = old


def make_input(shape, mf, dtype=torch.float64, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    return x.to(memory_format=mf) if mf is not None else x


def random_module(shift, scale, shape, cd, seed=1, **kw) -> ShiftScale:
    m = ShiftScale(shift, scale, shape[1:], cd, **kw)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if m.shift is not None:
            m.shift.copy_(0.5 * torch.randn(m.shift.shape, generator=g))
        if m.scale is not None:
            m.scale.copy_(1 + 0.5 * torch.randn(m.scale.shape, generator=g))
    return m


def params(m: ShiftScale, dtype=None):
    out = []
    for p in (m.shift, m.scale):
        out.append(None if p is None else p.detach().to(dtype or p.dtype).requires_grad_())
    return out


def forward_backward(fn, x, ps, g):
    x = x.detach().requires_grad_()
    y = fn(x, *ps)
    y.backward(g)
    return [y.detach(), x.grad] + [None if p is None else p.grad for p in ps]


@pytest.mark.parametrize("layout", LAYOUTS, ids=[lay[0] for lay in LAYOUTS])
@pytest.mark.parametrize("modes", PAIRS, ids=[f"{s}-{c}" for s, c in PAIRS])
@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
def test_gradcheck(layout, modes, relu):
    _, shape, cd, mf = layout
    m = random_module(*modes, shape, cd)
    x = make_input(shape, mf).requires_grad_()
    if relu:  # keep x away from the kink, where finite differences are meaningless
        x = (x.detach() + 0.2 * x.detach().sign()).requires_grad_()
    b, a = params(m, torch.float64)
    inputs = [t for t in (x, b, a) if t is not None]

    def fn(*args):
        it = iter(args)
        xx = next(it)
        bb = next(it) if b is not None else None
        aa = next(it) if a is not None else None
        return shift_scale(xx, bb, aa, *modes, cd, relu)

    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=[lay[0] for lay in LAYOUTS])
@pytest.mark.parametrize("modes", PAIRS, ids=[f"{s}-{c}" for s, c in PAIRS])
def test_fused_matches_reference(modes, layout, dtype):
    _, shape, cd, mf = layout
    shape = (4, *shape[1:])
    ref_m = random_module(*modes, shape, cd)
    fused_m = random_module(*modes, shape, cd, fused=True)
    x = make_input(shape, mf, dtype)
    g = make_input(shape, mf, dtype, seed=5)
    ref = forward_backward(lambda x, b, a: ref_m(x), x, [ref_m.shift, ref_m.scale], g)
    got = forward_backward(lambda x, b, a: fused_m(x), x, [fused_m.shift, fused_m.scale], g)
    exact = forward_backward(  # fp64 ground truth
        lambda x, b, a: shift_scale(x, b, a, *modes, cd),
        x.double(),
        params(ref_m, torch.float64),
        g.double(),
    )
    assert got[0].dtype == dtype and same_layout(got[0], x)
    assert got[1].dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for r, t, e in zip(ref, got, exact):
        if r is None:
            assert t is None
            continue
        assert t.shape == r.shape and t.dtype == r.dtype
        scale = e.abs().max().item() + 1.0
        torch.testing.assert_close(t.double(), e, atol=tol * scale, rtol=tol)
        torch.testing.assert_close(t.double(), r.double(), atol=2 * tol * scale, rtol=2 * tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("modes", PAIRS, ids=[f"{s}-{c}" for s, c in PAIRS])
def test_relu_fused_matches_relu_then_shift_scale(modes, dtype):
    shape, cd = (4, 3, 2, 3), 1
    m = random_module(*modes, shape, cd)
    x = make_input(shape, torch.channels_last, dtype)
    g = make_input(shape, torch.channels_last, dtype, seed=3)
    ps = [m.shift, m.scale]
    ref = forward_backward(lambda x, b, a: m(torch.relu(x)), x, ps, g)
    for p in ps:
        if p is not None:
            p.grad = None
    got = forward_backward(lambda x, b, a: relu_shift_scale(x, b, a, *modes, cd), x, ps, g)
    tol = 1e-6 if dtype == torch.float32 else 2e-2
    for r, t in zip(ref, got):
        if r is not None:
            scale = r.abs().max().item() + 1.0
            torch.testing.assert_close(t.double(), r.double(), atol=tol * scale, rtol=tol)
    assert torch.equal(got[1] == 0, (x <= 0) | (ref[1] == 0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", LAYOUTS, ids=[lay[0] for lay in LAYOUTS])
@pytest.mark.parametrize("modes", PAIRS, ids=[f"{s}-{c}" for s, c in PAIRS])
def test_identity_at_init_exact(modes, layout, dtype):
    _, shape, cd, mf = layout
    x = make_input(shape, mf, dtype) * 1e3
    for fused_on in (False, True):
        m = ShiftScale(*modes, shape[1:], cd, fused=fused_on)
        y = m(x)
        assert y.dtype == dtype and same_layout(y, x)
        assert torch.equal(y, x)
    assert ShiftScale(*modes, shape[1:], cd).fused is False  # off by default


def test_grads_reach_fp32_params_from_bf16_input():
    m = random_module("channel", "element", (2, 3, 4), 1, fused=True)
    x = make_input((2, 3, 4), None, torch.bfloat16).requires_grad_()
    m(x).sum().backward()
    assert m.shift.grad.dtype == torch.float32 and m.scale.grad.dtype == torch.float32
    assert x.grad.dtype == torch.bfloat16


def test_saves_input_not_intermediate():
    """The fused op keeps x (already alive) and the params; the plain one also keeps x + b."""

    def saved(m: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
        packed = []

        def pack(t):
            packed.append(t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            m(x)
        return [t for t in packed if t.numel() == x.numel()]

    x = make_input((4, 3, 5, 5), None, torch.float32).requires_grad_()
    plain = saved(ShiftScale("channel", "channel", (3, 5, 5), 1), x)
    one = saved(ShiftScale("channel", "channel", (3, 5, 5), 1, fused=True), x)
    assert len(one) == 1 and one[0] is x
    assert any(t is not x for t in plain)  # the intermediate x + shift


def tiny_convnet() -> nn.Module:
    class Tiny(nn.Module):
        input_size = (3, 8, 8)

        def __init__(self) -> None:
            super().__init__()
            self.c1 = nn.Conv2d(3, 4, 3, padding=1)
            self.act = nn.ReLU(inplace=True)
            self.c2 = nn.Conv2d(4, 5, 3, padding=1)
            self.fc = nn.Linear(5, 3)

        def forward(self, x):
            x = self.act(self.c1(x))
            x = torch.relu(self.c2(x))
            return self.fc(x.mean((2, 3)))

    torch.manual_seed(0)
    return Tiny()


def test_insert_fused_records_and_matches():
    model = tiny_convnet()
    plain = surgeon.insert(model, "channel", "layer")
    fast = surgeon.insert(model, "channel", "layer", fused=True)
    mods = surgeon.inserted_modules(fast)
    assert mods and all(m.fused for m in mods.values())
    assert not any(m.fused for m in surgeon.inserted_modules(plain).values())
    assert fast.surgeon_record.to_dict()["passes"][-1]["fused"] is True
    for p in fast.parameters():
        if p.dim() <= 1:
            with torch.no_grad():
                p.add_(0.1)
    plain.load_state_dict(fast.state_dict())
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(fast(x), plain(x))
    set_fused(fast, False)
    assert not any(m.fused for m in surgeon.inserted_modules(fast).values())


def test_fuse_relu_pass():
    gm = surgeon.insert(tiny_convnet(), "channel", "channel")
    for p in gm.parameters():
        with torch.no_grad():
            p.add_(0.05 * torch.randn_like(p))
    merged = fuse_relu(gm)
    kinds = [type(m) for m in merged.modules()]
    assert kinds.count(ReLUShiftScale) == 2
    assert not any(isinstance(m, nn.ReLU) for m in merged.modules())
    assert "relu" not in merged.code.replace("ss_relu", "")
    assert list(merged.state_dict()) == list(gm.state_dict())
    assert merged.surgeon_record.to_dict()["passes"] == [
        *gm.surgeon_record.to_dict()["passes"],
        {"name": "fuse_relu"},
    ]
    assert merged.surgeon_record.to_dict()["sites"] == gm.surgeon_record.to_dict()["sites"]
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(merged(x), gm(x))
    back = unfuse_relu(merged)
    assert not any(isinstance(m, ReLUShiftScale) for m in back.modules())
    torch.testing.assert_close(back(x), gm(x))
    assert back.surgeon_record.to_dict()["passes"][-1] == {"name": "unfuse_relu"}
    plain = surgeon.strip(gm)
    for stripped in (surgeon.strip(back), surgeon.strip(merged)):  # the merged ReLU stays
        assert torch.equal(stripped(x), plain(x))
        assert [p["name"] for p in stripped.surgeon_record.to_dict()["passes"]] == []


def test_save_load_replays_fused(tmp_path):
    gm = surgeon.insert(
        surgeon.build_model("allconv", {"width": 0.25}), "channel", "layer", fused=True
    )
    merged = fuse_relu(gm)
    surgeon.save(merged, tmp_path / "m")
    back = surgeon.load(tmp_path / "m")  # replays insert(fused=True), then fuse_relu
    mods = surgeon.inserted_modules(back)
    assert len(mods) == 9 and all(m.fused for m in mods.values())
    assert sum(isinstance(m, ReLUShiftScale) for m in mods.values()) == 8
    assert back.code == merged.code
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(back.eval()(x), merged.eval()(x))


def test_fuse_relu_keeps_shared_inplace_relu():
    class Shared(nn.Module):
        input_size = (4,)

        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.act = nn.ReLU(inplace=True)

        def forward(self, x):
            h = self.fc(x)
            return self.act(h) + h  # h is the ReLU's result too

    gm = surgeon.insert(Shared(), "layer", "layer", include=["activation"])
    merged = fuse_relu(gm)
    assert not any(isinstance(m, ReLUShiftScale) for m in merged.modules())


def test_symbolic_trace_through_fused_module():
    m = random_module("channel", "layer", (2, 3, 4, 4), 1, fused=True)
    gm = fx.symbolic_trace(m)  # not surgeon's tracer: ShiftScale is not a leaf here
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(gm(x), m(x))


def test_dynamo_traces_fused_modules_without_graph_breaks():
    gm = surgeon.insert(tiny_convnet(), "channel", "element", fused=True)
    compiled = torch.compile(gm, backend="eager", fullgraph=True)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(compiled(x), gm(x))


@pytest.mark.slow
def test_torch_compile_inductor_one_step():
    torch._dynamo.reset()
    model = fuse_relu(surgeon.insert(tiny_convnet(), "channel", "layer", fused=True))
    ref = fuse_relu(surgeon.insert(tiny_convnet(), "channel", "layer", fused=True))
    compiled = torch.compile(model, fullgraph=True)
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])
    losses = []
    for m in (compiled, ref):
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        loss = nn.functional.cross_entropy(m(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4)


@settings(max_examples=40, deadline=None)
@given(
    data=st.data(),
    ndim=st.integers(2, 5),
    modes=st.sampled_from(PAIRS),
    relu=st.booleans(),
    channels_last=st.booleans(),
)
def test_property_matches_reference(data, ndim, modes, relu, channels_last):
    shape = tuple(data.draw(st.lists(st.integers(1, 4), min_size=ndim, max_size=ndim)))
    cd = data.draw(st.integers(1, ndim - 1))
    mf = torch.channels_last if channels_last and ndim == 4 else None
    m = random_module(*modes, shape, cd, seed=data.draw(st.integers(0, 99)))
    x = make_input(shape, mf, seed=data.draw(st.integers(0, 99)))
    g = make_input(shape, mf, seed=7)
    b, a = params(m, torch.float64)
    m = m.double()

    def ref_fn(x, b, a):
        x = torch.relu(x) if relu else x
        if b is not None:
            x = x + op._view(b, modes[0], x, cd)
        return x * op._view(a, modes[1], x, cd) if a is not None else x

    ref = forward_backward(ref_fn, x, [b, a], g)
    b2, a2 = params(m)
    got = forward_backward(lambda x, b, a: shift_scale(x, b, a, *modes, cd, relu), x, [b2, a2], g)
    assert same_layout(got[0], x)
    for r, t in zip(ref, got):
        if r is None:
            assert t is None
        else:
            torch.testing.assert_close(t, r)


@pytest.mark.slow
def test_triton_kernels_in_interpreter():
    """The Triton kernels (forward, both backward kernels) against an fp64 reference, run
    by Triton's CPU interpreter on a subset of modes and layouts."""
    pytest.importorskip("triton")
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(root))
    env.pop("SURGEON_FUSED_BACKEND", None)
    out = subprocess.run(
        [sys.executable, "benchmarks/check_triton.py", "--device", "cpu", "--quick"],
        cwd=root, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0 and "PASS" in out.stdout, out.stdout[-3000:] + out.stderr[-3000:]
