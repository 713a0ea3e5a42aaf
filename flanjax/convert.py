"""`flanjax convert`: Hugging Face checkpoints into flanjax run directories and back.

    flanjax convert from-hf --in hf/Llama-3.2-1B --out runs/llama1b [--add_tokens "<|eot|>"]
    flanjax train --gin_file=configs/runs/sft.gin --gin_file=runs/llama1b/model.gin ...
    flanjax convert to-hf --in runs/my_sft --out hf/my_sft

A converted run directory holds an Orbax checkpoint of the weights (step 0), `model.json`,
the source's `hf_config.json`, its tokenizer (`tokenizer/`) and `model.gin`, which binds the
model, `lm.train.init_checkpoint` and the tokenizer: including it is enough to train from it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import jax
from flax import nnx

from flanjax.rundir.files import TOKENIZER_DIR, lineage, resolve_checkpoint, restore, run_vocabulary, write_model_config
from flanjax.models import hf
from flanjax.models.lora import remove_lora
from flanjax.models.transformer import TransformerConfig
from flanjax.sharding import MeshConfig, Partitioner
from flanjax.rundir.checkpoint import Checkpointer, CheckpointConfig

HF_CONFIG_FILE = "hf_config.json"  # the Hugging Face config a run descends from


def _has_tokenizer(path: str) -> bool:
    return any(os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


def from_hf(
    source: str,
    run_dir: str,
    *,
    dtype: str = "float32",
    mesh: MeshConfig = MeshConfig(data=1, fsdp=-1),
    add_tokens: tuple[str, ...] = (),
    allow_pickle: bool = False,
) -> TransformerConfig:
    """Writes the run directory of the Hugging Face checkpoint in `source`; returns its model."""
    if Checkpointer(run_dir, read_only=True).latest_step() is not None:
        raise hf.HFCheckpointError(f"{run_dir} already holds checkpoints; convert into a new directory.")
    partitioner = Partitioner.from_config(mesh)
    hf_config = hf.read_config(source)
    tokenizer = None
    if _has_tokenizer(source):  # checked before any weights are read
        import transformers

        tokenizer = transformers.AutoTokenizer.from_pretrained(source)
        hf.check_tokenizer(tokenizer, hf_config["vocab_size"], f"the tokenizer in {source}")
    elif add_tokens:
        raise hf.HFCheckpointError(f"{source} has no tokenizer files, so --add_tokens has nothing to add them to.")
    with partitioner.activate():
        model = hf.load_model(source, mesh=partitioner, dtype=dtype, allow_pickle=allow_pickle)
        if add_tokens:
            model = hf.add_tokens(model, tokenizer, list(add_tokens), partitioner)
    checkpointer = Checkpointer(run_dir, CheckpointConfig(async_save=False))
    checkpointer.save(0, {"model": nnx.to_pure_dict(nnx.state(model))})  # the trained state's `model`, alone
    checkpointer.close()
    if jax.process_index() == 0:
        write_model_config(run_dir, model.config)
        with open(os.path.join(run_dir, HF_CONFIG_FILE), "w") as f:
            json.dump(hf_config, f, indent=2)
        if tokenizer is not None:
            tokenizer.save_pretrained(os.path.join(run_dir, TOKENIZER_DIR))
        with open(os.path.join(run_dir, "model.gin"), "w") as f:
            f.write(model_gin(model.config, run_dir, source, tokenizer is not None))
    return model.config


def model_gin(config: TransformerConfig, run_dir: str, source: str, tokenizer: bool) -> str:
    """A gin file binding `config` as MODEL, the converted weights as the initial checkpoint
    and the converted tokenizer as the templated tasks' tokenizer."""
    run_dir = os.path.abspath(run_dir)
    # Every field that says what the checkpoint holds (all of them: they must win over an earlier
    # model file), not dropout, which is how to train it (a recipe such as lima.gin sets it).
    fields = [f"  {f.name} = {getattr(config, f.name)!r}" for f in dataclasses.fields(config) if "dropout" not in f.name]
    lines = [
        f"# {source} converted by `flanjax convert from-hf`. Include this file after a run file (such as",
        "# configs/runs/sft.gin) to train from these weights with this model's tokenizer.",
        "from __gin__ import dynamic_registration",
        "from flanjax.data import vocab",
        "from flanjax.models import transformer",
        "from flanjax.train import lm",
        "",
        "MODEL = @transformer.TransformerConfig()",
        "transformer.TransformerConfig:",
        *fields,
        "",
        f"lm.train.init_checkpoint = {run_dir!r}",
    ]
    if tokenizer:
        lines += [f"TOKENIZER = {os.path.join(run_dir, TOKENIZER_DIR)!r}", "vocab.default_tokenizer.path = %TOKENIZER"]
    return "\n".join(lines) + "\n"


def _origin(run_dir: str) -> str | None:
    """The run directory holding the HF config this run descends from, if any."""
    return next((d for d in lineage(run_dir) if os.path.exists(os.path.join(d, HF_CONFIG_FILE))), None)


def to_hf(checkpoint: str, out_dir: str, *, mesh: MeshConfig = MeshConfig(data=1, fsdp=-1)) -> str:
    """Writes a run's checkpoint (a run directory's latest, or a step directory) as a Hugging Face
    model directory, LoRA adapters merged in, with the tokenizer of the model it came from."""
    run_dir, _ = resolve_checkpoint(checkpoint)
    partitioner = Partitioner.from_config(mesh)
    graphdef, state, _ = restore(checkpoint, partitioner)
    with partitioner.activate():
        model = nnx.merge(graphdef, state)
        remove_lora(model)
    origin = _origin(run_dir)
    base = None
    if origin is not None:
        with open(os.path.join(origin, HF_CONFIG_FILE)) as f:
            base = json.load(f)
    hf.save_model(model, out_dir, base)
    vocabulary = run_vocabulary(run_dir)
    if vocabulary is not None and jax.process_index() == 0:
        shutil.copytree(vocabulary.path, out_dir, dirs_exist_ok=True)
    return out_dir
