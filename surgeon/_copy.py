"""``copy.deepcopy`` for module trees, a few times faster.

``copy.deepcopy(model)`` spends most of its time in the generic machinery, not in copying
tensors: every module goes through ``__reduce_ex__`` and ``_reconstruct``, and each of its
dozen hook dictionaries is rebuilt through ``OrderedDict.__reduce__``. :func:`deepcopy_module`
does what ``copy.deepcopy`` does for the containers a module is made of (modules whose class
keeps ``nn.Module``'s pickling protocol, plain ``dict``/``OrderedDict``/``list``/``set``/
``tuple`` and atomic values) and hands everything else (tensors, parameters, other objects)
to ``copy.deepcopy`` with the same memo, so shared references stay shared exactly as they
would.
"""

from __future__ import annotations

import copy
import copyreg
import functools
import types
import weakref
from collections import OrderedDict
from typing import Any

from torch import nn

# the types copy.deepcopy returns as they are
_ATOMIC = frozenset(
    {
        type(None),
        int,
        float,
        bool,
        complex,
        bytes,
        str,
        types.CodeType,
        type,
        range,
        types.BuiltinFunctionType,
        type(Ellipsis),
        type(NotImplemented),
        types.FunctionType,
        weakref.ref,
        property,
    }
)

_OBJECT_REDUCE_EX = object.__reduce_ex__
_OBJECT_REDUCE = object.__reduce__


@functools.cache
def _plain_module_class(cls: type) -> bool:
    """Whether ``copy.deepcopy`` copies instances of ``cls`` as ``cls.__new__(cls)`` then
    ``__setstate__`` of the deep-copied ``nn.Module.__getstate__()`` (no class on the way
    overrides how instances are reduced; ``__setstate__`` may be overridden, it is called
    the same way, e.g. by ``nn.Conv2d``)."""
    return (
        issubclass(cls, nn.Module)
        and cls not in copy._deepcopy_dispatch
        and cls not in copyreg.dispatch_table
        and getattr(cls, "__deepcopy__", None) is None
        and cls.__reduce_ex__ is _OBJECT_REDUCE_EX
        and cls.__reduce__ is _OBJECT_REDUCE
        and cls.__getstate__ is nn.Module.__getstate__
        and not hasattr(cls, "__getnewargs_ex__")
        and not hasattr(cls, "__getnewargs__")
    )


def _copy(x: Any, memo: dict[int, Any]) -> Any:
    cls = type(x)
    if cls in _ATOMIC:
        return x
    found = memo.get(id(x), memo)
    if found is not memo:
        return found
    if cls is dict or cls is OrderedDict:
        y = cls()
        memo[id(x)] = y
        for k, v in x.items():
            y[_copy(k, memo)] = _copy(v, memo)
    elif cls is list:
        y = []
        memo[id(x)] = y
        y.extend(_copy(v, memo) for v in x)
    elif cls is set:
        y = set()
        memo[id(x)] = y
        y.update(_copy(v, memo) for v in x)
    elif cls is tuple:  # copy.deepcopy's rule: the same tuple if every item is itself
        items = [_copy(v, memo) for v in x]
        if all(a is b for a, b in zip(items, x, strict=True)):
            return x
        y = tuple(items)
        memo[id(x)] = y
    else:
        if not _plain_module_class(cls):
            return copy.deepcopy(x, memo)
        y = cls.__new__(cls)
        memo[id(x)] = y
        state = x.__getstate__()
        y.__setstate__({k: _copy(v, memo) for k, v in state.items()})
    memo.setdefault(id(memo), []).append(x)  # keep x alive, as copy.deepcopy does
    return y


def deepcopy_module(module: nn.Module) -> nn.Module:
    """The same as ``copy.deepcopy(module)``, faster for large module trees."""
    return _copy(module, {})
