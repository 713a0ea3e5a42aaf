"""Elastic weight consolidation (EWC, Kirkpatrick et al. 2017) of LoRA fine-tuning (E2WM).

`flanjax fisher` (`compute_fisher`) estimates the diagonal empirical Fisher of the base kernels
(and embedding tables) that LoRA targets, on examples of a seqio task:

    F = mean over examples i of (d loss_i / d W)^2,   loss_i = example i's mean token loss

and saves it beside the run (RUN/fisher/):

    fisher.safetensors   one float32 tensor per kernel, named by its projection's path
                         ("layers.0.attn.q.kernel"; a scanned model's "layers.attn.q.kernel";
                         a table's "embed.embedding")
    fisher.json          run, step, task, split, num_examples, targets, shapes

The base weights stay frozen under LoRA, so theta - theta* is each adapter's update Delta W and
the EWC penalty is `weight * sum over kernels of sum(F * Delta W^2)` (`ewc_penalty`), added to
the LM loss as the "ewc" term (`ewc_term`, `losses.add_terms`).

How the Fisher reaches the jitted step: as state, never as a constant. Each LoRA module gets a
`FisherDiagonal` variable (shape and logical axes of its kernel, so the Partitioner shards it
like the kernel; not a `Param`, so no optimizer trains it), which the "ewc" term reads from the
model. `EwcTrainState` also holds the same variables under `ewc`, which sorts before `model`:
NNX stores a shared variable at its first path, so checkpoints keep the Fisher under `ewc/`
and the `model/` part stays that of a plain LoRA model, which eval, convert and chat read.
The step is unchanged: it receives, donates and returns the Fisher with the rest of the state,
and a resumed run restores it from its checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import safetensors.numpy
from flax import nnx

from flanjax import paths
from flanjax.errors import FlanjaxError
from flanjax.models.lora import ADAPTABLE, LoRA, LoraConfig, lora_modules, weight_name
from flanjax.models.transformer import TransformerConfig, new_model
from flanjax.sharding import Partitioner, to_host
from flanjax.train.losses import LossFn, Term, add_terms, lm_loss
from flanjax.train.steps import TrainState, lm_init

FISHER_DIR = "fisher"
FISHER_WEIGHTS = "fisher.safetensors"
FISHER_INFO = "fisher.json"


class FisherError(FlanjaxError, ValueError):
    """A Fisher file that does not fit the model, or EWC asked for without what it needs."""


class FisherNotFoundError(FlanjaxError, FileNotFoundError):
    pass


@dataclasses.dataclass(frozen=True)
class EwcConfig:
    """`lm.train.ewc`: the penalty `weight * sum(F * Delta W^2)` on the LoRA updates (needs `lm.train.lora`)."""

    fisher: str | None = None  # a `flanjax fisher` directory (RUN/fisher), or the run directory holding one
    weight: float = 1.0  # lambda

    def __post_init__(self):
        if not self.fisher:
            raise FisherError("EWC needs a Fisher: set ewc.EwcConfig.fisher to the directory `flanjax fisher` wrote (RUN/fisher).")
        if not self.weight >= 0.0:
            raise FisherError(f"EWC weight (lambda) must be >= 0, got {self.weight!r}.")


# --- the penalty --------------------------------------------------------------------------


def ewc_penalty(fisher: Sequence[jax.Array], deltas: Sequence[jax.Array], weight: float) -> jax.Array:
    """`weight * sum_k sum(fisher[k] * deltas[k]^2)`: EWC's quadratic penalty, Delta W = theta - theta*."""
    terms = (jnp.sum(f.astype(jnp.float32) * jnp.square(d.astype(jnp.float32))) for f, d in zip(fisher, deltas, strict=True))
    return weight * sum(terms)


class FisherDiagonal(nnx.Variable):
    """A kernel's diagonal Fisher: state the EWC term reads, never trained (not a `Param`)."""


