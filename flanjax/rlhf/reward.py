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
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import seqio
from flax import nnx

from flanjax.data.availability import check_datasets
from flanjax.data.pipeline import check_vocabulary, get_task_or_mixture, task_prompts
from flanjax.data.preferences import PreferenceBatches, PreferenceDataError, add_preference_task
from flanjax.data.vocab import DEFAULT_VOCABULARY, HFVocabulary
from flanjax.decode import SamplingConfig, decoder_prompt, generate_texts
from flanjax.errors import FlanjaxError
from flanjax.models.heads import ScoreModel, score_model_from_lm
from flanjax.models.transformer import TransformerConfig
from flanjax.rundir.checkpoint import CheckpointConfig, Checkpointer
from flanjax.rundir.files import read_model_config, resolve_checkpoint, restore, restore_weights
from flanjax.rundir.metrics import console
from flanjax.sharding import MeshConfig, Partitioner
from flanjax.train import trainer
from flanjax.train.loop import LoopConfig, LoopResult
from flanjax.train.optim import OptimizerConfig, make_optimizer, make_schedule
from flanjax.train.steps import TrainState, make_eval_step, make_train_step
from flanjax import paths

REWARD_FILE = "reward.json"  # normalisation and tokenizer of a trained reward model
TOKENIZER_FILE = "tokenizer.txt"  # beside preference files: the tokenizer directory of the policy sampled


class RewardModelError(FlanjaxError, ValueError):
    pass


# --- the maths -------------------------------------------------------------------------------


def pairwise_sums(scores: jax.Array, ranks: jax.Array, valid: jax.Array, pair_loss: Callable[[jax.Array], jax.Array]) -> dict[str, jax.Array]:
    """Sums over the ranked pairs of a batch of comparisons: scores, ranks, valid [b, K];
    `pair_loss(gap)` maps each pair's score gap [b, K, K] (better minus worse) to its loss.

    Returns `loss_sum` (each prompt's mean over its pairs, summed over prompts), `weight_sum`
    (prompts with a pair), `pairs_right_sum` and `pair_sum` (pairs scored right, all), and
    `better_score_sum` / `worse_score_sum` (the scores of each pair's better and worse response)."""
    better = (ranks[:, :, None] < ranks[:, None, :]) & valid[:, :, None] & valid[:, None, :]
    gap = scores[:, :, None] - scores[:, None, :]
    losses = jnp.where(better, pair_loss(gap), 0.0)
    pairs = better.sum(axis=(1, 2))
    per_pair = lambda x: jnp.sum(jnp.where(better, x, 0.0))  # noqa: E731
    return {
        "loss_sum": jnp.sum(losses.sum(axis=(1, 2)) / jnp.maximum(pairs, 1)),
        "weight_sum": jnp.sum(pairs > 0).astype(jnp.float32),
        "pairs_right_sum": jnp.sum(better & (gap > 0)).astype(jnp.float32),
        "pair_sum": jnp.sum(pairs).astype(jnp.float32),
        "better_score_sum": per_pair(jnp.broadcast_to(scores[:, :, None], gap.shape)),
        "worse_score_sum": per_pair(jnp.broadcast_to(scores[:, None, :], gap.shape)),
    }


def pairwise_loss(rewards: jax.Array, ranks: jax.Array, valid: jax.Array, margin: jax.Array) -> dict[str, jax.Array]:
    """The reward model's K-wise comparison loss of a batch: rewards, ranks, valid [b, K];
    margin [b]. `pairwise_sums` of -log sigmoid(r_better - r_worse - margin)."""
    return pairwise_sums(rewards, ranks, valid, lambda gap: -jax.nn.log_sigmoid(gap - margin[:, None, None]))


def sequence_scores(model: ScoreModel, tokens: jax.Array, lengths: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
    """Score at the last token of each row: tokens [..., t], lengths [...] -> [...]."""
    *lead, t = tokens.shape
    flat, n = tokens.reshape(-1, t), lengths.reshape(-1, 1)
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), flat.shape)
    segments = (positions < jnp.maximum(n, 1)).astype(jnp.int32)  # an empty slot still attends somewhere
    scores = model(flat, positions, segments, rngs=rngs)
    return jnp.take_along_axis(scores, jnp.maximum(n - 1, 0), axis=1).reshape(lead)


