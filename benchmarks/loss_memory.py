"""Memory of the training step's loss: full [b, t, v] logits against logits made in chunks.

Compiles (never runs), once with the loss over the full logits and once per chunk size, the
loss alone (hidden states -> value and gradients) and the whole training step (forward,
backward, AdamW) of a small trunk under a large vocabulary, and prints XLA's memory report
per device (temporaries) as one JSON object.

    .venv/bin/python benchmarks/loss_memory.py --vocab_size=128256 --seq_len=2048
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
import optax

from flanjax.benchmark import synthetic_lm_batch
from flanjax.models.transformer import TransformerConfig
from flanjax.sharding import MeshConfig, Partitioner
from flanjax.train.losses import chunked_token_cross_entropy, lm_loss
from flanjax.train.steps import lm_init, make_train_step
from flanjax.train.trainer import sharded_step

MIB = 2**20


def loss_memory(config: TransformerConfig, batch_size: int, seq_len: int, chunk_size: int | None) -> float:
    """Temporaries (MiB) of the loss alone: its value and gradients with respect to the final
    hidden states and the unembedding, from hidden states to scalar."""
    hidden = jax.ShapeDtypeStruct((batch_size, seq_len, config.d_model), jnp.float32)
    kernel = jax.ShapeDtypeStruct((config.d_model, config.vocab_size), jnp.float32)
    tokens = jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32)
    weights = jax.ShapeDtypeStruct((batch_size, seq_len), jnp.float32)

    def loss(h, w, targets, weights):
        return chunked_token_cross_entropy(h, lambda x: x @ w, targets, weights, chunk_size=chunk_size).loss

    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(hidden, kernel, tokens, weights).compile()
    return compiled.memory_analysis().temp_size_in_bytes / MIB


def step_memory(config: TransformerConfig, batch_size: int, seq_len: int, chunk_size: int | None) -> dict:
    partitioner = Partitioner.from_config(MeshConfig(data=1))
    graphdef, abstract = partitioner.abstract_state(lm_init(config, optax.adamw(1e-4)))
    batch = synthetic_lm_batch(batch_size, seq_len, 8)  # only its shapes and dtypes are used
    spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=partitioner.batch_sharding(v.ndim)) for k, v in batch.items()}
    start = time.perf_counter()
    with partitioner.activate():
        step = sharded_step(make_train_step(graphdef, lm_loss(chunk_size=chunk_size)), abstract, spec)
        memory = step.lower(abstract, spec).compile().memory_analysis()
    return {
        "chunk_size": chunk_size,
        "loss_temp_mib": loss_memory(config, batch_size, seq_len, chunk_size),
        "step_temp_mib": memory.temp_size_in_bytes / MIB,
        "argument_mib": memory.argument_size_in_bytes / MIB,
        "compile_s": time.perf_counter() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab_size", type=int, default=128256)  # LLaMA 3's
    parser.add_argument("--seq_len", type=int, default=2048)
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--d_model", type=int, default=512)
    parser.add_argument("--chunk_sizes", default="1024,512,256")
    args = parser.parse_args()
    config = TransformerConfig(
        vocab_size=args.vocab_size, d_model=args.d_model, num_layers=2, num_heads=8, d_ff=4 * args.d_model,
        max_len=args.seq_len, tie_embeddings=False,
    )  # fmt: skip
    full = step_memory(config, args.batch_size, args.seq_len, None)
    chunked = [step_memory(config, args.batch_size, args.seq_len, int(c)) for c in args.chunk_sizes.split(",")]
    logits_mib = args.batch_size * args.seq_len * args.vocab_size * 4 / MIB  # one float32 copy of the full logits
    print(json.dumps({
        "benchmark": "loss_memory", "device": jax.devices()[0].device_kind, "vocab_size": args.vocab_size,
        "seq_len": args.seq_len, "batch_size": args.batch_size, "params": config.num_params(),
        "full_logits_float32_mib": logits_mib, "full": full, "chunked": chunked,
        "loss_temp_reduction": {str(c["chunk_size"]): full["loss_temp_mib"] / c["loss_temp_mib"] for c in chunked},
    }))  # fmt: skip


if __name__ == "__main__":
    main()