def ewc_term(weight: float) -> Term:
    """The EWC penalty of a model whose LoRA modules carry their Fisher (`attach_fisher`)."""

    def term(model: nnx.Module, batch, rngs) -> jax.Array:
        modules = [m for _, m in lora_modules(model)]
        return ewc_penalty([m.fisher[...] for m in modules], [m.delta() for m in modules], weight)

    return term


def attach_fisher(model: nnx.Module, values: Sequence[jax.Array] | None = None) -> list[FisherDiagonal]:
    """Gives each LoRA module of `model` a `fisher` variable (zeros, or `values` in
    `lora_modules` order) shaped and named (logical axes) like its kernel; returns them."""
    variables = []
    for i, (_, m) in enumerate(lora_modules(model)):
        kernel = m.weight
        value = jnp.zeros(kernel.shape, jnp.float32) if values is None else jnp.asarray(values[i], jnp.float32)
        m.fisher = FisherDiagonal(value, out_sharding=kernel.get_metadata().get("out_sharding"), eager_sharding=False)
        variables.append(m.fisher)
    return variables


class EwcTrainState(TrainState):
    """A LoRA `TrainState` whose model's adapters carry their Fisher; `ewc` holds the same
    variables so that they are stored (and checkpointed) under `ewc/`, not `model/` (NNX
    flattens attributes in sorted order: the name must sort before "model")."""

    def __init__(self, model: nnx.Module, optimizer: nnx.Optimizer, fisher: Sequence[jax.Array] | None = None):
        super().__init__(model, optimizer)
        self.ewc = nnx.List(attach_fisher(model, fisher))


def ewc_init(config: TransformerConfig, tx: optax.GradientTransformation, seed: int, lora: LoraConfig):
    """`steps.lm_init` with the Fisher attached: `init(base_state, fisher_values)`; None: zeros
    (the abstract state)."""
    plain = lm_init(config, tx, seed, lora)

    def init(base: nnx.State | None = None, fisher: Sequence[jax.Array] | None = None) -> EwcTrainState:
        state = plain(base)
        return EwcTrainState(state.model, state.optimizer, fisher)

    return init


def ewc_loss(loss_fn: LossFn, config: EwcConfig) -> LossFn:
    """`loss_fn` plus the "ewc" term."""
    return add_terms(loss_fn, {"ewc": ewc_term(config.weight)})


# --- which kernels ------------------------------------------------------------------------


def kernel_name(path: str, weight: str = "kernel") -> str:
    """A weight's tensor name in a Fisher file: its module's path, dotted ("layers.0.attn.q.kernel",
    "embed.embedding")."""
    return f"{path.replace('/', '.')}.{weight}"


def target_kernels(model: nnx.Module, targets: Sequence[str]) -> dict[tuple, str]:
    """{kernel's state path: its name in a Fisher file} of every projection that LoRA `targets`
    pick, as `apply_lora` picks them (re.search in module paths); a projection that a LoRA
    module wraps counts by the wrapper's path, its kernel being the base's."""
    wrapped = {path for path, _ in lora_modules(model)}
    found = {}
    for parts, m in nnx.iter_modules(model):
        path = "/".join(map(str, parts))
        if isinstance(m, LoRA):
            name = m.weight_name
            kernel = (*parts, "base", name)
        elif isinstance(m, ADAPTABLE) and path.removesuffix("/base") not in wrapped:
            name = weight_name(m)
            kernel = (*parts, name)
        else:
            continue
        if any(re.search(t, path) for t in targets):
            found[kernel] = kernel_name(path, name)
    if not found:
        raise FisherError(f"targets {list(targets)} match no projection or embedding of the model: give LoRA target regexes, e.g. 'attn/q$'.")
    return found


# --- computing it -------------------------------------------------------------------------


def squared_gradients(
    graphdef: nnx.GraphDef, kernels: nnx.State, rest: nnx.State, batch: Mapping[str, jax.Array], loss_fn: LossFn
) -> nnx.State:
    """Sum over the batch's rows of each row's squared gradient (float32) of its loss wrt
    `kernels` (per-example gradients: a vmap of grad); each row is one example (unpacked), and
    a row without target tokens (padding) adds 0."""

    def example_loss(k, row):
        return loss_fn(nnx.merge(graphdef, k, rest), {name: x[None] for name, x in row.items()}, None)[0]

    grads = jax.vmap(jax.grad(example_loss), in_axes=(None, 0))(kernels, batch)
    return jax.tree.map(lambda g: jnp.sum(jnp.square(g.astype(jnp.float32)), axis=0), grads)


