"""Fold speed: a folded model against the surgered model it came from and the plain model.

    python benchmarks/fold_speed.py                  # CPU, a few minutes
    python benchmarks/fold_speed.py --rounds 3 --iters 5

Every model comes from one init; the shift/scale values are random (not the identity), and
the folded model's outputs are checked against the surgered one's. Inference (eval,
no_grad) and training steps (forward, backward, SGD) are timed in interleaved rounds, so
a busy shared CPU slows every model alike; the fastest round is reported (other jobs only
ever add time), with its ratio to the plain model, and the median too. Writes benchmarks/results/fold_speed_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import surgeon

CASES = (  # model, model args, input size, (shift, scale)
    ("allconv", {"width": 0.25}, (3, 32, 32), ("none", "channel")),
    ("allconv", {"width": 0.25}, (3, 32, 32), ("layer", "layer")),
    ("mlp", {}, (3, 32, 32), ("layer", "layer")),
)


def build(spec: str, args: dict, size: tuple, shift: str, scale: str) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    base = surgeon.build_model(spec, {**args, "num_classes": 10})
    plain = surgeon.insert(base, "none", "none", input_size=size)
    surgered = surgeon.insert(base, shift, scale, input_size=size)
    with torch.no_grad():
        for m in surgered.modules():
            if isinstance(m, surgeon.ShiftScale):
                for p in m.parameters():
                    p.add_(torch.randn_like(p) * 0.2)
    folded, report = surgeon.fold(surgered)
    return {"plain": plain, "surgered": surgered, "folded": folded}, report


def time_inference(model: torch.nn.Module, x: torch.Tensor, iters: int) -> float:
    model.eval()
    with torch.no_grad():
        t0 = time.perf_counter()
        for _ in range(iters):
            model(x)
    return (time.perf_counter() - t0) / iters


def time_step(model: torch.nn.Module, x, y, opt, iters: int) -> float:
    model.train()
    t0 = time.perf_counter()
    for _ in range(iters):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return (time.perf_counter() - t0) / iters


def run_case(spec, args, size, modes, batch, rounds, iters) -> dict:
    models, report = build(spec, args, size, *modes)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, *size, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    with torch.no_grad():
        ref = models["surgered"].eval()(x)
        diff = (models["folded"].eval()(x) - ref).abs().max().item()
    opts = {k: torch.optim.SGD(m.parameters(), lr=1e-4) for k, m in models.items()}
    times: dict[str, dict[str, list[float]]] = {k: {"infer": [], "step": []} for k in models}
    for k, m in models.items():  # warm-up
        time_inference(m, x, 1)
        time_step(m, x, y, opts[k], 1)
    for _ in range(rounds):
        for k, m in models.items():
            times[k]["infer"].append(time_inference(m, x, iters))
            times[k]["step"].append(time_step(m, x, y, opts[k], iters))
    med = {k: {w: statistics.median(v) for w, v in t.items()} for k, t in times.items()}
    best = {k: {w: min(v) for w, v in t.items()} for k, t in times.items()}
    out = {
        "model": spec, "model_args": args, "shift": modes[0], "scale": modes[1], "batch": batch,
        "max_abs_diff_folded_vs_surgered": diff, "max_abs_output": ref.abs().max().item(),
        "fold": {"folded": report.count("folded"), "scale_folded": report.count("scale folded"),
                 "kept": report.count("kept"), "modules_plain": sum(1 for _ in models["plain"].modules()),
                 "modules_surgered": report.modules_before, "modules_folded": report.modules_after},
    }  # fmt: skip
    for k in models:  # the fastest round: other jobs on a shared CPU only ever add time
        out[k] = {
            "infer_ms": 1e3 * best[k]["infer"],
            "step_ms": 1e3 * best[k]["step"],
            "infer_vs_plain": best[k]["infer"] / best["plain"]["infer"],
            "step_vs_plain": best[k]["step"] / best["plain"]["step"],
            "infer_ms_median": 1e3 * med[k]["infer"],
            "step_ms_median": 1e3 * med[k]["step"],
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=20, help="interleaved rounds (fastest kept)")
    ap.add_argument("--iters", type=int, default=3, help="iterations per round and model")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/fold_speed_cpu.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    cases = []
    for spec, margs, size, modes in CASES:
        c = run_case(spec, margs, size, modes, args.batch, args.rounds, args.iters)
        cases.append(c)
        f = c["fold"]
        print(
            f"{spec} {margs or ''} shift={modes[0]} scale={modes[1]}: {f['folded']} folded, "
            f"{f['scale_folded']} scale-only, {f['kept']} kept; modules plain/surgered/folded "
            f"{f['modules_plain']}/{f['modules_surgered']}/{f['modules_folded']}; "
            f"max |Δ| {c['max_abs_diff_folded_vs_surgered']:.2g}"
        )
        for k in ("plain", "surgered", "folded"):
            r = c[k]
            print(
                f"  {k:9s} inference {r['infer_ms']:7.2f} ms ({r['infer_vs_plain']:.3f}x plain)  "
                f"train step {r['step_ms']:7.2f} ms ({r['step_vs_plain']:.3f}x plain)"
            )
    result = {
        "benchmark": "fold_speed", "device": "cpu", "threads": args.threads,
        "machine": f"{platform.machine()} {platform.processor()}".strip(), "torch": torch.__version__,
        "batch": args.batch, "rounds": args.rounds, "iters": args.iters,
        "time_s": round(time.perf_counter() - t0, 1), "cases": cases,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
