"""Tracing with an example call: torch.fx proxies that carry the values of one real call.

The plain tracer (:mod:`surgeon.tracing`) sees proxies only, so a forward that asks a
tensor for its dtype or shape and branches on the answer (``if pixel_values.dtype !=
expected_dtype``, ``if height != self.image_size``, ``q_len > 1 and mask is None``) cannot
be traced, nor can a root ``forward(self, *args, **kwargs)`` behind decorators (transformers'
``can_return_tuple``, ``capture_outputs``, ...). This tracer runs the model on example inputs
while it traces, node by node, and answers such questions from the example:

- ``.shape``, ``.dtype``, ``.device``, ``.ndim``, ``.size()``, ``.dim()`` and ``.numel()`` are
  still recorded as nodes (the graph keeps a dynamic batch size, ``.to(x.dtype)`` follows a
  ``.half()`` model), but a Python decision on them (``bool``, ``len``, ``int``, iteration)
  takes the example's answer: the graph is specialised to the example's shapes and dtypes.
  Each decision is counted (``decisions``) and kept in the graph as a ``torch._assert``, so
  an input that would take another path fails, naming the model's line, instead of running
  the example's path.
- A decision on tensor *data* (``if (x > 0).any()``) still fails, as in the plain tracer:
  that is data-dependent control flow, which no graph of one call may fix.
- The root's forward is called with the example's positional inputs only, by their names, so
  its decorators and ``**kwargs`` run as in an eager call; a dict subclass it returns
  (``ImageClassifierOutput``) is rebuilt at the end of the graph.
- A parameterless module whose forward reads ``self.training`` and that is the identity in
  eval mode on the example (stochastic depth) stays a module of the graph, like
  ``nn.Dropout``, so the graph follows ``.train()``/``.eval()``.

It is the second attempt of :func:`surgeon.tracing.trace`, used only when the plain trace
fails and example inputs are known; the surgery record says so (``traced_with``).
"""

from __future__ import annotations

import inspect
import operator
import os
import traceback
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import fx, nn

# attributes and methods of a tensor whose value is shape/dtype/device metadata, not data
METADATA_ATTRS = frozenset({"shape", "dtype", "device", "ndim", "is_cuda", "layout"})
METADATA_METHODS = frozenset(
    {"size", "dim", "numel", "get_device", "is_floating_point", "is_contiguous"}
)
_NO_VALUE = object()


def reads_metadata_only(user: fx.Node, node: fx.Node) -> bool:
    """``user`` reads only the shape, dtype or device of ``node``'s value, not its data
    (``x.shape``, ``x.size(0)``): a pass that changes the values but not the shape can
    ignore it."""
    if user.op == "call_function" and user.target is getattr:
        return user.args[0] is node and user.args[1] in METADATA_ATTRS
    if user.op == "call_method" and user.target in METADATA_METHODS:
        return (
            user.args[0] is node and node not in user.args[1:] and node not in user.kwargs.values()
        )
    return False


class ExampleProxy(fx.Proxy):
    """A proxy whose Python conversions (``len``, ``int``, ``index``, ``float``) answer from
    the example value when that value is metadata."""

    def __len__(self) -> int:
        n = self.tracer.length(self)
        return len(self.tracer.decide(self, "len")) if n is None else n

    def __int__(self) -> int:
        return int(self.tracer.decide(self, "int"))

    def __index__(self) -> int:
        return operator.index(self.tracer.decide(self, "index"))

    def __float__(self) -> float:
        return float(self.tracer.decide(self, "float"))

    def __iter__(self) -> Iterator[fx.Proxy]:
        return self.tracer.iter(self)

    def __getattr__(self, k: str) -> fx.proxy.Attribute:
        return _ExampleAttribute(self, k)


class _ExampleAttribute(ExampleProxy, fx.proxy.Attribute):
    """fx's lazily recorded attribute proxy (``x.shape``) with :class:`ExampleProxy`'s
    conversions."""


