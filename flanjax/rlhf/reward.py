"""Reward models from ranked comparisons (InstructGPT's second step).

The reward model is the policy's Transformer with a scalar head (`models.heads.ScoreModel`),
started from an SFT checkpoint; a response's reward is the score at its last token. A
comparison ranks K >= 2 responses to one prompt; all its C(K, 2) pairs form ONE batch element
scored by K forward passes, with the loss

    -1/C(K,2) * sum over pairs (w better than l) of log sigmoid(r(x, y_w) - r(x, y_l) - margin)

averaged over prompts (a plain pair is K = 2). At the end of training the scores are
normalised: the shift and scale that give the reference (SFT) policy's own samples mean 0
and standard deviation 1 are written to `reward.json` beside the checkpoints, with the
tokenizer's fingerprint, and applied by every consumer (PPO, best-of-n).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import seqio
from flax import nnx

from flanjax.data.pipeline import decoder_prompt, get_task_or_mixture, task_prompts
from flanjax.data.preferences import PreferenceBatches, add_preference_task
from flanjax.data.vocab import DEFAULT_VOCABULARY, HFVocabulary
from flanjax.decode import SamplingConfig, generate_texts
from flanjax.errors import FlanjaxError
from flanjax.eval.run import read_model_config, resolve_checkpoint, restore, write_model_config
from flanjax.models.heads import ScoreModel, score_model_from_lm
from flanjax.models.transformer import Transformer, TransformerConfig
from flanjax.sharding import MeshConfig, Partitioner, shardings_of, to_host
from flanjax.train.checkpoint import CheckpointConfig, Checkpointer
from flanjax.train.loop import LoopConfig, LoopResult, TrainLoop
from flanjax.train.metrics import MetricsLog, console, plot_metrics
from flanjax.train.optim import OptimizerConfig, make_optimizer, make_schedule

REWARD_FILE = "reward.json"  # normalisation and tokenizer of a trained reward model
TOKENIZER_FILE = "tokenizer.txt"  # beside preference files: the tokenizer directory of the policy sampled


class RewardModelError(FlanjaxError, ValueError):
    pass


# --- the maths -------------------------------------------------------------------------------


def pairwise_loss(rewards: jax.Array, ranks: jax.Array, valid: jax.Array, margin: jax.Array) -> dict[str, jax.Array]:
    """K-wise comparison loss of a batch: rewards, ranks, valid [b, K]; margin [b].

    Returns sums: `loss_sum` (each prompt's mean over its pairs, summed over prompts),
    `weight_sum` (prompts with a pair), `correct_sum` and `pair_sum` (pairs ranked right, all)."""
    better = (ranks[:, :, None] < ranks[:, None, :]) & valid[:, :, None] & valid[:, None, :]
    gap = rewards[:, :, None] - rewards[:, None, :]
    losses = jnp.where(better, -jax.nn.log_sigmoid(gap - margin[:, None, None]), 0.0)
    pairs = better.sum(axis=(1, 2))
    return {
        "loss_sum": jnp.sum(losses.sum(axis=(1, 2)) / jnp.maximum(pairs, 1)),
        "weight_sum": jnp.sum(pairs > 0).astype(jnp.float32),
        "correct_sum": jnp.sum(better & (gap > 0)).astype(jnp.float32),
        "pair_sum": jnp.sum(pairs).astype(jnp.float32),
    }


def sequence_scores(model: ScoreModel, tokens: jax.Array, lengths: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
    """Score at the last token of each row: tokens [..., t], lengths [...] -> [...]."""
    *lead, t = tokens.shape
    flat, n = tokens.reshape(-1, t), lengths.reshape(-1, 1)
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), flat.shape)
    segments = (positions < jnp.maximum(n, 1)).astype(jnp.int32)  # an empty slot still attends somewhere
    scores = model(flat, positions, segments, rngs=rngs)
    return jnp.take_along_axis(scores, jnp.maximum(n - 1, 0), axis=1).reshape(lead)


def _batch_stats(model: ScoreModel, batch: Mapping[str, jax.Array], rngs: nnx.Rngs | None = None) -> dict[str, jax.Array]:
    rewards = sequence_scores(model, batch["tokens"], batch["lengths"], rngs)
    return pairwise_loss(rewards, batch["ranks"], batch["lengths"] > 0, batch["margin"])


def make_reward_train_step(graphdef: nnx.GraphDef, seed: int = 0):
    def step(state: nnx.State, batch: Mapping[str, jax.Array]):
        model, optimizer = nnx.merge(graphdef, state)
        model_def, params, rest = nnx.split(model, optimizer.wrt, ...)
        key = jax.random.fold_in(jax.random.key(seed), optimizer.step[...])

        def loss_fn(params):
            stats = _batch_stats(nnx.merge(model_def, params, rest), batch, nnx.Rngs(dropout=key))
            return stats["loss_sum"] / jnp.maximum(stats["weight_sum"], 1.0), stats

        grads, stats = jax.grad(loss_fn, has_aux=True)(params)
        optimizer.update(model, grads)
        metrics = {
            "loss_sum": stats["loss_sum"],
            "weight_sum": stats["weight_sum"],
            "pair_accuracy": stats["correct_sum"] / jnp.maximum(stats["pair_sum"], 1.0),
            "grad_norm": optax.global_norm(grads),
        }
        return nnx.state((model, optimizer)), metrics

    return step


# --- tokens of (prompt, response) texts ------------------------------------------------------


def encode_responses(vocabulary, prompts: Sequence[str], responses: Sequence[str], prompt_len: int, response_len: int) -> dict[str, np.ndarray]:
    """Rows laid out as `PreferenceBatches` lays them out: the prompt (`decoder_prompt`), the
    response's first tokens, EOS; `tokens` [n, P + R] and `lengths` [n]."""
    tokens = np.zeros((len(prompts), prompt_len + response_len), np.int32)
    lengths = np.zeros(len(prompts), np.int32)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        row = decoder_prompt(vocabulary.encode(p), prompt_len) + (vocabulary.encode(r) + [vocabulary.eos_id])[:response_len]
        tokens[i, : len(row)], lengths[i] = row, len(row)
    return {"tokens": tokens, "lengths": lengths}


@dataclasses.dataclass
class RewardModel:
    """A trained, normalised reward model on the mesh: `scores` of texts or of token rows."""

    graphdef: nnx.GraphDef
    state: nnx.State
    config: TransformerConfig
    shift: float
    scale: float
    tokenizer: str  # fingerprint
    partitioner: Partitioner
    prompt_len: int  # the layout it was trained on
    response_len: int

    def scores(self, vocabulary, prompts: Sequence[str], responses: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Normalised rewards of (prompt, response) texts."""
        raw = _text_scores(self.graphdef, self.state, self.partitioner, vocabulary, prompts, responses,
                           self.prompt_len, self.response_len, batch_size)  # fmt: skip
        return (raw - self.shift) / self.scale


@functools.partial(jax.jit, static_argnames="graphdef")
def _normalised_scores(graphdef, state, tokens, lengths, shift, scale):
    return (sequence_scores(nnx.merge(graphdef, state), tokens, lengths) - shift) / scale


def _text_scores(graphdef, state, partitioner, vocabulary, prompts, responses, prompt_len, response_len, batch_size) -> np.ndarray:
    out = []
    for start in range(0, len(prompts), batch_size):
        rows = encode_responses(vocabulary, prompts[start : start + batch_size], responses[start : start + batch_size], prompt_len, response_len)
        n = len(rows["lengths"])
        padded = {k: np.concatenate([v, np.zeros((batch_size - n, *v.shape[1:]), v.dtype)]) for k, v in rows.items()}
        with partitioner.activate():
            batch = partitioner.shard_global_batch(padded)
            scores = _normalised_scores(graphdef, state, batch["tokens"], batch["lengths"], 0.0, 1.0)
        out.append(to_host(scores)[:n])
    return np.concatenate(out) if out else np.zeros(0)


def load_reward_model(checkpoint_path: str, partitioner: Partitioner, vocabulary=None) -> RewardModel:
    """A reward model run (or step) with its normalisation; refuses one trained on another
    tokenizer than `vocabulary`'s."""
    run_dir, step = resolve_checkpoint(checkpoint_path)
    path = os.path.join(run_dir, REWARD_FILE)
    stats = {}
    if os.path.exists(path):
        with open(path) as f:
            stats = json.load(f)
    if "shift" not in stats or "scale" not in stats:
        raise RewardModelError(
            f"reward model {run_dir} has no normalisation stats ({path} is missing or incomplete): "
            "its training did not finish. Run the same `flanjax train-reward` command again; it "
            "resumes and normalises at the end."
        )
    if vocabulary is not None and stats.get("tokenizer") != vocabulary.fingerprint():
        raise RewardModelError(
            f"reward model {run_dir} was trained with another tokenizer ({stats.get('tokenizer_path')}, "
            f"fingerprint {stats.get('tokenizer')}) than the policy's ({vocabulary.path}, "
            f"{vocabulary.fingerprint()}): it would read the policy's token ids as other words. Train "
            "the reward model on preferences tokenized with the policy's tokenizer."
        )
    config = read_model_config(run_dir)
    graphdef, abstract = partitioner.abstract_state(lambda: ScoreModel(config, rngs=nnx.Rngs(0)))
    state = Checkpointer(run_dir, read_only=True).restore_model(step, abstract)
    return RewardModel(graphdef, state, config, float(stats["shift"]), float(stats["scale"]), stats["tokenizer"],
                       partitioner, stats["prompt_len"], stats["response_len"])  # fmt: skip


# --- `flanjax train` with configs/runs/reward.gin -------------------------------------------


@dataclasses.dataclass(frozen=True)
class NormalisationConfig:
    """Samples of the reference policy that set the reward's shift and scale."""

    num_prompts: int = 256
    sampling: SamplingConfig = SamplingConfig(max_new_tokens=32, temperature=1.0)
    batch_size: int = 64


def preference_task(preferences: str, allow_ties: bool = False) -> str:
    """Registers the preference files of a directory (train.jsonl, validation.jsonl, as `flanjax
    label` writes them) as a seqio task; returns its name. Tokenized with the tokenizer named in
    its tokenizer.txt, else the default one (gin's TOKENIZER, $FLANJAX_TOKENIZER)."""
    vocabulary = DEFAULT_VOCABULARY
    if os.path.exists(os.path.join(preferences, TOKENIZER_FILE)):
        with open(os.path.join(preferences, TOKENIZER_FILE)) as f:
            vocabulary = HFVocabulary(f.read().strip())
    files = {s: os.path.join(preferences, f"{s}.jsonl") for s in ("train", "validation")}
    files = {s: p for s, p in files.items() if os.path.exists(p)}
    if "train" not in files:
        raise RewardModelError(f"{preferences} has no train.jsonl; write preferences with `flanjax label`.")
    name = "preferences_" + "".join(c if c.isalnum() else "_" for c in os.path.abspath(preferences))[-60:]
    add_preference_task(name, files, vocabulary, allow_ties=allow_ties)
    return name


def train_reward(
    *,
    model_dir: str,
    init_checkpoint: str,
    batch_size: int,
    loop: LoopConfig,
    preferences: str | None = None,
    mixture_or_task_name: str | None = None,
    prompt_len: int = 64,
    response_len: int = 64,
    max_responses: int = 4,
    allow_ties: bool = False,
    optimizer: OptimizerConfig = OptimizerConfig(learning_rate=1e-5),
    mesh: MeshConfig = MeshConfig(),
    checkpoint: CheckpointConfig = CheckpointConfig(),
    normalisation: NormalisationConfig = NormalisationConfig(),
    validation_batches: int | None = None,
    seed: int = 0,
) -> LoopResult:
    """Trains a reward model from an SFT run (`init_checkpoint`) on comparisons: a directory of
    preference JSONL (`preferences`) or a registered seqio task with their features."""
    if (preferences is None) == (mixture_or_task_name is None):
        raise RewardModelError("give the comparisons as exactly one of `preferences` (a directory) or `mixture_or_task_name`.")
    name = mixture_or_task_name or preference_task(preferences, allow_ties=allow_ties)
    task = get_task_or_mixture(name)
    vocabulary = task.output_features["inputs"].vocabulary
    partitioner = Partitioner.from_config(mesh)
    per_process = partitioner.per_process_batch_size(batch_size)
    shape = dict(prompt_len=prompt_len, response_len=response_len, max_responses=max_responses)
    batches = PreferenceBatches(name, None, per_process, seed=seed, **shape)
    sft_dir, sft_step = resolve_checkpoint(init_checkpoint)
    config = read_model_config(sft_dir)
    if jax.process_index() == 0:
        write_model_config(model_dir, config)

    tx = make_optimizer(optimizer, loop.num_steps)

    def init(lm=None):
        model = score_model_from_lm(config, lm, seed)
        return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

    graphdef, abstract = partitioner.abstract_state(init)
    shardings = shardings_of(abstract)
    step_fn = jax.jit(make_reward_train_step(graphdef, seed), in_shardings=(shardings, None), out_shardings=(shardings, None), donate_argnums=0)

    hooks = {}
    if "validation" in seqio.get_subtasks(task)[0].splits:
        valid = PreferenceBatches(name, None, per_process, split="validation", shuffle=False, num_epochs=1, **shape)
        hooks["validation"] = _validation_hook(partitioner, graphdef, shardings, valid, validation_batches)

    metrics = MetricsLog(model_dir)
    checkpointer = Checkpointer(model_dir, checkpoint)
    trainer = TrainLoop(
        step_fn=step_fn, batches=batches, partitioner=partitioner, checkpointer=checkpointer, metrics=metrics,
        config=loop, eval_hooks=hooks, learning_rate=make_schedule(optimizer, loop.num_steps),
        console_keys=("loss", "pair_accuracy", "grad_norm"),
    )  # fmt: skip
    console.print(f"Training a reward model from {sft_dir} step {sft_step} on {name}; run dir {model_dir}")

    def create():
        plain = partitioner.abstract_state(lambda: Transformer(config, rngs=nnx.Rngs(0)))[1]
        lm = Checkpointer(sft_dir, read_only=True).restore_model(sft_step, plain)
        return partitioner.create(init, abstract, lm)

    with partitioner.activate():
        result = trainer.run(create, abstract)
    trainer.close()
    if result.preempted:  # normalised when the rerun finishes
        return result

    # Normalise against the reference policy's own samples.
    prompts = sorted(set(task_prompts(name, "train", normalisation.num_prompts)[0]))
    policy_def, policy_state, _ = restore(init_checkpoint, partitioner)
    responses = generate_texts(policy_def, policy_state, vocabulary, prompts, config=normalisation.sampling,
                               partitioner=partitioner, prompt_len=prompt_len, batch_size=normalisation.batch_size,
                               seed=seed)  # fmt: skip
    model_def = nnx.split(nnx.eval_shape(lambda: ScoreModel(config, rngs=nnx.Rngs(0))))[0]
    raw = _text_scores(model_def, result.state[0], partitioner, vocabulary, prompts, responses, prompt_len,
                       response_len, normalisation.batch_size)  # fmt: skip
    stats = {
        "shift": float(raw.mean()),
        "scale": float(max(raw.std(), 1e-6)),
        "num_samples": len(raw),
        "step": result.step,
        "reference_policy": sft_dir,
        "tokenizer": vocabulary.fingerprint(),
        "tokenizer_path": vocabulary.path,
        "prompt_len": prompt_len,
        "response_len": response_len,
    }
    if jax.process_index() == 0:
        with open(os.path.join(model_dir, REWARD_FILE), "w") as f:
            json.dump(stats, f, indent=2)
        plot_metrics(metrics.path, os.path.join(model_dir, "loss.png"), keys=("loss", "validation/loss"))
    console.print(f"Reward normalised on {len(raw)} reference samples: shift {stats['shift']:.4g}, scale {stats['scale']:.4g}")
    return result


def _validation_hook(partitioner: Partitioner, graphdef, shardings, source: PreferenceBatches, num_batches: int | None):
    @jax.jit
    def sums(state, batch):
        model, _ = nnx.merge(graphdef, state)
        return _batch_stats(model, batch)

    def hook(step: int, state) -> dict[str, float]:
        totals: dict[str, float] = {}
        source.set_state({"position": 0})
        for i, batch in enumerate(source):
            if num_batches is not None and i >= num_batches:
                break
            for k, v in jax.device_get(sums(state, partitioner.shard_batch(batch))).items():
                totals[k] = totals.get(k, 0.0) + float(v)
        if not totals.get("pair_sum"):
            return {}
        return {"loss": totals["loss_sum"] / totals["weight_sum"], "pair_accuracy": totals["correct_sum"] / totals["pair_sum"]}

    return hook
