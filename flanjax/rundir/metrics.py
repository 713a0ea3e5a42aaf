"""Where a run's numbers go: metrics.jsonl, TensorBoard event files, the console, PNG plots."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping

import jax
from clu.metric_writers.tf.summary_writer import SummaryWriter
from rich.console import Console

# soft_wrap: a line is never broken at the console width, so logs and the printed resume
# command stay whole when stderr is a file or a pipe (where rich assumes 80 columns).
console = Console(stderr=True, highlight=False, soft_wrap=True)


class MetricsLog:
    """Scalars per step to `metrics.jsonl` (one JSON object a line) and TensorBoard.

    Only process 0 writes; the others accept and drop, so callers need not check.
    """

    def __init__(self, model_dir: str):
        self.path = os.path.join(model_dir, "metrics.jsonl")
        self._enabled = jax.process_index() == 0
        if self._enabled:
            os.makedirs(model_dir, exist_ok=True)
            self._file = open(self.path, "a", buffering=1)
            self._tb = SummaryWriter(os.path.join(model_dir, "tensorboard"))

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self._enabled or not scalars:
            return
        clean = {k: float(v) for k, v in scalars.items()}
        self._file.write(json.dumps({"step": int(step), **clean}) + "\n")
        self._tb.write_scalars(int(step), clean)

    def flush(self) -> None:
        if self._enabled:
            self._file.flush()
            self._tb.flush()

    def close(self) -> None:
        if self._enabled:
            self._file.close()
            self._tb.close()


def read_metrics(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_metrics(
    metrics_path: str, png_path: str, keys: Iterable[str] = ("loss", "validation/loss"), title: str = "",
    log_scale: bool = True,
) -> str:
    """Line plot of `keys` against step from a metrics.jsonl; returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for key in keys:
        points = [(r["step"], r[key]) for r in rows if key in r]
        if points:
            # A resumed run appends: keep the last value written for each step.
            xs, ys = zip(*sorted(dict(points).items()))
            sparse = len(xs) < 30  # e.g. evaluations: show the points, dash what joins them
            ax.plot(xs, ys, label=key, marker="o" if sparse else None, linestyle="--" if sparse else "-")
    ax.set_xlabel("step")
    if log_scale:
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title(title or os.path.basename(os.path.dirname(os.path.abspath(metrics_path))))
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return png_path
