"""Direct preference optimisation: the policy trained on comparisons, without a reward model.

A response's log-ratio is log pi(y|x) - log pi_ref(y|x), summed over its tokens (EOS included),
and beta times it is the reward DPO implies. Every ordered pair (w better than l) of a comparison
contributes a loss of the gap between its two responses' scores:

    sigmoid        DPO              -log sigmoid(beta * h)            h = logratio_w - logratio_l
    conservative   cDPO             -(1 - e) log sigmoid(beta * h) - e log sigmoid(-beta * h)
                                    (e = label_smoothing: the chance that a label is flipped)
    ipo            IPO              (h' - 1 / (2 beta))^2             h' on each response's
                                    log-ratio per token (TRL's normalisation, the IPO paper's form)

and a batch's loss is the mean over prompts of each prompt's mean over its pairs (the reward
model's averaging, `reward.pairwise_sums`; K = 2 gives TRL's mean over pairs). The batches are
the reward model's (`data.preferences.PreferenceBatches`): K-wise rankings become their pairs.

The reference pi_ref is the starting policy, in one of three places:
    a LoRA policy      its own base weights (adapters off), inside the step: no second copy
                       (unless another `reference_checkpoint` is given)
    reference="model"  a frozen copy on the mesh, run on each batch before the step
    "precomputed"      every response's reference log-probability computed once before
                       training and stored in the run (reference_logps.npz); no reference in
                       memory while training
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import seqio
from flax import nnx

from flanjax import paths
from flanjax.data.availability import check_datasets
from flanjax.data.pipeline import check_vocabulary, get_task_or_mixture
from flanjax.data.preferences import PreferenceBatches
from flanjax.decode import round_up, token_log_likelihoods
from flanjax.errors import FlanjaxError
from flanjax.models.lora import LoraConfig, without_adapters
from flanjax.models.transformer import Transformer
from flanjax.rlhf.reward import comparisons_task, pairwise_sums
from flanjax.rundir.checkpoint import CheckpointConfig
from flanjax.rundir.files import check_tokenizer, read_model_config, resolve_checkpoint, restore_weights
from flanjax.rundir.metrics import console
from flanjax.sharding import MeshConfig, Partitioner, to_host
from flanjax.train import trainer
from flanjax.train.loop import BatchSource, LoopConfig, LoopResult
from flanjax.train.optim import OptimizerConfig, make_optimizer, make_schedule
from flanjax.train.steps import lm_init, make_eval_step, make_train_step

LOSSES = ("sigmoid", "conservative", "ipo")
REFERENCES = ("model", "precomputed")
REFERENCE_FILE = "reference_logps.npz"  # "precomputed": each response's reference log-probability


class DPOError(FlanjaxError, ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class DPOConfig:
    loss: str = "sigmoid"  # one of LOSSES
    beta: float = 0.1  # DPO: the KL penalty's strength; IPO: tau, the target gap is 1 / (2 beta)
    label_smoothing: float = 0.0  # conservative DPO's e, in [0, 0.5)
    reference: str = "model"  # one of REFERENCES (a LoRA policy with "model": its base, in the step)

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise DPOError(f"DPOConfig.loss = {self.loss!r} is not one of {', '.join(map(repr, LOSSES))}.")
        if self.reference not in REFERENCES:
            raise DPOError(f"DPOConfig.reference = {self.reference!r} is not one of {', '.join(map(repr, REFERENCES))}.")
        if self.beta <= 0:
            raise DPOError(f"DPOConfig.beta = {self.beta}: it must be positive (DPO's typical values are 0.1 to 0.5).")
        if not 0 <= self.label_smoothing < 0.5:
            raise DPOError(f"DPOConfig.label_smoothing = {self.label_smoothing}: it must lie in [0, 0.5).")
        if self.label_smoothing and self.loss != "conservative":
            raise DPOError(f"label_smoothing = {self.label_smoothing} is conservative DPO's: set DPOConfig.loss = 'conservative'.")


# --- the maths -------------------------------------------------------------------------------


def response_logps(model: Transformer, tokens: jax.Array, lengths: jax.Array, prompt_lengths: jax.Array):
    """Summed log-probabilities of each row's response tokens and their number: tokens [..., t]
    (prompt then response), lengths and prompt_lengths [...] -> ([...], [...])."""
    *lead, t = tokens.shape
    flat, n = tokens.reshape(-1, t), lengths.reshape(-1, 1)
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), flat.shape)
    hidden, _ = model(flat, positions, (positions < n).astype(jnp.int32), return_hidden=True)
    predicted = jnp.arange(1, t)[None, :]  # the token each position predicts
    scored = (predicted >= prompt_lengths.reshape(-1, 1)) & (predicted < n)
    logp = token_log_likelihoods(model.logits(hidden[:, :-1]), flat[:, 1:], scored).sum(axis=-1)
    return logp.reshape(lead), scored.sum(axis=-1).reshape(lead)


def pair_loss(config: DPOConfig) -> Callable[[jax.Array], jax.Array]:
    """The loss of a pair's score gap (scores: `pair_scores`)."""
    beta, e = config.beta, config.label_smoothing
    if config.loss == "ipo":
        return lambda gap: jnp.square(gap - 1 / (2 * beta))
    return lambda gap: -(1 - e) * jax.nn.log_sigmoid(gap) - e * jax.nn.log_sigmoid(-gap)


