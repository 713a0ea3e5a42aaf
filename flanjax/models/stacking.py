"""The two layouts of a Transformer's layers, and the conversion between them.

Unrolled (`scan_layers=False`): `layers/0/attn/q/kernel`, `layers/1/...`, one array per
layer. Stacked (`scan_layers=True`): `layers/attn/q/kernel`, one array with a leading axis
of layers (the "layers" logical axis). Checkpoints hold whichever layout the run trained
with; readers of weights (`Checkpointer.restore_model`, Hugging Face import and export) put
them into the layout their model wants with `relayout`, so a scanned run starts from an
unrolled one and the other way round.

Trees here are the plain nested dicts of `nnx.to_pure_dict` (keys of unrolled layers are
ints, or digit strings as Orbax returns them); "layers" may sit at any depth (a ScoreModel
keeps its Transformer under "transformer").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec


def _unrolled(layers: dict) -> bool:
    return bool(layers) and all(str(k).isdigit() for k in layers)


def _convert(tree: Any, fn: Callable[[dict], Any]) -> Any:
    if not isinstance(tree, dict):
        return tree
    return {k: fn(v) if k == "layers" and isinstance(v, dict) else _convert(v, fn) for k, v in tree.items()}


def _layer_list(layers: dict) -> list:
    return [layers[k] for k in sorted(layers, key=int)]


def is_stacked(tree: Any) -> bool | None:
    """Whether `tree`'s layers are stacked; None if it has none."""
    found: list[bool] = []
    _convert(tree, lambda layers: found.append(not _unrolled(layers)))
    return found[0] if found else None


def stack(tree: Any) -> Any:
    """Unrolled layers -> stacked (arrays, or abstract leaves carrying NamedShardings)."""

    def one(layers: dict) -> Any:
        if not _unrolled(layers):
            return layers
        return jax.tree.map(_stack_leaf, *_layer_list(layers))

    return _convert(tree, one)


def unstack(tree: Any) -> Any:
    """Stacked layers -> unrolled, keyed 0 .. n - 1."""

    def one(layers: dict) -> Any:
        if _unrolled(layers):
            return layers
        n = jax.tree.leaves(layers)[0].shape[0]
        return {i: jax.tree.map(lambda x, i=i: _slice_leaf(x, i), layers) for i in range(n)}

    return _convert(tree, one)


def _spec(x: jax.ShapeDtypeStruct) -> tuple:
    spec = tuple(x.sharding.spec)
    return spec + (None,) * (len(x.shape) - len(spec))


def _stack_leaf(*xs):
    x = xs[0]
    if isinstance(x, jax.ShapeDtypeStruct):  # a new leading axis, whole on every device
        sharding = NamedSharding(x.sharding.mesh, PartitionSpec(None, *_spec(x)))
        return jax.ShapeDtypeStruct((len(xs), *x.shape), x.dtype, sharding=sharding)
    return jnp.stack(xs)


def _slice_leaf(x, i: int):
    if isinstance(x, jax.ShapeDtypeStruct):
        sharding = NamedSharding(x.sharding.mesh, PartitionSpec(*_spec(x)[1:]))
        return jax.ShapeDtypeStruct(x.shape[1:], x.dtype, sharding=sharding)
    return x[i]


def in_layout(tree: Any, stacked: bool) -> Any:
    """`tree` (arrays or abstract leaves) with its layers in the given layout."""
    return stack(tree) if stacked else unstack(tree)


def relayout(values: Any, target: Any) -> Any:
    """`values` in the layout of `target` (abstract leaves carrying NamedShardings), converted
    on the devices straight into the target's shardings; unchanged if the layouts agree."""
    stacked = is_stacked(target)
    if stacked is None or is_stacked(values) == stacked:
        return values
    shardings = jax.tree.map(lambda x: x.sharding, target)
    return jax.jit(lambda v: in_layout(v, stacked), out_shardings=shardings)(values)
