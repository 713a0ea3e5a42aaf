"""int8 decoding: quantised projections against NumPy, and agreement with float32 decoding."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flanjax.decode import SamplingConfig, generate
from flanjax.models.lora import LoraConfig, apply_lora, lora_modules
from flanjax.models.quantize import QuantizedProjection, quantize
from flanjax.models.transformer import KVCache, Transformer, TransformerConfig


def numpy_int8(kernel: np.ndarray, num_in: int):
    """Reference: per output channel, scale = absmax over the input dims / 127."""
    axes = tuple(range(num_in))
    scale = np.abs(kernel).max(axis=axes, keepdims=True) / 127.0
    return np.clip(np.round(kernel / scale), -127, 127), scale


PROJECTIONS = {
    "linear": (lambda r: nnx.Linear(6, 5, use_bias=True, rngs=r), (2, 3, 6), 1, "...i,io->...o"),
    "einsum_q": (lambda r: nnx.Einsum("btd,dnh->btnh", (6, 2, 3), rngs=r), (2, 3, 6), 1, "btd,dnh->btnh"),
    "einsum_o": (lambda r: nnx.Einsum("btnh,nhd->btd", (2, 3, 6), (6,), rngs=r), (2, 3, 2, 3), 2, "btnh,nhd->btd"),
}


@pytest.mark.parametrize("name", PROJECTIONS)
def test_quantized_projections_match_numpy(name):
    make, x_shape, num_in, spec = PROJECTIONS[name]
    base = make(nnx.Rngs(0))
    if getattr(base, "bias", None) is not None:
        base.bias[...] = jax.random.normal(jax.random.key(1), base.bias.shape)
    x = np.asarray(jax.random.normal(jax.random.key(2), x_shape))
    kernel = np.asarray(base.kernel[...], np.float64)
    values, scale = numpy_int8(kernel, num_in)
    bias = 0 if base.bias is None else np.asarray(base.bias[...])

    weight_only = np.einsum(spec, x, values * scale) + bias
    np.testing.assert_allclose(np.asarray(QuantizedProjection(base, "int8")(jnp.asarray(x))), weight_only, atol=1e-5)

    x_axes = tuple(range(x.ndim - num_in, x.ndim))  # each row of x gets its own scale
    x_scale = np.abs(x).max(axis=x_axes, keepdims=True) / 127.0
    rows = np.round(x / x_scale)
    dynamic = np.einsum(spec, rows, values) * x_scale.reshape(x_scale.shape[: x.ndim - num_in] + (1,) * (kernel.ndim - num_in))
    dynamic = dynamic * scale.reshape(kernel.shape[num_in:]) + bias
    np.testing.assert_allclose(np.asarray(QuantizedProjection(base, "int8_dynamic")(jnp.asarray(x))), dynamic, atol=1e-4)
    # And both stay close to the float projection.
    np.testing.assert_allclose(weight_only, np.asarray(base(jnp.asarray(x))), atol=0.05)


CONFIG = TransformerConfig(vocab_size=97, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=128, max_len=48, init_std=0.1)


def teacher_forced(model, tokens):
    logits, _ = model(tokens)
    return jax.nn.log_softmax(logits.astype(jnp.float32))


@pytest.mark.parametrize("scan", [False, True])
def test_int8_decoding_agrees_with_float32(scan):
    """Greedy decoding with int8 weights is the float decoder's, quantised: the float model's
    greedy tokens are the int8 model's argmax at most positions (with the same prefix), and
    log-likelihoods move little."""
    config = dataclasses.replace(CONFIG, scan_layers=scan)
    model = Transformer(config, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    prompts = jnp.asarray(np.random.default_rng(0).integers(1, 97, (8, 8)), jnp.int32)
    lengths = jnp.full((8,), 8, jnp.int32)
    greedy = generate(graphdef, state, prompts, lengths, eos_id=-1, config=SamplingConfig(max_new_tokens=24)).tokens
    tokens = jnp.concatenate([prompts, greedy], axis=1)
    reference = teacher_forced(model, tokens)
    for mode, nats in (("int8", 0.02), ("int8_dynamic", 0.03)):  # measured: 0.011 and 0.016 nats per token
        quantized = teacher_forced(quantize(nnx.merge(graphdef, state), mode), tokens)
        positions = slice(7, -1)  # every position that predicts a generated token
        agreement = float(jnp.mean(jnp.argmax(quantized[:, positions], -1) == jnp.argmax(reference[:, positions], -1)))
        assert agreement >= 0.9, (mode, agreement)  # measured: 0.95-0.96
        targets = tokens[:, 8:, None]
        drift = jnp.abs(jnp.take_along_axis(quantized[:, positions], targets, -1) - jnp.take_along_axis(reference[:, positions], targets, -1))
        assert float(jnp.mean(drift)) < nats, (mode, float(jnp.mean(drift)))

    # The int8 KV cache (what generate() decodes with) keeps the same logits up to its rounding.
    model = quantize(nnx.merge(graphdef, state), "int8")
    full = model(tokens)[0]
    cached = model(tokens, cache=KVCache.empty(config, 8, tokens.shape[1], quantized=True))[0]
    np.testing.assert_allclose(np.asarray(cached), np.asarray(full), atol=0.05 * float(jnp.std(full)))
    assert float(jnp.mean(jnp.argmax(cached, -1) == jnp.argmax(full, -1))) >= 0.95
    out = generate(graphdef, state, prompts, lengths, eos_id=-1, config=SamplingConfig(max_new_tokens=24, quantize="int8"))
    assert out.tokens.shape == (8, 24) and bool(jnp.all(out.lengths == 24))


def test_lora_adapters_stay_float_over_an_int8_base():
    model = Transformer(CONFIG, rngs=nnx.Rngs(0))
    apply_lora(model, LoraConfig(rank=4, targets=(r"attn/q$",)), rngs=nnx.Rngs(1))
    for _, m in lora_modules(model):
        m.lora_b[...] = 0.1 * jax.random.normal(jax.random.key(3), m.lora_b.shape)
    quantize(model, "int8")
    (_, lora), *_ = lora_modules(model)
    assert isinstance(lora.base, QuantizedProjection) and lora.base.kernel[...].dtype == jnp.int8
    assert lora.lora_a[...].dtype == jnp.float32
    with pytest.raises(ValueError, match="quantize='int4' is not one of none, int8, int8_dynamic"):
        quantize(model, "int4")
