"""The trainer shell: what every training method shares, around the one loop.

A method (SFT, reward model, PPO, ...) describes itself as a `Trainer`: how to build its
trained state, how to compile its step, its batches and evaluation hooks. `run` does the rest
in one order for all of them:

    tokenizer check                                the data's against the run's and its origin's
    abstract state                                 shapes and shardings, nothing allocated
    ahead-of-time compile                          before any data is read, with a memory report
                                                   (a dry run stops here, having written nothing)
    model.json / lora.json / init_checkpoint.txt,  the run directory says what it holds
    dialogue.json, directions.json, tokenizer/
    checkpointer, metrics, hooks, TrainLoop        resume or create the state born sharded
    close, plots                                   loss.png (and the method's own plots)

So a new method is a loss function, a `Trainer` and its `TRAINER` entry in `flanjax.cli`.
"""

from __future__ import annotations

import contextvars
import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
from flax import nnx

from flanjax.data.bidirectional import Directions, write_directions
from flanjax.data.dialogue import DialogueFormat, write_format
from flanjax.models.lora import LoraConfig
from flanjax.models.transformer import TransformerConfig
from flanjax.rundir.checkpoint import CheckpointConfig, Checkpointer
from flanjax.rundir.files import check_tokenizer, write_init_checkpoint, write_model_config, write_tokenizer
from flanjax.rundir.metrics import MetricsLog, console, plot_metrics
from flanjax.sharding import Partitioner, shardings_of
from flanjax.train.loop import (
    BatchSource, EvalHook, LoopConfig, LoopResult, TrainLoop, exit_on_sigterm_during_start_up, summarise,
)

# `flanjax train --dry_run`: `run` stops once the step compiled, before anything is written.
DRY_RUN: contextvars.ContextVar[bool] = contextvars.ContextVar("flanjax_dry_run", default=False)


class DryRun(Exception):
    """Raised by `run` in a dry run, once the configuration resolved and the step compiled."""


StepFn = Callable[[Any, Mapping[str, jax.Array]], tuple[Any, Mapping[str, jax.Array]]]


@dataclasses.dataclass(frozen=True)
class Plot:
    """A PNG of metrics against step, written into the run directory at the end."""

    file: str = "loss.png"
    keys: tuple[str, ...] = ("loss", "validation/loss")
    log_scale: bool = True
    ylabel: str = ""  # "" : derived from the keys
    hlines: tuple[tuple[str, float], ...] = ()  # (label, y) reference lines, e.g. a target


@dataclasses.dataclass(kw_only=True)
class Trainer:
    """One training method, as the shell runs it."""

    description: str  # the console's first line: what is trained on what
    model_dir: str
    model: TransformerConfig  # written to model.json: how readers rebuild the model
    partitioner: Partitioner
    loop: LoopConfig
    checkpoint: CheckpointConfig
    batches: BatchSource
    # Builds the trained state (a `TrainState` or a method's own named module) from the
    # states `pretrained()` returns; `pretrained` is called only when the run starts fresh.
    init: Callable[..., nnx.Module]
    pretrained: Callable[[], Sequence[Any]] = tuple
    # (graphdef, abstract state, global batch spec) -> the compiled step; see `jit_step`.
    compile_step: Callable[[nnx.GraphDef, Any, Mapping[str, jax.ShapeDtypeStruct]], StepFn]
    # (graphdef, abstract state) -> evaluation hooks, run every `loop.eval_every` steps.
    make_hooks: Callable[[nnx.GraphDef, Any], Mapping[str, EvalHook]] = lambda graphdef, abstract: {}
    lora: LoraConfig | None = None  # written to lora.json
    vocabulary: Any = None  # the data's tokenizer (a seqio Vocabulary): checked and recorded in tokenizer/
    dialogue: DialogueFormat | None = None  # how conversations were rendered: recorded in dialogue.json
    directions: Directions | None = None  # bidirectional training's tokens: recorded in directions.json
    data_metrics: Mapping[str, float] = dataclasses.field(default_factory=dict)  # about the data, logged at step 0
    origin: str | None = None  # the run directory the weights start from
    learning_rate: Callable[[int], float] | None = None
    console_keys: tuple[str, ...] = ("loss", "token_accuracy", "grad_norm", "tokens_per_s")
    tokens_per_step: int = 0
    flops_per_step: float = 0.0
    peak_flops: float = 0.0
    plots: tuple[Plot, ...] = (Plot(),)


