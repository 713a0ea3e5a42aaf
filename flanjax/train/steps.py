"""Language-model steps (SFT, instruction tuning): pure functions of (state, batch).

`state` is `nnx.state((model, optimizer))` and the batch holds the decoder features of
`flanjax.data.pipeline`. The loss is the mean cross-entropy over target tokens of the whole
global batch; with microbatches the gradient is accumulated in a scan and normalised once,
so it equals the gradient of the full batch.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from flanjax.models.lora import LoraConfig, apply_lora
from flanjax.models.transformer import Transformer, TransformerConfig
from flanjax.sharding import Partitioner, shardings_of
from flanjax.train.objectives import TokenStats, token_cross_entropy

Batch = Mapping[str, jax.Array]


def new_model(config: TransformerConfig, lora: LoraConfig | None = None, seed: int = 0, base: nnx.State | None = None) -> Transformer:
    """A Transformer with random weights, or `base`'s (a plain model's state), plus LoRA adapters."""
    model = Transformer(config, rngs=nnx.Rngs(params=seed))
    if base is not None:
        nnx.update(model, base)
    if lora is not None:
        apply_lora(model, lora, rngs=nnx.Rngs(params=seed + 1))
    return model


def lm_init(config: TransformerConfig, tx: optax.GradientTransformation, seed: int = 0, lora: LoraConfig | None = None):
    """The function building (model, optimizer), from scratch or from a plain model's state:
    pass it to `Partitioner.create`. With LoRA the optimizer holds the adapters only."""

    def init(base: nnx.State | None = None):
        model = new_model(config, lora, seed, base)
        return model, nnx.Optimizer(model, tx, wrt=nnx.Param if lora is None else nnx.LoRAParam)

    return init


def compile_lm_train_step(partitioner: Partitioner, graphdef: nnx.GraphDef, abstract_state, **kwargs):
    """`make_lm_train_step` jitted with the state's shardings (state buffers donated)."""
    shardings = shardings_of(abstract_state)
    return jax.jit(
        make_lm_train_step(graphdef, **kwargs),
        in_shardings=(shardings, partitioner.batch_sharding(2)),
        out_shardings=(shardings, None),
        donate_argnums=0,
    )


def lm_stats(model: nnx.Module, batch: Batch, rngs: nnx.Rngs | None, z_loss: float = 0.0) -> TokenStats:
    logits, _ = model(
        batch["decoder_input_tokens"],
        batch["decoder_positions"],
        batch["decoder_segment_ids"],
        rngs=rngs,
    )
    return token_cross_entropy(logits, batch["decoder_target_tokens"], batch["decoder_loss_weights"], z_loss)


def _split_microbatches(batch: Batch, n: int) -> Batch:
    def split(x):
        if x.shape[0] % n:
            raise ValueError(f"batch of {x.shape[0]} rows does not split into {n} microbatches.")
        return x.reshape(n, x.shape[0] // n, *x.shape[1:])

    return {k: split(v) for k, v in batch.items()}


def make_lm_train_step(graphdef: nnx.GraphDef, *, z_loss: float = 0.0, num_microbatches: int = 1, seed: int = 0):
    """Returns step(state, batch) -> (state, metrics); metrics are sums to reduce on the host."""

    def step(state: nnx.State, batch: Batch):
        model, optimizer = nnx.merge(graphdef, state)
        model_def, params, rest = nnx.split(model, optimizer.wrt, ...)  # the trained parameters
        # Dropout keys from (seed, step): resumable without saving any RNG state.
        key = jax.random.fold_in(jax.random.key(seed), optimizer.step[...])

        def loss_fn(params, micro, key):
            stats = lm_stats(nnx.merge(model_def, params, rest), micro, nnx.Rngs(dropout=key), z_loss)
            return stats.loss + stats.z_loss, stats

        grad_fn = jax.grad(loss_fn, has_aux=True)
        if num_microbatches == 1:
            grads, stats = grad_fn(params, batch, key)
        else:
            def accumulate(carry, xs):
                micro, i = xs
                g, s = grad_fn(params, micro, jax.random.fold_in(key, i))
                return jax.tree.map(jnp.add, carry, (g, s)), None

            zeros = (jax.tree.map(jnp.zeros_like, params), TokenStats(*[jnp.zeros((), jnp.float32)] * 4))
            micro = _split_microbatches(batch, num_microbatches)
            (grads, stats), _ = jax.lax.scan(accumulate, zeros, (micro, jnp.arange(num_microbatches)))

        grads = jax.tree.map(lambda g: g / jnp.maximum(stats.weight, 1.0), grads)
        grad_norm = optax.global_norm(grads)
        optimizer.update(model, grads)
        metrics = {
            "loss_sum": stats.loss,
            "z_loss_sum": stats.z_loss,
            "correct_sum": stats.correct,
            "weight_sum": stats.weight,
            "grad_norm": grad_norm,
        }
        return nnx.state((model, optimizer)), metrics

    return step


def make_lm_eval_step(graphdef: nnx.GraphDef):
    """Returns step(state, batch) -> summed loss statistics, without dropout or updates."""

    def step(state: nnx.State, batch: Batch):
        model, _ = nnx.merge(graphdef, state)
        stats = lm_stats(model, batch, None)
        return {"loss_sum": stats.loss, "correct_sum": stats.correct, "weight_sum": stats.weight}

    return step
