"""The fast path: every speed-up that leans on torch.fx's private state, in one module.

Written for and tested on torch 2.14.1; used only for torch versions in ``SUPPORTED`` whose
tracer, graph and GraphModule still have the private parts it touches (:func:`why_off`
says why not), and unless ``SURGEON_FAST=0``. Anywhere else the plain path runs
(``surgeon.tracing``, ``surgeon.shapes``): the same graphs, sites and shapes, slower. ``SURGEON_FAST_SKIP=a,b``
turns named speed-ups off one by one (``SPEEDUPS``; ``benchmarks/insert_phases.py``).

- ``tracer``: parameter and tensor reads are dictionary lookups (fx scans
  ``named_parameters()`` per read: quadratic), and unpacking a proxy does not disassemble
  the caller's bytecode each time;
- ``replays``: a module call that reads ``self.training`` is traced again alone, in the
  other mode, into a scratch graph (fx's name counters restored after it), instead of the
  whole model traced twice;
- ``codegen``: a GraphModule whose code is generated on its first call (the passes change
  the graph before it runs), instead of once at construction and once after the change;
- ``rules``: on meta tensors, shape rules (``surgeon._fast_shapes``) answer for the common
  ops instead of torch's meta kernels, many of which are slow Python decompositions.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import copy
import dis
import functools
import inspect
import os
import re
import sys
from collections.abc import Iterator
from typing import Any

import torch
from torch import fx, nn
from torch.fx.proxy import ParameterProxy

SUPPORTED = ((2, 11), (2, 15))  # torch versions [lo, hi) the private parts are checked for
SPEEDUPS = ("tracer", "replays", "codegen", "rules")


def _check() -> str | None:
    """Why the fast path cannot run with this torch, or None."""
    found = re.match(r"(\d+)\.(\d+)", torch.__version__)
    version = (int(found[1]), int(found[2])) if found else (0, 0)
    lo, hi = SUPPORTED
    if not lo <= version < hi:
        return f"torch {torch.__version__} is outside {lo[0]}.{lo[1]}-{hi[0]}.{hi[1] - 1}"
    if sys.version_info < (3, 11):
        return "Python before 3.11 (proxy unpacking reads 3.11 bytecode offsets)"
    tracer = fx.Tracer()
    parts = {
        "Tracer.num_calls": isinstance(getattr(tracer, "num_calls", None), dict),
        "Tracer.module_stack": type(getattr(tracer, "module_stack", None))
        is collections.OrderedDict,
        "Tracer._qualname_counter": isinstance(getattr(tracer, "_qualname_counter", None), dict),
        "Tracer.get_fresh_qualname": hasattr(tracer, "get_fresh_qualname"),
        "Tracer.param_shapes_constant": hasattr(tracer, "param_shapes_constant"),
        "Graph._root": isinstance(getattr(fx.Graph(), "_root", None), fx.Node),
        "Proxy.__iter__": "UNPACK_SEQUENCE" in inspect.getsource(fx.Proxy.__iter__),
        "GraphModule class per instance": type(fx.GraphModule(nn.Module(), fx.Graph()))
        is not fx.GraphModule,
    }
    missing = [name for name, ok in parts.items() if not ok]
    return f"this torch's fx lacks {', '.join(missing)}" if missing else None


@functools.cache
def why_off() -> str | None:
    """Why the fast path cannot run with this torch (checked once), or None."""
    try:
        return _check()
    except Exception as exc:  # pragma: no cover - a torch too different to check
        return f"cannot check this torch's fx: {exc}"


def active() -> bool:
    """Whether the fast path runs: a supported torch, and ``SURGEON_FAST`` is not 0."""
    return os.environ.get("SURGEON_FAST", "1") != "0" and why_off() is None


def on(speedup: str) -> bool:
    """Whether the named speed-up runs (``active()``, not named in ``SURGEON_FAST_SKIP``)."""
    return active() and speedup not in os.environ.get("SURGEON_FAST_SKIP", "").split(",")


# ---------------------------------------------------------------- tracer: fewer overheads


@functools.lru_cache(maxsize=4096)
def _instructions(code: Any) -> tuple[list[int], list[dis.Instruction]]:
    insts = list(dis.get_instructions(code))
    return [i.offset for i in insts], insts


class _Proxy(fx.Proxy):
    """``fx.Proxy`` whose ``__iter__`` disassembles each calling function once, not on
    every call (fx decodes the whole caller's bytecode each time a proxy is unpacked)."""

    def __iter__(self) -> Iterator[fx.Proxy]:
        frame = inspect.currentframe()
        caller = frame.f_back if frame is not None else None
        if caller is None:  # pragma: no cover - CPython always has frames
            return super().__iter__()
        offsets, insts = _instructions(caller.f_code)
        inst = insts[bisect.bisect_left(offsets, caller.f_lasti)]
        if inst.opname == "UNPACK_SEQUENCE":
            return (self[i] for i in range(inst.argval))
        return self.tracer.iter(self)

    def __getattr__(self, k: str) -> fx.proxy.Attribute:
        return _Attribute(self, k)  # ``b, n, c = x.shape`` unpacks an attribute proxy


class _Attribute(_Proxy, fx.proxy.Attribute):
    """fx's lazily recorded attribute proxy (``x.shape``) with :class:`_Proxy`'s ``__iter__``."""


class _ModuleStack(collections.OrderedDict):
    """fx's stack of the modules being traced, copied into every node's meta as the plain
    OrderedDict fx makes, with watched classes (:func:`watch_training`) recorded as the
    classes they stand for."""

    def __copy__(self) -> collections.OrderedDict:
        return collections.OrderedDict(self)

    def __setitem__(self, key: str, value: tuple[str, Any]) -> None:
        name, cls = value
        super().__setitem__(key, (name, vars(cls).get("_surgeon_watches", cls)))


class FastTracing(fx.Tracer):
    """Overrides for an ``fx.Tracer`` subclass (``surgeon.tracing`` mixes them into its
    tracer): the same graph, built with fewer of fx's per-call overheads."""

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _Proxy(node, self)

    def trace(self, root: Any, concrete_args: dict[str, Any] | None = None) -> fx.Graph:
        self._tensor_names: tuple[dict[int, str], dict[int, str]] | None = None
        return super().trace(root, concrete_args)

    def _tensor_name(self, value: torch.Tensor) -> str | None:
        """The qualified name of a parameter or buffer of the root, by identity, from
        dictionaries built once per trace (fx scans ``named_parameters()`` or
        ``named_buffers()`` for every read: seconds for a MaxViT)."""
        if getattr(self, "_tensor_names", None) is None:
            params: dict[int, str] = {}
            buffers: dict[int, str] = {}
            for n, p in self.root.named_parameters():
                params.setdefault(id(p), n)
            for n, b in self.root.named_buffers():
                buffers.setdefault(id(b), n)
            self._tensor_names = (params, buffers)
            self._modules_at_start = list(self.root.named_modules())
        params, buffers = self._tensor_names
        if isinstance(value, nn.Parameter):
            return params.get(id(value))
        return buffers.get(id(value))

    def create_arg(self, a: Any) -> Any:
        # proxies and tensors first: fx's create_arg asks each argument a dozen isinstance
        # questions (parameter, module, named tuple, opaque type...) before the answer
        t = type(a)
        if t is _Proxy or t is _Attribute:
            return a.node
        if t is tuple or t is list:
            return t(self.create_arg(e) for e in a)
        if isinstance(a, torch.Tensor) and isinstance(getattr(self, "root", None), nn.Module):
            name = self._tensor_name(a)
            if name is None and not isinstance(a, nn.Parameter):
                name = self._other_tensor_name(a)
            if name is not None:
                return self.create_node("get_attr", name, (), {})
        return super().create_arg(a)  # anything else, as fx does it

    def _other_tensor_name(self, a: torch.Tensor) -> str:
        """fx's name for a tensor that was no parameter or buffer of the root when the trace
        began: a buffer registered since, a plain tensor attribute, or a new constant
        ``_tensor_constantN`` (fx scans ``named_buffers()`` for each)."""
        for prefix, module in self._modules_at_start:
            for k, b in module._buffers.items():
                if b is a:
                    return f"{prefix}.{k}" if prefix else k
        name = self.tensor_attrs.get(a)
        if name is None:
            name = self.get_fresh_qualname("_tensor_constant")
            self.tensor_attrs[a] = name
            setattr(self.root, name, a)
        return name

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        self._param_cache = parameter_proxy_cache  # see Replaying
        name = None
        tracked = isinstance(attr_val, torch.Tensor) and self.proxy_buffer_attributes
        if isinstance(attr_val, nn.Parameter) or tracked:
            name = self._tensor_name(attr_val)
        if name is None:  # not a tensor, or registered during the trace: fx's own scan
            return super().getattr(attr, attr_val, parameter_proxy_cache)
        if name not in parameter_proxy_cache:
            kwargs: dict[str, Any] = {}
            if self.param_shapes_constant:
                kwargs["proxy_factory_fn"] = lambda node: ParameterProxy(self, node, name, attr_val)
            parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {}, **kwargs)
        return parameter_proxy_cache[name]


