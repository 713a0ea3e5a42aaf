"""The one training loop: SFT, reward modelling, PPO and E2WM all run through it.

It takes a compiled step `(state, batch) -> (state, metrics)` and a batch source, and owns
what every run needs: resuming from the latest checkpoint (model, optimizer and data
position), periodic metrics (loss, token accuracy, learning rate, gradient norm, tokens/s,
MFU) to metrics.jsonl + TensorBoard + the console, periodic evaluation hooks, asynchronous
checkpoints, a clean stop on SIGTERM, and a stop on a non-finite loss that keeps the last
good checkpoint.

Step metrics are sums (`loss_sum`, `correct_sum`, `weight_sum`, ...) plus instantaneous values
(anything else, e.g. `grad_norm`); the loop turns them into means over each logging window
(`RATIOS` of the sums, averages of the rest).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import shlex
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import jax
import numpy as np
from flax import nnx
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from flanjax.errors import FlanjaxError
from flanjax.rundir.checkpoint import Checkpointer
from flanjax.rundir.metrics import MetricsLog, console
from flanjax.sharding import Partitioner


class NonFiniteLossError(FlanjaxError, FloatingPointError):
    pass


class BatchSource(Protocol):
    def __next__(self) -> Mapping[str, np.ndarray]: ...
    def element_spec(self) -> Mapping[str, jax.ShapeDtypeStruct]: ...  # this process's batches
    def get_state(self) -> Mapping: ...
    def set_state(self, state: Mapping) -> None: ...
    def close(self) -> None: ...


EvalHook = Callable[[int, nnx.State], Mapping[str, float]]


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    num_steps: int | None  # None: set by the trainer (lm.train's epochs)
    log_every: int = 10
    eval_every: int | None = None  # None: evaluate only at the end
    eval_at_start: bool = False  # also evaluate the initial model (e.g. untrained baseline)


@dataclasses.dataclass
class LoopResult:
    state: Any
    step: int
    preempted: bool = False
    start_step: int = 0  # restored from: equal to `step` when this invocation trained nothing
    evals: dict[int, dict[str, float]] = dataclasses.field(default_factory=dict)


# Means the loop derives from step metrics that are sums: name -> (numerator, denominator).
RATIOS = {
    "loss": ("loss_sum", "weight_sum"),
    "token_accuracy": ("correct_sum", "weight_sum"),
    "pair_accuracy": ("pairs_right_sum", "pair_sum"),  # comparisons: pairs ranked right
    # DPO's implied rewards (beta x log-ratio) of each pair's better and worse response
    "chosen_reward": ("chosen_reward_sum", "pair_sum"),
    "rejected_reward": ("rejected_reward_sum", "pair_sum"),
    "reward_margin": ("reward_margin_sum", "pair_sum"),
}


def summarise(sums: Mapping[str, float]) -> dict[str, float]:
    """The `RATIOS` of summed metrics whose denominator is not zero."""
    return {name: sums[num] / sums[den] for name, (num, den) in RATIOS.items() if num in sums and sums.get(den)}


def _reduce(window: list[Mapping[str, Any]]) -> dict[str, float]:
    """Host-side means over a logging window of step metrics."""
    host = jax.device_get(window)
    sums = {k: float(sum(m[k] for m in host)) for k in host[0]}
    return {**{k: v / len(host) for k, v in sums.items() if not k.endswith("_sum")}, **summarise(sums)}


class TrainLoop:
    def __init__(
        self,
        *,
        step_fn: Callable[[Any, Mapping[str, jax.Array]], tuple[Any, Mapping[str, jax.Array]]],
        batches: BatchSource,
        partitioner: Partitioner,
        checkpointer: Checkpointer,
        metrics: MetricsLog,
        config: LoopConfig,
        eval_hooks: Mapping[str, EvalHook] | None = None,
        learning_rate: Callable[[int], float] | None = None,
        tokens_per_step: int = 0,
        flops_per_step: float = 0.0,
        peak_flops: float = 0.0,
        console_keys: tuple[str, ...] = ("loss", "token_accuracy", "grad_norm", "tokens_per_s"),
    ):
        self.step_fn = step_fn
        self.batches = batches
        self.partitioner = partitioner
        self.checkpointer = checkpointer
        self.metrics = metrics
        self.config = config
        self.eval_hooks = dict(eval_hooks or {})
        self.learning_rate = learning_rate
        self.tokens_per_step = tokens_per_step
        self.flops_per_step = flops_per_step
        self.peak_flops = peak_flops
        self.console_keys = console_keys

    # --- start ----------------------------------------------------------------------------

    def restore_or_init(self, init_fn: Callable[[], Any], abstract_state: Any) -> tuple[Any, int]:
        latest = self.checkpointer.latest_step()
        if latest is None:
            console.print("Initialising the model and optimizer state...")
            return init_fn(), 0
        # Said before restoring: a large checkpoint takes a while to read.
        console.print(f"Resuming from checkpoint step {latest} in {self.checkpointer.directory}...")
        state, data_state = self.checkpointer.restore(latest, abstract_state)
        if data_state:
            self.batches.set_state(data_state)
        return state, latest

    # --- run ------------------------------------------------------------------------------

    def run(self, init_fn: Callable[[], Any], abstract_state: Any) -> LoopResult:
        cfg = self.config
        state, step = self.restore_or_init(init_fn, abstract_state)
        result = LoopResult(state, step, start_step=step)
        if step >= cfg.num_steps:  # evaluated when it finished: rerunning a finished run is a no-op
            console.print(f"The run is already complete at step {step} of {cfg.num_steps}: nothing to train. "
                          "To train longer, raise the step count (TRAIN_STEPS, or loop.LoopConfig.num_steps).")
            return result
        if step == 0 and cfg.eval_at_start:
            self._evaluate(0, state, result)
        watch = PreemptionWatch()
        window: list[Mapping[str, Any]] = []
        previous: Mapping[str, Any] | None = None
        window_start, timed = None, 0
        if step < cfg.num_steps:  # the first batch waits for the pipeline to start (shuffle buffers fill)
            console.print("Reading the first batch...")
        try:
            with self._progress(step) as progress:
                task = progress.add_task("train", total=cfg.num_steps, completed=step, metrics="")
                while step < cfg.num_steps:
                    if watch.should_stop(step):
                        self._stop_for_preemption(step, state)
                        result.preempted = True
                        break
                    batch = self.partitioner.shard_batch(next(self.batches))
                    state, step_metrics = self.step_fn(state, batch)
                    step += 1
                    if previous is not None:  # checked one step late: the device stays busy
                        self._check_finite(previous, step - 1)
                    previous = step_metrics
                    window.append(step_metrics)
                    timed += 1
                    if window_start is None:  # the first step compiles: keep it out of throughput
                        jax.block_until_ready(step_metrics)
                        window_start, timed = time.perf_counter(), 0
                    if step % cfg.log_every == 0 or step == cfg.num_steps:
                        self._log(step, window, timed, time.perf_counter() - window_start, progress, task)
                        window, window_start, timed = [], time.perf_counter(), 0
                    progress.update(task, completed=step)
                    if step % self.checkpointer.config.every_steps == 0 or step == cfg.num_steps:
                        self._check_finite(step_metrics, step)
                        self._save(step, state)
                    if cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.num_steps:
                        self._evaluate(step, state, result)
            if not result.preempted:
                self._evaluate(step, state, result)
        finally:
            self.checkpointer.wait()
            self.metrics.flush()
            watch.close()  # last: a SIGTERM meanwhile sets its flag, not the start-up handler's
        result.state, result.step = state, step
        return result

    def close(self) -> None:
        """Releases the checkpointer, the metrics files and the batch source after `run`."""
        self.checkpointer.close()
        self.metrics.close()
        self.batches.close()

    # --- pieces ---------------------------------------------------------------------------

    def _progress(self, step: int) -> Progress:
        return Progress(
            TextColumn("[bold]step"),
            MofNCompleteColumn(),
            BarColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[metrics]}"),
            console=console,
            disable=not console.is_terminal,
            transient=False,
        )

    def _check_finite(self, step_metrics: Mapping[str, Any], step: int) -> None:
        loss = float(jax.device_get(step_metrics["loss_sum"]))
        if math.isfinite(loss):
            return
        self.checkpointer.wait()
        good = self.checkpointer.latest_step()
        where = f"step {good} in {self.checkpointer.directory}" if good is not None else "none yet"
        raise NonFiniteLossError(
            f"loss is {loss} at step {step}; the run stopped before saving anything from it. "
            f"Last good checkpoint: {where}. Lower the learning rate (or raise warmup), check the "
            "data around this step, or enable gradient clipping, then run the same command to "
            "resume from that checkpoint."
        )

    def _save(self, step: int, state: Any) -> None:
        if self.checkpointer.latest_step() != step:  # a periodic save may have just written it
            self.checkpointer.save(step, state, self.batches.get_state())

    def _stop_for_preemption(self, step: int, state: Any) -> None:
        self._save(step, state)
        self.checkpointer.wait()
        console.print(
            f"[bold yellow]Pre-empted (SIGTERM) at step {step}; checkpoint saved to "
            f"{self.checkpointer.directory}.[/] Resume with the same command:\n  {resume_command()}"
        )

    def _log(self, step: int, window, timed: int, elapsed: float, progress: Progress, task) -> None:
        scalars = _reduce(window)
        if timed:  # throughput over the steps timed in this window
            scalars["step_time_s"] = elapsed / timed
            if self.tokens_per_step:
                scalars["tokens_per_s"] = self.tokens_per_step * timed / elapsed
            if self.flops_per_step and self.peak_flops:
                scalars["mfu"] = self.flops_per_step * timed / elapsed / self.peak_flops
        if self.learning_rate is not None:
            scalars["learning_rate"] = float(self.learning_rate(step))
        self.metrics.write(step, scalars)
        shown = "  ".join(
            f"{k}={scalars[k]:.4g}" for k in self.console_keys if k in scalars
        )
        progress.update(task, metrics=shown)
        if not console.is_terminal:  # a terminal shows the bar and its time remaining instead
            left = self.config.num_steps - step
            eta = f"  eta={format_eta(left * elapsed / timed)}" if timed and left else ""
            console.print(f"step {step}/{self.config.num_steps}  {shown}{eta}")

    def _evaluate(self, step: int, state: Any, result: LoopResult) -> None:
        if not self.eval_hooks:
            return
        scalars: dict[str, float] = {}
        for name, hook in self.eval_hooks.items():
            for k, v in hook(step, state).items():
                scalars[f"{name}/{k}"] = float(v)
        self.metrics.write(step, scalars)
        result.evals[step] = scalars


def format_eta(seconds: float) -> str:
    """A duration for the progress line: 45s, 3m12s, 2h05m."""
    if not math.isfinite(seconds):
        return "?"
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def resume_command() -> str:
    """The command line that started this process, runnable as printed: the script as it was
    invoked (`.venv/bin/flanjax train ...`), or the interpreter's whole command line under
    `python -m flanjax.cli`, where argv[0] is the module's file."""
    argv = sys.orig_argv if sys.argv[0].endswith(".py") else sys.argv
    return shlex.join(argv)