def reward_loss(model: ScoreModel, batch: Mapping[str, jax.Array], rngs: nnx.Rngs | None = None):
    """The reward model's loss function (see `train.losses`): the mean over prompts of each
    prompt's pairwise loss, on `PreferenceBatches` batches."""
    rewards = sequence_scores(model, batch["tokens"], batch["lengths"], rngs)
    sums = pairwise_loss(rewards, batch["ranks"], batch["lengths"] > 0, batch["margin"])
    return sums["loss_sum"] / jnp.maximum(sums["weight_sum"], 1.0), sums


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
def _scores(graphdef, state, tokens, lengths):
    return sequence_scores(nnx.merge(graphdef, state), tokens, lengths)


def _text_scores(graphdef, state, partitioner, vocabulary, prompts, responses, prompt_len, response_len, batch_size) -> np.ndarray:
    if not prompts:
        return np.zeros(0)
    rows = encode_responses(vocabulary, prompts, responses, prompt_len, response_len)
    return partitioner.map_batches(lambda batch, _: _scores(graphdef, state, batch["tokens"], batch["lengths"]), rows, batch_size)


def load_reward_model(checkpoint_path: str, partitioner: Partitioner, vocabulary=None) -> RewardModel:
    """A reward model run (or step) with its normalisation; refuses one trained on another
    tokenizer than `vocabulary`'s."""
    run_dir, step = resolve_checkpoint(checkpoint_path)
    path = os.path.join(run_dir, REWARD_FILE)
    stats = {}
    if paths.exists(path):
        with paths.open(path) as f:
            stats = json.load(f)
    if "shift" not in stats or "scale" not in stats:
        raise RewardModelError(
            f"reward model {run_dir} has no normalisation stats ({path} is missing or incomplete): "
            "its training did not finish. Run its `flanjax train` command again (the run file with "
            "TRAINER = \"reward\", e.g. configs/runs/reward.gin): it resumes and normalises at the end."
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
    if paths.exists(os.path.join(preferences, TOKENIZER_FILE)):
        with paths.open(os.path.join(preferences, TOKENIZER_FILE)) as f:
            vocabulary = HFVocabulary(f.read().strip())
    files = {s: os.path.join(preferences, f"{s}.jsonl") for s in ("train", "validation")}
    files = {s: p for s, p in files.items() if paths.exists(p)}
    if "train" not in files:
        raise RewardModelError(f"{preferences} has no train.jsonl; write preferences with `flanjax label`.")
    name = "preferences_" + "".join(c if c.isalnum() else "_" for c in paths.abspath(preferences))[-60:]
    add_preference_task(name, files, vocabulary, allow_ties=allow_ties)
    return name


def comparisons_task(preferences: str | None, mixture_or_task_name: str | None, allow_ties: bool) -> str:
    """The seqio task of a trainer's comparisons: the directory `preferences` registered, or
    the registered `mixture_or_task_name`, which must have responses to compare."""
    if (preferences is None) == (mixture_or_task_name is None):
        raise PreferenceDataError("give the comparisons as exactly one of `preferences` (a directory) or `mixture_or_task_name`.")
    name = mixture_or_task_name or preference_task(preferences, allow_ties=allow_ties)
    if "responses" not in seqio.get_subtasks(get_task_or_mixture(name))[0].output_features:
        raise PreferenceDataError(f"{name} has no `responses` feature, so no pairs to prefer one response over another: train "
                                  "on comparisons (a directory of preference JSONL, or a task registered with add_preference_task).")  # fmt: skip
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
    shuffle: bool = True,
    seed: int = 0,
) -> LoopResult:
    """Trains a reward model from an SFT run (`init_checkpoint`) on comparisons: a directory of
    preference JSONL (`preferences`) or a registered seqio task with their features (shuffled
    by `seed` unless `shuffle` is False)."""
    name = comparisons_task(preferences, mixture_or_task_name, allow_ties)
    task = get_task_or_mixture(name)
    check_datasets(name)  # before compiling: a missing dataset fails now, not at the first batch
    partitioner = Partitioner.from_config(mesh)
    per_process = partitioner.per_process_batch_size(batch_size)
    shape = dict(prompt_len=prompt_len, response_len=response_len, max_responses=max_responses)
    sft_dir, sft_step = resolve_checkpoint(init_checkpoint)
    config = read_model_config(sft_dir)
    vocabulary = check_vocabulary(name, config.vocab_size)
    tx = make_optimizer(optimizer, loop.num_steps)

    def make_hooks(graphdef, abstract):
        if "validation" not in seqio.get_subtasks(task)[0].splits:
            return {}
        valid = PreferenceBatches(name, None, per_process, split="validation", shuffle=False, num_epochs=1, **shape)
        return {"validation": trainer.validation_hook(partitioner, make_eval_step(graphdef, reward_loss), abstract, valid,
                                                      validation_batches)}  # fmt: skip

    result = trainer.run(trainer.Trainer(
        description=f"Training a reward model from {sft_dir} step {sft_step} on {name}",
        model_dir=model_dir, model=config, origin=sft_dir, vocabulary=vocabulary, partitioner=partitioner, loop=loop,
        checkpoint=checkpoint, batches=PreferenceBatches(name, None, per_process, seed=seed, shuffle=shuffle, **shape),
        init=lambda lm=None: TrainState.create(score_model_from_lm(config, lm, seed), tx),
        pretrained=lambda: (restore_weights(sft_dir, sft_step, config, partitioner)[1],),
        compile_step=lambda graphdef, abstract, spec: trainer.jit_step(make_train_step(graphdef, reward_loss, seed=seed), abstract, spec),
        make_hooks=make_hooks, learning_rate=make_schedule(optimizer, loop.num_steps),
        console_keys=("loss", "pair_accuracy", "grad_norm"),
    ))  # fmt: skip
    if result.preempted:  # normalised when the rerun finishes
        return result
    if result.start_step == result.step and paths.exists(os.path.join(model_dir, REWARD_FILE)):
        return result  # a finished run, normalised already

    stats = _normalisation(result, name, init_checkpoint, vocabulary, partitioner, normalisation, prompt_len, response_len, seed)
    if jax.process_index() == 0:
        with paths.open(os.path.join(model_dir, REWARD_FILE), "w") as f:
            json.dump(stats, f, indent=2)
    console.print(f"Reward normalised on {stats['num_samples']} reference samples: shift {stats['shift']:.4g}, scale {stats['scale']:.4g}")
    return result


