"""`flanjax train`: language-model training (instruction tuning, SFT) on a seqio mixture.

`train()` is configured by gin (configs/runs/*.gin) and composes the pieces: mesh, model
and optimizer born sharded, seqio batches for this process, the compiled LM step, and the
one training loop with its checkpoints, metrics and evaluation hooks.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

import jax
import numpy as np
from flax import nnx
from rich.table import Table

from flanjax.data.pipeline import SeqioBatches, check_vocabulary, model_feature_lengths
from flanjax.eval.evaluator import EvalConfig, Evaluator, TaskResult, flat_metrics
from flanjax.eval.report import write_results
from flanjax.eval.run import INIT_FILE, resolve_checkpoint, write_model_config
from flanjax.models.lora import LoraConfig
from flanjax.models.transformer import Transformer, TransformerConfig
from flanjax.sharding import MeshConfig, Partitioner, shardings_of
from flanjax.train import throughput
from flanjax.train.checkpoint import CheckpointConfig, Checkpointer
from flanjax.train.loop import LoopConfig, LoopResult, TrainLoop
from flanjax.train.metrics import MetricsLog, console, plot_metrics
from flanjax.train.optim import OptimizerConfig, make_optimizer, make_schedule
from flanjax.train.steps import compile_lm_train_step, lm_init, make_lm_eval_step, new_model


@dataclasses.dataclass(frozen=True)
class ValidationConfig:
    split: str = "validation"
    num_batches: int = 10


def train(
    *,
    model_dir: str,
    model: TransformerConfig,
    mixture_or_task_name: str,
    task_feature_lengths: Mapping[str, int],
    batch_size: int,
    loop: LoopConfig,
    optimizer: OptimizerConfig = OptimizerConfig(),
    mesh: MeshConfig = MeshConfig(),
    checkpoint: CheckpointConfig = CheckpointConfig(),
    validation: ValidationConfig | None = ValidationConfig(),
    evaluation: EvalConfig | None = None,
    pack: bool = True,
    shuffle: bool = True,
    num_microbatches: int = 1,
    z_loss: float = 0.0,
    seed: int = 0,
    init_checkpoint: str | None = None,
    lora: LoraConfig | None = None,
) -> LoopResult:
    """Trains `model` on `mixture_or_task_name` for `loop.num_steps` steps of `batch_size`
    sequences (global), resuming from `model_dir` if it holds checkpoints.

    `init_checkpoint`: a run directory (its latest step) or step directory whose model
    weights start a fresh run, e.g. one written by `flanjax convert from-hf`. `lora`: train
    low-rank adapters on those weights, which stay frozen."""
    partitioner = Partitioner.from_config(mesh)
    per_process = partitioner.per_process_batch_size(batch_size)
    batches = SeqioBatches(
        mixture_or_task_name, task_feature_lengths, per_process, seed=seed, pack=pack, shuffle=shuffle
    )
    check_vocabulary(mixture_or_task_name, model.vocab_size)
    if jax.process_index() == 0:
        write_model_config(model_dir, model, lora)  # lets `flanjax eval` rebuild the model

    init = lm_init(model, make_optimizer(optimizer, loop.num_steps), seed, lora)
    graphdef, abstract_state = partitioner.abstract_state(init)
    model_graphdef = nnx.split(nnx.eval_shape(lambda: new_model(model, lora)))[0]
    step_fn = compile_lm_train_step(
        partitioner, graphdef, abstract_state, z_loss=z_loss, num_microbatches=num_microbatches, seed=seed
    )
    with partitioner.activate():
        lengths = model_feature_lengths(task_feature_lengths, pack)
        step_fn = _compile_ahead(step_fn, partitioner, abstract_state, batch_size, lengths)

    hooks = {}
    if validation is not None:
        hooks["validation"] = _validation_hook(
            partitioner, graphdef, abstract_state,
            SeqioBatches(mixture_or_task_name, task_feature_lengths, per_process,
                         split=validation.split, shuffle=False, pack=pack, num_epochs=1),
            validation.num_batches,
        )  # fmt: skip
    evaluations: dict[int, dict[str, TaskResult]] = {}
    if evaluation is not None:
        evaluator = Evaluator(
            evaluation, model=model, graphdef=model_graphdef, partitioner=partitioner,
            task_feature_lengths=task_feature_lengths, default_task=mixture_or_task_name,
        )  # fmt: skip

        def evaluate(step: int, state) -> dict[str, float]:
            evaluations[step] = evaluator(step, state[0])
            return flat_metrics(evaluations[step])

        hooks["eval"] = evaluate

    seq_len = sum(task_feature_lengths.values())
    metrics = MetricsLog(model_dir)
    checkpointer = Checkpointer(model_dir, checkpoint)
    trainer = TrainLoop(
        step_fn=step_fn,
        batches=batches,
        partitioner=partitioner,
        checkpointer=checkpointer,
        metrics=metrics,
        config=loop,
        eval_hooks=hooks,
        learning_rate=make_schedule(optimizer, loop.num_steps),
        tokens_per_step=batch_size * seq_len,
        flops_per_step=batch_size * seq_len * throughput.train_flops_per_token(model, seq_len),
        peak_flops=throughput.peak_flops(),
    )
    console.print(
        f"Training {model.num_params() / 1e6:.2f}M parameters on {mixture_or_task_name} for "
        f"{loop.num_steps} steps; mesh {dict(partitioner.mesh.shape)}; run dir {model_dir}"
    )

    def create():
        if init_checkpoint is None:
            return partitioner.create(init, abstract_state)
        run_dir, step = resolve_checkpoint(init_checkpoint)
        console.print(f"Initialising from {run_dir} step {step}")
        if jax.process_index() == 0:  # the run's origin, for `flanjax convert to-hf`
            with open(os.path.join(model_dir, INIT_FILE), "w") as f:
                f.write(run_dir)
        plain = partitioner.abstract_state(lambda: Transformer(model, rngs=nnx.Rngs(0)))[1]
        return partitioner.create(init, abstract_state, Checkpointer(run_dir, read_only=True).restore_model(step, plain))

    with partitioner.activate():
        result = trainer.run(create, abstract_state)
    trainer.close()
    if evaluations:
        last = max(evaluations)
        write_results(evaluations[last], model_dir, last, checkpoint=os.path.join(checkpointer.directory, str(last)))
    if jax.process_index() == 0:
        png = plot_metrics(metrics.path, os.path.join(model_dir, "loss.png"))
        console.print(f"Loss curve: {png}")
        _print_eval_table(result)
    return result


def _compile_ahead(step_fn, partitioner: Partitioner, abstract_state, batch_size: int, lengths: Mapping[str, int]):
    """Compiles the step before any data is read and reports its memory (MaxText style)."""
    sharding = partitioner.batch_sharding(2)
    batch = {k: jax.ShapeDtypeStruct((batch_size, n), np.int32, sharding=sharding) for k, n in lengths.items()}
    compiled = step_fn.lower(abstract_state, batch).compile()
    memory = compiled.memory_analysis()
    if memory is not None:
        mib = lambda n: f"{n / 2**20:,.0f} MiB"  # noqa: E731
        console.print(
            f"Compiled train step, per device: {mib(memory.argument_size_in_bytes)} arguments, "
            f"{mib(memory.output_size_in_bytes)} outputs ({mib(memory.alias_size_in_bytes)} reused in place), "
            f"{mib(memory.temp_size_in_bytes)} temporaries"
        )
    return compiled


def _validation_hook(partitioner: Partitioner, graphdef, abstract_state, source: SeqioBatches, num_batches: int):
    step_fn = jax.jit(
        make_lm_eval_step(graphdef), in_shardings=(shardings_of(abstract_state), partitioner.batch_sharding(2))
    )

    def hook(step: int, state) -> dict[str, float]:
        totals: dict[str, float] = {}
        source.set_state({"position": 0})
        for _, batch in zip(range(num_batches), source):
            sums = jax.device_get(step_fn(state, partitioner.shard_batch(batch)))
            for k, v in sums.items():
                totals[k] = totals.get(k, 0.0) + float(v)
        if not totals.get("weight_sum"):
            return {}
        return {
            "loss": totals["loss_sum"] / totals["weight_sum"],
            "token_accuracy": totals["correct_sum"] / totals["weight_sum"],
        }

    return hook


def _print_eval_table(result: LoopResult) -> None:
    """Per-task metrics: the first evaluation against the last."""
    if len(result.evals) < 2:
        return
    first, last = min(result.evals), max(result.evals)
    keys = sorted(k for k in result.evals[last] if k.startswith("eval/"))
    if not keys:
        return
    table = Table(title=f"Held-out evaluation: step {first} vs step {last}")
    table.add_column("task / metric")
    table.add_column(f"step {first}" + (" (untrained)" if first == 0 else ""), justify="right")
    table.add_column(f"step {last}", justify="right")
    for k in keys:
        table.add_row(k.removeprefix("eval/"), f"{result.evals[first].get(k, np.nan):.1f}", f"{result.evals[last][k]:.1f}")
    console.print(table)
