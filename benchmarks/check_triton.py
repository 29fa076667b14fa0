"""GPU-side check of the fused shift-scale: the Triton path against the PyTorch path and
an fp64 reference, then the overhead benchmark's CUDA configuration.

    PYTHONPATH=. python benchmarks/check_triton.py                  # on a CUDA machine
    PYTHONPATH=. python benchmarks/check_triton.py --device cpu     # Triton's interpreter, small shapes
    PYTHONPATH=. python benchmarks/check_triton.py --no-bench       # the comparisons only
    PYTHONPATH=. python benchmarks/check_triton.py --device cpu --quick   # a subset (tests)
    PYTHONPATH=. python benchmarks/check_triton.py --no-bench --shard 2/8 --json r.json   # a worker

From Python (``benchmarks/gpu_check.py``): ``check(...)`` returns a dict, ``micro(...)`` its
timings, and ``parallel_check(...)`` splits the mode pairs over worker processes, since on a
fresh machine compiling the kernel specialisations, not running them, takes the time.

For every shift x scale mode pair, with and without the merged ReLU, fp32 and bf16, and the
layouts NCHW, channels-last, (N, C), (N, L, C) and (N, H, W, C) with channel dim 3, it
compares forward output and the gradients of x, shift and scale. Errors are relative to
the fp64 reference: ``max |got - ref| / max |ref|`` for the output and grad_x, and for a
parameter gradient (a sum) ``max |got - ref| / sum |terms|``, so cancellation in the sum does
not inflate it. Prints one line per case that fails, the worst errors, PASS or FAIL, and
exits 1 on failure. Needs nothing beyond torch and triton (no installs).
"""

from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
import time
from pathlib import Path

if "--device" in sys.argv and sys.argv[sys.argv.index("--device") + 1] == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from surgeon.layers import MODES, param_shape  # noqa: E402
from surgeon.ops import fused as op  # noqa: E402

TOL = {  # (output and grad_x, parameter gradients), relative; see the module docstring
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (1.6e-2, 1e-2),
}


def layouts(big: bool) -> list[tuple[str, tuple[int, ...], int, torch.memory_format | None]]:
    """(name, shape, channel dim, memory format)."""
    if big:  # several blocks per row / column, loops inside the kernels
        return [
            ("nchw", (16, 24, 48, 48), 1, None),
            ("channels_last", (16, 24, 48, 48), 1, torch.channels_last),
            ("nc", (4096, 192), 1, None),
            ("nlc", (8, 197, 384), 2, None),
            ("nhwc", (16, 14, 14, 96), 3, None),
            ("nchw_small_hw", (64, 192, 6, 6), 1, None),
            ("channels_last_odd_c", (8, 10, 9, 9), 1, torch.channels_last),
        ]
    return [
        ("nchw", (3, 4, 5, 6), 1, None),
        ("channels_last", (3, 4, 5, 6), 1, torch.channels_last),
        ("nc", (5, 7), 1, None),
        ("nlc", (3, 5, 6), 2, None),
        ("nhwc", (3, 4, 5, 6), 3, None),
        ("nchw_long_rows", (2, 3, 40, 40), 1, None),
    ]


def run(backend: str, x, b, a, modes, cd: int, relu: bool, g):
    op.BACKEND = backend
    x = x.detach().clone().requires_grad_()
    b = b.detach().clone().requires_grad_() if b is not None else None
    a = a.detach().clone().requires_grad_() if a is not None else None
    y = op.shift_scale(x, b, a, modes[0], modes[1], cd, relu)
    y.backward(g)
    return (
        y.detach(),
        x.grad,
        (b.grad if b is not None else None),
        (a.grad if a is not None else None),
    )


def reduce_abs(t: torch.Tensor, mode: str, cd: int) -> torch.Tensor:
    return op._reduce(t.abs(), mode, cd, t)


