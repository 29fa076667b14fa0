"""The report page in a real browser: tiny real runs, ``surgeon report``, a headless Chromium
screenshot of ``index.html``.

    python benchmarks/report_screenshot.py                  # 4.5 min on 2 busy CPU cores
    python benchmarks/report_screenshot.py --runs DIR       # reuse runs, skip the training

Trains the ``quick`` recipe (plain, batch norm, layer-wise shift+scale) for 2 epochs on 300
images of the embedded sample (batch size 25, loss EMA 0.9) with ``--probe`` (a smoke run
of the tool, not a result),
writes the report, opens ``index.html`` from disk in headless Chromium (no network: the page
must stand alone) and saves the screenshot to docs/results/report_screenshot.png.

Needs a Chromium: ``apt-get install -y chromium`` on Debian (or ``--chromium PATH``). Not
part of the test suite; tests/test_report.py checks the HTML itself.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def run(cmd: list[str], timeout: float, cwd: Path | None = None) -> None:
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, timeout=timeout, cwd=cwd)


def train(out: Path, epochs: int) -> None:
    cmd = [sys.executable, "-m", "surgeon", "train", "--recipe", "quick", "--data", "sample"]
    cmd += ["--epochs", str(epochs), "--limit-train", "300", "--limit-test", "200"]
    cmd += ["--batch-size", "25", "--ema", "0.9"]  # a dozen steps an epoch, an EMA that moves
    run(cmd + ["--device", "cpu", "--probe", "--quiet", "--out", str(out)], timeout=1800)


def screenshot(browser: str, page: Path, png: Path, size: str) -> None:
    """``page`` rendered by headless Chromium, saved to ``png``; no network, a fresh profile."""
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        cmd = [
            browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--hide-scrollbars", "--force-device-scale-factor=1",
            f"--user-data-dir={profile}", f"--screenshot={png}", f"--window-size={size}",
            page.resolve().as_uri(),
        ]  # fmt: skip
        print("$", " ".join(cmd), flush=True)
        # quiet unless it fails: headless Chromium logs D-Bus errors on machines without one
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    if done.returncode or not png.is_file() or png.stat().st_size == 0:
        raise SystemExit(f"{done.stderr}\nerror: {browser} wrote no screenshot to {png}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=Path, help="a runs folder to report on (skips training)")
    ap.add_argument("--epochs", type=int, default=2, help="epochs of the tiny runs")
    ap.add_argument("--keep", type=Path, help="write the runs and the report here (kept)")
    ap.add_argument("--chromium", help="the browser binary (default: chromium on PATH)")
    ap.add_argument("--window-size", default="1280,2000", help="WIDTH,HEIGHT in CSS pixels")
    ap.add_argument("--out", type=Path, default=ROOT / "docs/results/report_screenshot.png")
    args = ap.parse_args()
    browser = args.chromium or next(filter(None, map(shutil.which, BROWSERS)), None)
    if browser is None:
        raise SystemExit("error: no Chromium found. hint: apt-get install -y chromium")
    with tempfile.TemporaryDirectory(prefix="report-screenshot-") as tmp:
        work = (args.keep or Path(tmp)).resolve()
        work.mkdir(parents=True, exist_ok=True)
        runs = args.runs.resolve() if args.runs else work / "runs"
        if args.runs is None:
            t0 = time.perf_counter()
            train(runs, args.epochs)
            print(f"trained in {time.perf_counter() - t0:.0f} s")
        # run from `work`, so that the page names the runs `runs`, not a temporary path
        report = [sys.executable, "-m", "surgeon", "report", os.path.relpath(runs, work)]
        run(report + ["-o", "report"], timeout=600, cwd=work)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        screenshot(browser, work / "report" / "index.html", args.out, args.window_size)
    version = subprocess.run([browser, "--version"], capture_output=True, text=True).stdout
    print(f"wrote {args.out} ({args.out.stat().st_size // 1024} KiB) with {version.strip()}")


if __name__ == "__main__":
    main()