class ExampleTracing(fx.Tracer):
    """A tracer mix-in that runs each recorded node on the example's values (mixed into
    :class:`surgeon.tracing.SurgeonTracer` by :func:`surgeon.tracing.trace`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.values: dict[fx.Node, Any] = {}
        self.metadata: set[fx.Node] = set()  # nodes whose value is shape/dtype/device only
        self.decisions = 0
        self._inputs: list[Any] = []
        self._running = False  # computing a value: modules run eagerly, attributes are real
        self._leaf: tuple[nn.Module, Any] | None = None
        self._mode_leaves: set[int] = set()  # ids of drop-path-like modules kept as leaves

    # -- the values -------------------------------------------------------------------------
    def proxy(self, node: fx.Node) -> fx.Proxy:
        return ExampleProxy(node, self)

    def create_proxy(
        self, kind: str, target: Any, args: Any, kwargs: Any, *rest: Any, **kw: Any
    ) -> fx.Proxy:
        proxy = super().create_proxy(kind, target, args, kwargs, *rest, **kw)
        if isinstance(proxy, fx.Proxy):
            self._record(proxy.node)
        return proxy

    def _value(self, arg: Any) -> Any:
        missing = []

        def one(n: fx.Node) -> Any:
            if n not in self.values and n.op == "get_attr":  # made by create_arg, not a proxy
                self._record(n)
            if n not in self.values:
                missing.append(n)
                return None
            return self.values[n]

        out = fx.node.map_arg(arg, one)
        return _NO_VALUE if missing else out

    def _record(self, node: fx.Node) -> None:
        args, kwargs = self._value(node.args), self._value(node.kwargs)
        if args is _NO_VALUE or kwargs is _NO_VALUE:
            return
        op, target = node.op, node.target
        self._running = True
        try:
            with torch.no_grad():
                if op == "placeholder":
                    index = sum(1 for n in node.graph.nodes if n.op == "placeholder") - 1
                    if index >= len(self._inputs):
                        return
                    value = self._inputs[index]
                elif op == "get_attr":
                    value = self.root
                    for atom in str(target).split("."):
                        value = getattr(value, atom)
                elif op == "call_function":
                    value = target(*args, **kwargs)
                elif op == "call_method":
                    value = getattr(args[0], target)(*args[1:], **kwargs)
                elif op == "call_module" and self._leaf is not None:
                    value = self._leaf[1](*args, **kwargs)
                else:
                    return
        except Exception:  # the real call fails too: leave the node without a value
            return
        finally:
            self._running = False
        self.values[node] = value
        if not isinstance(value, torch.Tensor) and self._is_metadata(node):
            self.metadata.add(node)

    def _is_metadata(self, node: fx.Node) -> bool:
        if node.op == "call_function" and node.target is getattr:
            return node.args[1] in METADATA_ATTRS or node.args[0] in self.metadata
        if node.op == "call_method" and node.target in METADATA_METHODS:
            return True
        if node.op not in ("call_function", "call_method"):
            return False
        inputs = node.all_input_nodes
        return bool(inputs) and all(n in self.metadata for n in inputs)

    def decide(self, proxy: fx.Proxy, what: str) -> Any:
        """The example's value of ``proxy`` for a Python decision, if it is metadata."""
        node = proxy.node
        if node not in self.metadata:
            why = "has no example value" if node not in self.values else "depends on tensor data"
            raise fx.proxy.TraceError(
                f"symbolically traced variables cannot be used as inputs to control flow "
                f"({what} of {node.format_node()}, which {why})"
            )
        value = self.values[node]
        if what == "bool":
            self._guard(proxy, bool(value), what)
        elif what != "len":  # int, index, float
            self._guard(proxy, value, what)
        return value

    def _guard(self, proxy: fx.Proxy, expected: Any, what: str) -> None:
        """Record the decision in the graph as a ``torch._assert``: an input that would take
        another path fails loudly instead of running the example's path."""
        self.decisions += 1
        where = _caller()
        shapes = [list(x.shape) for x in self._inputs if isinstance(x, torch.Tensor)]
        message = (
            f"fx-surgeon traced this model with an example call of {shapes}; at {where} this "
            f"input takes another path ({what} was {expected!r} there): insert it again with "
            "this input's size (--input-size)"
        )
        if what == "bool":
            fn = operator.truth if expected else operator.not_
            cond = self.create_proxy("call_function", fn, (proxy,), {})
        elif what == "len":
            n = self.create_proxy("call_function", len, (proxy,), {})
            cond = self.create_proxy("call_function", operator.eq, (n, expected), {})
        else:
            cond = self.create_proxy("call_function", operator.eq, (proxy, expected), {})
        self.create_proxy("call_function", torch._assert, (cond, message), {})

    def to_bool(self, obj: fx.Proxy) -> bool:
        return bool(self.decide(obj, "bool"))

    def length(self, obj: fx.Proxy) -> int | None:
        """The example's length of ``obj`` (a tensor's first dimension), guarded; None when
        it has no example value of a sized kind."""
        value = self.values.get(obj.node, _NO_VALUE)
        if isinstance(value, torch.Tensor):
            n = value.shape[0] if value.dim() else None
        elif isinstance(value, (tuple, list, torch.Size)):
            n = len(value)
        else:
            n = None
        if n is not None:
            self._guard(obj, n, "len")
        return n

    def iter(self, obj: fx.Proxy) -> Iterator:
        n = self.length(obj)
        if n is None:
            return super().iter(obj)
        return iter([obj[i] for i in range(n)])

    # -- running modules and attributes for real while a value is computed ----------------
    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        if self._running:
            return forward(*args, **kwargs)
        outer, self._leaf = self._leaf, (m, forward)
        try:
            if id(m) not in self._mode_leaves and self._drops_in_training(m, forward, args, kwargs):
                self._mode_leaves.add(id(m))
            return super().call_module(m, forward, args, kwargs)
        finally:
            self._leaf = outer

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return id(m) in self._mode_leaves or super().is_leaf_module(m, module_qualified_name)

    def _drops_in_training(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> bool:
        """A module like transformers' ``BeitDropPath``: no parameters or buffers, a forward
        that reads ``self.training``, the identity in eval mode on the example. Traced
        through, it would bake one mode's branch into the graph; as a leaf it keeps
        following ``.train()``/``.eval()``, like ``nn.Dropout``."""
        if next(m.parameters(), None) is not None or next(m.buffers(), None) is not None:
            return False
        try:
            if "training" not in inspect.getsource(type(m).forward):
                return False
        except (OSError, TypeError):
            return False
        nodes = fx.node.map_aggregate(
            (args, kwargs), lambda a: a.node if isinstance(a, fx.Proxy) else a
        )
        values, kw = self._value(nodes[0]), self._value(nodes[1])
        if values is _NO_VALUE or kw is _NO_VALUE or not values:
            return False
        if not isinstance(values[0], torch.Tensor):
            return False
        was, rng = m.training, torch.get_rng_state()
        self._running = True
        try:
            m.eval()
            with torch.no_grad():
                out = forward(*values, **kw)
        except Exception:
            return False
        finally:
            self._running = False
            m.train(was)
            torch.set_rng_state(rng)
        x = values[0]
        return out is x or (
            isinstance(out, torch.Tensor) and out.shape == x.shape and torch.equal(out, x)
        )

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict) -> Any:
        if self._running:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    # -- the root ---------------------------------------------------------------------------
    def trace_example(self, root: nn.Module, inputs: Sequence[torch.Tensor]) -> fx.Graph:
        """Trace ``root`` called with ``inputs`` (positional) and nothing else."""
        self._inputs = list(inputs)
        names = _input_names(root, len(inputs))
        original, returned = type(root), []
        forward = _forward_of(original, names, returned)
        root.__class__ = type(original.__name__, (original,), {"forward": forward})
        try:
            graph = self.trace(root)
        finally:
            root.__class__ = original
        _drop_dead_metadata(graph, self.metadata)
        _keep_output_type(graph, returned[0] if returned else None)
        return graph


