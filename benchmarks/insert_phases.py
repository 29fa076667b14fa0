"""Where the time of ``surgeon.insert`` goes, per phase, and what each fast-path speed-up buys.

    python benchmarks/insert_phases.py                      # the default models, per phase
    python benchmarks/insert_phases.py timm:maxvit_base_tf_224 timm:coat_tiny
    python benchmarks/insert_phases.py --fast-path          # each speed-up off in turn

Each model is built on the meta device (no weights), put in eval mode and surgered
(``layer``/``layer``) once to warm up, then ``--repeats`` times; the phases are timed by
wrapping the functions ``surgeon.insert`` calls. Prints a table (median over repeats) and
writes ``benchmarks/results/insert_phases.json``. One thread.

``--fast-path`` times whole inserts in CPU seconds (``time.process_time``: steadier than
wall time on a shared machine) with the fast path on, with it off (``SURGEON_FAST=0``) and
with each speed-up of ``surgeon._fx_fast.SPEEDUPS`` off alone (``SURGEON_FAST_SKIP``), each
variant paired with an all-on run right before or after it; writes
``benchmarks/results/fast_path.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch import fx

import surgeon
from surgeon import _fx_fast, shapes, sites, tracing
from surgeon.models.sources import default_input_size

RESULTS = Path(__file__).parent / "results"
DEFAULT = [
    "timm:resnet50", "timm:vit_base_patch16_224", "timm:convnext_tiny", "timm:efficientnet_b3",
    "timm:maxvit_base_tf_224", "timm:coat_tiny", "timm:gcvit_tiny", "timm:ghostnetv3_050",
    "timm:eca_nfnet_l3", "timm:sequencer2d_s",
]  # fmt: skip
# the zoo's slowest inserts, and models near the zoo's median insert time
FAST_PATH_MODELS = [
    "timm:resnet50", "timm:vit_base_patch16_224", "timm:coat_tiny", "timm:maxvit_base_tf_224",
    "timm:nfnet_f7", "timm:mvitv2_huge_cls", "timm:rdnet_large", "timm:xcit_small_12_p16_224",
    "timm:efficientnet_b3", "timm:convnext_tiny",
]  # fmt: skip
# phase name -> (module or class, function); a replay of a module that reads
# self.training is part of "trace", as is a second whole trace when one is needed
PHASES = {
    "copy": (tracing, "deepcopy_module"),
    "trace": (tracing.SurgeonTracer, "trace"),
    "shape propagation": (shapes, "propagate"),
    "site discovery": (sites, "discover"),
    "code generation": (fx.GraphModule, "recompile"),
}


def _build(spec: str) -> tuple[torch.nn.Module, tuple[int, ...]]:
    with torch.device("meta"):
        model = surgeon.build_model(spec)
    model.eval()
    return model, tuple(default_input_size(model))


def phases(specs: list[str], repeats: int, out_path: Path) -> None:
    spent: dict[str, float] = defaultdict(float)
    depth: dict[str, int] = defaultdict(int)  # count the outermost call only
    for name, (mod, fn) in PHASES.items():
        orig = getattr(mod, fn)

        def timed(*a, _orig=orig, _name=name, **k):
            depth[_name] += 1
            t = time.perf_counter()
            try:
                return _orig(*a, **k)
            finally:
                depth[_name] -= 1
                if not depth[_name]:
                    spent[_name] += time.perf_counter() - t

        setattr(mod, fn, timed)
    results = []
    print(f"{'model':32} {'total s':>8} " + " ".join(f"{n:>20}" for n in PHASES))
    for spec in specs:
        model, size = _build(spec)
        surgeon.insert(model, "layer", "layer", input_size=size)  # warm-up
        runs = []
        for _ in range(repeats):
            spent.clear()
            t = time.perf_counter()
            surgeon.insert(model, "layer", "layer", input_size=size)
            runs.append({"total": time.perf_counter() - t, **spent})
        row = {k: round(statistics.median(r.get(k, 0.0) for r in runs), 3) for k in runs[0]}
        row["other"] = round(row["total"] - sum(row.get(n, 0.0) for n in PHASES), 3)
        results.append({"model": spec, "input_size": list(size), **row})
        print(f"{spec:32} {row['total']:8.2f} "
              + " ".join(f"{row.get(n, 0.0):20.2f}" for n in PHASES))  # fmt: skip
    _write(out_path, {"benchmark": "insert_phases", "repeats": repeats, "results": results})


def _insert_cpu_s(model: torch.nn.Module, size: tuple[int, ...], env: dict[str, str]) -> float:
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        t = time.process_time()
        surgeon.insert(model, "layer", "layer", input_size=size)
        return time.process_time() - t
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def fast_path(specs: list[str], repeats: int, out_path: Path) -> None:
    """Insert CPU time with everything on, and the extra time with one speed-up off."""
    variants = {"all off": {"SURGEON_FAST": "0"}}
    variants.update({f"{s} off": {"SURGEON_FAST_SKIP": s} for s in _fx_fast.SPEEDUPS})
    on = {"SURGEON_FAST": "1", "SURGEON_FAST_SKIP": ""}
    results = []
    print(f"{'model':32} {'on s':>7} " + " ".join(f"{v:>14}" for v in variants))
    for spec in specs:
        model, size = _build(spec)
        _insert_cpu_s(model, size, on)  # warm-up
        base: list[float] = []
        extra: dict[str, list[float]] = defaultdict(list)
        for i in range(repeats):
            for name, env in variants.items():
                pair = [(on, True), (env, False)]  # ABBA: alternate which runs first
                for e, is_base in pair if i % 2 else pair[::-1]:
                    t = _insert_cpu_s(model, size, {**on, **e})
                    if is_base:
                        b = t
                    else:
                        v = t
                base.append(b)
                extra[name].append(v - b)
        row = {"model": spec, "all_on_s": round(statistics.median(base), 3)}
        row.update({f"{n}: extra s": round(statistics.median(x), 3) for n, x in extra.items()})
        results.append(row)
        print(f"{spec:32} {row['all_on_s']:7.3f} "
              + " ".join(f"{row[f'{n}: extra s']:14.3f}" for n in variants))  # fmt: skip
    total = sum(r["all_on_s"] for r in results)
    summary = {
        name: {
            "extra_s": round(sum(r[f"{name}: extra s"] for r in results), 3),
            "share_of_insert_time": round(sum(r[f"{name}: extra s"] for r in results) / total, 3),
        }
        for name in variants
    }
    print(f"{'all models':32} {total:7.3f} "
          + " ".join(f"{summary[n]['share_of_insert_time']:13.0%} " for n in variants))  # fmt: skip
    _write(
        out_path,
        {
            "benchmark": "fast_path", "clock": "process_time (CPU s)", "repeats": repeats,
            "all_on_total_s": round(total, 3), "summary": summary, "results": results,
        },
    )  # fmt: skip


def _write(path: Path, body: dict) -> None:
    head = {
        "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
        "threads": 1, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**body, **head}, indent=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="*")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--fast-path", action="store_true", help="time each speed-up off in turn")
    p.add_argument("--out", default="", help="the results file")
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.fast_path:
        out = Path(args.out or RESULTS / "fast_path.json")
        fast_path(args.models or FAST_PATH_MODELS, args.repeats, out)
    else:
        phases(
            args.models or DEFAULT, args.repeats, Path(args.out or RESULTS / "insert_phases.json")
        )


if __name__ == "__main__":
    main()
