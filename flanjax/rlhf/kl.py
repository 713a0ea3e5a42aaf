"""Per-token KL penalties against the reference policy and the KL coefficient controller.

The controller is a frozen config plus a pure update, so beta can live in the train state
and be updated inside a jitted step.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from flanjax.errors import FlanjaxError

ESTIMATORS = ("k1", "k2", "k3")


class KLConfigError(FlanjaxError, ValueError):
    """An invalid KL penalty setting."""


def _check_estimator(estimator: str) -> None:
    if estimator not in ESTIMATORS:
        raise KLConfigError(f"unknown KL estimator {estimator!r}; use one of {', '.join(ESTIMATORS)}.")


def kl_penalty(logp: jax.Array, ref_logp: jax.Array, estimator: str) -> jax.Array:
    """Per-token estimate of KL(policy || reference) from the sampled tokens' log-probs.

    k1: logp - ref_logp (unbiased, can be negative per token).
    k2: 0.5 * (logp - ref_logp)^2 (biased, low variance).
    k3: (r - 1) - log r with r = exp(ref_logp - logp) (Schulman: unbiased and always >= 0).
    """
    _check_estimator(estimator)
    diff = logp - ref_logp
    if estimator == "k1":
        return diff
    if estimator == "k2":
        return 0.5 * jnp.square(diff)
    log_ratio = -diff
    # expm1, not exp(x) - 1: near r = 1 the latter's rounding exceeds the penalty and goes negative.
    return jnp.expm1(log_ratio) - log_ratio


@dataclasses.dataclass(frozen=True)
class KLConfig:
    init_beta: float = 0.02  # InstructGPT
    adaptive: bool = False
    target: float = 6.0  # nats per sequence (Ziegler et al.)
    horizon: int = 10_000
    estimator: str = "k1"  # per-token penalty estimator

    def __post_init__(self):
        # `not x >= 0` also refuses NaN.
        if not self.init_beta >= 0:
            raise KLConfigError(f"KL init_beta must be >= 0, got {self.init_beta!r}.")
        if not self.target > 0:
            raise KLConfigError(f"KL target must be > 0 (nats per sequence), got {self.target!r}.")
        if not self.horizon > 0:
            raise KLConfigError(f"KL horizon must be > 0 steps, got {self.horizon!r}.")
        _check_estimator(self.estimator)


def update_beta(beta, observed_kl, n_steps, config: KLConfig):
    """The KL coefficient after `n_steps` steps that observed `observed_kl` nats per sequence.

    Fixed controller: beta unchanged. Adaptive (Ziegler et al. 2019): move beta
    proportionally towards the target KL, the error clipped to +-20% so one noisy batch
    cannot swing it. Works on Python floats and on traced arrays.
    """
    if not config.adaptive:
        return beta
    error = jnp.clip(observed_kl / config.target - 1.0, -0.2, 0.2)
    return beta * (1.0 + error * n_steps / config.horizon)
