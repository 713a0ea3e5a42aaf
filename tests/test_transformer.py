"""Tests of `flanjax.models.transformer` and `flanjax.decode` against independent references.

* The forward pass of each family against Hugging Face transformers lives in test_hf.py
  (checkpoints saved by transformers and loaded by `flanjax.models.hf`).
* The model itself is the reference for its own fast paths: packed segments against each
  sequence alone, the KV cache and greedy `generate` against full forward passes without cache.
* Dropout, bfloat16 compute and config validation are checked against their specification.

Everything is tiny (vocabulary 97, width 32, 2 layers) so the file runs in seconds on CPU.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flanjax.decode import SamplingConfig, generate
from flanjax.models import stacking, transformer
from flanjax.models.transformer import KVCache, Transformer, TransformerConfig, attention_mask, rope, rope_frequencies
from flanjax.sharding import MeshConfig, Partitioner

LLAMA = TransformerConfig(
    vocab_size=97, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=64, max_len=32,
    rope_theta=10_000.0, norm_eps=1e-6,
)
# Qwen2: q/k/v biases, tied embeddings, and a different rope base to check that it is honoured.
QWEN2 = dataclasses.replace(LLAMA, qkv_bias=True, tie_embeddings=True, rope_theta=1e6)
# Mistral: a sliding window shorter than the test sequences.
MISTRAL = dataclasses.replace(LLAMA, sliding_window=3)
GPT2 = dataclasses.replace(
    LLAMA, num_kv_heads=None, norm="layer", norm_eps=1e-5, position="learned", mlp="gelu",
    qkv_bias=True, out_bias=True, mlp_bias=True, tie_embeddings=True,
)
# GPT-Neo: unscaled attention logits, a sliding window on the second layer only.
GPT_NEO = dataclasses.replace(GPT2, qkv_bias=False, attention_scale=1.0, sliding_window=3, sliding_window_layers=(1,))
# GPT-J: RoPE on part of each head, parallel attention and MLP, a biased untied output layer.
GPTJ = dataclasses.replace(
    GPT2, position="rope", rotary_dim=4, parallel_residual=True, qkv_bias=False, out_bias=False,
    tie_embeddings=False, lm_head_bias=True,
)
FAMILIES = {"llama": LLAMA, "mistral": MISTRAL, "qwen2": QWEN2, "gpt2": GPT2, "gpt_neo": GPT_NEO, "gptj": GPTJ}


def make_model(config: TransformerConfig, seed: int = 0, init_std: float = 0.2) -> Transformer:
    """A random model whose logits are O(1), so absolute tolerances and argmaxes mean something."""
    return Transformer(dataclasses.replace(config, init_std=init_std), rngs=nnx.Rngs(seed))


@nnx.jit
def apply(model, tokens, positions=None, segment_ids=None, cache=None, rngs=None):
    """The model call, compiled: one compilation per shape beats op-by-op dispatch on CPU."""
    return model(tokens, positions, segment_ids, cache=cache, rngs=rngs)


def random_tokens(shape, seed: int, vocab: int = 97) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=shape).astype(np.int32)


# --------------------------------------------------------------------------------------
# Packing, KV cache and greedy decoding against plain forward passes
# --------------------------------------------------------------------------------------


def forward(model, tokens, positions=None, segment_ids=None):
    """Logits of a full forward pass without cache, as numpy."""
    as_array = lambda x: None if x is None else jnp.asarray(x, jnp.int32)  # noqa: E731
    logits, _ = apply(model, as_array(tokens), as_array(positions), as_array(segment_ids))
    return np.asarray(logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_segments_match_separate_sequences(family):
    model = make_model(FAMILIES[family])
    a, b = random_tokens(5, seed=2), random_tokens(6, seed=3)
    padding = random_tokens(3, seed=4)  # arbitrary tokens in segment 0
    tokens = np.concatenate([a, b, padding])[None]
    positions = np.concatenate([np.arange(5), np.arange(6), np.arange(3)])[None]
    segments = np.repeat([1, 2, 0], [5, 6, 3])[None]

    packed = forward(model, tokens, positions, segments)[0]
    np.testing.assert_allclose(packed[:5], forward(model, a[None])[0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(packed[5:11], forward(model, b[None])[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("prompt_lengths", [(4, 4), (2, 6)])
def test_kv_cache_matches_full_forward(family, prompt_lengths):
    cfg = FAMILIES[family]
    model = make_model(cfg)
    steps, width = 4, 6  # prompts padded to a fixed width: fewer shapes to compile
    sequences = [random_tokens(n + steps, seed=10 + i) for i, n in enumerate(prompt_lengths)]
    expected = [forward(model, seq[None])[0] for seq in sequences]

    # Prefill left-padded prompts (random tokens in the padding, segment 0 there).
    prompts = random_tokens((2, width), seed=20)
    segments = np.zeros((2, width), np.int32)
    positions = np.zeros((2, width), np.int32)
    for row, (seq, n) in enumerate(zip(sequences, prompt_lengths)):
        prompts[row, width - n :], segments[row, width - n :], positions[row, width - n :] = seq[:n], 1, np.arange(n)
    cache = KVCache.empty(cfg, batch=2, length=width + steps)
    logits, cache = apply(model, jnp.asarray(prompts), jnp.asarray(positions), jnp.asarray(segments), cache)
    for row, n in enumerate(prompt_lengths):
        np.testing.assert_allclose(np.asarray(logits[row, width - n :]), expected[row][:n], atol=1e-5, rtol=0)

    # Then one token at a time into the same slot of every row, each at its own position.
    for i in range(steps):
        pos = np.array([[n + i] for n in prompt_lengths], np.int32)
        token = np.array([[seq[n + i]] for seq, n in zip(sequences, prompt_lengths)], np.int32)
        logits, cache = apply(model, jnp.asarray(token), jnp.asarray(pos), jnp.ones((2, 1), jnp.int32), cache)
        for row, n in enumerate(prompt_lengths):
            np.testing.assert_allclose(np.asarray(logits[row, 0]), expected[row][n + i], atol=1e-5, rtol=0)


def reference_greedy(model, prompt: np.ndarray, max_new_tokens: int) -> tuple[list[int], float]:
    """Argmax over full forward passes of the growing sequence; also the smallest top-2 margin."""
    seq, margin = list(prompt), np.inf
    for _ in range(max_new_tokens):
        last = forward(model, np.array(seq)[None])[0, -1]
        top2 = np.sort(last)[-2:]
        margin = min(margin, top2[1] - top2[0])
        seq.append(int(np.argmax(last)))
    return seq[len(prompt):], margin


def test_greedy_generate_matches_uncached_argmax():
    """Prompts of different lengths in one batch; EOS ends each row on its own."""
    model, new = make_model(LLAMA, seed=1), 5
    lengths = np.array([2, 4, 3], np.int32)
    prompts = random_tokens((3, 4), seed=30)  # tokens past each length are padding
    expected, margins = zip(*(reference_greedy(model, p[:n], new) for p, n in zip(prompts, lengths)))
    expected = np.array(expected)
    assert min(margins) > 1e-3  # no near-ties: the argmax is well defined

    graphdef, state = nnx.split(model)
    def greedy(eos):
        out = generate(graphdef, state, jnp.asarray(prompts), jnp.asarray(lengths), eos_id=eos, config=SamplingConfig(max_new_tokens=new))
        return np.asarray(out.tokens), np.asarray(out.lengths)

    tokens, generated = greedy(LLAMA.vocab_size)  # an EOS never generated
    np.testing.assert_array_equal(tokens, expected)
    np.testing.assert_array_equal(generated, [new] * 3)

    # EOS: the second token of row 0. Each row keeps its tokens up to its first EOS, then 0.
    eos = int(expected[0, 1])
    after_eos = np.cumsum(np.cumsum(expected == eos, axis=1), axis=1) > 1  # strictly after the first EOS
    assert after_eos[0, -1]  # the check below is not vacuous
    tokens, generated = greedy(eos)
    np.testing.assert_array_equal(tokens, np.where(after_eos, 0, expected))
    np.testing.assert_array_equal(generated, new - after_eos.sum(axis=1))


# --------------------------------------------------------------------------------------
# Scanned layers: the same numbers as unrolled ones
# --------------------------------------------------------------------------------------


def scanned_copy(model: Transformer) -> Transformer:
    """A scanned model holding `model`'s weights, stacked."""
    scanned = Transformer(dataclasses.replace(model.config, scan_layers=True), rngs=nnx.Rngs(0))
    state = nnx.state(scanned)
    nnx.replace_by_pure_dict(state, stacking.stack(nnx.to_pure_dict(nnx.state(model))))
    nnx.update(scanned, state)
    return scanned


