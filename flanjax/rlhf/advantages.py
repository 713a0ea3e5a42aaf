"""Generalised advantage estimation and masked statistics for PPO.

Arrays are [b, t] with `mask` 1 on each row's response tokens (a prefix of the row) and 0
after. Everything here is a pure function of its inputs and runs under `jax.jit`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def gae(
    rewards: jax.Array, values: jax.Array, mask: jax.Array, gamma: float, lam: float
) -> tuple[jax.Array, jax.Array]:
    """(advantages, returns), both [b, t] float32 and 0 where `mask` is 0.

    delta_t = r_t + gamma * V_{t+1} * m_{t+1} - V_t
    A_t = delta_t + gamma * lam * m_{t+1} * A_{t+1}
    with V and A taken as 0 past the last valid token; returns = A + V.
    """
    mask = jnp.asarray(mask).astype(bool)
    # Padding may hold anything (even inf): select, not multiply, so it cannot leak in.
    rewards = jnp.where(mask, jnp.asarray(rewards, jnp.float32), 0.0)
    values = jnp.where(mask, jnp.asarray(values, jnp.float32), 0.0)

    def step(carry, xs):
        next_value, next_adv = carry  # already 0 where m_{t+1} is 0
        r, v, m = xs
        adv = r + gamma * next_value - v + gamma * lam * next_adv
        adv = jnp.where(m, adv, 0.0)
        return (v, adv), adv

    # Scan over time: put t first; the carry starts at 0 (nothing beyond t-1).
    xs = (rewards.T, values.T, mask.T)
    zeros = jnp.zeros(rewards.shape[0], jnp.float32)
    _, adv = jax.lax.scan(step, (zeros, zeros), xs, reverse=True)
    adv = adv.T
    returns = jnp.where(mask, adv + values, 0.0)
    return adv, returns


def masked_mean(x: jax.Array, mask: jax.Array, axis: int | tuple[int, ...] | None = None) -> jax.Array:
    """Mean of `x` over the entries where `mask` is nonzero; 0 (not NaN) if there are none."""
    mask = jnp.asarray(mask).astype(bool)
    total = jnp.sum(jnp.where(mask, x, 0.0), axis=axis)
    count = jnp.sum(mask, axis=axis)
    # An empty mask (e.g. a batch of empty responses) must not put NaN into the loss.
    return total / jnp.maximum(count, 1)


def masked_var(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Biased (population, divide-by-n) variance of `x` over the masked entries; 0 if none."""
    mask = jnp.asarray(mask).astype(bool)
    mean = masked_mean(x, mask)
    return masked_mean(jnp.square(jnp.where(mask, x - mean, 0.0)), mask)


def whiten(x: jax.Array, mask: jax.Array, shift_mean: bool = True, eps: float = 1e-8) -> jax.Array:
    """(x - mean) / sqrt(var + eps) over the masked entries, 0 where `mask` is 0.

    With shift_mean=False the mean is added back (TRL's choice for rewards): only the
    scale is normalised.
    """
    mask = jnp.asarray(mask).astype(bool)
    mean = masked_mean(x, mask)
    out = (x - mean) * jax.lax.rsqrt(masked_var(x, mask) + eps)
    if not shift_mean:
        out = out + mean
    return jnp.where(mask, out, 0.0)
