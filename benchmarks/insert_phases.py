"""Where the time of ``surgeon.insert`` goes, per phase, for a few models on meta.

    python benchmarks/insert_phases.py                      # the default models
    python benchmarks/insert_phases.py timm:maxvit_base_tf_224 timm:coat_tiny

Each model is built on the meta device (no weights), put in eval mode and surgered
(``layer``/``layer``) once to warm up, then ``--repeats`` times; the phases are timed by
wrapping the functions ``surgeon.insert`` calls. Prints a table (median over repeats) and
writes ``benchmarks/results/insert_phases.json``. One thread.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch import fx

import surgeon
from surgeon import modsites, sites, tracing
from surgeon.models.sources import default_input_size

DEFAULT = [
    "timm:resnet50", "timm:vit_base_patch16_224", "timm:convnext_tiny", "timm:efficientnet_b3",
    "timm:maxvit_base_tf_224", "timm:coat_tiny", "timm:gcvit_tiny", "timm:ghostnetv3_050",
    "timm:eca_nfnet_l3", "timm:sequencer2d_s",
]  # fmt: skip
# phase name -> (module or class, function); a replay of a module that reads
# self.training is part of "trace", as is a second whole trace when one is needed
PHASES = {
    "copy": (tracing, "deepcopy_module"),
    "trace": (tracing.SurgeonTracer, "trace"),
    "shape propagation": (modsites, "propagate_with_leaves"),
    "site discovery": (sites, "discover"),
    "code generation": (fx.GraphModule, "recompile"),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="*", default=DEFAULT)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "insert_phases.json"))
    args = p.parse_args()
    torch.set_num_threads(1)
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
    for spec in args.models:
        with torch.device("meta"):
            model = surgeon.build_model(spec)
        model.eval()
        size = tuple(default_input_size(model))
        surgeon.insert(model, "layer", "layer", input_size=size)  # warm-up
        runs = []
        for _ in range(args.repeats):
            spent.clear()
            t = time.perf_counter()
            surgeon.insert(model, "layer", "layer", input_size=size)
            runs.append({"total": time.perf_counter() - t, **spent})
        row = {k: round(statistics.median(r.get(k, 0.0) for r in runs), 3) for k in runs[0]}
        row["other"] = round(row["total"] - sum(row.get(n, 0.0) for n in PHASES), 3)
        results.append({"model": spec, "input_size": list(size), **row})
        print(f"{spec:32} {row['total']:8.2f} "
              + " ".join(f"{row.get(n, 0.0):20.2f}" for n in PHASES))  # fmt: skip
    out = {
        "benchmark": "insert_phases", "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__, "threads": 1, "repeats": args.repeats,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "results": results,
    }  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