@pytest.mark.parametrize("family", ["llama", "gpt_neo", "gptj"])  # GPT-Neo: windows on some layers only
def test_scanned_layers_compute_what_unrolled_layers_do(family):
    config = dataclasses.replace(FAMILIES[family], num_layers=3, residual_dropout=0.1, residual_dropout_top=0.3, attention_dropout=0.1)
    model = make_model(config)
    scanned = scanned_copy(model)
    assert nnx.state(scanned)["layers"]["attn"]["q"]["kernel"].shape[0] == 3
    tokens = jnp.asarray(random_tokens((2, 9), seed=40))
    for rngs in (None, 5):  # dropout: layer i folds the same key by i in both layouts
        run = lambda m: np.asarray(apply(m, tokens, rngs=None if rngs is None else nnx.Rngs(dropout=rngs))[0])  # noqa: E731
        np.testing.assert_allclose(run(scanned), run(model), atol=1e-5, rtol=0)

    def loss(m):
        return jnp.mean(jax.nn.log_softmax(m(tokens, rngs=nnx.Rngs(dropout=1))[0])[..., 0])

    expected = nnx.to_pure_dict(nnx.grad(loss)(model))
    got = stacking.unstack(nnx.to_pure_dict(nnx.grad(loss)(scanned)))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-4, atol=2e-6), expected, got)

    # Decoding through the stacked KV cache gives the same tokens.
    prompts, lengths = jnp.asarray(random_tokens((3, 4), seed=41)), jnp.asarray([2, 4, 3], jnp.int32)
    greedy = lambda m: np.asarray(generate(*nnx.split(m), prompts, lengths, eos_id=97, config=SamplingConfig(max_new_tokens=4)).tokens)  # noqa: E731
    np.testing.assert_array_equal(greedy(scanned), greedy(model))