def pair_scores(config: DPOConfig, logratios: jax.Array, num_tokens: jax.Array) -> jax.Array:
    """What a pair's gap is taken between: beta * log-ratio (DPO), the per-token log-ratio (IPO)."""
    if config.loss == "ipo":
        return logratios / jnp.maximum(num_tokens, 1)
    return config.beta * logratios


def dpo_loss(config: DPOConfig):
    """The loss function (see `train.losses`) on `PreferenceBatches` batches with the reference's
    log-probabilities in `ref_logps` [b, K], or, without them, a LoRA policy's base as the
    reference. Metrics (sums, see `train.loop.RATIOS`): loss, pair accuracy and the implied
    rewards beta * log-ratio of each pair's better and worse response."""

    def loss_fn(model: Transformer, batch: Mapping[str, jax.Array], rngs: nnx.Rngs | None = None):
        del rngs  # no dropout: the log-ratios compare with the reference's deterministic ones
        rows = batch["tokens"], batch["lengths"], jnp.broadcast_to(batch["prompt_length"][:, None], batch["lengths"].shape)
        logps, num_tokens = response_logps(model, *rows)
        ref = batch["ref_logps"] if "ref_logps" in batch else response_logps(without_adapters(model), *rows)[0]
        logratios = logps - jax.lax.stop_gradient(ref)
        valid = batch["lengths"] > 0
        sums = pairwise_sums(pair_scores(config, logratios, num_tokens), batch["ranks"], valid, pair_loss(config))
        rewards = pairwise_sums(config.beta * logratios, batch["ranks"], valid, jnp.zeros_like)
        del sums["better_score_sum"], sums["worse_score_sum"]
        sums |= {"chosen_reward_sum": rewards["better_score_sum"], "rejected_reward_sum": rewards["worse_score_sum"],
                 "reward_margin_sum": rewards["better_score_sum"] - rewards["worse_score_sum"]}  # fmt: skip
        return sums["loss_sum"] / jnp.maximum(sums["weight_sum"], 1.0), sums

    return loss_fn


# --- the reference's log-probabilities ----------------------------------------------------------


class FrozenReference:
    """The reference model on the mesh (loaded at its first use: a dry run loads nothing):
    `logps(batch)` of this process's rows of a batch."""

    def __init__(self, checkpoint_path: str, partitioner: Partitioner):
        self.checkpoint_path, self.partitioner = checkpoint_path, partitioner
        self._state = None

    def rows_logps(self, tokens, lengths, prompt_lengths) -> jax.Array:
        """Reference log-probabilities of global rows (arrays on the mesh)."""
        if self._state is None:
            run_dir, step = resolve_checkpoint(self.checkpoint_path)
            console.print(f"Loading the reference policy from {run_dir} step {step}")
            graphdef, self._state = restore_weights(run_dir, step, read_model_config(run_dir), self.partitioner)
            self._logps = jax.jit(lambda state, rows: response_logps(nnx.merge(graphdef, state), *rows)[0])
        with self.partitioner.activate():
            return self._logps(self._state, (tokens, lengths, prompt_lengths))

    def logps(self, batch: Mapping[str, np.ndarray]) -> np.ndarray:
        g = self.partitioner.shard_batch({k: batch[k] for k in ("tokens", "lengths", "prompt_length")})
        out = to_host(self.rows_logps(g["tokens"], g["lengths"], jnp.broadcast_to(g["prompt_length"][:, None], g["lengths"].shape)))
        share = len(batch["tokens"])  # this process's rows of the global batch
        return out[jax.process_index() * share : (jax.process_index() + 1) * share]


