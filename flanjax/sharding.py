"""One device mesh and one table of logical-axis rules for every model in flanjax.

Models name *logical* axes on their parameters ("embed", "mlp", ...) and activations
("activation_batch", ...). `LOGICAL_AXIS_RULES` maps them onto the physical mesh axes
`data`, `fsdp` and `tensor`. Changing the parallelism (pure data, FSDP, tensor, 2-D) is a
change of mesh sizes and rules in gin, never a change to a model.

Several TPU slices (multislice) join over the data-centre network (DCN), much slower than
the links inside a slice (ICI): `MeshConfig.dcn_data` / `dcn_fsdp` split the data and FSDP
axes across slices, every other axis stays inside one, and `device_grid` lays the devices
out with `jax.experimental.mesh_utils.create_hybrid_device_mesh`. The rules do not change.

`Partitioner` owns the mesh and the rules: it creates states already sharded (inside jit,
with output shardings), assembles global batches from per-process data and checks at
start-up that every parameter's axes are known and divide the mesh.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from flanjax.errors import FlanjaxError
from jax.sharding import NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_MESH_AXES = ("data", "fsdp")

LogicalRules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

# Grouped as MaxText's base.yml: activations carry an `activation_` prefix so they can be
# laid out independently of the weights they meet.
LOGICAL_AXIS_RULES: LogicalRules = (
    # Activations: batch over every data-parallel axis, model dims over `tensor`.
    ("activation_batch", BATCH_MESH_AXES),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_head_dim", None),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    ("activation_layers", None),
    # Weights: FSDP splits the embedding dimension, tensor parallelism the wide ones.
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("positions", None),
    ("layers", None),  # the stacked layers of a scanned model: each device holds all of them
    ("norm", None),
    ("lora_rank", None),  # LoRA adapters: the rank is small, so keep it whole
)


class MeshError(FlanjaxError, ValueError):
    """The requested mesh does not fit the devices, or a parameter does not fit the mesh."""


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the `data`, `fsdp` and `tensor` mesh axes; one of them may be -1 ("the rest").
    With several slices, those are the sizes inside one slice, and `dcn_data` x `dcn_fsdp`
    slices multiply the data and FSDP axes (a mesh axis is then dcn x ici devices long)."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    dcn_data: int = 1  # slices across which the batch is split
    dcn_fsdp: int = 1  # slices across which parameters are sharded (rarely worth the DCN traffic)
    rules: LogicalRules = LOGICAL_AXIS_RULES

    @property
    def num_slices(self) -> int:
        return self.dcn_data * self.dcn_fsdp

    def resolve(self, num_devices: int) -> tuple[int, int, int]:
        """The whole mesh's (data, fsdp, tensor) sizes on `num_devices` devices."""
        if self.dcn_data < 1 or self.dcn_fsdp < 1:
            raise MeshError(f"dcn_data={self.dcn_data}, dcn_fsdp={self.dcn_fsdp}: the slice counts must be positive.")
        if num_devices % self.num_slices:
            raise MeshError(f"{num_devices} devices do not split into dcn_data x dcn_fsdp = {self.num_slices} equal slices: "
                            "set the DCN sizes to the number of slices the job runs on.")  # fmt: skip
        data, fsdp, tensor = self.resolve_slice(num_devices // self.num_slices)
        return data * self.dcn_data, fsdp * self.dcn_fsdp, tensor

    def resolve_slice(self, num_devices: int) -> tuple[int, int, int]:
        """The (data, fsdp, tensor) sizes inside one slice of `num_devices` devices."""
        sizes = (self.data, self.fsdp, self.tensor)
        described = " x ".join(f"{n}={s}" for n, s in zip(MESH_AXES, sizes))
        if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
            raise MeshError(
                f"mesh {described}: each axis size must be positive, and at most one may be -1 "
                "(meaning 'the remaining devices')."
            )
        known = math.prod(s for s in sizes if s != -1)
        if num_devices % known:
            axis, size = _axis_to_shrink(sizes, num_devices)
            raise MeshError(
                f"mesh {described} does not divide the {num_devices} available devices: the product of the fixed "
                f"axis sizes ({known}) must divide {num_devices}. Set --gin.sharding.MeshConfig.{axis}={size} "
                f"(or another size that divides), or run on a multiple of {known} devices."
            )
        resolved = tuple(num_devices // known if s == -1 else s for s in sizes)
        if math.prod(resolved) != num_devices:
            raise MeshError(
                f"mesh {described} uses {math.prod(resolved)} devices but {num_devices} are available: set one "
                "axis to -1 (the rest), e.g. --gin.sharding.MeshConfig.data=-1."
            )
        return resolved  # type: ignore[return-value]


def _axis_to_shrink(sizes: tuple[int, ...], num_devices: int) -> tuple[str, int]:
    """The fixed axis to change, and the largest size below its own that makes the mesh fit:
    the axis that does not divide the devices itself if there is one, else the last fixed one."""
    fixed = [i for i, s in enumerate(sizes) if s != -1]
    i = next((i for i in fixed if num_devices % sizes[i]), fixed[-1])
    others = math.prod(sizes[j] for j in fixed if j != i)
    size = max(d for d in range(1, sizes[i]) if num_devices % (others * d) == 0) if num_devices % others == 0 else 1
    return MESH_AXES[i], size


def make_mesh(config: MeshConfig, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    devices = list(devices if devices is not None else jax.devices())
    # Auto axes: GSPMD propagates shardings through contractions (Flax 0.12 + jax 0.10).
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    if config.num_slices == 1:
        return jax.make_mesh(config.resolve(len(devices)), MESH_AXES, axis_types=auto, devices=devices)
    return jax.sharding.Mesh(device_grid(config, devices), MESH_AXES, axis_types=auto)


def device_grid(config: MeshConfig, devices: Sequence[Any]) -> np.ndarray:
    """The devices of a multislice mesh as a [data, fsdp, tensor] array: each slice a contiguous
    block (its own ICI mesh), the slices laid along the data and FSDP axes (the DCN). Devices
    of one slice (GPUs, CPUs) count each process as a slice, as jax's fallback does."""
    from jax.experimental import mesh_utils

    config.resolve(len(devices))  # the sizes first: they name the axis to change
    # One slice (or none recorded: GPUs, CPUs): the processes, one per host, are the DCN's units.
    by_process = len({getattr(d, "slice_index", None) for d in devices}) == 1
    unit = "process" if by_process else "slice"
    found = len({d.process_index if by_process else d.slice_index for d in devices})
    if found != config.num_slices:
        raise MeshError(f"the mesh asks for dcn_data x dcn_fsdp = {config.num_slices} slices, but the devices form {found} "
                        f"(counted by {unit}). Set MeshConfig.dcn_data (and dcn_fsdp) to the number of slices the job runs on.")  # fmt: skip
    per_slice = config.resolve_slice(len(devices) // config.num_slices)
    return mesh_utils.create_hybrid_device_mesh(per_slice, (config.dcn_data, config.dcn_fsdp, 1), devices, process_is_granule=by_process)


def logical_to_mesh(axes: Sequence[str | None], rules: LogicalRules) -> PartitionSpec:
    table = dict(rules)
    unknown = [a for a in axes if a is not None and a not in table]
    if unknown:
        raise MeshError(
            f"logical axes {unknown} have no rule in the logical-axis rules table; add them to "
            "flanjax.sharding.LOGICAL_AXIS_RULES (or your MeshConfig.rules)."
        )
    return PartitionSpec(*(table[a] if a is not None else None for a in axes))


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Ask GSPMD to lay out activation `x` by logical `axes`; a no-op outside a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    from flax.core import spmd  # the active rules table, set by Partitioner.activate()

    spec = logical_to_mesh(axes, spmd.get_logical_axis_rules())
    return jax.lax.with_sharding_constraint(x, spec)


def shardings_of(abstract_state: Any) -> Any:
    """The NamedShardings carried by an abstract state's leaves (see `Partitioner.abstract_state`)."""
    return jax.tree.map(lambda a: a.sharding, abstract_state)


def filled(abstract_state: nnx.State, values: Mapping) -> nnx.State:
    """A copy of `abstract_state` holding `values` (a nested dict of arrays, the layout of
    `nnx.to_pure_dict`) in place of its shapes."""
    state = jax.tree.map(lambda x: x, abstract_state)
    nnx.replace_by_pure_dict(state, values)
    return state


class Partitioner:
    """Owns the mesh and the rules: shardings for states and batches, sharded creation."""

    def __init__(self, mesh: jax.sharding.Mesh, rules: LogicalRules = LOGICAL_AXIS_RULES):
        self.mesh = mesh
        self.rules = rules

    @classmethod
    def from_config(cls, config: MeshConfig) -> Partitioner:
        return cls(make_mesh(config), config.rules)

    @contextlib.contextmanager
    def activate(self) -> Iterator[None]:
        with jax.set_mesh(self.mesh), nnx.logical_axis_rules(self.rules):
            yield

    @property
    def data_parallel_size(self) -> int:
        return math.prod(self.mesh.shape[a] for a in BATCH_MESH_AXES)

    # --- states -------------------------------------------------------------------------

    def state_shardings(self, abstract_state: Any) -> Any:
        """NamedShardings for an (abstract) nnx.State, from each variable's logical axes."""
        self.check_parameters(abstract_state)
        with self.activate():
            return nnx.get_named_sharding(abstract_state, self.mesh)

    def abstract_state(self, init_fn: Callable[[], Any]) -> tuple[nnx.GraphDef, Any]:
        """Graph and state shapes of `init_fn()`, each leaf carrying its NamedSharding; nothing
        is allocated."""
        with self.activate():
            graphdef, abstract_state = nnx.split(nnx.eval_shape(init_fn))
            shardings = self.state_shardings(abstract_state)
        return graphdef, jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings
        )

    def create(self, init_fn: Callable[..., Any], abstract_state: Any, *args: Any) -> Any:
        """Builds `init_fn(*args)`'s state directly in its shardings: no unsharded copy anywhere."""
        with self.activate():
            return jax.jit(lambda *a: nnx.state(init_fn(*a)), out_shardings=shardings_of(abstract_state))(*args)

    def check_parameters(self, abstract_state: Any) -> None:
        """Fails at start-up, naming the parameter, if an axis is unnamed, unknown or uneven."""
        table = dict(self.rules)
        for path, var in nnx.to_flat_state(abstract_state):
            name = "/".join(map(str, path))
            axes = var.get_metadata().get("out_sharding")
            if not axes:
                if var.shape:  # scalars (step counters) are replicated by design
                    raise MeshError(
                        f"parameter {name} {var.shape} has no logical axis names; create it with "
                        "nnx.with_partitioning(init, (axis, ...)) so the rules can place it."
                    )
                continue
            if len(axes) != len(var.shape):
                raise MeshError(f"parameter {name} has shape {var.shape} but axis names {axes}.")
            spec = logical_to_mesh(axes, tuple(table.items()))
            for dim, mesh_axes in zip(var.shape, spec):
                if mesh_axes is None:
                    continue
                mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else mesh_axes
                ways = math.prod(self.mesh.shape[a] for a in mesh_axes)
                if dim % ways:
                    raise MeshError(
                        f"parameter {name} {var.shape} (axes {axes}) cannot be split {ways} ways "
                        f"over mesh axes {mesh_axes}: {dim} is not divisible by {ways}. Choose mesh "
                        "sizes that divide the model dimensions."
                    )

    # --- batches ------------------------------------------------------------------------

    def batch_sharding(self, ndim: int) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec(BATCH_MESH_AXES, *([None] * (ndim - 1))))

    def shard_batch(self, local_batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        """Global arrays from this process's rows; rows of all processes concatenate in order."""
        return {
            k: jax.make_array_from_process_local_data(self.batch_sharding(np.ndim(v)), np.asarray(v))
            for k, v in local_batch.items()
        }

    def shard_global_batch(self, batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        """Global arrays from a global batch that every process holds whole (each hands the mesh
        its own slice of rows)."""
        share = len(next(iter(batch.values()))) // jax.process_count()
        start = jax.process_index() * share
        return self.shard_batch({k: np.asarray(v)[start : start + share] for k, v in batch.items()})

    def map_batches(self, fn: Callable[[dict[str, jax.Array], int], Any], rows: Mapping[str, np.ndarray], batch_size: int) -> Any:
        """`fn(batch, start)` over `rows` (arrays with a leading row axis, held whole by every
        process) in global batches of `batch_size` rows starting at row `start`, the last one
        padded with zero rows; `fn` runs on the mesh. Its outputs (a pytree of arrays with a
        leading row axis) come back to every host without the padding, concatenated."""
        n = len(next(iter(rows.values())))
        outputs = []
        for start in range(0, n, batch_size):
            chunk = {k: np.asarray(v[start : start + batch_size]) for k, v in rows.items()}
            m = len(next(iter(chunk.values())))
            padded = {k: np.concatenate([v, np.zeros((batch_size - m, *v.shape[1:]), v.dtype)]) for k, v in chunk.items()}
            with self.activate():
                out = fn(self.shard_global_batch(padded), start)
            outputs.append(jax.tree.map(lambda x: to_host(x)[:m], out))
        return jax.tree.map(lambda *xs: np.concatenate(xs), *outputs)

    def per_process_batch_size(self, global_batch_size: int) -> int:
        if global_batch_size % self.data_parallel_size:
            raise MeshError(
                f"global batch size {global_batch_size} is not divisible by the "
                f"{self.data_parallel_size} data-parallel shards (mesh data x fsdp); pick a "
                "multiple."
            )
        return global_batch_size // jax.process_count()


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """Joins a multi-process run (`jax.distributed`); call before any other JAX work.

    With no arguments JAX detects the cluster (Cloud TPU, SLURM, ...). On CPU the processes
    talk through gloo collectives.
    """
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
    )


def to_host(x: jax.Array) -> np.ndarray:
    """All of a (possibly multi-process) global array, on every process."""
    if jax.process_count() == 1:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