class PreemptionWatch:
    """Turns SIGTERM (a pre-empted TPU VM, a cluster scheduler) into a flag the loop polls.

    With several processes JAX's preemption service (started by `jax.distributed`) catches
    the signal and agrees on a step at which every process stops together.
    """

    def __init__(self):
        self._flag = threading.Event()
        self._previous = None
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, lambda *_: self._flag.set())

    def should_stop(self, step: int) -> bool:
        if jax.process_count() == 1:
            return self._flag.is_set()
        from jax.experimental import multihost_utils

        return multihost_utils.reached_preemption_sync_point(step)

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


class _StartUpInterrupted(BaseException):
    """SIGTERM before the first step; not an `Exception`, so that no `except Exception` swallows it."""


@contextlib.contextmanager
def exit_on_sigterm_during_start_up(latest_step: Callable[[], int | None]):
    """Until the loop's `PreemptionWatch` takes over, SIGTERM (while compiling, reading data,
    restoring) ends the process with status 143 and says how to resume: there is nothing new
    to save. `latest_step()`: the run's latest checkpoint, for the message."""
    if jax.process_count() > 1 or threading.current_thread() is not threading.main_thread():
        yield  # several processes: JAX's preemption service owns the signal
        return

    def interrupt(*_):
        raise _StartUpInterrupted

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    except _StartUpInterrupted:
        signal.signal(signal.SIGTERM, previous)  # a second SIGTERM now ends it the usual way
        step = latest_step()
        at = f"; the latest checkpoint is step {step}" if step is not None else ""
        console.print(
            f"[bold yellow]Interrupted (SIGTERM) during start-up, before the first step{at}; nothing new to save.[/] "
            f"Resume with the same command:\n  {resume_command()}"
        )
        raise SystemExit(143) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
