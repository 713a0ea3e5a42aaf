"""`flanjax convert` and `flanjax grow`: run directories made from other weights, Hugging Face
checkpoints (and back) or a smaller trained model grown (`flanjax.models.grow`).

    flanjax convert from-hf --in hf/Llama-3.2-1B --out runs/llama1b [--add_tokens "<|eot|>"]
    flanjax train --gin_file=configs/runs/sft.gin --gin_file=runs/llama1b/model.gin ...
    flanjax convert to-hf --in runs/my_sft --out hf/my_sft
    flanjax grow --in runs/small --out runs/grown --d_model 1024 --num_layers 24

A converted (or grown) run directory holds an Orbax checkpoint of the weights (step 0), `model.json`,
the source's `hf_config.json` (from-hf only), its tokenizer (`tokenizer/`) and `model.gin`, which binds the
model, `lm.train.init_checkpoint` and the tokenizer: including it is enough to train from it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Mapping
from typing import Any

import jax
from flax import nnx

from flanjax import paths
from flanjax.rundir.files import (TOKENIZER_DIR, lineage, read_lora_config, read_model_config, resolve_checkpoint, restore,
                                  restore_weights, run_vocabulary, write_model_config, write_tokenizer)
from flanjax.rundir.metrics import console
from flanjax.models import hf
from flanjax.models.grow import Depth, GrowthError, check_growth, grow_params, grown_config
from flanjax.models.lora import remove_lora
from flanjax.models.transformer import Transformer, TransformerConfig
from flanjax.sharding import MeshConfig, Partitioner, shardings_of
from flanjax.rundir.checkpoint import Checkpointer, CheckpointConfig

HF_CONFIG_FILE = "hf_config.json"  # the Hugging Face config a run descends from


def _has_tokenizer(path: str) -> bool:
    return any(paths.exists(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


def from_hf(
    source: str,
    run_dir: str,
    *,
    dtype: str = "float32",
    mesh: MeshConfig = MeshConfig(data=1, fsdp=-1),
    add_tokens: tuple[str, ...] = (),
    allow_pickle: bool = False,
) -> TransformerConfig:
    """Writes the run directory of the Hugging Face checkpoint in `source` (a remote one is read
    through a local copy in the cache); returns its model."""
    if Checkpointer(run_dir, read_only=True).latest_step() is not None:
        raise hf.HFCheckpointError(f"{run_dir} already holds checkpoints; convert into a new directory.")
    partitioner = Partitioner.from_config(mesh)
    named, source = source, paths.local_copy(source)  # transformers and safetensors read local files
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
        paths.write_atomic(os.path.join(run_dir, HF_CONFIG_FILE), json.dumps(hf_config, indent=2))
        if tokenizer is not None:
            _save_local(tokenizer.save_pretrained, os.path.join(run_dir, TOKENIZER_DIR))
        paths.write_atomic(os.path.join(run_dir, "model.gin"),
                           model_gin(model.config, run_dir, f"{named} converted by `flanjax convert from-hf`", tokenizer is not None))  # fmt: skip
    return model.config


def model_gin(config: TransformerConfig, run_dir: str, origin: str, tokenizer: bool) -> str:
    """A gin file binding `config` as MODEL, the run's weights as the initial checkpoint and its
    tokenizer as the templated tasks' tokenizer; `origin` says where the weights came from."""
    run_dir = paths.abspath(run_dir)
    # Every field that says what the checkpoint holds (all of them: they must win over an earlier
    # model file), not dropout, which is how to train it (a recipe such as lima.gin sets it).
    fields = [f"  {f.name} = {getattr(config, f.name)!r}" for f in dataclasses.fields(config) if "dropout" not in f.name]
    lines = [
        f"# {origin}. Include this file after a run file (such as",
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
    return next((d for d in lineage(run_dir) if paths.exists(os.path.join(d, HF_CONFIG_FILE))), None)


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
        with paths.open(os.path.join(origin, HF_CONFIG_FILE)) as f:
            base = json.load(f)
    _save_local(lambda local: hf.save_model(model, local, base), out_dir)
    vocabulary = run_vocabulary(run_dir)
    if vocabulary is not None and jax.process_index() == 0:
        paths.copytree(vocabulary.path, out_dir)
    return out_dir


def _save_local(save, out_dir: str) -> None:
    """`save(directory)` of a writer that knows only local files (transformers, safetensors):
    into `out_dir` itself, or through a local temporary directory uploaded to a remote one."""
    if not paths.is_remote(out_dir):
        return save(out_dir)
    with tempfile.TemporaryDirectory() as local:
        save(local)
        if jax.process_index() == 0:
            paths.copytree(local, out_dir)


def grow(
    in_dir: str,
    out_dir: str,
    new: TransformerConfig | Mapping[str, Any],
    *,
    depth: Depth = "zero",
    noise: float = 0.0,
    seed: int = 0,
    mesh: MeshConfig = MeshConfig(data=1, fsdp=-1),
) -> str:
    """Writes into `out_dir` the run directory of the model of `in_dir` (a run directory or one
    of its step directories) grown to `new` (a config, or overrides of the trained one), as
    `flanjax convert from-hf` writes one: model.json, tokenizer/, model.gin (which binds the
    model, the tokenizer and `lm.train.init_checkpoint`) and the weights as step 0. Returns
    that checkpoint's path."""
    run_dir, step = resolve_checkpoint(in_dir)
    if read_lora_config(run_dir) is not None:
        raise GrowthError(
            f"{run_dir} trains LoRA adapters (lora.json): growth reads plain weights. Merge the adapters first: "
            f"`flanjax convert to-hf --in {run_dir} --out HF_DIR` (it merges them), then `flanjax convert from-hf "
            "--in HF_DIR --out MERGED_RUN`, and grow MERGED_RUN."
        )
    if Checkpointer(out_dir, read_only=True).latest_step() is not None:
        raise GrowthError(f"{out_dir} already holds checkpoints; grow into a new directory.")
    old = read_model_config(run_dir)
    new = grown_config(old, new)
    check_growth(old, new, depth, noise)  # before any weights are read
    partitioner = Partitioner.from_config(mesh)
    weights = nnx.to_pure_dict(restore_weights(run_dir, step, old, partitioner)[1])
    abstract = nnx.to_pure_dict(partitioner.abstract_state(lambda: Transformer(new, rngs=nnx.Rngs(0)))[1])
    with partitioner.activate():  # grown on the devices, straight into the new model's shardings
        grow = jax.jit(lambda w: grow_params(w, old, new, depth=depth, noise=noise, seed=seed), out_shardings=shardings_of(abstract))
        grown = grow(weights)
    source = f"{run_dir} step {step}"
    origin = f"{source} grown by `flanjax grow` (depth={depth}, noise={noise:g})"
    if jax.process_index() == 0:  # the descriptions first: a checkpoint is never there without them
        write_model_config(out_dir, new)
        vocabulary = run_vocabulary(run_dir)
        write_tokenizer(out_dir, vocabulary)
        paths.write_atomic(os.path.join(out_dir, "model.gin"), model_gin(new, out_dir, origin, vocabulary is not None))
    checkpointer = Checkpointer(out_dir, CheckpointConfig(async_save=False))
    checkpointer.save(0, {"model": grown})  # the trained state's `model`, alone, as from-hf writes it
    checkpointer.close()
    console.print(f"Grew {source} ({old.num_params() / 1e6:.2f}M parameters) into {out_dir} "
                  f"({new.num_params() / 1e6:.2f}M, depth={depth}, noise={noise:g})")  # fmt: skip
    return os.path.join(paths.abspath(out_dir), "checkpoints", "0")
