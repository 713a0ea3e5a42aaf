"""Batched incremental decoding with the model's KV cache, entirely on the device.

Prompts are right-padded to a common length and may differ in length: each sequence writes
its cache at its own positions, so a short prompt starts generating right after its last
token while padding slots stay masked until they are overwritten.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from flanjax.models.transformer import KVCache


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "eos_id"))
def greedy_generate(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    prompts: jax.Array,  # [b, p] int, right-padded
    prompt_lengths: jax.Array,  # [b] int, >= 1
    *,
    max_new_tokens: int,
    eos_id: int,
) -> jax.Array:
    """Greedy continuation of each prompt: [b, max_new_tokens], 0 after each sequence's EOS."""
    model = nnx.merge(graphdef, state)
    b, p = prompts.shape
    rows = jnp.arange(b)
    cache = KVCache.empty(model.config, b, p + max_new_tokens)
    segments = (jnp.arange(p)[None, :] < prompt_lengths[:, None]).astype(jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
    logits, cache = model(prompts, positions, segments, cache=cache)
    token = jnp.argmax(logits[rows, prompt_lengths - 1], axis=-1).astype(jnp.int32)

    def cond(carry):
        i, _, _, _, done = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, token, cache, out, done = carry
        out = out.at[:, i].set(jnp.where(done, 0, token))
        done = done | (token == eos_id)
        pos = (prompt_lengths + i)[:, None]
        logits, cache = model(token[:, None], pos, jnp.ones_like(pos), cache=cache)
        token = jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)
        return i + 1, token, cache, out, done

    out = jnp.zeros((b, max_new_tokens), jnp.int32)
    carry = (jnp.int32(0), token, cache, out, jnp.zeros((b,), bool))
    return jax.lax.while_loop(cond, body, carry)[3]