def _input_names(root: nn.Module, n: int) -> list[str]:
    """The names of the first ``n`` parameters of ``root.forward`` (unwrapping decorators),
    or ``input_0, ...`` where it has fewer named ones."""
    try:
        params = list(inspect.signature(inspect.unwrap(type(root).forward)).parameters.values())
    except (TypeError, ValueError):
        params = []
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    named = [p.name for p in params[1:] if p.kind in kinds]
    return [
        named[i] if i < len(named) and named[i].isidentifier() else f"input_{i}" for i in range(n)
    ]


def _forward_of(cls: type, names: list[str], returned: list[type]) -> Any:
    """``def forward(self, a, b): return cls.forward(self, a, b)`` with the given names (fx
    makes one placeholder per name); the type of what it returns goes to ``returned``."""
    args = ", ".join(names)
    namespace = {"_forward": cls.forward, "_returned": returned}
    source = (
        f"def forward(self, {args}):\n"
        f"    out = _forward(self, {args})\n"
        "    _returned.append(type(out))\n"
        "    return out\n"
    )
    exec(source, namespace)  # noqa: S102 - our own source, names checked as identifiers
    return namespace["forward"]


def _keep_output_type(graph: fx.Graph, returned: type | None) -> None:
    """fx records a dict subclass (transformers' ``ImageClassifierOutput``) as a plain dict:
    rebuild it from its fields at the end of the graph, so the traced model returns what
    the model did."""
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    value = output.args[0]
    if returned is None or returned is dict or not issubclass(returned, dict):
        return
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        return
    with graph.inserting_before(output):
        rebuilt = graph.call_function(returned, (), dict(value))
    output.args = (rebuilt,)


def _caller() -> str:
    """``file:line`` of the innermost frame outside torch and fx-surgeon: where the model
    asked its question."""
    skip = (os.path.dirname(torch.__file__), os.path.dirname(os.path.abspath(__file__)))
    for frame in reversed(traceback.extract_stack()):
        if not os.path.abspath(frame.filename).startswith(skip):
            return f"{frame.filename}:{frame.lineno}"
    return "?"


def _drop_dead_metadata(graph: fx.Graph, metadata: set[fx.Node]) -> None:
    """Remove what only fed a Python decision: unused metadata nodes and the unused
    ``get_attr`` nodes (a weight read for its dtype) left behind."""
    changed = True
    while changed:
        changed = False
        for node in reversed(list(graph.nodes)):
            if node.users or node.op == "output" or node.target is torch._assert:
                continue
            if (
                node in metadata
                or node.op == "get_attr"
                or (node.op == "call_function" and node.target is getattr)
            ):
                graph.erase_node(node)
                changed = True