def test_stacking_round_trips_and_keeps_shardings():
    partitioner = Partitioner.from_config(MeshConfig(data=2, fsdp=4))
    unrolled = nnx.to_pure_dict(partitioner.abstract_state(lambda: Transformer(LLAMA, rngs=nnx.Rngs(0)))[1])
    scanned_config = dataclasses.replace(LLAMA, scan_layers=True)
    scanned = nnx.to_pure_dict(partitioner.abstract_state(lambda: Transformer(scanned_config, rngs=nnx.Rngs(0)))[1])
    describe = lambda tree: jax.tree.map(lambda x: (x.shape, x.sharding.spec), tree)  # noqa: E731
    assert stacking.is_stacked(scanned) and not stacking.is_stacked(unrolled)
    assert describe(stacking.stack(unrolled)) == describe(scanned)
    assert describe(stacking.unstack(scanned)) == describe(unrolled)
    values = nnx.to_pure_dict(nnx.state(make_model(LLAMA)))
    jax.tree.map(np.testing.assert_array_equal, stacking.unstack(stacking.stack(values)), values)


# --------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------


def test_rope_is_a_rotation_by_relative_position():
    rng = np.random.default_rng(5)
    q, k = (jnp.asarray(rng.normal(size=(1, 1, 2, 8)), jnp.float32) for _ in range(2))
    rotate = lambda x, p: rope(x, jnp.array([[p]]), rope_frequencies(dataclasses.replace(LLAMA, rope_theta=100.0, head_dim=8)))  # noqa: E731
    np.testing.assert_allclose(jnp.linalg.norm(rotate(q, 7)), jnp.linalg.norm(q), rtol=1e-5)
    np.testing.assert_allclose(rotate(q, 0), q, atol=1e-6)
    # <rope(q, m), rope(k, n)> depends on m - n only, per head.
    dot = lambda m, n: jnp.sum(rotate(q, m) * rotate(k, n), axis=-1)  # noqa: E731
    np.testing.assert_allclose(dot(5, 2), dot(13, 10), atol=1e-5)
    assert not np.allclose(dot(5, 2), dot(5, 3), atol=1e-3)


