"""Putting a module into a model: after a graph node, or after/before a module via a hook.

Graph insertion follows the FX idiom (torchvision's feature extraction, torch's quantisation
``prepare``): add the submodule under a free name, call it after the node, and repoint every
*other* user of the node. Module-level attachment makes the new module a child of the module
it follows, applied by a forward hook (:class:`ApplyChild`) that survives ``copy.deepcopy``.
"""

from __future__ import annotations

import torch
from torch import fx, nn


def free_name(module: nn.Module, base: str) -> str:
    """``base``, or ``base_1``, ``base_2``, ... : the first name ``module`` has no attribute for."""
    name, i = base, 1
    while hasattr(module, name):
        name, i = f"{base}_{i}", i + 1
    return name


def free_path(root: nn.Module, base: str) -> str:
    """Like :func:`free_name` for a dotted submodule path of ``root``."""
    name, i = base, 1
    while _has_submodule(root, name):
        name, i = f"{base}_{i}", i + 1
    return name


def _has_submodule(root: nn.Module, path: str) -> bool:
    try:
        root.get_submodule(path)
    except AttributeError:
        return False
    return True


def insert_after(gm: fx.GraphModule, node: fx.Node, name: str, module: nn.Module) -> fx.Node:
    """Add ``module`` as ``name`` and call it on ``node``'s output; every other user of
    ``node`` reads the new node instead. Inputs keep the placeholders together at the top."""
    gm.add_submodule(name, module)
    anchor = node
    if node.op == "placeholder":
        anchor = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
    with gm.graph.inserting_after(anchor):
        new = gm.graph.call_module(name, (node,))
    for user in list(node.users):
        if user is not new:  # not node.replace_all_uses_with(new): new would consume itself
            user.replace_input_with(node, new)
    return new


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    """Replace (or add) the submodule at dotted ``path``."""
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


class ApplyChild:
    """Forward hook: pass the module's output through its child module ``name``."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, module: nn.Module, args, output):
        return getattr(module, self.name)(output) if isinstance(output, torch.Tensor) else None


class ApplyChildToInput:
    """Forward pre-hook (with kwargs): pass the first input, positional or named ``param``,
    through the child module ``name``."""

    def __init__(self, name: str, param: str) -> None:
        self.name, self.param = name, param

    def __call__(self, module: nn.Module, args, kwargs):
        child = getattr(module, self.name)
        if args and isinstance(args[0], torch.Tensor):
            return (child(args[0]), *args[1:]), kwargs
        if isinstance(kwargs.get(self.param), torch.Tensor):
            return args, {**kwargs, self.param: child(kwargs[self.param])}
        return None


SS_CHILD = "ss"


def attach_after(module: nn.Module, child: nn.Module) -> str:
    """Make ``child`` a child of ``module`` applied to its output; return the child's name."""
    name = free_name(module, SS_CHILD)
    module.add_module(name, child)
    module.register_forward_hook(ApplyChild(name))
    return name


def attach_before(root: nn.Module, child: nn.Module, param: str) -> str:
    """Make ``child`` a child of ``root`` applied to its first input; return the child's name."""
    name = free_name(root, f"ss_{param}")
    root.add_module(name, child)
    root.register_forward_pre_hook(ApplyChildToInput(name, param), with_kwargs=True)
    return name


def has_attached(module: nn.Module) -> bool:
    return any(isinstance(h, ApplyChild) for h in module._forward_hooks.values())


def detach_all(model: nn.Module) -> int:
    """Remove every hook-applied module; return how many were removed."""
    removed = 0
    for m in list(model.modules()):
        for hooks, extra in (
            (m._forward_hooks, ("_forward_hooks_with_kwargs", "_forward_hooks_always_called")),
            (m._forward_pre_hooks, ("_forward_pre_hooks_with_kwargs",)),
        ):
            for key, hook in list(hooks.items()):
                if not isinstance(hook, (ApplyChild, ApplyChildToInput)):
                    continue
                del hooks[key]
                for attr in extra:
                    getattr(m, attr, {}).pop(key, None)
                if hook.name in m._modules:
                    del m._modules[hook.name]
                removed += 1
    return removed


def device_of(module: nn.Module) -> torch.device:
    """The device of the module's first parameter (CPU for a module without any)."""
    return next((p.device for p in module.parameters()), torch.device("cpu"))
