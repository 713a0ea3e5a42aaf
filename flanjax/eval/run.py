"""`flanjax eval`: evaluate a checkpoint on a seqio task or mixture.

`evaluate()` is configured by gin (configs/runs/eval.gin): it restores only the model's
parameters, straight into their shardings on the mesh, runs the `Evaluator` and writes
eval_results.json, eval_results.md and TensorBoard scalars (`eval/<task>/<metric>` at the
checkpoint's step, beside the training curves) to the output directory.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping

from flax import nnx

from flanjax.data.pipeline import check_vocabulary
from flanjax.eval.evaluator import EvalConfig, Evaluator, TaskResult, flat_metrics
from flanjax.eval.report import markdown_table, write_results
from flanjax.models.lora import LoraConfig
from flanjax.models.transformer import TransformerConfig
from flanjax.sharding import MeshConfig, Partitioner
from flanjax.train.checkpoint import Checkpointer, CheckpointNotFoundError
from flanjax.train.metrics import MetricsLog, console
from flanjax.train.steps import new_model

MODEL_FILE = "model.json"  # the run's TransformerConfig, written by `flanjax train`
LORA_FILE = "lora.json"  # its LoraConfig, if it trains adapters
INIT_FILE = "init_checkpoint.txt"  # the run directory its weights started from, if any


def write_model_config(model_dir: str, model: TransformerConfig, lora: LoraConfig | None = None) -> None:
    os.makedirs(model_dir, exist_ok=True)
    with open(os.path.join(model_dir, MODEL_FILE), "w") as f:
        json.dump(dataclasses.asdict(model), f, indent=2)
    if lora is not None:
        with open(os.path.join(model_dir, LORA_FILE), "w") as f:
            json.dump(dataclasses.asdict(lora), f, indent=2)


def read_lora_config(run_dir: str) -> LoraConfig | None:
    """The run's LoRA adapters (lora.json), if it trained any."""
    path = os.path.join(run_dir, LORA_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return LoraConfig(**json.load(f))


def read_model_config(run_dir: str) -> TransformerConfig:
    path = os.path.join(run_dir, MODEL_FILE)
    if not os.path.exists(path):
        raise CheckpointNotFoundError(
            f"{path} not found, so the model's shape is unknown: include the model's gin file "
            "(e.g. --gin_file=configs/models/small.gin) to say which model the checkpoint holds."
        )
    with open(path) as f:
        return TransformerConfig(**json.load(f))


def resolve_checkpoint(path: str) -> tuple[str, int]:
    """(run directory, step) from a run directory (its latest checkpoint) or a step directory
    (`<run>/checkpoints/<step>`)."""
    path = os.path.abspath(path)
    if os.path.basename(path).isdigit() and os.path.basename(os.path.dirname(path)) == "checkpoints":
        run_dir, step = os.path.dirname(os.path.dirname(path)), int(os.path.basename(path))
        if not os.path.isdir(path):
            raise CheckpointNotFoundError(f"checkpoint {path} does not exist.")
        return run_dir, step
    if not os.path.isdir(os.path.join(path, "checkpoints")):
        raise CheckpointNotFoundError(
            f"no checkpoints in {path}: give a training run directory (it holds checkpoints/) or "
            "one step of it (RUN/checkpoints/STEP)."
        )
    step = Checkpointer(path, read_only=True).latest_step()
    if step is None:
        raise CheckpointNotFoundError(f"{path}/checkpoints holds no finished checkpoint yet.")
    return path, step


def restore(checkpoint_path: str, partitioner: Partitioner) -> tuple[nnx.GraphDef, nnx.State, TransformerConfig]:
    """A run's model (LoRA adapters included) at a checkpoint, restored into its shardings."""
    run_dir, step = resolve_checkpoint(checkpoint_path)
    config = read_model_config(run_dir)
    graphdef, abstract = partitioner.abstract_state(lambda: new_model(config, read_lora_config(run_dir)))
    return graphdef, Checkpointer(run_dir, read_only=True).restore_model(step, abstract), config


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
    check_vocabulary(mixture_or_task_name, model.vocab_size)
    partitioner = Partitioner.from_config(mesh)
    lora = read_lora_config(run_dir)
    graphdef, abstract = partitioner.abstract_state(lambda: new_model(model, lora))
    # Datasets and length checks first: a bad task fails before any weights are read.
    evaluator = Evaluator(
        dataclasses.replace(evaluation, mixture_or_task_name=mixture_or_task_name),
        model=model, graphdef=graphdef, partitioner=partitioner, task_feature_lengths=task_feature_lengths,
    )  # fmt: skip
    console.print(f"Evaluating {run_dir} at step {step} on {mixture_or_task_name}")
    state = Checkpointer(run_dir, read_only=True).restore_model(step, abstract)
    results = evaluator(step, state)

    output_dir = output_dir or run_dir
    write_results(results, output_dir, step, checkpoint=os.path.join(run_dir, "checkpoints", str(step)))
    log = MetricsLog(output_dir)
    log.write(step, {f"eval/{k}": v for k, v in flat_metrics(results).items()})
    log.close()
    console.print(markdown_table(results, step), markup=False)
    console.print(f"Results: {os.path.join(output_dir, 'eval_results.json')}")
    return results
