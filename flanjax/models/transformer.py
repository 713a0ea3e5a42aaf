"""A decoder-only Transformer language model in Flax NNX.

One `TransformerConfig` covers the LLaMA family (RMSNorm, RoPE, SwiGLU, grouped-query
attention; Mistral and Qwen2 are switches on it) and the GPT-2 family (LayerNorm, learned
positions, GELU, biases; GPT-Neo and GPT-J are switches on it). Every parameter names its logical axes and the main
activations are constrained by logical axes too; `flanjax.sharding` maps both to the mesh.

Shapes use the letters of the einsum strings: b batch, t query length, s key length,
d model width, n query heads, k key/value heads, h head width, f feed-forward width,
v vocabulary, l layers.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flanjax.models.lora import LoRA, LoraConfig, apply_lora
from flanjax.models.quantize import absmax_int8
from flanjax.sharding import constrain

Axes = tuple[str | None, ...]


# `TransformerConfig.remat` -> the jax.checkpoint policy of each layer (None: no remat).
REMAT_POLICIES = {
    "none": None,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "full": jax.checkpoint_policies.nothing_saveable,
}


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    vocab_size: int
    d_model: int
    num_layers: int
    num_heads: int
    d_ff: int
    # Fewer key/value heads than query heads is grouped-query attention; None means as many.
    num_kv_heads: int | None = None
    # None means d_model // num_heads.
    head_dim: int | None = None
    # Longest sequence: size of the learned position table and the default KV-cache length.
    max_len: int = 2048

    # Family switches. LLaMA: rms / rope / swiglu; GPT-2: layer / learned / gelu / biases.
    norm: Literal["rms", "layer"] = "rms"
    norm_eps: float = 1e-6
    position: Literal["rope", "learned"] = "rope"
    rope_theta: float = 10_000.0
    # Hugging Face `rope_parameters` of a scaled RoPE ({"rope_type": "linear" | "llama3", ...});
    # stored as sorted (key, value) pairs so the config stays hashable.
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    rotary_dim: int | None = None  # leading head dims that RoPE rotates; None: all (GPT-J: 64)
    mlp: Literal["swiglu", "gelu"] = "swiglu"
    qkv_bias: bool = False  # biases on q, k, v (GPT-2, Qwen2)
    out_bias: bool = False  # bias on the attention output (GPT-2, GPT-Neo)
    mlp_bias: bool = False  # biases on the MLP (GPT-2, GPT-Neo, GPT-J)
    lm_head_bias: bool = False  # GPT-J
    tie_embeddings: bool = False
    # GPT-J: x + attn(norm(x)) + mlp(norm(x)), one norm per block.
    parallel_residual: bool = False
    # Attention logits are scaled by this; None: 1/sqrt(head width). GPT-Neo does not scale (1.0).
    attention_scale: float | None = None
    # Queries see only keys fewer than this many positions back (Mistral, GPT-Neo's local
    # layers); on the layers listed, or on all when `sliding_window_layers` is None.
    sliding_window: int | None = None
    sliding_window_layers: tuple[int, ...] | None = None

    # Regularisation. Residual dropout grows linearly with depth from `residual_dropout` at
    # the first layer to `residual_dropout_top` at the last (LIMA: 0.0 -> 0.3).
    embed_dropout: float = 0.0
    attention_dropout: float = 0.0
    residual_dropout: float = 0.0
    residual_dropout_top: float | None = None

    # What the backward pass keeps of each layer (training only; the forward pass is the same):
    # "none" every activation; "save_dots" the matmul outputs, the rest recomputed; "full"
    # only the layer's input, the whole layer recomputed (least memory, ~1/3 more compute).
    remat: Literal["none", "save_dots", "full"] = "none"
    # Layers stacked along a leading "layers" axis and run by one `lax.scan`: compile time stays
    # flat in depth. Checkpoints then hold the stacked arrays; `flanjax.models.stacking` converts
    # between the layouts wherever weights are read (checkpoints, Hugging Face import/export).
    scan_layers: bool = False
    # The attention kernel of training and scoring passes (not of KV-cache decoding): "xla"
    # (any backend) or "cudnn" (cuDNN's fused flash attention; NVIDIA GPUs, bfloat16/float16).
    attention: Literal["xla", "cudnn"] = "xla"

    # Numerics: parameters stay float32; `dtype` is the compute dtype (e.g. "bfloat16").
    dtype: str = "float32"
    param_dtype: str = "float32"
    init_std: float = 0.02

    def __post_init__(self):
        # gin and JSON give lists and dicts; keep the config hashable.
        if isinstance(self.rope_scaling, (dict, list)):
            object.__setattr__(self, "rope_scaling", tuple(sorted(dict(self.rope_scaling).items())))
        if self.sliding_window_layers is not None:
            object.__setattr__(self, "sliding_window_layers", tuple(self.sliding_window_layers))
        if self.attention not in ("xla", "cudnn"):
            raise ValueError(f"attention={self.attention!r} is not one of xla, cudnn.")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r} is not one of {', '.join(REMAT_POLICIES)}.")
        rope_type = dict(self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in ("default", "linear", "llama3"):
            raise ValueError(f"rope_type={rope_type!r} is not supported (flanjax implements default, linear, llama3).")
        if self.d_model % self.num_heads and self.head_dim is None:
            raise ValueError(
                f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}; "
                "set head_dim explicitly."
            )
        if self.num_heads % self.kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.kv_heads}."
            )

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def head_size(self) -> int:
        return self.head_dim or self.d_model // self.num_heads

    def window(self, layer: int) -> int | None:
        """The sliding window of `layer`, or None for full attention."""
        if self.sliding_window_layers is None or layer in self.sliding_window_layers:
            return self.sliding_window
        return None

    def windows(self) -> jax.Array | None:
        """Every layer's window as an array (full attention: a window longer than any sequence),
        or None when no layer has one."""
        if self.sliding_window is None:
            return None
        return jnp.asarray([self.window(i) or np.iinfo(np.int32).max for i in range(self.num_layers)], jnp.int32)

    def residual_dropout_rates(self) -> tuple[float, ...]:
        """One rate per layer, linear from bottom to top."""
        top = self.residual_dropout if self.residual_dropout_top is None else self.residual_dropout_top
        if self.num_layers == 1:
            return (self.residual_dropout,)
        step = (top - self.residual_dropout) / (self.num_layers - 1)
        return tuple(self.residual_dropout + i * step for i in range(self.num_layers))

    def num_params(self, include_embeddings: bool = True) -> int:
        d, f, n, k, h = self.d_model, self.d_ff, self.num_heads, self.kv_heads, self.head_size
        attn = d * n * h * 2 + d * k * h * 2 + self.qkv_bias * (n + 2 * k) * h + self.out_bias * d
        mlp = d * f * (3 if self.mlp == "swiglu" else 2) + self.mlp_bias * (f * (2 if self.mlp == "swiglu" else 1) + d)
        norm = d * (2 if self.norm == "layer" else 1)  # LayerNorm has a bias too
        per_layer = attn + mlp + (1 if self.parallel_residual else 2) * norm
        embed = self.vocab_size * d * (1 if self.tie_embeddings else 2) + self.lm_head_bias * self.vocab_size
        if self.position == "learned":
            embed += self.max_len * d
        return self.num_layers * per_layer + norm + (embed if include_embeddings else 0)


class KVCache(NamedTuple):
    """Keys and values of every layer, filled slot by slot from the left.

    Every call writes its `t` tokens at slots [index, index + t) of all rows at once (one
    in-place update, however the rows differ), so prompts of different lengths are
    left-padded: padding slots keep segment id 0 and are never attended to, while each
    token's own position (for RoPE) comes in separately.

    k, v: [l, b, k, s, h], all layers in one array (a scan over layers carries it and updates
    its layer in place; each layer's [b, k, s, h] is the layout the attention dots read without
    a transpose); segment_ids: [b, s], 0 where nothing (or padding) was written; index: the
    next free slot. A quantised cache holds k and v in int8 with one float32 scale per
    written vector, `k_scale` and `v_scale` [l, b, k, s] (None otherwise): a quarter of the
    bytes that decoding reads at every step.
    """

    k: jax.Array
    v: jax.Array
    segment_ids: jax.Array
    index: jax.Array
    k_scale: jax.Array | None = None
    v_scale: jax.Array | None = None

    @classmethod
    def empty(cls, config: TransformerConfig, batch: int, length: int | None = None, quantized: bool = False) -> KVCache:
        length = length or config.max_len
        shape = (config.num_layers, batch, config.kv_heads, length, config.head_size)
        axes = ("activation_layers", "activation_batch", "activation_kv_heads", "activation_length", "activation_head_dim")
        dtype = jnp.int8 if quantized else jnp.dtype(config.dtype)
        layers = lambda shape, axes, dtype: constrain(jnp.zeros(shape, dtype), axes)  # noqa: E731
        scales = lambda: layers(shape[:-1], axes[:-1], jnp.float32) if quantized else None  # noqa: E731
        segments = constrain(jnp.zeros((batch, length), jnp.int32), ("activation_batch", "activation_length"))
        return cls(layers(shape, axes, dtype), layers(shape, axes, dtype), segments, jnp.zeros((), jnp.int32), scales(), scales())

    def rows(self, index: jax.Array) -> KVCache:
        """The cache of rows `index` (e.g. each prompt repeated once per option)."""
        take = lambda x, axis: None if x is None else jnp.take(x, index, axis=axis)  # noqa: E731
        return KVCache(take(self.k, 1), take(self.v, 1), take(self.segment_ids, 0), self.index, take(self.k_scale, 1), take(self.v_scale, 1))


# Parameters record their logical axes but are not sharded eagerly: models can be built
# without a mesh (tests, conversion), and `Partitioner.create` places them through jit's
# output shardings.
def _partitioned(init, axes: Axes):
    return nnx.with_partitioning(init, axes, eager_sharding=False)


def _init(config: TransformerConfig, axes: Axes, std: float | None = None):
    return _partitioned(nnx.initializers.normal(std or config.init_std), axes)


def _zeros(axes: Axes):
    return _partitioned(nnx.initializers.zeros_init(), axes)


def _norm(config: TransformerConfig, rngs: nnx.Rngs) -> nnx.Module:
    common = dict(
        epsilon=config.norm_eps,
        dtype=jnp.dtype(config.dtype),
        param_dtype=jnp.dtype(config.param_dtype),
        scale_init=_partitioned(nnx.initializers.ones_init(), ("norm",)),
        rngs=rngs,
    )
    if config.norm == "rms":
        return nnx.RMSNorm(config.d_model, **common)
    return nnx.LayerNorm(config.d_model, bias_init=_zeros(("norm",)), **common)


def rope_frequencies(config: TransformerConfig) -> np.ndarray:
    """Inverse frequencies [rotary_dim / 2] of RoPE, with Hugging Face's linear or LLaMA-3 scaling."""
    dim = config.rotary_dim or config.head_size
    inv_freq = 1.0 / config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    scaling = dict(config.rope_scaling or {})
    kind, factor = scaling.get("rope_type", "default"), scaling.get("factor", 1.0)
    if kind == "linear":
        inv_freq = inv_freq / factor
    elif kind == "llama3":  # long wavelengths slowed by `factor`, short ones kept, smooth between
        original = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = original / scaling["low_freq_factor"], original / scaling["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (original / wavelen - scaling["low_freq_factor"]) / (scaling["high_freq_factor"] - scaling["low_freq_factor"])
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = np.where(wavelen > low_wavelen, inv_freq / factor, np.where(wavelen < high_wavelen, inv_freq, blended))
    return inv_freq.astype(np.float32)


def rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotary embedding, rotate-half layout (LLaMA), of the first 2 * len(inv_freq) dims of each
    head (the rest pass through, as GPT-J's). x: [b, t, n, h]; positions: [b, t]."""
    half = len(inv_freq)
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [b, t, half]
    sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
    x1, x2, rest = jnp.split(x.astype(jnp.float32), [half, 2 * half], axis=-1)
    rotated = [x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest]
    return jnp.concatenate(rotated, axis=-1).astype(x.dtype)


def attention_mask(
    q_segments: jax.Array,
    q_positions: jax.Array,
    k_segments: jax.Array,
    k_positions: jax.Array,
    window: int | None = None,
) -> jax.Array:
    """[b, t, s] boolean: same packed segment, not in the future and, with a sliding
    `window`, fewer than `window` positions back."""
    same = q_segments[:, :, None] == k_segments[:, None, :]
    back = q_positions[:, :, None] - k_positions[:, None, :]
    allowed = back >= 0 if window is None else (back >= 0) & (back < window)
    return same & allowed


class Attention(nnx.Module):
    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        self.config = config
        d, n, k, h = config.d_model, config.num_heads, config.kv_heads, config.head_size
        dtype, pdtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
        qkv_bias = config.qkv_bias

        def proj(spec, shape, axes, bias_shape, bias_axes, std=None):
            return nnx.Einsum(
                spec,
                shape,
                bias_shape if bias_shape else None,
                kernel_init=_init(config, axes, std),
                bias_init=_zeros(bias_axes),
                dtype=dtype,
                param_dtype=pdtype,
                rngs=rngs,
            )

        self.q = proj("btd,dnh->btnh", (d, n, h), ("embed", "heads", "head_dim"), qkv_bias and (n, h), ("heads", "head_dim"))
        self.k = proj("bsd,dkh->bskh", (d, k, h), ("embed", "kv_heads", "head_dim"), qkv_bias and (k, h), ("kv_heads", "head_dim"))
        self.v = proj("bsd,dkh->bskh", (d, k, h), ("embed", "kv_heads", "head_dim"), qkv_bias and (k, h), ("kv_heads", "head_dim"))
        out_std = config.init_std / (2 * config.num_layers) ** 0.5  # GPT-2's residual scaling
        self.o = proj("btnh,nhd->btd", (n, h, d), ("heads", "head_dim", "embed"), config.out_bias and (d,), ("embed",), out_std)
        self.dropout = nnx.Dropout(config.attention_dropout)

    def __call__(
        self,
        x: jax.Array,  # [b, t, d]
        positions: jax.Array,  # [b, t]
        segment_ids: jax.Array,  # [b, t]
        cache: KVCache | None,  # segment ids already updated for these tokens
        layer: jax.Array | int,
        window: jax.Array | None,  # this layer's sliding window; None: full attention
        rngs: nnx.Rngs | None,
    ) -> tuple[jax.Array, KVCache | None]:
        cfg = self.config
        q = constrain(project(self.q, x, rngs), ("activation_batch", "activation_length", "activation_heads", "activation_head_dim"))
        k = constrain(project(self.k, x, rngs), ("activation_batch", "activation_length", "activation_kv_heads", "activation_head_dim"))
        v = constrain(project(self.v, x, rngs), ("activation_batch", "activation_length", "activation_kv_heads", "activation_head_dim"))
        if cfg.position == "rope":
            inv_freq = rope_frequencies(cfg)
            q, k = rope(q, positions, inv_freq), rope(k, positions, inv_freq)
        scale = cfg.head_size**-0.5 if cfg.attention_scale is None else cfg.attention_scale

        if cache is None:
            mask = attention_mask(segment_ids, positions, segment_ids, positions, window)  # [b, t, s]
            if cfg.attention_dropout and rngs is not None:
                dropout = lambda p: self.dropout(p, rngs=rngs)  # noqa: E731
                out = _attend(q, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), mask, scale, dropout)
            else:
                # The mask already holds causality; saying so lets cuDNN skip the upper triangle.
                out = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], scale=scale, implementation=cfg.attention,
                                                   is_causal=cfg.attention == "cudnn")  # fmt: skip  [b, t, n, h]
        else:
            cache, (k, k_scale), (v, v_scale) = _write_cache(cache, layer, k, v)
            # Causality by slot: slots are filled in order, whatever each row's positions.
            b, t = segment_ids.shape
            q_slots = jnp.broadcast_to(cache.index + jnp.arange(t), (b, t))
            k_slots = jnp.broadcast_to(jnp.arange(k.shape[2]), cache.segment_ids.shape)
            # Within a row, slot distance is position distance (rows are contiguous after padding).
            mask = attention_mask(segment_ids, q_slots, cache.segment_ids, k_slots, window)
            out = _attend(q, k, v, mask, scale, k_scale=k_scale, v_scale=v_scale)
        out = constrain(out, ("activation_batch", "activation_length", "activation_heads", "activation_head_dim"))
        return project(self.o, out, rngs), cache