def test_partial_rope_rotates_leading_dims_only():
    x = jnp.asarray(np.random.default_rng(5).normal(size=(1, 1, 2, 8)), jnp.float32)
    out = rope(x, jnp.array([[3]]), rope_frequencies(dataclasses.replace(LLAMA, head_dim=8, rotary_dim=4)))
    np.testing.assert_array_equal(out[..., 4:], x[..., 4:])
    assert not np.allclose(out[..., :4], x[..., :4])


@pytest.mark.parametrize(
    "scaling",
    [dict(rope_type="linear", factor=4.0),
     dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64)],
)  # fmt: skip
def test_rope_scaling_matches_hugging_face(scaling):
    import torch  # noqa: F401  (transformers' RoPE functions are written in torch)
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = dataclasses.replace(LLAMA, head_dim=16, rope_theta=500.0, rope_scaling=scaling)
    hf = LlamaConfig(hidden_size=64, num_attention_heads=4, head_dim=16, rope_parameters={**scaling, "rope_theta": 500.0})
    expected, attention_factor = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](hf, "cpu")
    assert attention_factor == 1.0
    np.testing.assert_allclose(rope_frequencies(cfg), expected.numpy(), rtol=1e-6)
    assert not np.allclose(rope_frequencies(cfg), rope_frequencies(dataclasses.replace(cfg, rope_scaling=None)))


def test_attention_mask_matches_loops():
    rng = np.random.default_rng(6)
    qs, qp = rng.integers(0, 3, (2, 5)), rng.integers(0, 6, (2, 5))
    ks, kp = rng.integers(0, 3, (2, 7)), rng.integers(0, 6, (2, 7))
    for window in (None, 2):
        expected = np.array(
            [[[qs[b, t] == ks[b, s] and 0 <= qp[b, t] - kp[b, s] < (window or 99) for s in range(7)] for t in range(5)]
             for b in range(2)]
        )  # fmt: skip
        np.testing.assert_array_equal(attention_mask(*map(jnp.asarray, (qs, qp, ks, kp)), window), expected)


# --------------------------------------------------------------------------------------
# Dropout, bfloat16, validation
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("layers, bottom, top", [(4, 0.0, 0.3), (3, 0.1, 0.1), (3, 0.2, None), (1, 0.1, 0.3)])
def test_residual_dropout_is_linear_in_depth(layers, bottom, top, monkeypatch):
    cfg = dataclasses.replace(LLAMA, num_layers=layers, residual_dropout=bottom, residual_dropout_top=top)
    expected = np.linspace(bottom, bottom if top is None else top, layers) if layers > 1 else [bottom]
    np.testing.assert_allclose(cfg.residual_dropout_rates(), expected, atol=1e-12)
    # Each layer drops its attention and its MLP output at its own rate (called eagerly, in order).
    seen = []
    monkeypatch.setattr(transformer, "dropout", lambda x, rate, key: seen.append(float(rate)) or x)
    Transformer(cfg, rngs=nnx.Rngs(0))(jnp.asarray(random_tokens((1, 4), seed=0)), rngs=nnx.Rngs(dropout=0))
    np.testing.assert_allclose(seen, np.repeat(expected, 2) if any(expected) else [], atol=1e-6)