def _normalisation(result: LoopResult, task: str, sft: str, vocabulary, partitioner: Partitioner, config: NormalisationConfig,
                   prompt_len: int, response_len: int, seed: int) -> dict:  # fmt: skip
    """reward.json: the shift and scale that give the reference (SFT) policy's own samples mean 0
    and standard deviation 1, and the tokenizer and layout the scores were read with."""
    prompts = sorted(set(task_prompts(task, "train", config.num_prompts)[0]))
    policy_def, policy_state, model = restore(sft, partitioner)
    responses = generate_texts(policy_def, policy_state, vocabulary, prompts, config=config.sampling, partitioner=partitioner,
                               prompt_len=prompt_len, batch_size=config.batch_size, seed=seed)  # fmt: skip
    model_def = nnx.split(nnx.eval_shape(lambda: ScoreModel(model, rngs=nnx.Rngs(0))))[0]
    raw = _text_scores(model_def, result.state["model"], partitioner, vocabulary, prompts, responses, prompt_len,
                       response_len, config.batch_size)  # fmt: skip
    return {
        "shift": float(raw.mean()),
        "scale": float(max(raw.std(), 1e-6)),
        "num_samples": len(raw),
        "step": result.step,
        "reference_policy": resolve_checkpoint(sft)[0],
        "tokenizer": vocabulary.fingerprint(),
        "tokenizer_path": vocabulary.path,
        "prompt_len": prompt_len,
        "response_len": response_len,
    }
