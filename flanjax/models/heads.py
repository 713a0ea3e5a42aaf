"""Scalar heads: a Transformer with one in place of its unembedding (one score per position),
and a head alone that reads another model's hidden states.

The reward model reads the score at the last token of a response; the value model (PPO's
critic, initialised from the reward model) at every response token, or, sharing the policy's
trunk, a `ValueHead` on the policy's own hidden states. Heads' weights have logical axes like
every other parameter, so they are sharded by the same rules.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from flanjax.models.transformer import Transformer, TransformerConfig, _init, _zeros


class ScoreModel(nnx.Module):
    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.transformer = Transformer(config, rngs=rngs)
        self.transformer.lm_head = None  # replaced by the head: no vocabulary-sized matrix to train
        self.head = nnx.Linear(
            config.d_model, 1, kernel_init=_init(config, ("embed", None), config.d_model**-0.5),
            bias_init=_zeros((None,)), rngs=rngs,
        )  # fmt: skip

    def __call__(self, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
        """[b, t] float32 scores."""
        hidden, _ = self.transformer(tokens, positions, segment_ids, rngs=rngs, return_hidden=True)
        return self.head(hidden.astype(jnp.float32))[..., 0]


def score_model_from_lm(config: TransformerConfig, lm_state: nnx.State | None = None, seed: int = 0) -> ScoreModel:
    """A ScoreModel whose Transformer takes a language model's weights (its unembedding dropped)."""
    model = ScoreModel(config, rngs=nnx.Rngs(params=seed))
    if lm_state is not None:
        nnx.update(model.transformer, nnx.State({k: v for k, v in lm_state.items() if k != "lm_head"}))
    return model


class ValueHead(nnx.Module):
    """A scalar head on the final hidden states of another model (PPO's policy): a value
    function that shares the policy's trunk. Zero at the start, so the first advantages are
    the returns themselves."""

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        self.head = nnx.Linear(config.d_model, 1, kernel_init=_zeros(("embed", None)), bias_init=_zeros((None,)), rngs=rngs)

    def __call__(self, hidden: jax.Array) -> jax.Array:
        """[...] float32 values of hidden states [..., d]."""
        return self.head(hidden.astype(jnp.float32))[..., 0]
