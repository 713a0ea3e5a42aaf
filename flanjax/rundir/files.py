"""The files that describe a run's model, and restoring that model from a checkpoint.

    model.json            the run's TransformerConfig (how to rebuild the model)
    lora.json             its LoraConfig, if it trains adapters
    init_checkpoint.txt   the run directory its weights started from, if any
"""

from __future__ import annotations

import dataclasses
import json
import os

from flax import nnx

from flanjax.models.lora import LoraConfig
from flanjax.models.transformer import Transformer, TransformerConfig, new_model
from flanjax.rundir.checkpoint import Checkpointer, CheckpointNotFoundError
from flanjax.sharding import Partitioner

MODEL_FILE = "model.json"
LORA_FILE = "lora.json"
INIT_FILE = "init_checkpoint.txt"


def write_model_config(model_dir: str, model: TransformerConfig, lora: LoraConfig | None = None) -> None:
    os.makedirs(model_dir, exist_ok=True)
    with open(os.path.join(model_dir, MODEL_FILE), "w") as f:
        json.dump(dataclasses.asdict(model), f, indent=2)
    if lora is not None:
        with open(os.path.join(model_dir, LORA_FILE), "w") as f:
            json.dump(dataclasses.asdict(lora), f, indent=2)


def write_init_checkpoint(model_dir: str, origin_run_dir: str) -> None:
    """Records the run whose weights started this one (`flanjax convert to-hf` follows it)."""
    os.makedirs(model_dir, exist_ok=True)
    with open(os.path.join(model_dir, INIT_FILE), "w") as f:
        f.write(origin_run_dir)


def read_init_checkpoint(run_dir: str) -> str | None:
    path = os.path.join(run_dir, INIT_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return f.read().strip()


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


def restore_weights(run_dir: str, step: int, config: TransformerConfig, partitioner: Partitioner) -> tuple[nnx.GraphDef, nnx.State]:
    """The plain Transformer weights (no adapters) of a run at `step`, restored into their
    shardings: what starts a new run from an earlier one."""
    graphdef, abstract = partitioner.abstract_state(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    return graphdef, Checkpointer(run_dir, read_only=True).restore_model(step, abstract)
