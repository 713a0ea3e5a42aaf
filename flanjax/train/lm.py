"""`flanjax train` with TRAINER = "lm": language-model training (instruction tuning, SFT) on a
seqio mixture.

`train()` is configured by gin (configs/runs/sft.gin and the files that include it): the
loss is `losses.lm_loss`; the model is a fresh Transformer or an initial checkpoint's, with
optional LoRA adapters and their EWC penalty (`train.ewc`); the hooks are validation loss and
the `Evaluator`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Mapping

import jax
import numpy as np
from flax import nnx
from rich.table import Table

from flanjax.data.availability import check_datasets
from flanjax.data.bidirectional import BidirectionalFeatureConverter, Directions, DirectionTokenError
from flanjax.data.dialogue import check_conversations, eot_id, is_dialogue
from flanjax.data.pipeline import SeqioBatches, check_vocabulary, steps_per_epoch
from flanjax.eval.evaluator import EvalConfig, Evaluator, TaskResult, flat_metrics
from flanjax.eval.report import write_results
from flanjax.models.lora import LoraConfig, num_adapter_params
from flanjax.models.transformer import TransformerConfig, new_model
from flanjax.rundir.checkpoint import CheckpointConfig
from flanjax.rundir.files import resolve_checkpoint, restore_weights
from flanjax.rundir.metrics import console
from flanjax.sharding import MeshConfig, Partitioner
from flanjax.train import throughput, trainer
from flanjax.train.ewc import EwcConfig, ewc_init, ewc_loss, fisher_for_run, place_fisher
from flanjax.train.loop import LoopConfig, LoopResult
from flanjax.train.losses import lm_loss
from flanjax.train.optim import OptimizerConfig, make_optimizer, make_schedule
from flanjax.train.steps import lm_init, make_eval_step, make_train_step
from flanjax import paths


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
    loss_chunk_size: int | None = 512,  # positions whose logits are made at once; None: all
    seed: int = 0,
    init_checkpoint: str | None = None,
    lora: LoraConfig | None = None,
    ewc: EwcConfig | None = None,
    bidirectional: Directions | None = None,
    epochs: int | None = None,
    checkpoint_every_epoch: bool = False,
) -> LoopResult:
    """Trains `model` on `mixture_or_task_name` for `loop.num_steps` steps of `batch_size`
    sequences (global), resuming from `model_dir` if it holds checkpoints.

    `init_checkpoint`: a run directory (its latest step) or step directory whose model
    weights start a fresh run, e.g. one written by `flanjax convert from-hf`. `lora`: train
    low-rank adapters on those weights, which stay frozen. `ewc`: add the EWC penalty on the
    adapters' updates, with a `flanjax fisher` of those weights (logged as "ewc"; validation
    loss stays the LM loss). `bidirectional`: train left-to-right and right-to-left (BatGPT,
    `data.bidirectional`). `epochs`: train for this many passes over the training split
    instead (LIMA: 15), the steps counted from its size, with a checkpoint after each pass if
    `checkpoint_every_epoch`."""
    partitioner = Partitioner.from_config(mesh)
    per_process = partitioner.per_process_batch_size(batch_size)
    vocabulary = check_vocabulary(mixture_or_task_name, model.vocab_size)
    # Before compiling: a missing dataset fails now, not at the first batch or evaluation.
    check_datasets(mixture_or_task_name, evaluation and evaluation.mixture_or_task_name)
    dialogue, data_metrics = check_conversations(mixture_or_task_name, task_feature_lengths) if is_dialogue(mixture_or_task_name) else (None, {})
    if epochs is not None:
        loop, checkpoint = _in_epochs(epochs, mixture_or_task_name, task_feature_lengths, pack, batch_size, loop, checkpoint,
                                      checkpoint_every_epoch)  # fmt: skip
    elif loop.num_steps is None:
        raise ValueError("give the training length: TRAIN_STEPS (loop.LoopConfig.num_steps) or lm.train.epochs.")
    origin = None if init_checkpoint is None else resolve_checkpoint(init_checkpoint)
    fisher = ewc and fisher_for_run(ewc, model, lora, origin)  # before compiling: a bad Fisher fails now
    stops = () if dialogue is None else (eot_id(vocabulary.tokenizer, dialogue),)  # decoding ends a reply there
    converter = bidirectional and _bidirectional_converter(bidirectional, mixture_or_task_name, dialogue, vocabulary, pack)
    batches = SeqioBatches(mixture_or_task_name, task_feature_lengths, per_process, seed=seed, pack=pack, shuffle=shuffle, converter=converter)
    loss = lm_loss(z_loss, loss_chunk_size)
    train_loss = loss if ewc is None else ewc_loss(loss, ewc)
    tx = make_optimizer(optimizer, loop.num_steps)
    init = lm_init(model, tx, seed, lora) if ewc is None else ewc_init(model, tx, seed, lora)
    evaluations: dict[int, dict[str, TaskResult]] = {}
    valid = validation and SeqioBatches(mixture_or_task_name, task_feature_lengths, per_process, split=validation.split,
                                        shuffle=False, pack=pack, num_epochs=1, converter=converter)  # fmt: skip
    evaluator = evaluation and (lambda: Evaluator(
        evaluation, model=model, graphdef=nnx.split(nnx.eval_shape(lambda: new_model(model, lora)))[0], partitioner=partitioner,
        task_feature_lengths=task_feature_lengths, default_task=mixture_or_task_name, stop_tokens=stops,
        directions=converter and converter.ids))  # fmt: skip
    seq_len = sum(task_feature_lengths.values())
    result = trainer.run(trainer.Trainer(
        description=f"Training {_trained(model, lora, ewc)} on {mixture_or_task_name} for {loop.num_steps} steps",
        model_dir=model_dir, model=model, lora=lora, origin=origin and origin[0], vocabulary=vocabulary, partitioner=partitioner,
        loop=loop, checkpoint=checkpoint, batches=batches,
        init=init, pretrained=functools.partial(_pretrained, origin, model, partitioner, fisher, init),
        compile_step=lambda graphdef, abstract, spec: trainer.jit_step(
            make_train_step(graphdef, train_loss, num_microbatches=num_microbatches, seed=seed), abstract, spec),
        make_hooks=_hook_maker(partitioner, loss, valid, validation and validation.num_batches, evaluator, evaluations),
        learning_rate=make_schedule(optimizer, loop.num_steps), dialogue=dialogue, directions=bidirectional, data_metrics=data_metrics,
        tokens_per_step=batch_size * seq_len, peak_flops=throughput.peak_flops(),
        flops_per_step=batch_size * seq_len * throughput.train_flops_per_token(model, seq_len),
        **({} if ewc is None else {"console_keys": (*trainer.Trainer.console_keys, "ewc")}),
    ))  # fmt: skip
    _report(result, evaluations, model_dir)
    return result


def _hook_maker(partitioner: Partitioner, loss, valid: SeqioBatches | None, num_batches: int | None,
                evaluator: Callable[[], Evaluator] | None, evaluations: dict):  # fmt: skip
    """The trainer's `make_hooks`: the validation loss over `valid`, and the evaluator's hook
    (its results kept in `evaluations`); either left out when None. Built after compiling."""

    def make_hooks(graphdef, abstract):
        hooks = {}
        if valid is not None:
            hooks["validation"] = trainer.validation_hook(partitioner, make_eval_step(graphdef, loss), abstract, valid, num_batches)
        if evaluator is not None:
            hooks["eval"] = evaluation_hook(evaluator(), evaluations)
        return hooks

    return make_hooks


def _pretrained(origin: tuple[str, int] | None, model: TransformerConfig, partitioner: Partitioner, fisher, init) -> tuple:
    """The states a fresh run starts from: the init checkpoint's weights, and EWC's Fisher (placed
    in its shardings: it is state, see `train.ewc`)."""
    base = None
    if origin is not None:
        console.print(f"Initialising from {origin[0]} step {origin[1]}")
        base = restore_weights(*origin, model, partitioner)[1]
    if fisher is not None:
        return base, place_fisher(fisher, partitioner.abstract_state(init)[1])
    return () if base is None else (base,)


def _report(result: LoopResult, evaluations: Mapping[int, Mapping[str, TaskResult]], model_dir: str) -> None:
    """The last evaluation's eval_results files, and the table of the first and last evaluations."""
    if evaluations:
        last = max(evaluations)
        checkpoint_dir = os.path.join(model_dir, "checkpoints", str(last))
        write_results(evaluations[last], model_dir, last, checkpoint=paths.abspath(checkpoint_dir))
    if jax.process_index() == 0:
        _print_eval_table(result)


