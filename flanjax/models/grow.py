"""Growing a trained Transformer into a larger one that computes the same function.

BatGPT's "parameter expansion", after Net2Net (Chen et al., 2016): a small model trained
first starts a larger one, which trains on from the small one's function instead of from
random weights. Every operator keeps the logits (up to float rounding) unless said otherwise.

* Width, by duplication. New unit j of a grown dimension is a copy of old unit j mod n
  (tiling), for the residual width d, the MLP width f, the query heads n and, by the same
  factor, the key/value heads k: query head j then belongs to the copy of its old group, and
  every head keeps its size h, so RoPE and the attention scale are unchanged. A weight that
  writes a grown dimension is tiled along it; a weight that reads one is tiled and divided
  by the number of copies m, so the m copies of a unit together contribute what it did.
  Norms are tiled: a tiled vector keeps its mean and mean square, so RMSNorm and LayerNorm
  give the tiled output. Tied embeddings: the logits read the tiled table m_d times, and the
  table is also the input embedding, so the final norm's scale (and bias) is divided instead.
* Noise (optional): each read weight's m copies get noise that sums to zero over the copies,
  so the copies differ (training pulls them apart) while their sum, the function, is kept.
* Depth. New layer j runs old layer j * L // L' (for 2x: each old layer, then a copy of it).
  depth="zero": a copy has its output projections (attention o, MLP down: kernels and biases)
  zeroed, so it adds nothing to the residual stream until trained (parallel residual blocks
  too). depth="stack": copies are whole, a warmer start that changes the function.

Trees are the plain nested dicts of `nnx.to_pure_dict` of a model's parameters, in either
layer layout (`flanjax.models.stacking`); the grown tree has the new config's layout.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import nnx

from flanjax.errors import FlanjaxError
from flanjax.models import stacking
from flanjax.models.transformer import Transformer, TransformerConfig

Depth = Literal["zero", "stack"]


class GrowthError(FlanjaxError, ValueError):
    """A growth that would not keep the model's function, or weights that do not fit."""


# Fields that decide what function the weights compute: growth keeps them.
FAMILY_FIELDS = (
    "vocab_size", "norm", "norm_eps", "position", "rope_theta", "rope_scaling", "rotary_dim", "mlp", "qkv_bias",
    "out_bias", "mlp_bias", "lm_head_bias", "tie_embeddings", "parallel_residual", "attention_scale", "sliding_window",
)  # fmt: skip

# Each parameter's axes, by the letters of transformer.py's einsums (h head width, v vocabulary
# and p positions never grow), and the grown axis whose units it reads, if any.
_BLOCK = {
    ("attn_norm", "scale"): ("d", None),
    ("attn_norm", "bias"): ("d", None),
    ("mlp_norm", "scale"): ("d", None),
    ("mlp_norm", "bias"): ("d", None),
    ("attn", "q", "kernel"): ("dnh", "d"),
    ("attn", "q", "bias"): ("nh", None),
    ("attn", "k", "kernel"): ("dkh", "d"),
    ("attn", "k", "bias"): ("kh", None),
    ("attn", "v", "kernel"): ("dkh", "d"),
    ("attn", "v", "bias"): ("kh", None),
    ("attn", "o", "kernel"): ("nhd", "n"),
    ("attn", "o", "bias"): ("d", None),
    ("mlp", "up", "kernel"): ("df", "d"),
    ("mlp", "up", "bias"): ("f", None),
    ("mlp", "gate", "kernel"): ("df", "d"),
    ("mlp", "gate", "bias"): ("f", None),
    ("mlp", "down", "kernel"): ("fd", "f"),
    ("mlp", "down", "bias"): ("d", None),
}
# What a block writes to the residual stream: zero in a new layer (depth="zero").
_OUTPUTS = (("attn", "o", "kernel"), ("attn", "o", "bias"), ("mlp", "down", "kernel"), ("mlp", "down", "bias"))


def _top(tied: bool) -> dict[tuple[str, ...], tuple[str, str | None]]:
    # Tied: the logits read the tiled embedding table, so the final norm that feeds them
    # carries the division (and the noise) of a read weight.
    final = ("d", "d" if tied else None)
    return {
        ("embed", "embedding"): ("vd", None),
        ("positions", "embedding"): ("pd", None),
        ("final_norm", "scale"): final,
        ("final_norm", "bias"): final,
        ("lm_head", "kernel"): ("dv", "d"),
        ("lm_head", "bias"): ("v", None),
    }


# --- checks -----------------------------------------------------------------------------------


