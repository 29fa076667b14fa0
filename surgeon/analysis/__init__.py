"""Analysis of surgered models and training runs: what the shift/scale layers learned
(:func:`inspect`), how runs compare, and the training report (:func:`build_report`).

Pure library code (no CLI); nothing is unpickled: only JSON and safetensors are read.
"""

from __future__ import annotations

from .plots import plot_depth, plot_histograms, plot_inspect, plot_trajectory
from .report import DEFAULT_MARGIN, build_report, render_html, render_markdown
from .runs import Run, find_runs, load_run, load_runs, read_metrics
from .stats import (
    affine_summary,
    check_compatible,
    compare,
    describe_sites,
    effective_affine,
    inspect,
    jsonable,
    pearson,
    site_stats,
    tensor_stats,
    trajectory,
)
from .targets import Target, list_snapshots, load_target, load_targets, read_params

__all__ = [
    "DEFAULT_MARGIN", "Run", "Target", "affine_summary", "build_report", "check_compatible",
    "compare", "describe_sites", "effective_affine", "find_runs", "inspect", "jsonable",
    "list_snapshots", "load_run", "load_runs", "load_target", "load_targets", "pearson",
    "plot_depth", "plot_histograms", "plot_inspect", "plot_trajectory", "read_metrics",
    "read_params", "render_html", "render_markdown", "site_stats", "tensor_stats", "trajectory",
]  # fmt: skip