def compute_fisher(
    run: str,
    task: str,
    num_examples: int,
    *,
    task_feature_lengths: Mapping[str, int],
    partitioner: Partitioner,
    split: str = "train",
    batch_size: int = 8,
    targets: Sequence[str] | None = None,
    out: str | None = None,
) -> dict:
    """The diagonal empirical Fisher of the run's targeted kernels on the first `num_examples`
    examples (those with target tokens) of `task`'s `split`, written to `out` (default
    RUN/fisher). Returns {examples, examples_per_s, path}.

    The model is the run's (its selected or latest step; a LoRA run's adapters included).
    `targets` (LoRA target regexes) default to the run's own LoRA targets if it trained
    adapters, else `LoraConfig()`'s: what a LoRA + EWC run from this model adapts by default."""
    from flanjax.data.pipeline import SeqioBatches, check_vocabulary
    from flanjax.rundir.files import check_tokenizer, read_lora_config, resolve_checkpoint, restore
    from flanjax.rundir.metrics import console

    if num_examples < 1:
        raise FisherError(f"the number of examples must be positive, got {num_examples}.")
    run_dir, step = resolve_checkpoint(run)
    targets = tuple(targets or (read_lora_config(run_dir) or LoraConfig()).targets)
    partitioner.per_process_batch_size(batch_size)  # the batch must split over the data axes
    graphdef, state, config = restore(run, partitioner)
    vocabulary = check_vocabulary(task, config.vocab_size)
    check_tokenizer(run_dir, vocabulary, f"task {task!r}")
    model = nnx.merge(graphdef, state)
    names = target_kernels(model, targets)
    graphdef, kernels, rest = nnx.split(model, lambda path, _: tuple(path) in names, ...)

    console.print(f"Reading {num_examples} examples of {task} ({split} split)...")
    # Unpacked, one example a row; every process reads them all and hands the mesh its share.
    source = SeqioBatches(task, task_feature_lengths, 1, split=split, shuffle=False, pack=False, num_epochs=1,
                          shard_index=0, num_shards=1)  # fmt: skip
    examples = _examples(source, num_examples)
    n = len(examples)
    if n == 0:
        raise FisherError(f"task {task!r} split {split!r} has no example with target tokens.")
    if n < num_examples:
        console.print(f"{task} ({split} split) has only {n} examples with target tokens: the Fisher averages over those.")
    rows = {k: np.concatenate([e[k] for e in examples]) for k in examples[0]}

    shardings = jax.tree.map(lambda x: x.sharding, kernels)  # the restored kernels'
    zeros = jax.jit(lambda: jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), kernels), out_shardings=shardings)
    loss_fn = lm_loss()

    def accumulate(total, k, r, batch):
        return jax.tree.map(jnp.add, total, squared_gradients(graphdef, k, r, batch, loss_fn))

    batches = [{k: _padded(v[i : i + batch_size], batch_size) for k, v in rows.items()} for i in range(0, n, batch_size)]
    total = zeros()
    console.print(f"Compiling the Fisher step ({len(names)} kernels, {batch_size} examples a batch)...")
    # Outside `partitioner.activate()`, so the model's activation constraints are off: under the
    # vmap they would pin a one-example batch axis. The kernels' and batch's shardings lay it out.
    step_fn = jax.jit(accumulate, out_shardings=shardings, donate_argnums=0)
    step_fn = step_fn.lower(total, kernels, rest, partitioner.shard_global_batch(batches[0])).compile()
    every = max(len(batches) // 10, 1)
    start_time = time.perf_counter()
    for i, batch in enumerate(batches):
        total = step_fn(total, kernels, rest, partitioner.shard_global_batch(batch))
        if (i + 1) % every == 0 or i == len(batches) - 1:
            jax.block_until_ready(total)
            done = min((i + 1) * batch_size, n)
            console.print(f"  {done}/{n} examples, {done / (time.perf_counter() - start_time):.1f} examples/s")
    seconds = time.perf_counter() - start_time

    tensors = {names[tuple(path)]: to_host(v[...]) / n for path, v in nnx.to_flat_state(total)}
    out = out or os.path.join(run_dir, FISHER_DIR)
    info = {"run": run_dir, "step": step, "task": task, "split": split, "num_examples": n, "targets": list(targets),
            "task_feature_lengths": dict(task_feature_lengths), "shapes": {k: list(v.shape) for k, v in tensors.items()}}  # fmt: skip
    if jax.process_index() == 0:
        save_fisher(out, tensors, info)
    console.print(f"Wrote the Fisher of {len(tensors)} kernels ({n} examples of {task}, {split} split) to {out}")
    return {"examples": n, "examples_per_s": n / seconds, "path": paths.abspath(out)}


def _examples(source, n: int) -> list[dict[str, np.ndarray]]:
    """The first `n` one-row batches of `source` that have target tokens (a row without any has
    no loss, so no gradient: counting it would only dilute the mean)."""
    rows = []
    for batch in source:
        if batch["decoder_loss_weights"].any():
            rows.append(batch)
        if len(rows) == n:
            break
    source.close()
    return rows


def _padded(x: np.ndarray, size: int) -> np.ndarray:
    """`x` with zero rows up to `size` rows: a padding row has no target tokens."""
    return np.concatenate([x, np.zeros((size - len(x), *x.shape[1:]), x.dtype)])


# --- files ----------------------------------------------------------------------------------


def save_fisher(directory: str, tensors: Mapping[str, np.ndarray], info: Mapping) -> None:
    """Writes fisher.safetensors, then fisher.json (each through a temporary file and a rename):
    a directory with the JSON holds a whole Fisher. Remotely each file is one upload (a GCS object
    appears only whole), the JSON still last."""
    paths.makedirs(directory)
    json_path = os.path.join(directory, FISHER_INFO)
    if paths.exists(json_path):
        paths.remove(json_path)  # the old JSON must not vouch for new, half-written weights
    weights = os.path.join(directory, FISHER_WEIGHTS)
    arrays = {k: np.asarray(v, np.float32) for k, v in tensors.items()}
    if paths.is_remote(weights):  # safetensors writes only local files
        paths.write_atomic(weights, safetensors.numpy.save(arrays))
    else:
        safetensors.numpy.save_file(arrays, weights + ".tmp")
        os.replace(weights + ".tmp", weights)
    paths.write_atomic(json_path, json.dumps(dict(info), indent=2))


def fisher_directory(path: str) -> str:
    """The Fisher directory `path` names: itself, or a run directory's fisher/."""
    for directory in (path, os.path.join(path, FISHER_DIR)):
        if paths.exists(os.path.join(directory, FISHER_INFO)) and paths.exists(os.path.join(directory, FISHER_WEIGHTS)):
            return directory
    raise FisherNotFoundError(
        f"no Fisher in {path} ({FISHER_INFO} and {FISHER_WEIGHTS}, or a run's {FISHER_DIR}/ holding them): "
        f"compute it first with `flanjax fisher --run RUN --task TASK --num_examples N`, and point "
        "lm.train.ewc (EwcConfig.fisher) at RUN or RUN/fisher."
    )


def read_fisher_info(path: str) -> dict:
    with paths.open(os.path.join(fisher_directory(path), FISHER_INFO)) as f:
        return json.load(f)


def read_fisher(path: str) -> tuple[dict[str, np.ndarray], dict]:
    """(tensors by name, info) of a Fisher directory (or of the run directory holding one)."""
    directory = fisher_directory(path)
    weights = os.path.join(directory, FISHER_WEIGHTS)
    tensors = safetensors.numpy.load(paths.read_bytes(weights)) if paths.is_remote(weights) else safetensors.numpy.load_file(weights)
    return tensors, read_fisher_info(directory)


def check_fisher(tensors: Mapping[str, np.ndarray], info: Mapping, model: nnx.Module, where: str) -> list[np.ndarray]:
    """The Fisher tensors in `lora_modules(model)` order, once each LoRA module's kernel has
    one of its shape and the file has no other (`model` may be abstract)."""
    modules = lora_modules(model)
    if not modules:
        raise FisherError("EWC penalises LoRA updates, and this model has no LoRA adapters: set lm.train.lora "
                          "(e.g. include configs/runs/lora.gin).")  # fmt: skip
    wanted = {kernel_name(path, m.weight_name): m.weight.shape for path, m in modules}
    fix = (f"Compute the Fisher of the model this run starts from, for its LoRA targets (`flanjax fisher --run RUN "
           f"--task TASK --num_examples N --targets REGEX...`), or set lora.LoraConfig.targets to the Fisher's "
           f"{info.get('targets')}.")  # fmt: skip
    unrolled = lambda names: any(re.match(r"layers\.\d+\.", n) for n in names)  # noqa: E731
    if tensors and unrolled(tensors) != unrolled(wanted):
        fix += " One of the two models scans its layers (TransformerConfig.scan_layers), the other not: use one layout."
    for name in wanted:
        if name not in tensors:
            raise FisherError(f"the Fisher in {where} has no tensor for kernel {name}, which LoRA adapts. {fix}")
        if tuple(tensors[name].shape) != tuple(wanted[name]):
            raise FisherError(
                f"the Fisher in {where} has shape {tuple(tensors[name].shape)} for kernel {name} but the model's kernel "
                f"is {tuple(wanted[name])}: it was computed on another model. {fix}"
            )
    extra = sorted(set(tensors) - set(wanted))
    if extra:
        raise FisherError(f"the Fisher in {where} covers kernel {extra[0]}, which LoRA does not adapt ({len(extra)} such). "
                          f"{fix}")  # fmt: skip
    return [tensors[kernel_name(path, m.weight_name)] for path, m in modules]


def read_checked_fisher(path: str, model: nnx.Module, origin: tuple[str, int] | None = None) -> list[np.ndarray]:
    """The Fisher of `path` for `model`'s LoRA modules, in their order (see `check_fisher`);
    a warning if it was computed at another checkpoint than `origin` (run directory, step), the
    weights the adapters start from."""
    tensors, info = read_fisher(path)
    checked = check_fisher(tensors, info, model, fisher_directory(path))
    if origin is not None and (paths.abspath(info.get("run", "")), info.get("step")) != (paths.abspath(origin[0]), origin[1]):
        from flanjax.rundir.metrics import console

        console.print(f"[yellow]Warning:[/] the Fisher in {fisher_directory(path)} was computed at {info.get('run')} step "
                      f"{info.get('step')}, but the adapters start from {origin[0]} step {origin[1]}.")  # fmt: skip
    return checked


def fisher_for_run(config: EwcConfig, model: TransformerConfig, lora: LoraConfig | None,
                   origin: tuple[str, int] | None) -> list[np.ndarray]:  # fmt: skip
    """`lm.train`'s Fisher, read and checked against the LoRA model before anything compiles."""
    if lora is None:
        raise FisherError("EWC (lm.train.ewc) penalises LoRA updates, but the run trains no adapters: set "
                          "lm.train.lora (e.g. include configs/runs/lora.gin), or drop lm.train.ewc.")  # fmt: skip
    return read_checked_fisher(config.fisher, nnx.eval_shape(lambda: new_model(model, lora)), origin)


def place_fisher(values: Sequence[np.ndarray], abstract_state: nnx.State) -> list[jax.Array]:
    """The Fisher tensors put straight into the shardings of `EwcTrainState.ewc` in an abstract
    state (those of their kernels): no device holds a whole copy."""
    return [jax.device_put(np.asarray(v, np.float32), abstract_state["ewc"][i].sharding) for i, v in enumerate(values)]