QUICK_PAIRS = [
    ("layer", "channel"), ("channel", "element"), ("element", "layer"),
    ("channel", "channel"), ("none", "element"), ("layer", "none"),
]  # fmt: skip


def mode_pairs(quick: bool = False) -> list[tuple[str, str]]:
    """Every (shift, scale) mode pair but (none, none); ``quick``: a subset for the tests."""
    if quick:
        return list(QUICK_PAIRS)
    return [(s, c) for s in MODES for c in MODES if (s, c) != ("none", "none")]


def check(
    device: str,
    big: bool,
    quick: bool = False,
    shard: tuple[int, int] = (0, 1),
    verbose: bool = True,
    progress=None,
) -> dict:
    """Compare the Triton path with the PyTorch path and fp64 for every case; ``shard=(i, n)``
    takes every n-th mode pair from the i-th. Returns ``{"passed", "cases", "failures",
    "worst", "wall_s"}`` (``worst``: the largest relative error per backend, output, dtype).
    ``progress(result)`` is called with the result so far after each layout."""
    torch.manual_seed(0)
    pairs = mode_pairs(quick)[shard[0] :: shard[1]]
    cases = layouts(big)
    if quick:
        cases = [c for c in cases if c[0] in ("channels_last", "nlc", "nc")]
    worst: dict[tuple[str, str], float] = {}
    failures: list[str] = []
    n = 0
    t0 = time.perf_counter()

    def fail(msg: str) -> None:
        failures.append(msg)
        if verbose:
            print("FAIL " + msg)

    for (name, shape, cd, mf), (sh, sc), relu, dt in itertools.product(
        cases, pairs, (False, True), (torch.float32, torch.bfloat16)
    ):
        x = torch.randn(shape, device=device).to(dt)
        g = torch.randn(shape, device=device).to(dt)
        if mf is not None:
            x, g = x.to(memory_format=mf), g.to(memory_format=mf)
        fs = shape[1:]
        b = 0.5 * torch.randn(param_shape(sh, fs, cd), device=device) if sh != "none" else None
        a = 1 + 0.5 * torch.randn(param_shape(sc, fs, cd), device=device) if sc != "none" else None
        got = run("triton", x, b, a, (sh, sc), cd, relu, g)
        base = run("torch", x, b, a, (sh, sc), cd, relu, g)
        b64 = b.double() if b is not None else None
        a64 = a.double() if a is not None else None
        ref = run("torch", x.double(), b64, a64, (sh, sc), cd, relu, g.double())
        # the scale of each parameter gradient: sum |terms|
        xr = x.double().clamp_min(0) if relu else x.double()
        xb = xr + op._view(b64, sh, xr, cd) if b64 is not None else xr
        ga64 = g.double() * op._view(a64, sc, xr, cd) if a64 is not None else g.double()
        scales = [
            None,
            None,
            reduce_abs(ga64, sh, cd).max() if b is not None else None,
            reduce_abs(g.double() * xb, sc, cd).max() if a is not None else None,
        ]
        tol_act, tol_par = TOL[dt]
        case = f"{name} {sh}/{sc} relu={relu} {str(dt)[6:]}"
        for i, what in enumerate(("out", "grad_x", "grad_shift", "grad_scale")):
            r = ref[i]
            if r is None:
                continue
            denom = (r.abs().max() if scales[i] is None else scales[i]).item() + 1e-12
            tol = tol_act if i < 2 else tol_par
            for backend, res in (("triton", got), ("torch", base)):
                t = res[i]
                if t is None or t.shape != r.shape:
                    fail(f"{backend} {case}: {what} missing/shape")
                    continue
                err = (t.double() - r).abs().max().item() / denom
                key = (backend, f"{what} {str(dt)[6:]}")
                worst[key] = max(worst.get(key, 0.0), err)
                if backend == "triton" and err > tol:
                    fail(f"{case}: {what} rel err {err:.2e}")
        if got[0].dtype != x.dtype or got[0].stride() != x.stride():
            fail(f"{case}: output dtype/layout")
        n += 1
        if progress is not None and (sh, sc, relu, dt) == (*pairs[-1], True, torch.bfloat16):
            progress(result(n, failures, worst, t0, big, pairs, cases, done=False))
    op.BACKEND = "auto"
    wall = time.perf_counter() - t0
    if verbose:
        print(f"{n} cases in {wall:.1f}s; worst relative errors vs fp64:")
        for key in sorted(worst):
            print(f"  {key[0]:6s} {key[1]:20s} {worst[key]:.2e}")
        print("PASS" if not failures else f"FAIL ({len(failures)})")
    return result(n, failures, worst, t0, big, pairs, cases, done=True)


