"""Per-site probes: activation statistics and the gradient norms around each site.

Once per epoch, on a fixed batch, the probe runs the model through an FX interpreter that
keeps the value flowing out of each site (after the shift/scale module when there is one),
then back-propagates the loss and reads the gradient norm of the nearest weight layer
before and after the site. Between two probes it also measures the effective step size of
those layers: the mean over the optimiser steps of ``||W_after - W_before|| / ||W_before||``
(what the optimiser did to the layer, whatever its LR, momentum or multiplier). The same site names exist in every variant (plain, batchnorm,
shift/scale), so the numbers can be compared across variants.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..discover import analyse
from ..errors import TrainError
from ..layers import ChannelBatchNorm, ShiftScale


def _weight_module(node: fx.Node, gm: fx.GraphModule) -> str | None:
    if node.op != "call_module":
        return None
    mod = gm.get_submodule(node.target)
    if isinstance(mod, (ShiftScale, ChannelBatchNorm, nn.modules.batchnorm._BatchNorm)):
        return None
    w = getattr(mod, "weight", None)
    return node.target if isinstance(w, nn.Parameter) and w.dim() >= 2 else None


def _walk(node: fx.Node, gm: fx.GraphModule, up: bool, limit: int = 32) -> str | None:
    cur: fx.Node | None = node
    for _ in range(limit):
        if cur is None:
            return None
        nxt = [a for a in cur.all_input_nodes if a.op != "get_attr"] if up else list(cur.users)
        cur = nxt[0] if nxt else None
        if cur is not None and (hit := _weight_module(cur, gm)):
            return hit
    return None


class Probe:
    """Measures ``act_mean``, ``act_std``, ``grad_norm_before``, ``grad_norm_after``,
    ``step_before`` and ``step_after`` per site."""

    def __init__(self, model: fx.GraphModule, input_size: tuple[int, ...]) -> None:
        if not isinstance(model, fx.GraphModule):
            raise TrainError(
                "--probe needs a model torch.fx can trace", hint="drop --probe or use --leaf"
            )
        sites = analyse(model, input_size=input_size).sites
        nodes = {n.name: n for n in model.graph.nodes}
        self.model = model
        self.rows: list[dict[str, Any]] = []
        for s in sites:
            node = nodes.get(s.name)
            if node is None:
                continue
            out = node  # read after the inserted shift/scale module, if any
            for u in node.users:
                if u.op == "call_module" and isinstance(model.get_submodule(u.target), ShiftScale):
                    out = u
            self.rows.append(
                {"site": s.name, "kind": s.kind, "index": s.index, "node": out.name,
                 "before": _walk(node, model, up=True), "after": _walk(out, model, up=False)}
            )  # fmt: skip
        self.layers = sorted({r[k] for r in self.rows for k in ("before", "after")} - {None})
        self._weights_before: list[torch.Tensor] = []
        self._step_sums: list[torch.Tensor] = []  # per layer, on the weights' device
        self._steps = 0

    def _weights(self) -> list[torch.Tensor]:
        return [self.model.get_submodule(name).weight.detach() for name in self.layers]

    def before_step(self) -> None:
        """Call just before ``optimizer.step()``: keeps a copy of the probed layers' weights."""
        self._weights_before = [w.clone() for w in self._weights()]

    def after_step(self) -> None:
        """Call just after ``optimizer.step()``: adds this step's relative update per layer."""
        if not self._weights_before:
            return
        with torch.no_grad():  # summed on the device: no host sync per step
            ratios = [
                (new.float() - old.float()).norm() / old.float().norm().clamp_min(1e-12)
                for old, new in zip(self._weights_before, self._weights(), strict=True)
            ]
            self._step_sums = (
                ratios if not self._step_sums else [a + r for a, r in zip(self._step_sums, ratios)]
            )
        self._steps += 1
        self._weights_before = []

    def _step_sizes(self) -> dict[str, float | None]:
        """Mean relative update per layer since the last call (None before any step)."""
        if not self._steps:
            return dict.fromkeys(self.layers)
        sizes = {n: v.item() / self._steps for n, v in zip(self.layers, self._step_sums)}
        self._step_sums, self._steps = [], 0
        return sizes

    def measure(self, x: torch.Tensor, y: torch.Tensor) -> list[dict[str, Any]]:
        """One forward/backward on ``(x, y)``; gradients, buffers and the RNG are restored."""
        captured: dict[str, torch.Tensor] = {}
        wanted = {r["node"] for r in self.rows}

        class _Capture(fx.Interpreter):
            def run_node(self, n: fx.Node) -> Any:
                result = super().run_node(n)
                if n.name in wanted and isinstance(result, torch.Tensor):
                    captured[n.name] = result.detach()
                return result

        was = self.model.training
        buffers = {
            k: v.clone()
            for k, v in self.model.state_dict().items()
            if k in dict(self.model.named_buffers())
        }
        rng = torch.get_rng_state()
        self.model.train()
        self.model.zero_grad(set_to_none=True)
        out = _Capture(self.model).run(x)
        F.cross_entropy(out.float(), y).backward()
        rows, steps = [], self._step_sizes()
        for r in self.rows:
            act = captured.get(r["node"])
            row = {"site": r["site"], "kind": r["kind"], "index": r["index"]}
            if act is not None:
                a = act.float()
                row.update(act_mean=a.mean().item(), act_std=a.std().item())
            for key in ("before", "after"):
                name = r[key]
                g = self.model.get_submodule(name).weight.grad if name else None
                row[f"grad_norm_{key}"] = g.norm().item() if g is not None else None
                row[f"step_{key}"] = steps.get(name) if name else None
            rows.append(row)
        self.model.zero_grad(set_to_none=True)
        self.model.load_state_dict(buffers, strict=False)  # BN running stats untouched
        torch.set_rng_state(rng)  # dropout draws untouched: probing does not change training
        self.model.train(was)
        return rows
