"""Shared test fixtures: the hand-written model files and surgery checks."""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import nn

MODELS_DIR = Path(__file__).parent / "models"

try:  # property tests draw the same examples on every run (no flaky CI); explore with
    # HYPOTHESIS_PROFILE=explore
    from hypothesis import settings

    settings.register_profile("ci", derandomize=True, print_blob=True)
    settings.register_profile("explore", max_examples=500)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
except ImportError:  # pragma: no cover - hypothesis is a test dependency
    pass


@pytest.fixture(scope="session")
def models_dir() -> Path:
    """``tests/models``: hand-written model files, one per way of writing a model."""
    return MODELS_DIR


@pytest.fixture(scope="session")
def forms() -> ModuleType:
    """``tests/models/forms.py`` imported as a module (one class per activation form)."""
    path = MODELS_DIR / "forms.py"
    spec = importlib.util.spec_from_file_location("surgeon_test_forms", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def seeded() -> None:
    """Seed torch's global RNG so random inits and inputs repeat from run to run."""
    torch.manual_seed(0)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Run torch on one CPU thread (the CI box is small and shared), then restore."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@pytest.fixture(scope="module")
def training_env(tmp_path_factory) -> Iterator[Path]:
    """For a module of training tests: a data cache they share (never ~/.cache) and one torch
    thread (tiny models: faster and steadier on busy cores); yields the cache folder."""
    cache = tmp_path_factory.getbasetemp() / "surgeon-cache"
    mp = pytest.MonkeyPatch()
    mp.setenv("SURGEON_CACHE", str(cache))
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield cache
    finally:
        torch.set_num_threads(n)
        mp.undo()


def _tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _tensors(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _tensors(v)]
    return []


@torch.no_grad()
def _max_abs_diff(a: nn.Module, b: nn.Module, *inputs: torch.Tensor) -> float:
    """max |a(x) - b(x)| over all output tensors, both in eval mode (modes restored)."""
    modes = a.training, b.training
    a.eval()
    b.eval()
    try:
        out_a, out_b = _tensors(a(*inputs)), _tensors(b(*inputs))
    finally:
        a.train(modes[0])
        b.train(modes[1])
    assert len(out_a) == len(out_b), "the two models return different numbers of tensors"
    return max(((x - y).abs().max().item() for x, y in zip(out_a, out_b, strict=True)), default=0.0)


@pytest.fixture(scope="session")
def max_abs_diff() -> Callable[..., float]:
    """``max_abs_diff(a, b, *inputs)``: largest output difference, eval mode."""
    return _max_abs_diff


def _params_without_grad(gm: nn.Module, *inputs: torch.Tensor) -> list[str]:
    """Backward a random projection of the outputs; return the inserted parameters whose
    gradient is missing or all zero.

    Weights initialised to exactly zero (ResNet's last BN gamma, zero-init heads) block every
    gradient behind them; they get small random values first. The shift/scale modules are
    still at identity, so this tests gradient flow through the surgered graph.
    """
    import surgeon

    inserted = surgeon.inserted_modules(gm)
    own = {id(p) for m in inserted.values() for p in m.parameters()}
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in gm.parameters():
            if id(p) not in own and p.is_floating_point() and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    gm.zero_grad(set_to_none=True)
    was = gm.training
    gm.eval()
    try:
        outs = _tensors(gm(*inputs))
    finally:
        gm.train(was)
    loss = sum((o.float() * torch.randn(o.shape, generator=g)).sum() for o in outs)
    loss.backward()
    return [
        f"{name}.{pname}"
        for name, m in inserted.items()
        for pname, p in m.named_parameters()
        if p.grad is None or not p.grad.any()
    ]


@pytest.fixture(scope="session")
def params_without_grad() -> Callable[..., list[str]]:
    """``params_without_grad(gm, *inputs)``: inserted parameters that get no gradient."""
    return _params_without_grad


@pytest.fixture
def fast(monkeypatch):
    """The fast path on, whatever ``SURGEON_FAST`` says (skipped where this torch has none)."""
    from surgeon import _fx_fast

    if _fx_fast.why_off():
        pytest.skip(_fx_fast.why_off())
    monkeypatch.setenv("SURGEON_FAST", "1")
    monkeypatch.delenv("SURGEON_FAST_SKIP", raising=False)