def _row_key(tokens: np.ndarray, length: int, prompt_length: int) -> bytes:
    return hashlib.blake2b(np.asarray(tokens[:length], np.int32).tobytes() + int(prompt_length).to_bytes(4, "little"),
                           digest_size=16).digest()  # fmt: skip


class PrecomputedReference:
    """Reference log-probabilities looked up by row (prompt and response tokens) in a table
    that `load()` gives at the first use."""

    def __init__(self, load: Callable[[], Mapping[bytes, float]], path: str):
        self.load, self.path, self.table = load, path, None

    def logps(self, batch: Mapping[str, np.ndarray]) -> np.ndarray:
        self.table = self.table or self.load()
        out = np.zeros(batch["lengths"].shape, np.float32)
        for (i, k), n in np.ndenumerate(batch["lengths"]):
            if n > 0:
                key = _row_key(batch["tokens"][i, k], n, batch["prompt_length"][i])
                if key not in self.table:
                    raise DPOError(f"a response of the batch is not in {self.path}: the comparisons (or prompt_len, "
                                   "response_len) changed since it was computed. Delete it to compute it again.")  # fmt: skip
                out[i, k] = self.table[key]
        return out


def precompute_reference(reference: FrozenReference, name: str, splits, shape: Mapping[str, int], batch_size: int) -> dict[bytes, float]:
    """Every distinct response row of the task's `splits`, read whole on every process, and its
    reference log-probability (computed on the mesh `batch_size` rows at a time)."""
    rows: dict[bytes, tuple] = {}
    for split in splits:
        source = PreferenceBatches(name, None, 1, split=split, shuffle=False, num_epochs=1, shard_index=0, num_shards=1, **shape)
        for batch in source:
            for k, n in enumerate(batch["lengths"][0]):
                if n > 0:
                    key = _row_key(batch["tokens"][0, k], n, batch["prompt_length"][0])
                    rows[key] = (batch["tokens"][0, k], n, batch["prompt_length"][0])
        source.close()
    keys = list(rows)
    columns = {name: np.stack([rows[k][i] for k in keys]) for i, name in enumerate(("tokens", "lengths", "prompt_lengths"))}
    logps = reference.partitioner.map_batches(lambda b, _: reference.rows_logps(b["tokens"], b["lengths"], b["prompt_lengths"]),
                                              columns, batch_size)  # fmt: skip
    return dict(zip(keys, logps.tolist()))


def save_table(path: str, table: Mapping[bytes, float]) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, keys=np.frombuffer(b"".join(table), np.uint8).reshape(-1, 16), logps=np.asarray(list(table.values()), np.float32))
    paths.write_atomic(path, buffer.getvalue())


def load_table(path: str) -> dict[bytes, float]:
    with np.load(io.BytesIO(paths.read_bytes(path))) as f:
        return dict(zip((k.tobytes() for k in f["keys"]), f["logps"].tolist()))


@dataclasses.dataclass
class WithReference:
    """A batch source with each batch's reference log-probabilities added as `ref_logps` [b, K]."""

    source: BatchSource
    logps: Callable[[Mapping[str, np.ndarray]], np.ndarray]

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = dict(next(self.source))
        return batch | {"ref_logps": self.logps(batch)}

    def element_spec(self) -> dict[str, jax.ShapeDtypeStruct]:
        spec = dict(self.source.element_spec())
        return spec | {"ref_logps": jax.ShapeDtypeStruct(spec["lengths"].shape, np.float32)}

    def get_state(self) -> Mapping:
        return self.source.get_state()

    def set_state(self, state: Mapping) -> None:
        self.source.set_state(state)

    def close(self) -> None:
        self.source.close()


# --- `flanjax train` with configs/runs/dpo.gin ------------------------------------------------


def _check_reference(reference_checkpoint: str, policy_dir: str, vocabulary) -> None:
    """A reference must be the policy's architecture, on the same tokenizer."""
    run_dir, _ = resolve_checkpoint(reference_checkpoint)
    ours, theirs = read_model_config(policy_dir), read_model_config(run_dir)
    if ours != theirs:
        changed = [f.name for f in dataclasses.fields(ours) if getattr(ours, f.name) != getattr(theirs, f.name)]
        raise DPOError(f"the reference {run_dir} is another model than the policy {policy_dir} (they differ in "
                       f"{', '.join(changed)}); DPO's reference is the policy before training: give its SFT run.")  # fmt: skip
    check_tokenizer(run_dir, vocabulary, "the preference data")


