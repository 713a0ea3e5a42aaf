"""PPO maths (GAE, whitening, KL penalties, the KL controller) against plain NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flanjax.rlhf.advantages import gae, masked_mean, masked_var, whiten
from flanjax.rlhf.kl import KLConfig, kl_penalty, update_beta

LENGTHS = [0, 1, 3, 7, 10, 10, 5]  # one empty row, one full row (t = 10)
T = 10


def _batch(seed):
    rng = np.random.default_rng(seed)
    b = len(LENGTHS)
    rewards = rng.normal(size=(b, T)).astype(np.float32)
    values = rng.normal(size=(b, T)).astype(np.float32)
    mask = (np.arange(T)[None, :] < np.array(LENGTHS)[:, None]).astype(np.float32)
    return rewards, values, mask


def _gae_reference(rewards, values, lengths, gamma, lam):
    adv = np.zeros(rewards.shape, np.float64)
    for i, length in enumerate(lengths):
        last = 0.0
        for t in reversed(range(length)):
            next_value = values[i, t + 1] if t + 1 < length else 0.0
            delta = rewards[i, t] + gamma * next_value - values[i, t]
            last = delta + gamma * lam * last
            adv[i, t] = last
    valid = np.arange(rewards.shape[1])[None, :] < np.array(lengths)[:, None]
    returns = np.where(valid, adv + values, 0.0)
    return adv, returns


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 1.0), (0.9, 0.0)])
def test_gae_matches_reference(gamma, lam):
    rewards, values, mask = _batch(0)
    adv, ret = gae(rewards, values, mask, gamma, lam)
    want_adv, want_ret = _gae_reference(rewards, values, LENGTHS, gamma, lam)
    assert adv.dtype == jnp.float32 and ret.dtype == jnp.float32
    np.testing.assert_allclose(adv, want_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret, want_ret, rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(adv)[mask == 0] == 0) and np.all(np.asarray(ret)[mask == 0] == 0)


def test_gae_ignores_padding_and_jits():
    rewards, values, mask = _batch(1)
    adv, ret = gae(rewards, values, mask, 0.99, 0.95)
    # Garbage (even inf/nan) after each response must change nothing.
    junk_r = np.where(mask == 1, rewards, np.inf)
    junk_v = np.where(mask == 1, values, np.nan)
    jitted = jax.jit(gae, static_argnums=(3, 4))
    adv2, ret2 = jitted(junk_r, junk_v, mask.astype(bool), 0.99, 0.95)
    np.testing.assert_allclose(adv2, adv, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ret2, ret, rtol=1e-6, atol=1e-6)


def test_gae_lam_zero_is_one_step_td():
    rewards, values, mask = _batch(2)
    adv, _ = gae(rewards, values, mask, 0.9, 0.0)
    next_v = np.concatenate([values[:, 1:] * mask[:, 1:], np.zeros((len(LENGTHS), 1))], axis=1)
    np.testing.assert_allclose(adv, (rewards + 0.9 * next_v - values) * mask, rtol=1e-5, atol=1e-6)


def test_masked_mean_and_var():
    rng = np.random.default_rng(3)
    x = rng.normal(2.0, 3.0, size=(len(LENGTHS), T)).astype(np.float32)
    _, _, mask = _batch(3)
    sel = x[mask == 1]
    np.testing.assert_allclose(masked_mean(x, mask), sel.mean(), rtol=1e-5)
    np.testing.assert_allclose(masked_var(x, mask), sel.var(ddof=0), rtol=1e-5)
    rows = [x[i, :n].mean() if n else 0.0 for i, n in enumerate(LENGTHS)]  # empty row: 0, not NaN
    np.testing.assert_allclose(masked_mean(x, mask, axis=1), rows, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shift_mean", [True, False])
def test_whiten(shift_mean):
    rng = np.random.default_rng(4)
    x = rng.normal(5.0, 4.0, size=(len(LENGTHS), T)).astype(np.float32)
    _, _, mask = _batch(4)
    out = np.asarray(jax.jit(whiten, static_argnames="shift_mean")(x, mask, shift_mean=shift_mean))
    sel = x[mask == 1].astype(np.float64)
    want = (x - sel.mean()) / np.sqrt(sel.var() + 1e-8) + (0.0 if shift_mean else sel.mean())
    np.testing.assert_allclose(out[mask == 1], want[mask == 1], rtol=1e-4, atol=1e-4)
    assert np.all(out[mask == 0] == 0)
    got = out[mask == 1]
    np.testing.assert_allclose(got.mean(), 0.0 if shift_mean else sel.mean(), atol=1e-4)
    np.testing.assert_allclose(got.std(), 1.0, atol=1e-4)


def test_kl_estimators():
    rng = np.random.default_rng(5)
    logp = rng.normal(-3.0, 2.0, size=(4, 16)).astype(np.float32)
    ref = (logp + rng.normal(0.0, 1.0, size=logp.shape)).astype(np.float32)
    ref[0] = logp[0]  # equal log-probs: k3 is exactly 0
    ref[1] = logp[1] + rng.normal(0.0, 1e-4, size=16).astype(np.float32)  # near r = 1
    lp, rf = logp.astype(np.float64), ref.astype(np.float64)
    np.testing.assert_allclose(kl_penalty(logp, ref, "k1"), lp - rf, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(kl_penalty(logp, ref, "k2"), 0.5 * (lp - rf) ** 2, rtol=1e-5, atol=1e-6)
    ratio = np.exp(rf - lp)
    k3 = np.asarray(jax.jit(kl_penalty, static_argnums=2)(logp, ref, "k3"))
    np.testing.assert_allclose(k3, (ratio - 1) - np.log(ratio), rtol=1e-4, atol=1e-6)
    assert np.all(k3 >= 0) and np.all(k3[0] == 0)
    # Near r = 1 the penalty is ~ (log r)^2 / 2, far below float32 rounding of exp(log r):
    # a naive exp(x) - 1 - x goes negative there.
    near = rng.normal(0.0, 1e-3, size=4096).astype(np.float32)
    assert np.all(np.asarray(kl_penalty(jnp.zeros(4096), near, "k3")) >= 0)
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_penalty(logp, ref, "k4")


def _expected_beta(beta, kl, n, target, horizon):
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return beta * (1.0 + error * n / horizon)


@pytest.mark.parametrize("kl", [6.3, 5.5, 100.0, 0.0])  # inside the clip, then clipped both ways
def test_adaptive_beta(kl):
    config = KLConfig(init_beta=0.1, adaptive=True, target=6.0, horizon=1000)
    want = _expected_beta(0.1, kl, 64, 6.0, 1000)
    np.testing.assert_allclose(update_beta(0.1, kl, 64, config), want, rtol=1e-6)
    step = jax.jit(update_beta, static_argnames="config")
    got = step(jnp.float32(0.1), jnp.float32(kl), jnp.int32(64), config=config)
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_adaptive_beta_clip_bounds_and_direction():
    config = KLConfig(init_beta=1.0, adaptive=True, target=2.0, horizon=10)
    assert float(update_beta(1.0, 1e6, 10, config)) == pytest.approx(1.2)
    assert float(update_beta(1.0, 0.0, 10, config)) == pytest.approx(0.8)
    assert float(update_beta(1.0, 2.0, 10, config)) == pytest.approx(1.0)


def test_fixed_beta_unchanged():
    config = KLConfig(init_beta=0.05)
    assert update_beta(0.05, 100.0, 64, config) == 0.05
    got = jax.jit(update_beta, static_argnames="config")(jnp.float32(0.05), 100.0, 64, config=config)
    assert float(got) == np.float32(0.05)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"init_beta": -0.1}, "init_beta"),
        ({"init_beta": float("nan")}, "init_beta"),
        ({"target": 0.0}, "target"),
        ({"horizon": 0}, "horizon"),
        ({"estimator": "k9"}, "k1, k2, k3"),
    ],
)
def test_kl_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KLConfig(**kwargs)
