"""Tracing any nn.Module with torch.fx, the way timm's feature extraction does.

FX runs ``forward`` once, so Python code that branches on ``self.training`` is baked into
the graph in the mode the model had when it was traced. :func:`trace` therefore records
every read of a module's ``training`` flag during the trace (:func:`watch_training`) and
traces each module call that read it a second time, in the other mode, comparing the two
(the whole model when a read is not inside any module call, e.g. the root's own forward):
``F.dropout(x, p, training=...)`` calls whose flag is the only difference become
``nn.Dropout`` modules (which read ``self.training`` at run time); any other difference
marks the graph mode-dependent (``gm.surgeon_mode_dependent``) so that the passes can warn.
A graph that read no flag is traced once.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dis
import functools
import inspect
import os
import re
import sys
import traceback
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.node import map_arg
from torch.fx.proxy import ParameterProxy

from . import registry
from ._copy import deepcopy_module
from .errors import TraceError

try:  # attributes listed here survive copy.deepcopy of a GraphModule
    from torch.fx.graph_module import _USER_PRESERVED_ATTRIBUTES_KEY
except ImportError:  # pragma: no cover - older torch
    _USER_PRESERVED_ATTRIBUTES_KEY = "_user_preserved_attributes"


def set_preserved(gm: fx.GraphModule, name: str, value: Any) -> None:
    """``setattr(gm, name, value)`` in a way that survives ``copy.deepcopy(gm)``.

    ``GraphModule.__deepcopy__`` rebuilds the module from its graph and drops unknown
    attributes; those registered in ``gm.meta`` under torch's preserved-attributes key
    are put back.
    """
    setattr(gm, name, value)
    gm.meta.setdefault(_USER_PRESERVED_ATTRIBUTES_KEY, {})[name] = value


def _package_dirs() -> tuple[str, ...]:
    import surgeon

    dirs = [os.path.dirname(os.__file__)]  # the standard library
    for mod in (torch, surgeon):
        dirs.append(os.path.dirname(mod.__file__))
    for name in ("timm", "torchvision"):
        try:
            dirs.append(os.path.dirname(__import__(name).__file__))
        except ImportError:
            pass
    return tuple(os.path.join(d, "") for d in dirs)


def _timm_fx() -> tuple[list[type], list]:
    try:
        import timm  # noqa: F401  (importing timm's models registers their leaves)
        from timm.layers import _fx
    except ImportError:
        return [], []
    fns = [f for f in _fx.get_notrace_functions() if callable(f)]
    leaves = [
        m
        for m in _fx.get_notrace_modules()
        if f"{m.__module__}.{m.__qualname__}" not in registry.TRACE_THROUGH
    ]
    return leaves, fns


def _torchvision_ops() -> None:
    try:  # importing the ops registers their torch.fx.wrap'ed functions (e.g. stochastic_depth)
        import torchvision.ops  # noqa: F401
    except ImportError:
        pass


@functools.lru_cache(maxsize=4096)
def _instructions(code: Any) -> tuple[list[int], list[dis.Instruction]]:
    insts = list(dis.get_instructions(code))
    return [i.offset for i in insts], insts


class _Proxy(fx.Proxy):
    """``fx.Proxy`` whose ``__iter__`` disassembles each calling function once, not on
    every call (fx decodes the whole caller's bytecode each time a proxy is unpacked)."""

    def __iter__(self):
        frame = inspect.currentframe()
        caller = frame.f_back if frame is not None else None
        if caller is None:  # pragma: no cover - CPython always has frames
            return super().__iter__()
        offsets, insts = _instructions(caller.f_code)
        if sys.version_info >= (3, 11):
            import bisect

            idx = bisect.bisect_left(offsets, caller.f_lasti)
        else:  # pragma: no cover - Python 3.10
            idx = caller.f_lasti // 2
        inst = insts[idx]
        if inst.opname == "UNPACK_SEQUENCE":
            return (self[i] for i in range(inst.argval))
        return self.tracer.iter(self)

    def __getattr__(self, k: str) -> fx.proxy.Attribute:
        return _Attribute(self, k)  # ``b, n, c = x.shape`` unpacks an attribute proxy


class _Attribute(_Proxy, fx.proxy.Attribute):
    """fx's lazily recorded attribute proxy (``x.shape``) with :class:`_Proxy`'s ``__iter__``."""


# arguments fx passes through unchanged (``torch.fx.node.base_types`` without tensors)
_PLAIN_ARGS = frozenset(
    t for t in (*fx.node.base_types, type(None), type(...)) if not issubclass(t, torch.Tensor)
)


class _ModuleStack(collections.OrderedDict):
    """fx's stack of the modules being traced, copied into every node's meta: ``copy.copy``
    of an OrderedDict goes through ``__reduce_ex__`` (a twentieth of a trace). Watched
    classes (:func:`watch_training`) are recorded as the classes they stand for."""

    def __copy__(self) -> collections.OrderedDict:
        return collections.OrderedDict(self)

    def __setitem__(self, key: str, value: tuple[str, Any]) -> None:
        name, cls = value
        super().__setitem__(key, (name, vars(cls).get("_surgeon_watches", cls)))


class SurgeonTracer(fx.Tracer):
    """An FX tracer whose leaves are torch.nn modules, timm's registered leaves,
    registered activation and norm-act classes, and any extra classes the user names."""

    def __init__(self, leaf_modules: Iterable[type] = (), reads: _Reads | None = None) -> None:
        timm_leaves, timm_fns = _timm_fx()
        _torchvision_ops()
        super().__init__(autowrap_functions=tuple(timm_fns))
        self.module_stack = _ModuleStack()
        self.leaf_types = tuple(set(timm_leaves) | registry.LEAF_MODULES | set(leaf_modules))
        # with ``reads`` (a watch_training record), a module whose forward read ``training``
        # is traced again in the other mode right away, into a scratch graph (see replay)
        self.reads = reads
        self.replays = _Replays()

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        from .layers import ShiftScale

        if isinstance(m, (ShiftScale, *self.leaf_types)):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _Proxy(node, self)

    def trace(self, root: Any, concrete_args: dict[str, Any] | None = None) -> fx.Graph:
        self._tensor_names: tuple[dict[int, str], dict[int, str]] | None = None
        self._param_cache: dict[str, Any] | None = None
        # from the instance dict: ``root.training`` would count as a read of the root's flag
        self.traced_training = bool(getattr(root, "__dict__", {}).get("training", True))
        return super().trace(root, concrete_args)

    def _tensor_name(self, value: torch.Tensor) -> str | None:
        """The qualified name of a parameter or buffer of the root, by identity, from
        dictionaries built once per trace (fx scans ``named_parameters()`` or
        ``named_buffers()`` for every read, which made tracing quadratic in the number of
        parameters: seconds for a MaxViT)."""
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
        # the common arguments first: fx's create_arg asks each of them a dozen isinstance
        # questions (parameter, module, named tuple, opaque type...) before the answer
        t = type(a)
        if t in _PLAIN_ARGS:
            return a
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

    def _other_tensor_name(self, a: torch.Tensor) -> str | None:
        """fx's name for a tensor that was no parameter or buffer of the root when the trace
        began: a buffer registered since, a plain tensor attribute, or a new constant
        ``_tensor_constantN``. fx finds it after a scan of ``named_buffers()`` per use (a
        second for a big ViT that computes its rotary embeddings per block); here the scan is
        a loop over the ``_buffers`` of the modules listed when the trace began."""
        if not hasattr(self, "tensor_attrs") or not hasattr(self, "get_fresh_qualname"):
            return None  # pragma: no cover - another torch: fx's own way
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

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        reads = self.reads
        if reads is None or reads.paused or reads.whole:
            return super().call_module(m, forward, args, kwargs)
        start, last = len(reads.modules), getattr(self.graph, "_root", None)
        last = last.prev if last is not None else None
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
        """Whether this torch's tracer keeps the state a replay saves and restores (else
        the whole model is traced again)."""
        state = ("num_calls", "_qualname_counter", "tensor_attrs", "get_fresh_qualname")
        return all(hasattr(self, a) for a in state) and hasattr(self.graph, "_root")

    def _replay(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict, last: fx.Node) -> None:
        """Trace ``m``'s call again with ``m``'s modules in the other mode, into a scratch
        graph, and compare it with the nodes the call just added; undo every trace of it
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
            self.replays.dependent = True
            return
        dependent, dropouts = _compare(mine, list(scratch.nodes), self.traced_training)
        self.replays.dependent |= dependent
        self.replays.dropouts.update(dropouts)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        self._param_cache = parameter_proxy_cache
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


def resolve_leaf_names(model: nn.Module, names: Sequence[str]) -> list[type]:
    """Map class names (``Block`` or ``pkg.mod.Block``) to the classes used in ``model``."""
    found: list[type] = []
    classes = {type(m) for m in model.modules()}
    for name in names:
        matches = [c for c in classes if name in (c.__name__, f"{c.__module__}.{c.__qualname__}")]
        if not matches:
            known = sorted({c.__name__ for c in classes})
            raise TraceError(
                f"--leaf {name!r}: no module of that class in the model",
                hint=f"use a class name that appears in the model, e.g. {', '.join(known[:8])}",
            )
        found.extend(matches)
    return found


def _user_frame(exc: BaseException) -> str | None:
    """``file:line`` of the innermost traceback frame outside torch, timm, torchvision,
    fx-surgeon and the standard library: the user's own code."""
    skip = _package_dirs()
    for fr in reversed(traceback.extract_tb(exc.__traceback__)):
        fn = fr.filename
        if fn.startswith("<") or os.path.abspath(fn).startswith(skip):
            continue
        return f"{fn}:{fr.lineno}"
    return None


def _trace_graph(
    root: nn.Module, leaf_modules: Iterable[type], concrete: dict[str, Any] | None = None
) -> fx.Graph:
    return SurgeonTracer(leaf_modules).trace(root, concrete_args=concrete or None)


def constant_defaults(root: nn.Module, n_inputs: int) -> dict[str, Any]:
    """The arguments of ``root.forward`` past the first ``n_inputs`` whose default is None, a
    bool, a number or a string: a call with ``n_inputs`` tensors leaves them at that value.

    The graph takes them as constants (FX asserts the value at run time), so that
    ``if mask is not None or is_causal:`` follows the call the model gets instead of failing
    on, or branching on, a proxy (timm's ``Hiera.forward``, ``VisionTransformer.forward``).
    """
    try:
        params = list(inspect.signature(root.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {
        p.name: p.default
        for i, p in enumerate(params)
        if i >= n_inputs
        and p.kind in kinds
        and (p.default is None or type(p.default) in (bool, int, float, str))
    }


def graph_module(
    root: nn.Module, graph: fx.Graph, name: str, compile: bool = True
) -> fx.GraphModule:
    """``fx.GraphModule(root, graph, name)``; with ``compile=False`` its Python code is
    generated on the first call instead (for a graph that will change before it runs:
    code generation costs as much as a tenth of ``surgeon.insert``)."""
    if compile:
        return fx.GraphModule(root, graph, name)
    gm = fx.GraphModule.__new__(fx.GraphModule)
    cls = type(gm)  # fx makes one class per instance, to hold its generated forward
    if cls is fx.GraphModule or "recompile" in vars(cls):  # not that layout: compile now
        fx.GraphModule.__init__(gm, root, graph, name)
        return gm
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


def trace(
    model: nn.Module,
    leaf_modules: Iterable[type] = (),
    copy_model: bool = True,
    n_inputs: int = 1,
    compile: bool = True,
) -> fx.GraphModule:
    """Symbolically trace ``model`` (a deep copy unless ``copy_model=False``) in its
    current train/eval mode, for calls with ``n_inputs`` positional tensors. With
    ``compile=False`` the code is generated on the first call (see :func:`graph_module`)."""
    leaf_modules = tuple(leaf_modules)
    if isinstance(model, fx.GraphModule):
        root = copy.deepcopy(model) if copy_model else model
        gm = fx.GraphModule(
            root, copy.deepcopy(root.graph) if copy_model else root.graph, type(root).__name__
        )
        gm.train(model.training)
        set_preserved(gm, "surgeon_mode_dependent", getattr(model, "surgeon_mode_dependent", False))
        return gm
    root = deepcopy_module(model) if copy_model else model
    concrete = constant_defaults(root, n_inputs)
    try:
        with watch_training(root) as reads:
            tracer = SurgeonTracer(leaf_modules, reads)
            graph = tracer.trace(root, concrete_args=concrete or None)
    except Exception as exc:  # the tracer raises many types; all mean "not traceable"
        raise _trace_error(model, exc) from exc
    # A graph that read no module's ``training`` is the graph of either mode. Modules that
    # read it were traced again in the other mode as they were met (tracer.replays); reads
    # no module call could answer (the root's own forward, a module that reads another's
    # flag, an unwatchable class) need the whole model traced again in the other mode.
    well_formed = _well_formed(graph)
    if reads.whole or reads.modules or reads.unwatched or not well_formed:
        if not well_formed:  # pragma: no cover - a replay left a dangling node
            graph = _trace_graph(root, leaf_modules, concrete)
        other = _trace_in_other_mode(root, leaf_modules, concrete)
        dependent, dropouts = _compare_graphs(graph, other, trained=root.training)
    else:
        dependent, dropouts = tracer.replays.dependent, tracer.replays.dropouts
    gm = graph_module(root, graph, type(model).__name__, compile)
    _dropouts_to_modules(gm, dropouts)
    if dropouts and compile:
        gm.recompile()
    gm.train(model.training)
    set_preserved(gm, "surgeon_mode_dependent", dependent)
    return gm


def _trace_error(model: nn.Module, exc: BaseException) -> TraceError:
    text = str(exc).strip()
    reason = text.splitlines()[0] if text else type(exc).__name__
    where = _user_frame(exc)
    loc = f" at {where}" if where else ""
    return TraceError(
        f"cannot trace {type(model).__name__} with torch.fx{loc}: {reason}",
        hint="mark the module that does data-dependent control flow as a leaf with --leaf ClassName, or insert at module level with --fallback auto",
    )


def _trace_in_other_mode(
    root: nn.Module, leaf_modules: Iterable[type], concrete: dict[str, Any] | None = None
) -> fx.Graph | None:
    mode = root.training
    root.train(not mode)
    try:
        return _trace_graph(root, leaf_modules, concrete)
    except Exception:
        return None
    finally:
        root.train(mode)


# ---------------------------------------------------------------- mode dependence


class _Reads:
    """Reads of ``training`` in a :func:`watch_training` block: whether any happened
    (``seen``), the class names (``by``), the modules whose reads no replay answered yet
    (``modules``), and whether some module could not be watched (``unwatched``)."""

    def __init__(self) -> None:
        self.unwatched = self.paused = False
        self.whole = False  # a read outside every module call: only a whole trace answers it
        self.depth = 0  # module calls being traced
        self.by: list[str] = []
        self.modules: list[nn.Module] = []

    @property
    def seen(self) -> bool:
        return bool(self.by) or self.unwatched


class _Replays:
    """What the replays of the modules that read ``training`` found."""

    def __init__(self) -> None:
        self.dependent = False
        self.dropouts: dict[fx.Node, dict[str, Any]] = {}


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
def watch_training(root: nn.Module):
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
            if watched is None:
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


_DROPOUT_MODULES: dict[Any, type[nn.Module]] = {
    F.dropout: nn.Dropout, F.dropout1d: nn.Dropout1d, F.dropout2d: nn.Dropout2d,
    F.dropout3d: nn.Dropout3d, F.alpha_dropout: nn.AlphaDropout,
    F.feature_alpha_dropout: nn.FeatureAlphaDropout,
}  # fmt: skip
_CONSTANT = re.compile(r"_tensor_constant\d+")


def _target_key(node: fx.Node) -> Any:
    if node.op == "get_attr":
        return _CONSTANT.sub("_tensor_constant", node.target)
    return node.target


def _dropout_args(node: fx.Node) -> dict[str, Any] | None:
    try:
        bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
    except (TypeError, ValueError):
        return None
    bound.apply_defaults()
    return dict(bound.arguments)


def _compare(
    mine: list[fx.Node], theirs: list[fx.Node], trained: bool
) -> tuple[bool, dict[fx.Node, dict[str, Any]]]:
    """Compare the nodes of one trace in ``trained`` mode with those of the other mode:
    whether they still differ once ``F.dropout(..., training=self.training)`` calls are
    set aside, and those calls (node -> bound arguments). Attribute reads are compared by
    name (a replay reuses the parameter reads already made); references to nodes outside
    the lists, by identity."""
    mine = [n for n in mine if n.op != "get_attr"]
    theirs = [n for n in theirs if n.op != "get_attr"]
    if len(mine) != len(theirs):
        return True, {}
    pos_a = {n: i for i, n in enumerate(mine)}
    pos_b = {n: i for i, n in enumerate(theirs)}

    def key(value: Any, pos: dict[fx.Node, int]) -> str:
        def ref(n: fx.Node) -> str:
            if n.op == "get_attr":
                return f"@{_target_key(n)}"
            return f"%{pos[n]}" if n in pos else f"^{id(n)}"

        return repr(map_arg(value, ref))

    dropouts: dict[fx.Node, dict[str, Any]] = {}
    for a, b in zip(mine, theirs, strict=True):
        if a.op != b.op or _target_key(a) != _target_key(b):
            return True, {}
        if key((a.args, a.kwargs), pos_a) == key((b.args, b.kwargs), pos_b):
            continue
        if a.op != "call_function" or a.target not in _DROPOUT_MODULES:
            return True, {}
        args_a, args_b = _dropout_args(a), _dropout_args(b)
        if args_a is None or args_b is None:
            return True, {}
        rest_a = {k: v for k, v in args_a.items() if k != "training"}
        rest_b = {k: v for k, v in args_b.items() if k != "training"}
        if key(rest_a, pos_a) != key(rest_b, pos_b):
            return True, {}
        if args_a["training"] is not trained or args_b["training"] is trained:
            return True, {}  # not training=self.training
        dropouts[a] = args_a
    return False, dropouts


def _compare_graphs(
    graph: fx.Graph, other: fx.Graph | None, trained: bool
) -> tuple[bool, dict[fx.Node, dict[str, Any]]]:
    """:func:`_compare` for two whole graphs; no other graph (it did not trace): dependent."""
    if other is None:
        return True, {}
    return _compare(list(graph.nodes), list(other.nodes), trained)


def _well_formed(graph: fx.Graph) -> bool:
    """Every node's inputs are nodes of the graph (a replay's scratch nodes never leak)."""
    return all(inp.graph is graph for n in graph.nodes for inp in n.all_input_nodes)


def _dropouts_to_modules(gm: fx.GraphModule, dropouts: dict[fx.Node, dict[str, Any]]) -> None:
    """Turn ``F.dropout(..., training=<baked>)`` nodes into ``nn.Dropout`` modules, which
    read ``self.training`` when they run."""
    for node, args in dropouts.items():
        name, i = f"{node.name}_mod", 1
        while hasattr(gm, name):
            name, i = f"{node.name}_mod_{i}", i + 1
        cls = _DROPOUT_MODULES[node.target]
        gm.add_submodule(name, cls(p=float(args["p"]), inplace=bool(args["inplace"])))
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(name, (args["input"],))
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    if dropouts:
        gm.graph.lint()