def result(n, failures, worst, t0, big, pairs, cases, done: bool) -> dict:
    """``check``'s result; ``done`` false: a partial one (``passed`` false until done)."""
    return {
        "passed": done and not failures,
        "done": done,
        "cases": n,
        "failures": list(failures),
        "worst": {f"{b} {w}": e for (b, w), e in sorted(worst.items())},
        "wall_s": round(time.perf_counter() - t0, 2),
        "big": big,
        "pairs": [f"{s}/{c}" for s, c in pairs],
        "layouts": [c[0] for c in cases],
    }


def merge(results: list[dict]) -> dict:
    """One result from several ``check`` results (workers, small and big shapes)."""
    worst: dict[str, float] = {}
    for r in results:
        for k, v in r["worst"].items():
            worst[k] = max(worst.get(k, 0.0), v)
    return {
        "passed": bool(results) and all(r["passed"] for r in results),
        "cases": sum(r["cases"] for r in results),
        "failures": [f for r in results for f in r["failures"]],
        "worst": dict(sorted(worst.items())),
    }


def parallel_check(
    device: str,
    workers: int,
    quick: bool = False,
    big: bool = True,
    timeout_s: float = 600.0,
    log_dir: Path | None = None,
) -> dict:
    """``check`` in ``workers`` processes (the mode pairs split between them), small shapes
    then, unless ``quick`` or ``big`` is false, large ones. A worker still running after
    ``timeout_s`` is stopped; what it finished counts and the result says it was cut."""
    import json
    import signal
    import tempfile

    n_pairs = len(mode_pairs(quick))
    workers = max(1, min(workers, n_pairs))
    tmp = Path(tempfile.mkdtemp(prefix="check_triton_"))
    log_dir = log_dir or tmp
    log_dir.mkdir(parents=True, exist_ok=True)
    procs = []
    t0 = time.perf_counter()
    for i in range(workers):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--device", device, "--no-bench"]
        cmd += ["--no-micro", "--shard", f"{i}/{workers}", "--json", str(tmp / f"w{i}.json")]
        cmd += ["--quick"] if quick else ([] if big else ["--no-big"])
        log = open(log_dir / f"check_triton_w{i}.log", "w")  # noqa: SIM115 (closed below)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        if device == "cpu":
            env["TRITON_INTERPRET"] = "1"
        procs.append(
            (
                subprocess.Popen(
                    cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
                ),
                log,
            )
        )
    cut, codes = [], []
    for i, (p, log) in enumerate(procs):
        try:
            codes.append(p.wait(timeout=max(1.0, timeout_s - (time.perf_counter() - t0))))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)  # this worker's own process group
            codes.append(p.wait())
            cut.append(i)
        log.close()
    parts, missing = [], []
    for i in range(workers):
        path = tmp / f"w{i}.json"
        if path.is_file():
            parts.extend(json.loads(path.read_text()))
        else:
            missing.append(i)
    out = merge(parts)
    out.update(
        workers=workers,
        worker_exit_codes=codes,
        workers_cut_by_timeout=cut,
        workers_without_results=missing,
        complete=not cut
        and not missing
        and len(parts) == workers * (1 if quick or not big else 2)
        and all(p.get("done", True) for p in parts),
        wall_s=round(time.perf_counter() - t0, 2),
        device=device,
        quick=quick,
    )
    out["passed"] = out["passed"] and out["complete"] and all(c == 0 for c in codes)
    if out["failures"] or not out["complete"]:
        for i in range(workers):
            tail = (log_dir / f"check_triton_w{i}.log").read_text()[-2000:]
            out.setdefault("log_tails", {})[str(i)] = tail
    return out


