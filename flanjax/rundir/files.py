"""The files that describe a run's model, and restoring that model from a checkpoint.

    model.json            the run's TransformerConfig (how to rebuild the model)
    lora.json             its LoraConfig, if it trains adapters
    init_checkpoint.txt   the run directory its weights started from, if any
    tokenizer/            the tokenizer its model reads (Hugging Face files): data of another
                          tokenizer is refused, and readers of the run need no other
    selected.json         the checkpoint `flanjax select` chose: what readers of the run use
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile

from flax import nnx

from flanjax import paths
from flanjax.data.vocab import HFVocabulary
from flanjax.errors import FlanjaxError
from flanjax.models.lora import LoraConfig
from flanjax.models.transformer import Transformer, TransformerConfig, new_model
from flanjax.rundir.checkpoint import Checkpointer, CheckpointNotFoundError
from flanjax.sharding import Partitioner

MODEL_FILE = "model.json"
LORA_FILE = "lora.json"
INIT_FILE = "init_checkpoint.txt"
TOKENIZER_DIR = "tokenizer"
SELECTED_FILE = "selected.json"


class TokenizerMismatchError(FlanjaxError, ValueError):
    pass


def write_model_config(model_dir: str, model: TransformerConfig, lora: LoraConfig | None = None) -> None:
    paths.makedirs(model_dir)
    with paths.open(os.path.join(model_dir, MODEL_FILE), "w") as f:
        json.dump(dataclasses.asdict(model), f, indent=2)
    if lora is not None:
        with paths.open(os.path.join(model_dir, LORA_FILE), "w") as f:
            json.dump(dataclasses.asdict(lora), f, indent=2)


def write_init_checkpoint(model_dir: str, origin_run_dir: str) -> None:
    """Records the run whose weights started this one (`flanjax convert to-hf` follows it)."""
    paths.makedirs(model_dir)
    with paths.open(os.path.join(model_dir, INIT_FILE), "w") as f:
        f.write(origin_run_dir)


def read_init_checkpoint(run_dir: str) -> str | None:
    path = os.path.join(run_dir, INIT_FILE)
    if not paths.exists(path):
        return None
    with paths.open(path) as f:
        return f.read().strip()


def write_tokenizer(run_dir: str, vocabulary) -> None:
    """Records the tokenizer of the run's data (once: `check_tokenizer` guards a resumed run).
    Hugging Face writes only local files: a remote run directory gets a local save, copied up."""
    path = os.path.join(run_dir, TOKENIZER_DIR)
    if not isinstance(vocabulary, HFVocabulary) or paths.isdir(path):
        return
    if not paths.is_remote(path):
        vocabulary.tokenizer.save_pretrained(path)
        return
    with tempfile.TemporaryDirectory(prefix="flanjax-tokenizer-") as local:
        vocabulary.tokenizer.save_pretrained(local)
        paths.copytree(local, path)


def lineage(run_dir: str):
    """The run directory, then the run its weights started from, and so on."""
    seen = set()
    while run_dir and run_dir not in seen:
        yield run_dir
        seen.add(run_dir)
        run_dir = read_init_checkpoint(run_dir)


def run_vocabulary(run_dir: str) -> HFVocabulary | None:
    """The tokenizer a run recorded; for a run without one (an older run), that of the nearest
    run its weights descend from that recorded one."""
    for ancestor in lineage(run_dir):
        if paths.isdir(os.path.join(ancestor, TOKENIZER_DIR)):
            return HFVocabulary(os.path.join(ancestor, TOKENIZER_DIR))
    return None


def check_tokenizer(run_dir: str, vocabulary, data: str) -> None:
    """Refuses `data` (e.g. "task 'quickstart'") tokenized otherwise than the model of `run_dir`
    was trained or converted with: same-sized vocabularies would pass every shape check and
    silently read as other words."""
    recorded = run_vocabulary(run_dir)
    if recorded is None or not isinstance(vocabulary, HFVocabulary) or recorded.fingerprint() == vocabulary.fingerprint():
        return
    raise TokenizerMismatchError(
        f"{data} is tokenized with the tokenizer in {vocabulary.path} (fingerprint {vocabulary.fingerprint()}, "
        f"{len(vocabulary.tokenizer)} tokens), but the model of {run_dir} reads the one in {recorded.path} "
        f"(fingerprint {recorded.fingerprint()}, {len(recorded.tokenizer)} tokens): its token ids would mean other "
        f"words. Tokenize the data with the model's tokenizer (templated tasks: --gin.TOKENIZER={recorded.path})."
    )


def read_lora_config(run_dir: str) -> LoraConfig | None:
    """The run's LoRA adapters (lora.json), if it trained any."""
    path = os.path.join(run_dir, LORA_FILE)
    if not paths.exists(path):
        return None
    with paths.open(path) as f:
        return LoraConfig(**json.load(f))


def read_model_config(run_dir: str) -> TransformerConfig:
    path = os.path.join(run_dir, MODEL_FILE)
    if not paths.exists(path):
        raise CheckpointNotFoundError(
            f"{path} not found, so the model's shape is unknown: include the model's gin file "
            "(e.g. --gin_file=configs/models/small.gin) to say which model the checkpoint holds."
        )
    with paths.open(path) as f:
        return TransformerConfig(**json.load(f))


def resolve_checkpoint(path: str) -> tuple[str, int]:
    """(run directory, step) from a run directory (the step `flanjax select` chose, else its
    latest checkpoint) or a step directory (`<run>/checkpoints/<step>`)."""
    path = paths.abspath(path).rstrip("/")
    if os.path.basename(path).isdigit() and os.path.basename(os.path.dirname(path)) == "checkpoints":
        run_dir, step = os.path.dirname(os.path.dirname(path)), int(os.path.basename(path))
        if not paths.isdir(path):
            raise CheckpointNotFoundError(f"checkpoint {path} does not exist.")
        return run_dir, step
    if not paths.isdir(os.path.join(path, "checkpoints")):
        raise CheckpointNotFoundError(
            f"no checkpoints in {path}: give a training run directory (it holds checkpoints/) or "
            "one step of it (RUN/checkpoints/STEP)."
        )
    checkpointer = Checkpointer(path, read_only=True)
    selected = read_selected_step(path)
    if selected is not None and selected in checkpointer.all_steps():
        return path, selected
    step = checkpointer.latest_step()
    if step is None:
        raise CheckpointNotFoundError(f"{path}/checkpoints holds no finished checkpoint yet.")
    return path, step


def read_selected_step(run_dir: str) -> int | None:
    path = os.path.join(run_dir, SELECTED_FILE)
    if not paths.exists(path):
        return None
    with paths.open(path) as f:
        return int(json.load(f)["step"])


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
