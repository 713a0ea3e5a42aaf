"""Reference point: the bench_27m training step written in plain JAX + optax (no Flax).

A LLaMA-style model in ~40 lines (2-D weights, RMSNorm, RoPE, causal `dot_product_attention`,
SwiGLU), trained with optax AdamW on random tokens. It separates what XLA itself achieves on
this machine from what flanjax's model code adds or costs. Prints one JSON object.

    .venv/bin/python benchmarks/plain_jax_train.py --batch_size=8 --seq_len=256
"""

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import optax

V, D, F, L, H = 8192, 512, 1408, 6, 8  # bench_27m


def init(key):
    keys = iter(jax.random.split(key, 2 + 7 * L))
    normal = lambda shape: jax.random.normal(next(keys), shape) * 0.02  # noqa: E731
    layer = lambda: dict(  # noqa: E731
        wq=normal((D, D)), wk=normal((D, D)), wv=normal((D, D)), wo=normal((D, D)),
        wg=normal((D, F)), wu=normal((D, F)), wd=normal((F, D)), n1=jnp.ones(D), n2=jnp.ones(D),
    )  # fmt: skip
    return {"emb": normal((V, D)), "head": normal((D, V)), "norm": jnp.ones(D), "layers": [layer() for _ in range(L)]}


def rms(x, w):
    return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * w


def rope(x, positions):
    half = x.shape[-1] // 2
    angles = positions[:, None] * 10000.0 ** (-jnp.arange(half) / half)
    sin, cos = jnp.sin(angles)[None, :, None], jnp.cos(angles)[None, :, None]
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def loss(params, tokens, targets):
    b, t = tokens.shape
    x, positions = params["emb"][tokens], jnp.arange(t)
    for p in params["layers"]:
        h = rms(x, p["n1"])
        q, k, v = ((h @ p[w]).reshape(b, t, H, D // H) for w in ("wq", "wk", "wv"))
        attn = jax.nn.dot_product_attention(rope(q, positions), rope(k, positions), v, is_causal=True)
        x = x + attn.reshape(b, t, D) @ p["wo"]
        h = rms(x, p["n2"])
        x = x + (jax.nn.silu(h @ p["wg"]) * (h @ p["wu"])) @ p["wd"]
    logits = rms(x, params["norm"]) @ params["head"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    tx = optax.adamw(1e-4, b1=0.9, b2=0.95, weight_decay=0.1)

    @jax.jit
    def step(params, opt_state, tokens, targets):
        value, grads = jax.value_and_grad(loss)(params, tokens, targets)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    params = init(jax.random.key(0))
    opt_state = tx.init(params)
    tokens = jax.random.randint(jax.random.key(1), (args.batch_size, args.seq_len + 1), 0, V)
    times = []
    for _ in range(args.warmup + args.steps):
        start = time.perf_counter()
        params, opt_state, value = step(params, opt_state, tokens[:, :-1], tokens[:, 1:])
        value.block_until_ready()
        times.append(time.perf_counter() - start)
    step_time = statistics.median(times[args.warmup :])
    print(json.dumps({
        "framework": "plain_jax", "model": "bench_27m", "batch_size": args.batch_size, "seq_len": args.seq_len,
        "step_time_s": step_time, "tokens_per_s": args.batch_size * args.seq_len / step_time,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