def depth_map(old_layers: int, new_layers: int) -> list[tuple[int, bool]]:
    """For each new layer, the old layer it copies and whether it repeats the layer before it
    (a new layer) rather than being that old layer itself. Spread evenly: 2 -> 4 gives
    [(0, False), (0, True), (1, False), (1, True)]."""
    sources = [j * old_layers // new_layers for j in range(new_layers)]
    return [(i, j > 0 and sources[j - 1] == i) for j, i in enumerate(sources)]


def _sizes(config: TransformerConfig) -> dict[str, int]:
    return {"d_model": config.d_model, "d_ff": config.d_ff, "num_heads": config.num_heads,
            "num_kv_heads": config.kv_heads, "num_layers": config.num_layers}  # fmt: skip


def check_growth(old: TransformerConfig, new: TransformerConfig, depth: Depth = "zero", noise: float = 0.0) -> None:
    """Raises GrowthError, naming the field and the fix, unless `old` grows into `new`."""
    if depth not in ("zero", "stack"):
        raise GrowthError(f"depth={depth!r} is not one of zero (new layers start as identities: exact) or stack "
                          "(new layers are whole copies: not exact).")  # fmt: skip
    if not (noise >= 0 and math.isfinite(noise)):
        raise GrowthError(f"noise={noise!r}: give a finite scale >= 0 (a fraction of each weight's std, e.g. 0.01).")
    for field in FAMILY_FIELDS:
        before, after = getattr(old, field), getattr(new, field)
        if before != after:
            raise GrowthError(
                f"{field} differs: {before!r} in the trained model, {after!r} in the grown one. Growth keeps the "
                "architecture family and only widens (d_model, d_ff, num_heads, num_kv_heads) and deepens "
                f"(num_layers); set {field}={before!r}."
            )
    if old.position == "learned" and new.max_len != old.max_len:
        raise GrowthError(f"max_len differs ({old.max_len} -> {new.max_len}), but the learned position table has "
                          f"one trained row per position; set max_len={old.max_len}.")  # fmt: skip
    before, after = _sizes(old), _sizes(new)
    for name in before:
        if after[name] < before[name]:
            raise GrowthError(f"{name} shrinks from {before[name]} to {after[name]}: growth only adds units and "
                              f"layers; set {name} >= {before[name]}.")  # fmt: skip
    for name in ("d_model", "d_ff", "num_heads", "num_kv_heads"):
        if after[name] % before[name]:
            multiple = -(-after[name] // before[name]) * before[name]
            raise GrowthError(
                f"{name}={after[name]} is not a multiple of the trained {before[name]}: width grows by copying each "
                f"unit a whole number of times; set {name}={multiple} (or another multiple of {before[name]})."
            )
    if new.head_size != old.head_size:
        more_heads = f"num_heads={new.d_model // old.head_size}, or " if new.d_model % old.head_size == 0 else ""
        raise GrowthError(
            f"the head size changes from {old.head_size} to {new.head_size} (head_dim, else d_model // num_heads): "
            f"growth keeps each head's size, so RoPE and the attention scale are unchanged; set {more_heads}"
            f"head_dim={old.head_size}."
        )
    heads, kv = new.num_heads // old.num_heads, new.kv_heads // old.kv_heads
    if heads != kv:
        raise GrowthError(
            f"num_kv_heads grows {kv}x ({old.kv_heads} -> {new.kv_heads}) but num_heads {heads}x: each query "
            "head keeps attending with a copy of its own key/value head only if both grow by the same factor; "
            f"set num_kv_heads={old.kv_heads * heads}."
        )
    _check_windows(old, new, depth)


def _check_windows(old: TransformerConfig, new: TransformerConfig, depth: Depth) -> None:
    """Every layer that runs a trained layer (not a zeroed copy) keeps that layer's window."""
    layers = depth_map(old.num_layers, new.num_layers)
    for j, (i, repeat) in enumerate(layers):
        if new.window(j) != old.window(i) and not (repeat and depth == "zero"):
            windowed = tuple(k for k, (source, _) in enumerate(layers) if old.window(source) is not None)
            raise GrowthError(
                f"layer {j} of the grown model runs trained layer {i} but gets sliding window {new.window(j)} "
                f"instead of {old.window(i)}; set sliding_window_layers={windowed} (the trained layers' windows "
                "at their new places)."
            )


def _flat_unrolled(params: Mapping) -> dict[tuple, Any]:
    """{path: array} with layers unrolled and keyed by int (Orbax gives digit strings)."""
    flat = nnx.traversals.flatten_mapping(stacking.unstack(dict(params)))
    return {(p[0], int(p[1]), *p[2:]) if p[0] == "layers" else p: v for p, v in flat.items()}


def _check_params(flat: dict[tuple, Any], old: TransformerConfig) -> None:
    """`flat` holds exactly the parameters of a plain Transformer of config `old`."""
    names = {"/".join(map(str, p)): v for p, v in flat.items()}
    adapters = [n for n in names if "lora_" in n]
    if adapters:
        raise GrowthError(
            f"the weights hold LoRA adapters ({adapters[0]}, ...): growth reads plain weights. Merge the adapters "
            "first (flanjax.models.lora.remove_lora on the model; for a run directory: `flanjax convert to-hf`, "
            "which merges them, then `flanjax convert from-hf`)."
        )
    unrolled = dataclasses.replace(old, scan_layers=False)
    model = nnx.eval_shape(lambda: Transformer(unrolled, rngs=nnx.Rngs(0)))
    expected = {"/".join(map(str, p)): v for p, v in nnx.traversals.flatten_mapping(nnx.to_pure_dict(nnx.state(model, nnx.Param))).items()}  # fmt: skip
    for name in sorted(expected.keys() | names.keys()):
        if name not in names or name not in expected:
            missing = "lacks" if name not in names else "has an extra"
            raise GrowthError(f"the weights {missing} parameter {name}: they are not those of the trained model's "
                              "config; pass the config they were trained with.")  # fmt: skip
        if tuple(names[name].shape) != expected[name].shape:
            raise GrowthError(f"parameter {name} has shape {tuple(names[name].shape)} but the trained model's config "
                              f"gives {expected[name].shape}; pass the config the weights were trained with.")  # fmt: skip


# --- operators --------------------------------------------------------------------------------


def _zero_sum_noise(key: jax.Array, x: jax.Array, axis: int, copies: int, scale: float) -> jax.Array:
    """Noise of std `scale` times x's that sums to zero over the `copies` of each unit along
    `axis` (copy c of unit i sits at c * n + i)."""
    shape = (*x.shape[:axis], copies, x.shape[axis] // copies, *x.shape[axis + 1 :])
    eps = jax.random.normal(key, shape, jnp.float32)
    eps = (eps - eps.mean(axis=axis, keepdims=True)) * math.sqrt(copies / (copies - 1))  # std 1 again
    return (scale * jnp.std(x.astype(jnp.float32)) * eps).reshape(x.shape).astype(x.dtype)


def _grow_array(x, letters: str, reads: str | None, factors: dict[str, int], noise: float, key: jax.Array) -> jax.Array:
    """`x` tiled along each grown axis; along the axis it reads, also divided by the copies."""
    x = jnp.asarray(x)
    for axis, letter in enumerate(letters):
        x = jnp.concatenate([x] * factors[letter], axis=axis)
    copies = factors[reads] if reads else 1
    if copies == 1:
        return x
    axis = letters.index(reads)
    x = x / copies
    return x + _zero_sum_noise(key, x, axis, copies, noise) if noise else x


def _grow_tree(flat: dict[tuple, Any], specs: dict, factors: dict[str, int], noise: float, key: jax.Array, where: str) -> dict:
    grown = {}
    for path, x in flat.items():
        name = "/".join(map(str, (where, *path) if where else path))
        path_key = jax.random.fold_in(key, zlib.crc32(name.encode()) & 0x7FFFFFFF)
        grown[path] = _grow_array(x, *specs[path], factors, noise, path_key)
    return grown


def grow_params(
    params: Mapping[str, Any],
    old: TransformerConfig,
    new: TransformerConfig,
    *,
    depth: Depth = "zero",
    noise: float = 0.0,
    seed: int = 0,
) -> dict:
    """The parameters of `new` grown from `params` (`nnx.to_pure_dict` of a model of config
    `old`, either layer layout): the same logits, except with depth="stack". `noise` (a
    fraction of each weight's std) makes the copies of each unit differ, the function kept."""
    check_growth(old, new, depth, noise)
    flat = _flat_unrolled(params)
    _check_params(flat, old)
    factors = {"d": new.d_model // old.d_model, "f": new.d_ff // old.d_ff, "n": new.num_heads // old.num_heads,
               "k": new.kv_heads // old.kv_heads, "h": 1, "v": 1, "p": 1}  # fmt: skip
    # XLA's RngBitGenerator: compiles in a fraction of threefry's time (one draw per weight);
    # its values may differ across backends, the copies' zero sum does not.
    key = jax.random.key(seed, impl="rbg")
    top = {p: v for p, v in flat.items() if p[0] != "layers"}
    grown = _grow_tree(top, _top(old.tie_embeddings), factors, noise, key, "")
    blocks = []
    for i in range(old.num_layers):
        block = {p[2:]: v for p, v in flat.items() if p[:2] == ("layers", i)}
        blocks.append(_grow_tree(block, _BLOCK, factors, noise, key, f"layers/{i}"))
    for j, (i, repeat) in enumerate(depth_map(old.num_layers, new.num_layers)):
        for path, x in blocks[i].items():
            grown["layers", j, *path] = jnp.zeros_like(x) if repeat and depth == "zero" and path in _OUTPUTS else x
    dtype = jnp.dtype(new.param_dtype)
    tree = nnx.traversals.unflatten_mapping({p: x.astype(dtype) for p, x in grown.items()})
    return stacking.in_layout(tree, new.scan_layers)


# --- the grown config ---------------------------------------------------------------------


def grown_config(old: TransformerConfig, new: TransformerConfig | Mapping[str, Any]) -> TransformerConfig:
    """`new`, or `old` with the fields in `new` replaced (e.g. {"d_model": 1024, "num_layers": 24})."""
    if isinstance(new, TransformerConfig):
        return new
    unknown = sorted(set(new) - {f.name for f in dataclasses.fields(TransformerConfig)})
    if unknown:
        raise GrowthError(f"{unknown[0]} is not a TransformerConfig field; the grown model's sizes are d_model, "
                          "d_ff, num_heads, num_kv_heads, head_dim and num_layers.")  # fmt: skip
    try:
        return dataclasses.replace(old, **new)
    except ValueError as e:
        raise GrowthError(f"the grown model's config is invalid: {e}") from None
