"""optax AdamW and its learning-rate schedule, from one gin-configurable dataclass."""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import optax


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    learning_rate: float = 1e-3  # peak rate, reached after warmup
    schedule: Literal["constant", "linear", "cosine"] = "cosine"
    warmup_steps: int = 0
    # Rate at the end of the decay, as a fraction of the peak (LIMA: 1e-5 -> 1e-6 is 0.1).
    end_lr_fraction: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1  # decoupled; applied to matrices only, not norms or biases
    clip_grad_norm: float | None = 1.0


def make_schedule(config: OptimizerConfig, num_steps: int) -> optax.Schedule:
    peak, warmup = config.learning_rate, min(config.warmup_steps, num_steps)
    decay_steps = max(num_steps - warmup, 1)
    end = peak * config.end_lr_fraction
    if config.schedule == "constant":
        after = optax.constant_schedule(peak)
    elif config.schedule == "linear":
        after = optax.linear_schedule(peak, end, decay_steps)
    elif config.schedule == "cosine":
        after = optax.cosine_decay_schedule(peak, decay_steps, alpha=config.end_lr_fraction)
    else:
        raise ValueError(f"unknown schedule {config.schedule!r}; use constant, linear or cosine.")
    if not warmup:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def _decay_mask(params):
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(config: OptimizerConfig, num_steps: int) -> optax.GradientTransformation:
    adamw = optax.adamw(
        make_schedule(config, num_steps),
        b1=config.b1,
        b2=config.b2,
        eps=config.eps,
        weight_decay=config.weight_decay,
        mask=_decay_mask,
    )
    if config.clip_grad_norm is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(config.clip_grad_norm), adamw)
