"""Watching one forward run: which activation modules and functions are called, with what
output shapes and layouts, and when parametrised modules run (for finality).

Shared by the module-level sites inside leaves (:mod:`surgeon.module_sites`) and the eager
fallback (:mod:`surgeon.eager`). Activation *functions* are seen through a
``TorchFunctionMode`` that is on only inside a watched scope.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from . import registry
from .sites import describe, module_layout


@dataclass
class Call:
    """One activation call seen during the run."""

    path: str  # the activation module, or the innermost module around a function call
    target: str  # nn.ReLU, F.softmax, Tensor.sigmoid, ...
    scope: str  # the leaf (or root) it happened in
    inv: int  # which call of that scope
    seq: int  # when it ended
    tag: str  # meta, fake or real: which attempt of the run
    site: bool  # a module that gets a module-level site (else: unreachable)
    shape: tuple[int, ...] | None = None
    dtype: torch.dtype | None = None
    layout: str | None = None  # "first"/"last" from the layer that produced its input


def _tag(obj) -> str | None:
    if isinstance(obj, (tuple, list)):
        return next((t for t in map(_tag, obj) if t is not None), None)
    if isinstance(obj, dict):
        return _tag(list(obj.values()))
    if not isinstance(obj, torch.Tensor):
        return None
    from torch._subclasses.fake_tensor import FakeTensor

    if isinstance(obj, FakeTensor):
        return "fake"
    return "meta" if obj.is_meta else "real"


def activation_target(func) -> str | None:
    """The descriptor of a registered activation function or Tensor method, else None."""
    try:
        entry = registry.ACT_FUNCTIONS.get(func)
    except TypeError:  # unhashable
        return None
    if entry is not None:
        return describe(func)
    name = getattr(func, "__name__", None)
    if name in registry.ACT_METHODS and getattr(torch.Tensor, name, None) is func:
        return describe(name)
    return None


class _Functions(TorchFunctionMode):
    def __init__(self, obs: Observer) -> None:
        super().__init__()
        self.obs = obs

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        obs = self.obs
        if obs.scopes and not obs.act_depth:
            target = activation_target(func)
            if target is not None:
                obs.record(obs.stack[-1] if obs.stack else obs.scopes[-1][0], target, False, out)
        return out


class Observer:
    """Watch a forward run inside ``scopes`` (``{path: module}``): the output shape of each
    call of the activation modules in ``targets``, the activation calls nothing reaches, and
    when parametrised modules run (for finality). Use as a context manager."""

    def __init__(
        self,
        scopes: dict[str, nn.Module],
        targets: dict[str, nn.Module],
        others: dict[str, nn.Module] | None = None,
    ) -> None:
        self.scope_modules, self.targets = scopes, targets
        self.others = others or {}  # activation modules that get no site (counted, unreached)
        self.calls: list[Call] = []
        self.last_param: dict[int, int] = {}  # scope call -> seq of its last parametrised module
        self.scopes: list[tuple[str, int]] = []
        self.stack: list[str] = []
        self.act_depth = 0
        self.seq = self.inv = 0
        self._handles: list = []
        self._mode: _Functions | None = None
        self._layout: dict[int, tuple[str, tuple[int, ...]]] = {}
        self._inputs: dict[str, list[tuple[int, ...] | None]] = defaultdict(list)

    # hooks
    def _scope_pre(self, path: str):
        def hook(module, args):
            self.inv += 1
            if not self.scopes:
                self._functions_on()
            self.scopes.append((path, self.inv))

        return hook

    def _scope_post(self, module, args, output):
        if self.scopes:
            self.scopes.pop()
            if not self.scopes:
                self._functions_off()

    # The function mode is on only inside a scope: outside, every torch call of the run
    # (and of the shape recorder) would pay for it.
    def _functions_on(self) -> None:
        if self._mode is None:
            self._mode = _Functions(self)
            self._mode.__enter__()

    def _functions_off(self) -> None:
        if self._mode is not None:
            mode, self._mode = self._mode, None
            mode.__exit__(None, None, None)

    def enter(self, path: str) -> None:
        """Enter a scope that is not a module (a function the graph keeps whole)."""
        self._scope_pre(path)(None, ())

    def leave(self) -> None:
        self._scope_post(None, (), None)

    def _module_pre(self, path: str, has_params: bool):
        def hook(module, args):
            self.stack.append(path)
            if has_params and self.scopes and not self.act_depth:
                self.seq += 1
                self.last_param[self.scopes[-1][1]] = self.seq

        return hook

    def _module_post(self, layout: str | None):
        def hook(module, args, output):
            if self.stack:
                self.stack.pop()
            if layout and self.scopes and isinstance(output, torch.Tensor):
                self._layout[self.scopes[-1][1]] = (layout, tuple(output.shape))

        return hook

    def _act_pre(self, path: str):
        def hook(module, args):
            if not self.act_depth and self.scopes:
                x = args[0] if args and isinstance(args[0], torch.Tensor) else None
                last = self._layout.get(self.scopes[-1][1])
                ok = x is not None and last is not None and last[1] == tuple(x.shape)
                self._inputs[path].append(last[0] if ok else None)
            self.act_depth += 1

        return hook

    def _act_post(self, path: str, site: bool, target: str):
        def hook(module, args, output):
            self.act_depth -= 1
            if not self.act_depth and self.scopes:
                layouts = self._inputs[path]
                layout = layouts.pop() if layouts else None
                self.record(path, target, site, output, module_layout(module) or layout)

        return hook

    def record(self, path: str, target: str, site: bool, out, layout: str | None = None) -> None:
        self.seq += 1
        scope, inv = self.scopes[-1]
        shape = dtype = None
        if isinstance(out, torch.Tensor):
            shape, dtype = tuple(int(s) for s in out.shape), out.dtype
        tag = _tag(out) or "real"
        self.calls.append(Call(path, target, scope, inv, self.seq, tag, site, shape, dtype, layout))

    def __enter__(self) -> Observer:
        acts = {**{p: (m, True) for p, m in self.targets.items()},
                **{p: (m, False) for p, m in self.others.items()}}  # fmt: skip
        act_ids = {id(m) for m, _ in acts.values()}
        for path, scope in self.scope_modules.items():
            self._handles.append(scope.register_forward_pre_hook(self._scope_pre(path)))
            self._handles.append(scope.register_forward_hook(self._scope_post, always_call=True))
            for sub, mod in scope.named_modules(prefix=path):
                if id(mod) in act_ids:
                    continue
                has_params = any(True for _ in mod.parameters(recurse=False))
                layout = module_layout(mod)
                self._handles.append(
                    mod.register_forward_pre_hook(self._module_pre(sub, has_params))
                )
                self._handles.append(
                    mod.register_forward_hook(self._module_post(layout), always_call=True)
                )
        for path, (mod, site) in acts.items():
            target = describe(type(mod))
            self._handles.append(mod.register_forward_pre_hook(self._act_pre(path)))
            self._handles.append(
                mod.register_forward_hook(self._act_post(path, site, target), always_call=True)
            )
        return self

    def __exit__(self, *exc) -> None:
        self._functions_off()
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def reset(self) -> None:
        """Forget what was seen (before another attempt of the run)."""
        self.calls.clear()
        self.scopes.clear()
        self._functions_off()
        self.stack.clear()
        self.act_depth = 0

    def final_calls(self) -> list[Call]:
        """The calls of the last attempt (meta, fake and real attempts tag their tensors)."""
        if not self.calls:
            return []
        tag = self.calls[-1].tag
        return [c for c in self.calls if c.tag == tag]

    def is_last_in_scope(self, call: Call) -> bool:
        """No parametrised module ran after ``call`` in the same call of its scope."""
        return self.last_param.get(call.inv, 0) < call.seq