class Replaying(fx.Tracer):
    """Overrides for an ``fx.Tracer`` subclass: with ``reads`` (a :func:`watch_training`
    record), a module call that read ``training`` is traced again at once in the other
    mode; the pairs of node lists to compare are left in ``self.replays``."""

    def __init__(self, *args: Any, reads: _Reads | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if type(self.module_stack) is collections.OrderedDict:
            self.module_stack = _ModuleStack()  # names the watched classes' real classes
        self.reads = reads
        self.replays = Replays()

    def trace(self, root: Any, concrete_args: dict[str, Any] | None = None) -> fx.Graph:
        self._param_cache: dict[str, Any] | None = None
        # from the instance dict: ``root.training`` would count as a read of the root's flag
        self.traced_training = bool(getattr(root, "__dict__", {}).get("training", True))
        return super().trace(root, concrete_args)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        self._param_cache = parameter_proxy_cache  # a replay drops what it added
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        reads = self.reads
        if reads is None or reads.paused or reads.whole:
            return super().call_module(m, forward, args, kwargs)
        start, last = len(reads.modules), self.graph._root.prev
        reads.depth += 1
        try:
            out = super().call_module(m, forward, args, kwargs)
        finally:
            reads.depth -= 1
        new = reads.modules[start:]
        if new and not reads.whole and self._can_replay():
            inside = {id(x) for x in m.modules()}
            if all(id(x) in inside for x in new):  # else an enclosing module's call replays
                self._replay(m, forward, args, kwargs, last)
                del reads.modules[start:]  # answered
        return out

    def _can_replay(self) -> bool:
        """Whether this trace keeps the state a replay saves and restores (else the whole
        model is traced again)."""
        return hasattr(self, "tensor_attrs")

    def _replay(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict, last: fx.Node) -> None:
        """Trace ``m``'s call again with ``m``'s modules in the other mode, into a scratch
        graph, and keep both node lists in ``self.replays``; undo every trace of it
        (cached parameter proxies, constants, call counts, users of outer nodes)."""
        reads, mine = self.reads, []
        node = last.next
        while node is not self.graph._root:
            mine.append(node)
            node = node.next
        flags = [(x, x.__dict__["training"]) for x in m.modules()]
        graph, scratch = self.graph, fx.Graph()
        state = (
            copy.copy(self.num_calls),
            copy.copy(self._qualname_counter),
            dict(self.tensor_attrs),
        )
        cache = self._param_cache
        cached = set(cache) if cache is not None else set()
        self.graph, reads.paused = scratch, True
        for x, _ in flags:
            x.__dict__["training"] = not self.traced_training
        try:
            super().call_module(m, forward, args, kwargs)
            failed = False
        except Exception:  # the other mode does not trace: the graph depends on the mode
            failed = True
        finally:
            for x, flag in flags:
                x.__dict__["training"] = flag
            self.graph, reads.paused = graph, False
            self.num_calls, self._qualname_counter, attrs = state
            for t, name in list(self.tensor_attrs.items()):
                if t not in attrs:
                    delattr(self.root, name)
            self.tensor_attrs = attrs
            if cache is not None:
                for k in set(cache) - cached:
                    del cache[k]
            for n in scratch.nodes:
                for inp in n.all_input_nodes:
                    if inp.graph is not scratch:
                        inp.users.pop(n, None)
        if failed:
            self.replays.failed = True
        else:
            self.replays.pairs.append((mine, list(scratch.nodes)))


class Replays:
    """What the replays of the modules that read ``training`` left: pairs of node lists
    (this mode's, the other mode's) to compare, and whether one did not trace."""

    def __init__(self) -> None:
        self.failed = False
        self.pairs: list[tuple[list[fx.Node], list[fx.Node]]] = []


# ---------------------------------------------------------------- reads of ``training``


class _Reads:
    """Reads of ``training`` in a :func:`watch_training` block: the class names (``by``),
    the modules whose reads no replay answered yet (``modules``), whether a read was outside
    every module call (``whole``) and whether some module could not be watched."""

    def __init__(self) -> None:
        self.unwatched = self.paused = False
        self.whole = False  # a read outside every module call: only a whole trace answers it
        self.depth = 0  # module calls being traced
        self.by: list[str] = []
        self.modules: list[nn.Module] = []

    @property
    def seen(self) -> bool:
        return bool(self.by) or self.unwatched


_WATCH: list[_Reads] = []  # the innermost watch_training() records the reads


class _TrainingAttribute:
    """``training`` of a watched module: the instance's own value, each read recorded."""

    def __get__(self, obj: Any, objtype: Any = None) -> Any:
        if obj is None:
            return self
        if _WATCH and not _WATCH[-1].paused:
            reads = _WATCH[-1]
            reads.by.append(type(obj).__name__)
            reads.modules.append(obj)
            if not reads.depth:
                reads.whole = True
        return obj.__dict__["training"]

    def __set__(self, obj: Any, value: bool) -> None:
        obj.__dict__["training"] = value


_TRAINING = _TrainingAttribute()


@functools.cache
def _watched_class(cls: type) -> type | None:
    """A subclass of ``cls`` that differs only in recording reads of ``training``; None
    where ``cls`` defines ``training`` itself (a property: not the plain flag)."""
    if any("training" in vars(c) for c in cls.__mro__):
        return None
    try:
        return type(
            cls.__name__,
            (cls,),
            {
                "training": _TRAINING,
                "_surgeon_watches": cls,
                "__module__": cls.__module__,
                "__qualname__": cls.__qualname__,
            },
        )
    except TypeError:  # a final class or an odd metaclass
        return None


@contextlib.contextmanager
def watch_training(root: nn.Module) -> Iterator[_Reads]:
    """Record reads of ``training`` of any module of ``root`` inside the block.

    Each module's class is swapped for a subclass whose ``training`` is a recording
    descriptor, and swapped back on exit. The values read are the real booleans, so the
    code runs exactly as it would. Yields a :class:`_Reads`; where a module cannot be
    watched, ``seen`` is True from the start (assume the worst).
    """
    reads = _Reads()
    swapped: list[tuple[nn.Module, type]] = []
    try:
        for m in root.modules():
            cls = type(m)
            watched = _watched_class(cls)
            if watched is None or "training" not in m.__dict__:
                reads.unwatched = True
                continue
            try:
                m.__class__ = watched
            except TypeError:  # a layout that cannot take a subclass
                reads.unwatched = True
                continue
            swapped.append((m, cls))
        _WATCH.append(reads)
        yield reads
    finally:
        if _WATCH and _WATCH[-1] is reads:
            _WATCH.pop()
        for m, cls in swapped:
            m.__class__ = cls


# ---------------------------------------------------------------- codegen


def lazy_graph_module(root: nn.Module, graph: fx.Graph, name: str) -> fx.GraphModule | None:
    """``fx.GraphModule(root, graph, name)`` whose Python code is generated on its first
    call, or None where GraphModule is not laid out as expected."""
    gm = fx.GraphModule.__new__(fx.GraphModule)
    cls = type(gm)  # fx makes one class per instance, to hold its generated forward
    if cls is fx.GraphModule or "recompile" in vars(cls):
        return None
    cls.recompile = lambda self: None
    try:
        fx.GraphModule.__init__(gm, root, graph, name)
    finally:
        del cls.recompile

    def forward(self, *args, **kwargs):  # replaced by the generated forward
        self.recompile()
        return self(*args, **kwargs)

    cls.forward = forward
    return gm
