"""`flanjax eval`: evaluate a checkpoint on a seqio task or mixture.

`evaluate()` is configured by gin (configs/runs/eval.gin): it restores only the model's
parameters, straight into their shardings on the mesh, runs the `Evaluator` and writes
eval_results.json, eval_results.md and TensorBoard scalars (`eval/<task>/<metric>` at the
checkpoint's step, beside the training curves) to the output directory.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

from flanjax.data.availability import check_datasets
from flanjax.data.bidirectional import run_direction_ids
from flanjax.data.pipeline import check_vocabulary
from flanjax.eval.evaluator import EvalConfig, Evaluator, TaskResult, flat_metrics
from flanjax.eval.report import markdown_table, write_results
from flanjax.models.transformer import TransformerConfig, new_model
from flanjax.rundir.checkpoint import Checkpointer
from flanjax.data.dialogue import eot_id, read_format
from flanjax.rundir.files import check_tokenizer, lineage, read_lora_config, read_model_config, resolve_checkpoint, run_vocabulary
from flanjax.rundir.metrics import MetricsLog, console
from flanjax.sharding import MeshConfig, Partitioner
from flanjax import paths


def run_tokenizer(checkpoint_path: str, tokenizer: str | None = None) -> str | None:
    """The templated tasks' tokenizer for evaluating a run: `tokenizer` if set, else the one
    the run recorded (eval.gin binds vocab.default_tokenizer.path to this)."""
    if tokenizer:
        return tokenizer
    vocabulary = run_vocabulary(resolve_checkpoint(checkpoint_path)[0])
    return vocabulary.path if vocabulary else None


def evaluate(
    *,
    checkpoint_path: str,
    mixture_or_task_name: str,
    output_dir: str | None = None,  # None: the checkpoint's run directory
    model: TransformerConfig | None = None,  # None: the run's own (model.json)
    task_feature_lengths: Mapping[str, int] | None = None,  # None: each task's longest
    mesh: MeshConfig = MeshConfig(),
    evaluation: EvalConfig = EvalConfig(),
) -> dict[str, TaskResult]:
    run_dir, step = resolve_checkpoint(checkpoint_path)
    model = model or read_model_config(run_dir)
    check_tokenizer(run_dir, check_vocabulary(mixture_or_task_name, model.vocab_size), f"task {mixture_or_task_name!r}")
    check_datasets(mixture_or_task_name)  # before any weights are read or steps compiled
    partitioner = Partitioner.from_config(mesh)
    lora = read_lora_config(run_dir)
    graphdef, abstract = partitioner.abstract_state(lambda: new_model(model, lora))
    # Datasets and length checks first: a bad task fails before any weights are read.
    dialogue = read_format(lineage(run_dir))  # a chat model stops at its end-of-turn token
    evaluator = Evaluator(
        dataclasses.replace(evaluation, mixture_or_task_name=mixture_or_task_name),
        model=model, graphdef=graphdef, partitioner=partitioner, task_feature_lengths=task_feature_lengths,
        stop_tokens=() if dialogue is None else (eot_id(run_vocabulary(run_dir).tokenizer, dialogue),),
        directions=run_direction_ids(lineage(run_dir), run_vocabulary(run_dir)),
    )  # fmt: skip
    console.print(f"Evaluating {run_dir} at step {step} on {mixture_or_task_name}")
    state = Checkpointer(run_dir, read_only=True).restore_model(step, abstract)
    results = evaluator(step, state)

    output_dir = output_dir or run_dir
    previous = os.path.join(output_dir, "eval_results.json")
    if paths.exists(previous):  # e.g. the training run's own evaluation: say what is replaced
        console.print(f"Replacing {previous} and eval_results.md (set EVAL_OUTPUT_DIR to write elsewhere)")
    write_results(results, output_dir, step, checkpoint=os.path.join(run_dir, "checkpoints", str(step)))
    log = MetricsLog(output_dir)
    log.write(step, {f"eval/{k}": v for k, v in flat_metrics(results).items()})
    log.close()
    console.print(markdown_table(results, step), markup=False)
    console.print(f"Results: {os.path.join(output_dir, 'eval_results.json')}")
    return results