def run(trainer: Trainer) -> LoopResult:
    """Trains for `trainer.loop.num_steps` steps, resuming from the run directory's latest
    checkpoint if it has one."""
    t, partitioner = trainer, trainer.partitioner
    checkpointer = None  # once created, the start-up SIGTERM message names its latest step
    # Until the loop's first step, SIGTERM (compiling, reading data, restoring) exits with a message.
    with exit_on_sigterm_during_start_up(lambda: None if checkpointer is None else checkpointer.latest_step()):
        for run_dir in (t.model_dir, t.origin):  # the run resumed and the one it starts from
            if run_dir is not None:
                check_tokenizer(run_dir, t.vocabulary, "the training data")
        graphdef, abstract = partitioner.abstract_state(t.init)
        console.print("Building the input pipeline...")
        spec = global_batch_spec(t.batches, partitioner)  # builds the input pipeline
        with partitioner.activate():
            step = t.compile_step(graphdef, abstract, spec)
        if DRY_RUN.get():
            raise DryRun(f"{t.description}; mesh {dict(partitioner.mesh.shape)}")
        if jax.process_index() == 0:
            write_model_config(t.model_dir, t.model, t.lora)
            write_tokenizer(t.model_dir, t.vocabulary)
            if t.origin is not None:
                write_init_checkpoint(t.model_dir, t.origin)
            if t.dialogue is not None:
                write_format(t.model_dir, t.dialogue)
            if t.directions is not None:
                write_directions(t.model_dir, t.directions)
        metrics = MetricsLog(t.model_dir)
        metrics.write(0, t.data_metrics)
        checkpointer = Checkpointer(t.model_dir, t.checkpoint)
        console.print("Preparing evaluation...")
        hooks = t.make_hooks(graphdef, abstract)  # builds their input pipelines and compiles some
        loop = TrainLoop(
            step_fn=step, batches=t.batches, partitioner=partitioner, checkpointer=checkpointer,
            metrics=metrics, config=t.loop, eval_hooks=hooks, learning_rate=t.learning_rate,
            tokens_per_step=t.tokens_per_step, flops_per_step=t.flops_per_step, peak_flops=t.peak_flops,
            console_keys=t.console_keys,
        )  # fmt: skip
        console.print(f"{t.description}; mesh {dict(partitioner.mesh.shape)}; run dir {t.model_dir}")
        with partitioner.activate():
            result = loop.run(lambda: partitioner.create(t.init, abstract, *t.pretrained()), abstract)
    loop.close()
    if jax.process_index() == 0:
        for plot in t.plots:
            png = plot_metrics(metrics.path, os.path.join(t.model_dir, plot.file), keys=plot.keys, log_scale=plot.log_scale,
                               ylabel=plot.ylabel, hlines=dict(plot.hlines))  # fmt: skip
            console.print(f"Plot: {png}")
    return result


def global_batch_spec(batches: BatchSource, partitioner: Partitioner) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch `batches` yields (every process's rows), laid out over the data axes."""
    spec = batches.element_spec()
    unknown = [k for k, s in spec.items() if None in s.shape]
    if unknown:
        raise ValueError(f"batch features {unknown} have no static shape; give them one in the batch source "
                         "(tf.ensure_shape), so that the step compiles ahead of time.")
    return {
        k: jax.ShapeDtypeStruct((s.shape[0] * jax.process_count(), *s.shape[1:]), s.dtype,
                                sharding=partitioner.batch_sharding(len(s.shape)))  # fmt: skip
        for k, s in spec.items()
    }


def sharded_step(step_fn: StepFn, abstract_state: Any, batch_spec: Mapping[str, jax.ShapeDtypeStruct]):
    """`step_fn` jitted with the state's shardings in and out (its buffers donated) and the
    batch's: the state keeps its layout from step to step, so one compile serves them all."""
    shardings = shardings_of(abstract_state)
    return jax.jit(step_fn, in_shardings=(shardings, shardings_of(batch_spec)), out_shardings=(shardings, None), donate_argnums=0)


def jit_step(step_fn: StepFn, abstract_state: Any, batch_spec: Mapping[str, jax.ShapeDtypeStruct], name: str = "train step") -> StepFn:
    """`sharded_step`, compiled ahead of time with its memory report."""
    return compile_ahead(name, sharded_step(step_fn, abstract_state, batch_spec), abstract_state, batch_spec)


def compile_ahead(name: str, jitted, *abstract_args):
    """Compiles `jitted` for these shapes before any data is read and reports its memory per
    device (MaxText style)."""
    console.print(f"Compiling the {name}...")  # said first: a large model compiles for minutes
    compiled = jitted.lower(*abstract_args).compile()
    memory = compiled.memory_analysis()
    if memory is not None:
        mib = lambda n: f"{n / 2**20:,.0f} MiB"  # noqa: E731
        console.print(
            f"Compiled {name}, per device: {mib(memory.argument_size_in_bytes)} arguments, "
            f"{mib(memory.output_size_in_bytes)} outputs ({mib(memory.alias_size_in_bytes)} reused in place), "
            f"{mib(memory.temp_size_in_bytes)} temporaries"
        )
    return compiled


def validation_hook(partitioner: Partitioner, eval_step, abstract_state, source: BatchSource, num_batches: int | None) -> EvalHook:
    """An evaluation hook: `eval_step(state, batch) -> summed metrics` (e.g. `steps.make_eval_step`)
    over the first `num_batches` batches of `source` (None: all of them), summarised like the
    training metrics."""
    step = jax.jit(eval_step, in_shardings=(shardings_of(abstract_state), None))

    def hook(_: int, state) -> dict[str, float]:
        totals: dict[str, float] = {}
        source.set_state({"position": 0})
        for i, batch in enumerate(source):
            if num_batches is not None and i >= num_batches:
                break
            for k, v in jax.device_get(step(state, partitioner.shard_batch(batch))).items():
                totals[k] = totals.get(k, 0.0) + float(v)
        return summarise(totals)

    return hook
