"""Low-rank adapters (LoRA, Hu et al. 2021) for the Transformer's projections and embeddings.

`apply_lora` replaces the chosen `nnx.Linear` / `nnx.Einsum` projections in place by a
`LoRA` wrapper computing `base(x) + alpha / rank * (x @ A) @ B`; an `nnx.Embed` table gets
`base(ids) + alpha / rank * A[ids] @ B` (the same update with a one-hot input, as PEFT adapts
`nn.Embedding`): tokens added to the vocabulary need it, since `add_tokens` starts their rows
all equal (the mean row) and a frozen table cannot tell them apart. The base weight stays an
`nnx.Param`; A and B are `nnx.LoRAParam`s, so `nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)`
trains the adapters only (note that `LoRAParam` subclasses `Param`: a `wrt=nnx.Param` filter
trains everything). A and B carry logical axes ("lora_rank" for the rank) like every other
parameter, so `Partitioner` shards them with their kernel.

Also here: merging adapters into the kernels for inference, and saving/loading adapters
alone (`adapter_model.safetensors` + `adapter_config.json`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import string

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from flax import nnx
from flax.nnx.nn import dtypes

from flanjax import paths
from flanjax.errors import FlanjaxError

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


class LoraError(FlanjaxError, ValueError):
    """A LoRA configuration, target or adapter file does not fit the model."""


class AdapterNotFoundError(FlanjaxError, FileNotFoundError):
    """An adapter directory lacks its weights or config file."""


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0  # the update is scaled by alpha / rank
    dropout: float = 0.0  # on the adapter's input, when the model is called with dropout rngs
    # Regexes searched in module paths such as "layers/0/attn/q" or "layers/1/mlp/down".
    targets: tuple[str, ...] = (r"attn/q$", r"attn/v$")

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))  # gin passes lists
        if not isinstance(self.rank, int) or self.rank < 1:
            raise LoraError(f"LoRA rank must be a positive integer, got {self.rank!r}.")
        if not 0.0 <= self.dropout < 1.0:
            raise LoraError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}.")
        if not self.targets:
            raise LoraError("LoRA targets is empty; give at least one module-path regex.")
        for pattern in self.targets:
            try:
                re.compile(pattern)
            except re.error as e:
                raise LoraError(f"LoRA target {pattern!r} is not a valid regex: {e}.") from None


def projection_letters(base: nnx.Linear | nnx.Einsum) -> tuple[str, str, str]:
    """The einsum letters (input, kernel, output) of a projection: "...i", "io", "...o" for a
    Linear; "btd", "dnh", "btnh" for an Einsum "btd,dnh->btnh". The kernel lists its input
    dims (contracted with the input's last dims) first."""
    if isinstance(base, nnx.Linear):
        return "...i", "io", "...o"
    lhs, y = base.einsum_str.replace(" ", "").split("->")
    x, kernel = lhs.split(",")
    return x, kernel, y


def _specs(base: nnx.Linear | nnx.Einsum | nnx.Embed) -> tuple[str, str, int]:
    """(x-to-rank einsum, rank-to-output einsum, number of kernel in-dims) for `base`; an
    embedding's A is looked up by id, then "...r,rd->...d"."""
    if isinstance(base, nnx.Embed):
        return "", "...r,rd->...d", 1
    x, kernel, y = projection_letters(base)
    in_letters = "".join(c for c in kernel if c in x)
    if not kernel.startswith(in_letters):
        raise LoraError(f"kernel {kernel!r} of {base.einsum_str!r} does not list its input dims first.")
    batch = "".join(c for c in x if c not in kernel)
    r = next(c for c in string.ascii_letters if c not in x + kernel + y)
    out_letters = kernel[len(in_letters) :]
    return f"{x},{in_letters}{r}->{batch}{r}", f"{batch}{r},{r}{out_letters}->{y}", len(in_letters)


class LoRA(nnx.Module):
    """`base(x) + alpha / rank * (dropout(x) . A) . B` around one Linear or Einsum projection,
    or `base(ids) + alpha / rank * A[ids] . B` around an Embed table (no dropout: its input
    is an id; with tied embeddings `attend` uses the same updated table).

    A is [*in_dims, rank] (uniform, std 1 / sqrt(3 fan_in) as in PEFT; an id is one-hot, so a
    table's fan-in is 1), B is [rank, *out_dims] (zeros), so a fresh wrapper computes exactly
    `base(x)`. `weight` is the base's kernel or embedding table, whatever the kind.

    Dropout follows the model's convention (active only when `rngs` are passed, like
    `nnx.Dropout(..., deterministic=rngs is None)` in `Block`) rather than keeping a private
    RNG stream: a stream stored in the module would also fire in eval and decoding, and the
    train step (which merges a copy of the model inside `jax.grad`) would never advance it.
    """

    def __init__(self, base: nnx.Linear | nnx.Einsum | nnx.Embed, rank: int, alpha: float, dropout: float = 0.0, *,
                 rngs: nnx.Rngs):  # fmt: skip
        if not isinstance(base, ADAPTABLE):
            raise LoraError(f"LoRA wraps nnx.Linear, nnx.Einsum or nnx.Embed, not {type(base).__name__}.")
        self.base = base
        self.weight_name = weight_name(base)
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        self.a_spec, self.b_spec, n_in = _specs(base)
        self.num_in_dims = n_in
        kernel = self.weight
        in_shape, out_shape = kernel.shape[:n_in], kernel.shape[n_in:]
        axes = kernel.get_metadata().get("out_sharding") or (None,) * kernel.ndim
        in_axes, out_axes = tuple(axes[:n_in]), tuple(axes[n_in:])
        bound = 1.0 if isinstance(base, nnx.Embed) else 1 / math.sqrt(math.prod(in_shape))  # fan-in: all in-dims

        def a_init(key, shape, dtype):
            return jax.random.uniform(key, shape, dtype, -bound, bound)

        def partitioned(init, axes):
            return nnx.with_partitioning(init, axes, eager_sharding=False)

        a_init = partitioned(a_init, in_axes + ("lora_rank",))
        b_init = partitioned(nnx.initializers.zeros_init(), ("lora_rank",) + out_axes)
        self.lora_a = nnx.LoRAParam(a_init(rngs.params(), (*in_shape, rank), base.param_dtype))
        self.lora_b = nnx.LoRAParam(b_init(rngs.params(), (rank, *out_shape), base.param_dtype))
        self.dropout = nnx.Dropout(dropout)
        self.merged = False  # static: merging is an export step, done outside jit

    @property
    def weight(self) -> nnx.Param:
        return getattr(self.base, self.weight_name)

    def __call__(self, x: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
        y = self.base(x)
        if self.merged:
            return y
        if isinstance(self.base, nnx.Embed):
            h, b = dtypes.promote_dtype((self.lora_a[...][x], self.lora_b[...]), dtype=self.base.dtype)
            return y + (jnp.einsum(self.b_spec, h, b) * self.scale).astype(y.dtype)
        x = self.dropout(x, deterministic=rngs is None, rngs=rngs)
        x, a, b = dtypes.promote_dtype((x, self.lora_a[...], self.lora_b[...]), dtype=self.base.dtype)
        h = jnp.einsum(self.a_spec, x, a, precision=self.base.precision) * self.scale  # rank-wide
        return y + jnp.einsum(self.b_spec, h, b, precision=self.base.precision).astype(y.dtype)

    def attend(self, query: jax.Array) -> jax.Array:
        """A tied table's output logits, `query . (E + Delta E)^T`, Delta E never materialised."""
        y = self.base.attend(query)
        if self.merged:
            return y
        q, a, b = dtypes.promote_dtype((query, self.lora_a[...], self.lora_b[...]), dtype=self.base.dtype)
        h = jnp.einsum("...d,rd->...r", q, b) * self.scale
        return y + jnp.einsum("...r,vr->...v", h, a).astype(y.dtype)

    def delta(self) -> jax.Array:
        """The scaled update alpha / rank * A @ B, in the kernel's shape (float32); stacked layers
        (a leading axis on the kernel and both factors) each get their own."""
        a = self.lora_a[...].astype(jnp.float32)
        b = self.lora_b[...].astype(jnp.float32)
        lead = a.shape[: a.ndim - self.num_in_dims - 1]
        update = a.reshape(*lead, -1, self.rank) @ b.reshape(*lead, self.rank, -1)
        return (self.scale * update).reshape(self.weight.shape)

    def merge(self) -> None:
        """Folds the update into the base weight; forward then skips the adapter."""
        if self.merged:
            raise LoraError("this LoRA module is already merged; unmerge() it first.")
        kernel = self.weight
        kernel[...] = (kernel[...].astype(jnp.float32) + self.delta()).astype(kernel.dtype)
        self.merged = True

    def unmerge(self) -> None:
        """Subtracts the update back out of the base weight (exact up to rounding)."""
        if not self.merged:
            raise LoraError("this LoRA module is not merged; there is nothing to unmerge.")
        kernel = self.weight
        kernel[...] = (kernel[...].astype(jnp.float32) - self.delta()).astype(kernel.dtype)
        self.merged = False


ADAPTABLE = (nnx.Linear, nnx.Einsum, nnx.Embed)


def weight_name(module: nnx.Module) -> str:
    """The attribute holding an adaptable module's weight: "embedding" for a table, else "kernel"."""
    return "embedding" if isinstance(module, nnx.Embed) else "kernel"


def _path(parts) -> str:
    return "/".join(map(str, parts))


def lora_modules(model: nnx.Module) -> list[tuple[str, LoRA]]:
    """(path, wrapper) of every LoRA module in `model`."""
    return [(_path(p), m) for p, m in nnx.iter_modules(model) if isinstance(m, LoRA)]


def apply_lora(model: nnx.Module, config: LoraConfig, *, rngs: nnx.Rngs) -> list[str]:
    """Wraps every Linear/Einsum/Embed whose path matches a target in place; returns their paths."""
    if lora_modules(model):
        raise LoraError("the model already has LoRA adapters; apply_lora once per model.")
    projections = [(p, m) for p, m in nnx.iter_modules(model) if isinstance(m, ADAPTABLE)]
    chosen = [(p, m) for p, m in projections if any(re.search(t, _path(p)) for t in config.targets)]
    if not chosen:
        # Listing one layer is enough to see the naming scheme.
        names = [_path(p) for p, _ in projections if not re.search(r"layers/[1-9]", _path(p))]
        raise LoraError(
            f"LoRA targets {list(config.targets)} match no projection or embedding. Patterns are searched "
            f"(re.search) in module paths such as: {', '.join(sorted(names))}."
        )
    for parts, module in chosen:
        replace_module(model, parts, _wrap(module, config, _stacked_layers(parts, module), rngs))
    return [_path(p) for p, _ in chosen]


def _stacked_layers(parts: tuple, module: nnx.Module) -> int | None:
    """How many layers a projection of a scanned model's stacked layers holds ("layers/attn/q",
    where an unrolled model has "layers/0/attn/q"); None for any other projection."""
    if len(parts) > 1 and parts[0] == "layers" and not isinstance(parts[1], int):
        return getattr(module, weight_name(module)).shape[0]
    return None


def _wrap(module: nnx.Module, config: LoraConfig, layers: int | None, rngs: nnx.Rngs) -> LoRA:
    def wrap(module, rngs):
        return LoRA(module, config.rank, config.alpha, config.dropout, rngs=rngs)

    if layers is None:
        return wrap(module, rngs)
    # Stacked layers: one adapter per layer, stacked along the same "layers" axis.
    stacked = nnx.vmap(wrap, in_axes=(0, 0), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    return nnx.split_rngs(splits=layers)(stacked)(module, rngs)


def remove_lora(model: nnx.Module) -> list[str]:
    """Merges every adapter into its kernel and puts the plain projection back in place: the
    model is then a plain Transformer again (to export it, or to serve it without adapters)."""
    modules = [(p, m) for p, m in nnx.iter_modules(model) if isinstance(m, LoRA)]
    for parts, module in modules:
        if not module.merged:
            module.merge()
        replace_module(model, parts, module.base)
    return [_path(p) for p, _ in modules]


def replace_module(model: nnx.Module, parts: tuple, new: nnx.Module) -> None:
    """Puts `new` in place of the submodule at path `parts` of `model`."""
    parent = model
    for part in parts[:-1]:
        parent = parent[part] if isinstance(part, int) else getattr(parent, part)
    if isinstance(parts[-1], int):
        parent[parts[-1]] = new
    else:
        setattr(parent, parts[-1], new)


def _require_lora(model: nnx.Module) -> list[tuple[str, LoRA]]:
    modules = lora_modules(model)
    if not modules:
        raise LoraError("the model has no LoRA adapters; call apply_lora first.")
    return modules


def merge_lora(model: nnx.Module) -> list[str]:
    """Merges every adapter into its kernel (for inference); returns their paths."""
    modules = _require_lora(model)
    for _, m in modules:
        m.merge()
    return [p for p, _ in modules]


def unmerge_lora(model: nnx.Module) -> list[str]:
    modules = _require_lora(model)
    for _, m in modules:
        m.unmerge()
    return [p for p, _ in modules]


def without_adapters(model: nnx.Module) -> nnx.Module:
    """A LoRA model with its adapters zeroed: exactly its frozen base weights, so a reference
    policy (PPO's KL, DPO's log-ratios) needs no second copy of the model."""
    graphdef, adapters, rest = nnx.split(model, nnx.LoRAParam, ...)
    return nnx.merge(graphdef, jax.tree.map(jnp.zeros_like, adapters), rest)


def adapter_state(model: nnx.Module) -> nnx.State:
    """The LoRA parameters only."""
    return nnx.state(model, nnx.LoRAParam)


def num_adapter_params(model: nnx.Module) -> int:
    """How many LoRA parameters `model` has; works on an `nnx.eval_shape` model too (no weights needed)."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(adapter_state(model)))


def _flat_adapters(model: nnx.Module) -> dict[str, nnx.Variable]:
    return {".".join(map(str, p)): v for p, v in nnx.to_flat_state(adapter_state(model))}


def save_adapters(model: nnx.Module, directory: str, config: LoraConfig) -> None:
    """Writes the adapters (float32, names like "layers.0.attn.q.lora_a") and their config."""
    tensors = {name: np.asarray(jax.device_get(v[...]), np.float32) for name, v in _flat_adapters(model).items()}
    if not tensors:
        raise LoraError("the model has no LoRA adapters to save; call apply_lora first.")
    paths.makedirs(directory)
    weights = os.path.join(directory, ADAPTER_WEIGHTS)
    if paths.is_remote(weights):  # safetensors writes only local files
        paths.write_atomic(weights, safetensors.numpy.save(tensors))
    else:
        safetensors.numpy.save_file(tensors, weights)
    with paths.open(os.path.join(directory, ADAPTER_CONFIG), "w") as f:
        json.dump(dataclasses.asdict(config), f, indent=2)


def read_adapter_config(directory: str) -> LoraConfig:
    """The LoraConfig saved beside the adapters: build the wrapped model with it."""
    path = os.path.join(directory, ADAPTER_CONFIG)
    if not paths.exists(path):
        raise AdapterNotFoundError(f"no {ADAPTER_CONFIG} in {directory}; is it a save_adapters directory?")
    with paths.open(path) as f:
        return LoraConfig(**json.load(f))


def load_adapters(model: nnx.Module, directory: str) -> LoraConfig:
    """Loads saved adapters into a model already wrapped by `apply_lora`; returns their config."""
    config = read_adapter_config(directory)
    path = os.path.join(directory, ADAPTER_WEIGHTS)
    if not paths.exists(path):
        raise AdapterNotFoundError(f"no {ADAPTER_WEIGHTS} in {directory}; is it a save_adapters directory?")
    for name, m in _require_lora(model):
        if (m.rank, m.alpha) != (config.rank, config.alpha):
            raise LoraError(
                f"{name} has rank {m.rank}, alpha {m.alpha} but the adapters in {directory} were "
                f"trained with rank {config.rank}, alpha {config.alpha}; wrap the model with "
                "read_adapter_config(directory)."
            )
    tensors = safetensors.numpy.load(paths.read_bytes(path)) if paths.is_remote(path) else safetensors.numpy.load_file(path)
    variables = _flat_adapters(model)
    missing, extra = sorted(variables.keys() - tensors.keys()), sorted(tensors.keys() - variables.keys())
    if missing or extra:
        raise LoraError(
            f"adapters in {path} do not match the model's LoRA modules: missing {missing}, "
            f"unexpected {extra}. Wrap the model with the same targets as when saving."
        )
    for name, var in variables.items():
        old, new = var[...], tensors[name]
        if new.shape != old.shape:
            raise LoraError(f"adapter tensor {name} has shape {new.shape} in {path} but {old.shape} in the model.")
        var[...] = jax.device_put(new.astype(old.dtype), old.sharding)  # keep the model's layout
    return config
