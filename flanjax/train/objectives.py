"""Training losses as pure functions of logits and batch features."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax


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


def token_log_likelihoods(
    logits: jax.Array,  # [b, t, v]
    targets: jax.Array,  # [b, t]
    weights: jax.Array,  # [b, t]; 0 where a token is not scored
) -> jax.Array:
    """log p(target | prefix) of each scored token (float32), 0 elsewhere: [b, t]."""
    log_p = -optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    return jnp.where(weights > 0, log_p, 0.0)