def micro(device: str, iters: int = 20) -> dict:
    """Forward+backward of one All-CNN-C-sized activation: unfused, fused PyTorch, Triton;
    returns ``{mode: {impl: ms}}``."""
    from surgeon.layers import ShiftScale

    shape = (512, 96, 32, 32)
    x0 = torch.randn(shape, device=device, dtype=torch.bfloat16)
    x0 = x0.to(memory_format=torch.channels_last)
    g = torch.randn_like(x0)
    print(f"\nmicro: {shape} bf16 channels_last, forward+backward, ms")
    out: dict = {"shape": list(shape), "dtype": "bfloat16", "layout": "channels_last"}
    for mode in ("layer", "channel", "element"):
        row, out[mode] = [], {}
        for label, fused_on, backend in (
            ("plain", False, "torch"),
            ("torch", True, "torch"),
            ("triton", True, "triton"),
        ):
            m = ShiftScale(mode, mode, shape[1:], 1, fused=fused_on).to(device)
            op.BACKEND = backend
            x = x0.detach().requires_grad_()
            for _ in range(3):
                m(x).backward(g)
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                m(x).backward(g)
            end.record()
            torch.cuda.synchronize()
            out[mode][label] = round(start.elapsed_time(end) / iters, 4)
            row.append(f"{label} {out[mode][label]:.3f}")
        print(f"  {mode:8s} " + "  ".join(row))
    op.BACKEND = "auto"
    return out


def main() -> int:
    import json

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda, or cpu for Triton's interpreter")
    ap.add_argument("--no-bench", action="store_true", help="skip the overhead benchmark")
    ap.add_argument("--no-micro", action="store_true", help="skip the micro-benchmark")
    ap.add_argument("--no-big", action="store_true", help="small shapes only")
    ap.add_argument("--quick", action="store_true", help="a subset of modes and layouts")
    ap.add_argument("--shard", default="0/1", help="I/N: every N-th mode pair from the I-th")
    ap.add_argument("--json", default=None, help="write the comparisons' results here")
    ap.add_argument("--bench-args", default="", help="extra arguments for overhead.py")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device; use --device cpu for the interpreter")
        return 2
    if op._triton() is None:
        print("triton cannot be imported")
        return 2
    print(f"torch {torch.__version__}, triton {op._triton().triton.__version__}, ", end="")
    print(torch.cuda.get_device_name() if args.device == "cuda" else "interpreter on CPU")
    shard = tuple(int(v) for v in args.shard.split("/"))
    results = []

    def save() -> None:
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1) + "\n")

    def partial(r: dict) -> None:  # a killed worker leaves what it checked
        if args.json:
            Path(args.json).write_text(json.dumps([*results, r], indent=1) + "\n")

    results.append(check(args.device, False, args.quick, shard, progress=partial))
    save()
    if args.device == "cuda" and not args.quick and not args.no_big:
        results.append(check(args.device, big=True, shard=shard, progress=partial))
        save()
    if args.device == "cuda" and not args.quick and not args.no_micro:
        micro(args.device)
    ok = all(r["passed"] for r in results)
    if args.device == "cuda" and not args.no_bench:
        cmd = [sys.executable, str(ROOT / "benchmarks" / "overhead.py"), "--device", "cuda"]
        cmd += ["--compile", *args.bench_args.split()]
        print("\n$ " + " ".join(cmd), flush=True)
        ok = subprocess.call(cmd, cwd=ROOT) == 0 and ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