def _in_epochs(epochs: int, name: str, lengths: Mapping[str, int], pack: bool, batch_size: int, loop: LoopConfig,
               checkpoint: CheckpointConfig, every_epoch: bool) -> tuple[LoopConfig, CheckpointConfig]:  # fmt: skip
    """The loop (and checkpoints, with `every_epoch`) for `epochs` passes over the training split."""
    rows, per_epoch = steps_per_epoch(name, lengths, pack, batch_size)
    console.print(f"One epoch: {rows} rows = {per_epoch} steps of {batch_size}; {epochs} epochs = {epochs * per_epoch} steps")
    checkpoint = dataclasses.replace(checkpoint, every_steps=per_epoch) if every_epoch else checkpoint
    return dataclasses.replace(loop, num_steps=epochs * per_epoch), checkpoint


def _bidirectional_converter(directions: Directions, name: str, dialogue, vocabulary, pack: bool) -> BidirectionalFeatureConverter:
    """BatGPT's feature converter for the task, built before compiling so that a missing direction token fails now."""
    if dialogue is not None:
        raise DirectionTokenError(f"{name!r} is a dialogue task: bidirectional training reads prompt/response or plain-text tasks.")
    return BidirectionalFeatureConverter.of(directions, vocabulary, pack)


def _trained(model: TransformerConfig, lora: LoraConfig | None, ewc: EwcConfig | None = None) -> str:
    """What trains: all parameters, or the LoRA adapters of how many (abstract model, nothing allocated)."""
    if lora is None:
        return f"{model.num_params() / 1e6:.2f}M parameters"
    adapters = num_adapter_params(nnx.eval_shape(lambda: new_model(model, lora)))
    penalty = "" if ewc is None else f" with EWC (lambda {ewc.weight:g})"
    return f"LoRA adapters{penalty}: {adapters / 1e6:.2f}M trainable of {(model.num_params() + adapters) / 1e6:.2f}M parameters"


def evaluation_hook(evaluator: Evaluator, results: dict[int, dict[str, TaskResult]]):
    """The evaluator as a loop hook on the trained state's model; keeps each step's results."""

    def evaluate(step: int, state) -> dict[str, float]:
        results[step] = evaluator(step, state["model"])
        return flat_metrics(results[step])

    return evaluate


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