def train_dpo(
    *,
    model_dir: str,
    init_checkpoint: str,
    batch_size: int,
    loop: LoopConfig,
    preferences: str | None = None,
    mixture_or_task_name: str | None = None,
    dpo: DPOConfig = DPOConfig(),
    reference_checkpoint: str | None = None,
    prompt_len: int = 64,
    response_len: int = 64,
    max_responses: int = 4,
    allow_ties: bool = False,
    optimizer: OptimizerConfig = OptimizerConfig(learning_rate=5e-7),
    mesh: MeshConfig = MeshConfig(),
    checkpoint: CheckpointConfig = CheckpointConfig(),
    lora: LoraConfig | None = None,
    validation_batches: int | None = None,
    shuffle: bool = True,
    seed: int = 0,
) -> LoopResult:
    """Trains the policy of `init_checkpoint` (an SFT run or step) by DPO on comparisons: a
    directory of preference JSONL (`preferences`, as for the reward model) or a registered task.
    `reference_checkpoint`: the reference policy (default: `init_checkpoint`)."""
    name = comparisons_task(preferences, mixture_or_task_name, allow_ties)
    check_datasets(name)
    partitioner = Partitioner.from_config(mesh)
    per_process = partitioner.per_process_batch_size(batch_size)
    shape = dict(prompt_len=prompt_len, response_len=response_len, max_responses=max_responses)
    origin = resolve_checkpoint(init_checkpoint)
    config = read_model_config(origin[0])
    vocabulary = check_vocabulary(name, config.vocab_size)
    if reference_checkpoint is not None:
        _check_reference(reference_checkpoint, origin[0], vocabulary)
    splits = [s for s in ("train", "validation") if s in seqio.get_subtasks(get_task_or_mixture(name))[0].splits]
    base = lora is not None and reference_checkpoint is None  # a LoRA policy's own base weights
    reference = _reference(dpo, base, reference_checkpoint or init_checkpoint, partitioner, model_dir, name, splits, shape)
    batches: BatchSource = PreferenceBatches(name, None, per_process, seed=seed, shuffle=shuffle, **shape)
    if reference is not None:
        batches = WithReference(batches, reference)
    loss = dpo_loss(dpo)
    tx = make_optimizer(optimizer, loop.num_steps)

    def make_hooks(graphdef, abstract):
        if "validation" not in splits:
            return {}
        valid = PreferenceBatches(name, None, per_process, split="validation", shuffle=False, num_epochs=1, **shape)
        valid = valid if reference is None else WithReference(valid, reference)
        return {"validation": trainer.validation_hook(partitioner, make_eval_step(graphdef, loss), abstract, valid, validation_batches)}

    return trainer.run(trainer.Trainer(
        description=f"DPO ({dpo.loss}, beta {dpo.beta}) of {origin[0]} step {origin[1]} on {name}",
        model_dir=model_dir, model=config, lora=lora, origin=origin[0], vocabulary=vocabulary, partitioner=partitioner,
        loop=loop, checkpoint=checkpoint, batches=batches, init=lm_init(config, tx, seed, lora),
        pretrained=lambda: (restore_weights(*origin, config, partitioner)[1],),
        compile_step=lambda graphdef, abstract, spec: trainer.jit_step(make_train_step(graphdef, loss, seed=seed), abstract, spec),
        make_hooks=make_hooks, learning_rate=make_schedule(optimizer, loop.num_steps),
        console_keys=("loss", "pair_accuracy", "reward_margin", "grad_norm"),
        plots=(trainer.Plot(), trainer.Plot("rewards.png", ("chosen_reward", "rejected_reward", "reward_margin"), log_scale=False,
                                            ylabel="implied reward (beta x log-ratio)")),  # fmt: skip
    ))  # fmt: skip


def _reference(dpo: DPOConfig, base: bool, checkpoint_path: str, partitioner: Partitioner, model_dir: str,
               name: str, splits, shape) -> Callable | None:  # fmt: skip
    """`logps(batch)` of the reference, or None for the policy's own base inside the step."""
    if dpo.reference == "model":
        return None if base else FrozenReference(checkpoint_path, partitioner).logps
    path = os.path.join(model_dir, REFERENCE_FILE)

    def load() -> dict[bytes, float]:
        if paths.exists(path):  # a resumed run
            return load_table(path)
        console.print(f"Computing the reference's log-probabilities of every response in {name} ({', '.join(splits)})")
        rows = round_up(64, partitioner.data_parallel_size)
        table = precompute_reference(FrozenReference(checkpoint_path, partitioner), name, splits, shape, rows)
        if jax.process_index() == 0:
            save_table(path, table)
        return table

    return PrecomputedReference(load, path).logps
