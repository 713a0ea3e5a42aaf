"""Where a run's numbers go: metrics.jsonl, TensorBoard event files, the console, PNG plots."""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Iterable, Mapping

import jax
from clu.metric_writers.tf.summary_writer import SummaryWriter
from rich.console import Console

from flanjax import paths

# soft_wrap: a line is never broken at the console width, so logs and the printed resume
# command stay whole when stderr is a file or a pipe (where rich assumes 80 columns). There a
# wide width also keeps tables (laid out to the width) from wrapping or cutting their cells.
console = Console(stderr=True, highlight=False, soft_wrap=True, width=None if os.isatty(2) else 1000)


class MetricsLog:
    """Scalars per step to `metrics.jsonl` (one JSON object a line) and TensorBoard.

    Only process 0 writes; the others accept and drop, so callers need not check. A local file
    is line-buffered. A remote one (gs://) is opened in gfile's append mode, which on GCS
    downloads the object and re-uploads it whole on each flush: it is flushed at most every
    `REMOTE_FLUSH_S` seconds, and on `flush`/`close`. TensorBoard's writer reaches gs:// itself.
    """

    REMOTE_FLUSH_S = 60.0

    def __init__(self, model_dir: str):
        self.path = os.path.join(model_dir, "metrics.jsonl")
        self._enabled = jax.process_index() == 0
        if self._enabled:
            paths.makedirs(model_dir)
            self._file = paths.open(self.path, "a", buffering=1)
            self._remote, self._flushed = paths.is_remote(self.path), time.monotonic()
            self._tb = SummaryWriter(os.path.join(model_dir, "tensorboard"))

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self._enabled or not scalars:
            return
        clean = {k: float(v) for k, v in scalars.items()}
        self._file.write(json.dumps({"step": int(step), **clean}) + "\n")
        self._tb.write_scalars(int(step), clean)
        if self._remote and time.monotonic() - self._flushed >= self.REMOTE_FLUSH_S:
            self._file.flush()  # a run killed without `close` loses at most this long of metrics
            self._flushed = time.monotonic()

    def flush(self) -> None:
        if self._enabled:
            self._file.flush()
            self._tb.flush()
            self._flushed = time.monotonic()

    def close(self) -> None:
        if self._enabled:
            self._file.close()
            self._tb.close()


def read_metrics(path: str) -> list[dict]:
    with paths.open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def latest_metrics(path: str) -> dict[str, float]:
    """Each metric's last logged value (a run's summary)."""
    return {k: v for row in read_metrics(path) for k, v in row.items() if k != "step"} if paths.exists(path) else {}


def plot_metrics(
    metrics_path: str, png_path: str, keys: Iterable[str] = ("loss", "validation/loss"), title: str = "",
    log_scale: bool = True, ylabel: str = "", hlines: Mapping[str, float] | None = None,
) -> str:
    """Plot of `keys` against step from a metrics.jsonl, with horizontal reference lines
    `hlines` (label -> y); returns the PNG path (local or remote: matplotlib writes only local
    files, so a remote PNG is rendered in memory and uploaded)."""
    title = title or os.path.basename(os.path.dirname(paths.abspath(metrics_path)))
    fig = _figure(read_metrics(metrics_path), tuple(keys), title, log_scale, ylabel, hlines or {})
    if not paths.is_remote(png_path):
        fig.savefig(png_path)
        return png_path
    png = io.BytesIO()
    fig.savefig(png, format="png")
    paths.write_atomic(png_path, png.getvalue())
    return png_path


def _default_ylabel(keys: tuple[str, ...]) -> str:
    if len(keys) == 1:
        return keys[0]
    names = {k.rsplit("/", 1)[-1] for k in keys}  # "loss" and "validation/loss" are both a loss
    if len(names) == 1:
        return names.pop()
    if keys and all(k.endswith("loss") for k in keys):  # e.g. "loss", "z_loss"
        return "loss"
    return ", ".join(keys)


def _figure(rows: list[dict], keys: tuple[str, ...], title: str, log_scale: bool, ylabel: str,
            hlines: Mapping[str, float]):  # fmt: skip
    """The matplotlib Figure `plot_metrics` saves (kept apart so tests can inspect it)."""
    from matplotlib import ticker
    from matplotlib.figure import Figure  # not pyplot: no global figure registry or backend to manage

    class PlainLogFormatter(ticker.LogFormatter):
        # Decimals ("0.4", "2", "6") instead of the default "6x10^0".
        def _num_to_string(self, x, vmin, vmax):
            return f"{x:g}"

    fig = Figure(figsize=(7, 4), dpi=110)
    ax = fig.subplots()
    for key in keys:
        points = [(r["step"], r[key]) for r in rows if key in r]
        if points:
            # A resumed run appends: keep the last value written for each step.
            xs, ys = zip(*sorted(dict(points).items()))
            if len(xs) < 30:  # e.g. evaluations: points only, a line between two evaluations is no trend
                ax.plot(xs, ys, label=key, marker="o", linestyle="none")
            else:
                ax.plot(xs, ys, label=key)
    for label, y in hlines.items():
        ax.axhline(y, color="0.35", linestyle="--", linewidth=1, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel or _default_ylabel(keys))
    if log_scale:
        ax.set_yscale("log")  # resets the formatters: set ours after
        ax.yaxis.set_major_formatter(PlainLogFormatter())
        # Label a subset of minor ticks (1, 2, 3, 4, 6) up to two decades, all of them under half a decade.
        ax.yaxis.set_minor_formatter(PlainLogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    return fig
