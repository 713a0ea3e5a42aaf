"""Training steps: pure functions of (state, batch), built from a loss function.

`make_train_step(graphdef, loss_fn)` is the step of every trainer whose state is a
`TrainState` (SFT, reward model, ...): one gradient update of the model's trainable
parameters (its optimizer's `wrt`: all of them, or the LoRA adapters) on `loss_fn` (see
`train.losses`). `gradients` is the part a trainer with several models reuses (PPO's policy and
value model). Dropout keys come from (seed, step), so a resumed run needs no saved RNG state.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from flanjax.models.lora import LoraConfig
from flanjax.models.transformer import TransformerConfig, new_model
from flanjax.train.losses import LossFn

Batch = Mapping[str, jax.Array]


class TrainState(nnx.Module):
    """What a trainer updates and checkpoints: the model and its optimizer, by name."""

    def __init__(self, model: nnx.Module, optimizer: nnx.Optimizer):
        self.model = model
        self.optimizer = optimizer

    @classmethod
    def create(cls, model: nnx.Module, tx: optax.GradientTransformation, wrt=nnx.Param) -> TrainState:
        """`wrt`: which parameters train (nnx.LoRAParam: the adapters only)."""
        return cls(model, nnx.Optimizer(model, tx, wrt=wrt))


def lm_init(config: TransformerConfig, tx: optax.GradientTransformation, seed: int = 0, lora: LoraConfig | None = None):
    """The function building a language model's `TrainState`, from scratch or from a plain
    model's state: pass it to `Partitioner.create`. With LoRA the optimizer holds the adapters only."""

    def init(base: nnx.State | None = None) -> TrainState:
        return TrainState.create(new_model(config, lora, seed, base), tx, nnx.Param if lora is None else nnx.LoRAParam)

    return init


def gradients(loss_fn, models: Sequence[nnx.Module], wrts: Sequence, batch, key: jax.Array):
    """(gradients of each model's `wrt` parameters, metrics) of `loss_fn(*models, batch, rngs)
    -> (loss, metrics)`, with dropout keyed by `key`."""
    splits = [nnx.split(model, wrt, ...) for model, wrt in zip(models, wrts)]

    def objective(params):
        merged = [nnx.merge(graphdef, p, rest) for (graphdef, _, rest), p in zip(splits, params)]
        return loss_fn(*merged, batch, nnx.Rngs(dropout=key))

    return jax.grad(objective, has_aux=True)([params for _, params, _ in splits])


def _split_microbatches(batch: Batch, n: int) -> Batch:
    def split(x):
        if x.shape[0] % n:
            raise ValueError(f"batch of {x.shape[0]} rows does not split into {n} microbatches.")
        return x.reshape(n, x.shape[0] // n, *x.shape[1:])

    return {k: split(v) for k, v in batch.items()}


def _accumulated_gradients(loss_fn: LossFn, model, wrt, batch: Batch, key, num_microbatches: int):
    """Gradients of the whole batch from a scan over microbatches: each microbatch's gradient
    counts by its `weight_sum`; sums add up, other metrics average."""

    def one(micro, i):
        (grads,), metrics = gradients(loss_fn, [model], [wrt], micro, jax.random.fold_in(key, i))
        weight = metrics.get("weight_sum", jnp.ones(()))
        return jax.tree.map(lambda g: g * weight, grads), metrics, weight

    def accumulate(carry, xs):
        return jax.tree.map(jnp.add, carry, one(*xs)), None

    micro = _split_microbatches(batch, num_microbatches)
    first = jax.eval_shape(one, jax.tree.map(lambda x: x[0], micro), 0)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), first)
    (grads, metrics, weight), _ = jax.lax.scan(accumulate, zeros, (micro, jnp.arange(num_microbatches)))
    grads = jax.tree.map(lambda g: g / jnp.maximum(weight, 1.0), grads)
    return grads, {k: v if k.endswith("_sum") else v / num_microbatches for k, v in metrics.items()}


def make_train_step(graphdef: nnx.GraphDef, loss_fn: LossFn, *, num_microbatches: int = 1, seed: int = 0):
    """Returns step(state, batch) -> (state, metrics) for a `TrainState`: one update of the
    model's trainable parameters on `loss_fn`, the batch split into `num_microbatches`."""

    def step(state: nnx.State, batch: Batch):
        train_state = nnx.merge(graphdef, state)
        model, optimizer = train_state.model, train_state.optimizer
        key = jax.random.fold_in(jax.random.key(seed), optimizer.step[...])
        if num_microbatches == 1:
            (grads,), metrics = gradients(loss_fn, [model], [optimizer.wrt], batch, key)
        else:
            grads, metrics = _accumulated_gradients(loss_fn, model, optimizer.wrt, batch, key, num_microbatches)
        optimizer.update(model, grads)
        return nnx.state(train_state), {**metrics, "grad_norm": optax.tree.norm(grads)}

    return step


def make_eval_step(graphdef: nnx.GraphDef, loss_fn: LossFn):
    """Returns step(state, batch) -> the loss function's metrics, without dropout or updates."""

    def step(state: nnx.State, batch: Batch):
        return loss_fn(nnx.merge(graphdef, state).model, batch, None)[1]

    return step