def project(module: nnx.Module, x: jax.Array, rngs: nnx.Rngs | None) -> jax.Array:
    """A projection of `x`; LoRA adapters also get the dropout randomness."""
    return module(x, rngs=rngs) if isinstance(module, LoRA) else module(x)


def _write_cache(cache: KVCache, layer: jax.Array | int, k: jax.Array, v: jax.Array):
    """Writes this layer's new keys/values [b, t, k, h] at the cache's next slots; returns the
    cache and the layer's keys and values [b, k, s, h] with their scales [b, k, s] (None for a
    float cache)."""

    def write(arrays, scales, new):
        new = jnp.swapaxes(new, 1, 2)[None]  # [1, b, k, t, h]
        if scales is not None:  # int8, one scale per vector
            new, scale = absmax_int8(new, (-1,))
            scales = jax.lax.dynamic_update_slice(scales, scale[..., 0], (layer, 0, 0, cache.index))
        arrays = jax.lax.dynamic_update_slice(arrays, new.astype(arrays.dtype), (layer, 0, 0, cache.index, 0))
        pick = lambda x: None if x is None else jax.lax.dynamic_index_in_dim(x, layer, keepdims=False)  # noqa: E731
        return arrays, scales, pick(arrays), pick(scales)

    ks, k_scales, k, k_scale = write(cache.k, cache.k_scale, k)
    vs, v_scales, v, v_scale = write(cache.v, cache.v_scale, v)
    return cache._replace(k=ks, v=vs, k_scale=k_scales, v_scale=v_scales), (k, k_scale), (v, v_scale)


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float, dropout=None,
            k_scale: jax.Array | None = None, v_scale: jax.Array | None = None) -> jax.Array:  # fmt: skip
    """Attention of q [b, t, n, h] over k, v [b, k, s, h] (a cache layer's layout); mask [b, t, s].
    int8 keys and values come with their scales [b, k, s], applied to the scores and the
    weights (the dots read int8).

    Written out (rather than `jax.nn.dot_product_attention`) for the cache layout and for
    dropout on the attention weights.
    """
    b, t, n, h = q.shape
    q = q.reshape(b, t, k.shape[1], n // k.shape[1], h)
    per_slot = lambda x: 1.0 if x is None else x[:, :, None, None, :]  # noqa: E731  [b, k, 1, 1, s]
    scores = jnp.einsum("btkgh,bksh->bkgts", q, k.astype(q.dtype)).astype(jnp.float32) * per_slot(k_scale) * scale
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    if dropout is not None:
        probs = dropout(probs)
    dtype = q.dtype if v_scale is not None else v.dtype
    return jnp.einsum("bkgts,bksh->btkgh", (probs * per_slot(v_scale)).astype(dtype), v.astype(dtype)).reshape(b, t, n, h)


class MLP(nnx.Module):
    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        self.config = config
        d, f = config.d_model, config.d_ff
        out_std = config.init_std / (2 * config.num_layers) ** 0.5

        def linear(n_in, n_out, axes, bias_axes, std=None):
            return nnx.Linear(
                n_in,
                n_out,
                use_bias=config.mlp_bias,
                kernel_init=_init(config, axes, std),
                bias_init=_zeros(bias_axes),
                dtype=jnp.dtype(config.dtype),
                param_dtype=jnp.dtype(config.param_dtype),
                rngs=rngs,
            )

        self.up = linear(d, f, ("embed", "mlp"), ("mlp",))
        self.gate = linear(d, f, ("embed", "mlp"), ("mlp",)) if config.mlp == "swiglu" else None
        self.down = linear(f, d, ("mlp", "embed"), ("embed",), out_std)

    def __call__(self, x: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
        if self.gate is not None:
            hidden = jax.nn.silu(project(self.gate, x, rngs)) * project(self.up, x, rngs)
        else:
            hidden = jax.nn.gelu(project(self.up, x, rngs), approximate=True)  # GPT-2's "gelu_new"
        hidden = constrain(hidden, ("activation_batch", "activation_length", "activation_mlp"))
        return project(self.down, hidden, rngs)


class Block(nnx.Module):
    """Pre-norm residual block: x + drop(attn(norm(x))), then x + drop(mlp(norm(x))); or, with
    `parallel_residual`, x + drop(attn(norm(x))) + drop(mlp(norm(x))).

    The residual dropout rate and the attention window come with each call (arrays over layers
    are scanned like the weights), so one Block serves every depth."""

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        self.attn_norm = _norm(config, rngs)
        self.attn = Attention(config, rngs=rngs)
        self.mlp_norm = None if config.parallel_residual else _norm(config, rngs)
        self.mlp = MLP(config, rngs=rngs)

    def __call__(self, x, positions, segment_ids, cache, layer, rngs, residual_dropout=None, window=None):
        drop = lambda h: h if residual_dropout is None else dropout(h, residual_dropout, rngs.dropout())  # noqa: E731
        normed = self.attn_norm(x)
        h, cache = self.attn(normed, positions, segment_ids, cache, layer, window, rngs)
        if self.mlp_norm is None:  # parallel: both read the same normed input
            x = x + drop(h) + drop(self.mlp(normed, rngs))
        else:
            x = x + drop(h)
            x = x + drop(self.mlp(self.mlp_norm(x), rngs))
        return constrain(x, ("activation_batch", "activation_length", "activation_embed")), cache


def dropout(x: jax.Array, rate: jax.Array | float, key: jax.Array) -> jax.Array:
    """Inverted dropout at a rate that may be traced (a scanned layer's own)."""
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class Transformer(nnx.Module):
    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        self.config = config
        dtype, pdtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
        self.embed = nnx.Embed(
            config.vocab_size,
            config.d_model,
            embedding_init=_init(config, ("vocab", "embed")),
            dtype=dtype,
            param_dtype=pdtype,
            rngs=rngs,
        )
        self.positions = (
            nnx.Embed(
                config.max_len,
                config.d_model,
                embedding_init=_init(config, ("positions", "embed"), 0.01),
                dtype=dtype,
                param_dtype=pdtype,
                rngs=rngs,
            )
            if config.position == "learned"
            else None
        )
        self.embed_dropout = nnx.Dropout(config.embed_dropout)
        if config.scan_layers:
            self.layers = _stacked_blocks(config, rngs)
        else:
            self.layers = nnx.List([Block(config, rngs=rngs) for _ in range(config.num_layers)])
        self.final_norm = _norm(config, rngs)
        self.lm_head = (
            None
            if config.tie_embeddings
            else nnx.Linear(
                config.d_model,
                config.vocab_size,
                use_bias=config.lm_head_bias,
                kernel_init=_init(config, ("embed", "vocab")),
                bias_init=_zeros(("vocab",)),
                dtype=dtype,
                param_dtype=pdtype,
                rngs=rngs,
            )
        )

    def __call__(
        self,
        tokens: jax.Array,  # [b, t] int
        positions: jax.Array | None = None,  # [b, t]; default 0..t-1
        segment_ids: jax.Array | None = None,  # [b, t]; packed example ids, 0 = padding
        *,
        cache: KVCache | None = None,
        rngs: nnx.Rngs | None = None,  # dropout randomness; None = deterministic
        return_hidden: bool = False,
    ) -> tuple[jax.Array, KVCache | None]:
        """Returns (logits [b, t, v] or final hidden states [b, t, d], updated cache or None).

        Without a cache, attention is causal within each packed segment. With a cache, the new
        tokens are written at the cache's next free slots and attend to every earlier slot of
        the same segment: prefill (left-padded) prompts, then feed one token at a time.
        """
        b, t = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if segment_ids is None:
            segment_ids = jnp.ones((b, t), jnp.int32)

        x = self.embed(tokens)
        if self.positions is not None:
            x = x + self.positions(positions)
        x = self.embed_dropout(x, deterministic=rngs is None, rngs=rngs)
        x = constrain(x, ("activation_batch", "activation_length", "activation_embed"))

        if cache is not None:
            segments = jax.lax.dynamic_update_slice(cache.segment_ids, segment_ids, (0, cache.index))
            cache = cache._replace(segment_ids=segments)
        x, cache = self._run_layers(x, positions, segment_ids, cache, rngs)
        if cache is not None:
            cache = cache._replace(index=cache.index + t)
        x = self.final_norm(x)
        return (x if return_hidden else self.logits(x)), cache

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Output logits [..., v] of final hidden states [..., d] (e.g. only the last position's)."""
        logits = self.embed.attend(hidden) if self.lm_head is None else self.lm_head(hidden)
        if logits.ndim == 3:
            logits = constrain(logits, ("activation_batch", "activation_length", "activation_vocab"))
        return logits


    def _run_layers(self, x, positions, segment_ids, cache, rngs):
        """Every layer, unrolled or as one scan over the stacked weights (the same numbers).

        Layer i's dropout randomness is folded from one key by i, so both layouts draw alike;
        its residual dropout rate and window are picked from per-layer arrays."""
        cfg = self.config
        key = None if rngs is None else rngs.dropout()
        rates = None if key is None or not any(cfg.residual_dropout_rates()) else jnp.asarray(cfg.residual_dropout_rates())
        windows = cfg.windows()

        def layer_fn(graphdef, state, x, cache, i, rate, window):
            layer_rngs = None if key is None else nnx.Rngs(dropout=jax.random.fold_in(key, i))
            return nnx.merge(graphdef, state)(x, positions, segment_ids, cache, i, layer_rngs, rate, window)

        policy = REMAT_POLICIES[cfg.remat]
        if policy is not None and cache is None:  # decoding is never differentiated
            layer_fn = jax.checkpoint(layer_fn, policy=policy, static_argnums=(0,))
        pick = lambda a, i: None if a is None else a[i]  # noqa: E731
        if not cfg.scan_layers:
            for i, layer in enumerate(self.layers):
                x, cache = layer_fn(*nnx.split(layer), x, cache, i, pick(rates, i), pick(windows, i))
            return x, cache
        graphdef, stacked = nnx.split(self.layers)

        def body(carry, xs):
            state, i, rate, window = xs
            return layer_fn(graphdef, state, *carry, i, rate, window), None

        (x, cache), _ = jax.lax.scan(body, (x, cache), (stacked, jnp.arange(cfg.num_layers), rates, windows))
        return x, cache


def _stacked_blocks(config: TransformerConfig, rngs: nnx.Rngs) -> Block:
    """One Block whose every parameter has a leading axis of `num_layers` layers, named by the
    "layers" logical axis (each layer initialised from its own key)."""

    @nnx.split_rngs(splits=config.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def blocks(rngs):
        return Block(config, rngs=rngs)

    return blocks(rngs)


def new_model(config: TransformerConfig, lora: LoraConfig | None = None, seed: int = 0, base: nnx.State | None = None) -> Transformer:
    """A Transformer with random weights, or `base`'s (a plain model's state), plus LoRA adapters."""
    model = Transformer(config, rngs=nnx.Rngs(params=seed))
    if base is not None:
        nnx.update(model, base)
    if lora is not None:
        apply_lora(model, lora, rngs=nnx.Rngs(params=seed + 1))
    return model
