"""Training losses: pure functions of model outputs, and the loss functions trainers pass to
`steps.make_train_step`.

A loss function is `loss_fn(model, batch, rngs) -> (loss, metrics)`: `loss` is the scalar to
minimise (a mean over the batch) and `metrics` a dict of sums (`loss_sum`, `weight_sum`, ...,
reduced by `train.loop.summarise`) and other values (averaged). `weight_sum` is how much the
batch counts: with microbatches the step weights each microbatch's gradient by it, so the
gradient equals the whole batch's. Extra terms (a penalty, an auxiliary loss) compose on top
with `add_terms`, without touching the step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

LossFn = Callable[[nnx.Module, Mapping[str, jax.Array], nnx.Rngs | None], tuple[jax.Array, dict[str, jax.Array]]]
Term = Callable[[nnx.Module, Mapping[str, jax.Array], nnx.Rngs | None], jax.Array]


class TokenStats(NamedTuple):
    """Sums over the weighted tokens of a batch; divide by `weight` for means."""

    loss: jax.Array
    z_loss: jax.Array
    correct: jax.Array
    weight: jax.Array


def token_cross_entropy(
    logits: jax.Array,  # [b, t, v]
    targets: jax.Array,  # [b, t]
    weights: jax.Array,  # [b, t]; 0 on the prefix and padding
    z_loss: float = 0.0,
) -> TokenStats:
    """Summed next-token cross-entropy (float32), optional z-loss (PaLM) and correct count."""
    logits = logits.astype(jnp.float32)
    weights = weights.astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    zl = z_loss * jnp.square(jax.nn.logsumexp(logits, axis=-1)) if z_loss else jnp.zeros_like(ce)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return TokenStats(
        loss=jnp.sum(ce * weights),
        z_loss=jnp.sum(zl * weights),
        correct=jnp.sum(correct * weights),
        weight=jnp.sum(weights),
    )


def chunked_token_cross_entropy(
    hidden: jax.Array,  # [b, t, d] final hidden states
    unembed: Callable[[jax.Array], jax.Array],  # [b, c, d] -> logits [b, c, v]
    targets: jax.Array,  # [b, t]
    weights: jax.Array,  # [b, t]
    z_loss: float = 0.0,
    chunk_size: int | None = 512,
) -> TokenStats:
    """`token_cross_entropy(unembed(hidden), ...)` over chunks of `chunk_size` positions: each
    chunk's logits are made, reduced and dropped, in the forward pass and again (recomputed)
    in the backward, so memory holds one chunk's [b, chunk_size, v] logits, never [b, t, v].
    Chunks split the sequence, not the batch, so that a batch-sharded mesh keeps its layout.
    None: the whole sequence at once."""
    b, t, _ = hidden.shape
    if chunk_size is None or t <= chunk_size:
        return token_cross_entropy(unembed(hidden), targets, weights, z_loss)
    n = -(-t // chunk_size)
    pad = n * chunk_size - t  # padded positions weigh 0

    def chunks(x: jax.Array) -> jax.Array:  # [b, t, ...] -> [n, b, chunk_size, ...]
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(b, n, chunk_size, *x.shape[2:]), 1, 0)

    @jax.checkpoint  # save only the chunk's inputs: its logits are recomputed for the backward pass
    def chunk_stats(h, y, w):
        return token_cross_entropy(unembed(h), y, w, z_loss)

    def add(total: TokenStats, chunk) -> tuple[TokenStats, None]:
        return TokenStats(*(a + c for a, c in zip(total, chunk_stats(*chunk)))), None

    zero = TokenStats(*(jnp.zeros((), jnp.float32) for _ in TokenStats._fields))
    return jax.lax.scan(add, zero, (chunks(hidden), chunks(targets), chunks(weights)))[0]


def lm_loss(z_loss: float = 0.0, chunk_size: int | None = 512) -> LossFn:
    """Mean cross-entropy over the weighted target tokens of decoder features (see
    `data.pipeline`), plus an optional z-loss; the logits are made `chunk_size` positions at
    a time (`chunked_token_cross_entropy`)."""

    def loss_fn(model: nnx.Module, batch: Mapping[str, jax.Array], rngs: nnx.Rngs | None):
        inputs = (batch["decoder_input_tokens"], batch["decoder_positions"], batch["decoder_segment_ids"])
        hidden, _ = model(*inputs, rngs=rngs, return_hidden=True)
        targets, weights = batch["decoder_target_tokens"], batch["decoder_loss_weights"]
        stats = chunked_token_cross_entropy(hidden, model.logits, targets, weights, z_loss, chunk_size)
        metrics = {"loss_sum": stats.loss, "z_loss_sum": stats.z_loss, "correct_sum": stats.correct, "weight_sum": stats.weight}
        return (stats.loss + stats.z_loss) / jnp.maximum(stats.weight, 1.0), metrics

    return loss_fn


def add_terms(loss_fn: LossFn, terms: Mapping[str, Term]) -> LossFn:
    """`loss_fn` plus each term `term(model, batch, rngs) -> scalar` (its weight inside it),
    each logged under its name: e.g. an L2 or EWC penalty on the trained parameters."""

    def with_terms(model: nnx.Module, batch: Mapping[str, jax.Array], rngs: nnx.Rngs | None):
        loss, metrics = loss_fn(model, batch, rngs)
        values: dict[str, Any] = {name: term(model, batch, rngs) for name, term in terms.items()}
        return loss + sum(values.values()), {**metrics, **values}

    return with_terms