def test_dropout_drops_at_its_rate_and_keeps_the_mean():
    x = jnp.ones((200_000,))
    for rate in (0.1, 0.3):
        y = np.asarray(transformer.dropout(x, jnp.float32(rate), jax.random.key(0)))
        assert abs((y == 0).mean() - rate) < 0.005
        assert abs(y.mean() - 1.0) < 0.01


@pytest.mark.parametrize(
    "dropout",
    [dict(embed_dropout=0.2), dict(attention_dropout=0.2), dict(residual_dropout=0.1, residual_dropout_top=0.3)],
    ids=["embed", "attention", "residual"],
)
def test_dropout_is_deterministic_without_rngs(dropout):
    model = make_model(dataclasses.replace(LLAMA, **dropout))
    plain = make_model(LLAMA)  # same seed, same parameters, no dropout
    tokens = jnp.asarray(random_tokens((2, 8), seed=7))
    run = lambda m, rngs=None: np.asarray(apply(m, tokens, rngs=rngs)[0])  # noqa: E731

    np.testing.assert_array_equal(run(model), run(plain))
    np.testing.assert_array_equal(run(model, nnx.Rngs(dropout=1)), run(model, nnx.Rngs(dropout=1)))
    assert not np.allclose(run(model, nnx.Rngs(dropout=1)), run(model, nnx.Rngs(dropout=2)))
    assert not np.allclose(run(model, nnx.Rngs(dropout=1)), run(model))


def test_attention_dropout_path_matches_fused_attention_at_rate_zero():
    """The hand-written attention used for attention dropout agrees with the fused one (GQA)."""
    model = make_model(dataclasses.replace(LLAMA, attention_dropout=0.2))
    for block in model.layers:
        block.attn.dropout.rate = 0.0  # keep the hand-written path, drop nothing
    tokens = jnp.asarray(random_tokens((2, 8), seed=8))
    segments = jnp.asarray(np.repeat([[1, 2]], 4, axis=1))  # two packed segments per row
    positions = jnp.asarray(np.tile(np.arange(4), (2, 2)))
    manual = apply(model, tokens, positions, segments, rngs=nnx.Rngs(dropout=0))[0]
    fused = apply(model, tokens, positions, segments)[0]
    np.testing.assert_allclose(np.asarray(manual), np.asarray(fused), atol=1e-5, rtol=0)


def test_bfloat16_compute_keeps_float32_params():
    model32 = make_model(LLAMA)
    model16 = make_model(dataclasses.replace(LLAMA, dtype="bfloat16"))
    params = nnx.to_flat_state(nnx.state(model16, nnx.Param))
    assert all(var[...].dtype == jnp.float32 for _, var in params)

    tokens = jnp.asarray(random_tokens((2, 8), seed=9))
    logits16, logits32 = apply(model16, tokens)[0], np.asarray(apply(model32, tokens)[0])
    assert logits16.dtype == jnp.bfloat16
    error = np.abs(np.asarray(logits16, np.float32) - logits32).max()
    assert 0 < error < 5e-2 * np.abs(logits32).max()


@pytest.mark.parametrize(
    "config",
    [*FAMILIES.values(), dataclasses.replace(LLAMA, qkv_bias=True, out_bias=True, mlp_bias=True, norm="layer", head_dim=4)],
    ids=[*FAMILIES, "llama_with_biases"],
)
def test_num_params_counts_every_parameter(config):
    model = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    sizes = {path: var.get_value().size for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    embeddings = sum(size for path, size in sizes.items() if path[0] in ("embed", "positions", "lm_head"))
    assert config.num_params() == sum(sizes.values())
    assert config.num_params(include_embeddings=False) == sum(sizes.values()) - embeddings


@pytest.mark.parametrize(
    "kwargs, message",
    [(dict(num_heads=4, num_kv_heads=3), "multiple of num_kv_heads"), (dict(d_model=30, num_heads=4), "head_dim"),
     (dict(attention="flash"), "attention='flash' is not one of xla, cudnn")],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TransformerConfig(**{**dict(vocab_size=97, d_model=32, num_layers=2, num_heads=4, d_ff=64), **kwargs})
