"""PPO with a KL penalty and auxiliary LM terms (InstructGPT's third step), on one mesh.

Four models share the mesh and its rules: the policy (from an SFT run, optionally with LoRA
adapters) and the value model (from the reward model, or a head on the policy's trunk with
`value_on_policy_trunk`) are trained; the reference policy (the
SFT weights; for a LoRA policy, the policy itself with its adapters off, no second copy) and
the reward model are frozen. Each iteration of the one training loop:

    rollout     sample a response to every prompt of the batch with the policy (the decoder)
    scoring     log-probabilities under policy and reference, values, the reward model's
                normalised score at the last token; per-token reward -beta * KL plus the
                clipped score (and a penalty if no stop token came) at the last token; GAE
    training    `epochs` passes over `num_minibatches` shuffled minibatches: clipped ratio
                loss - entropy bonus (+ each `LMTerm`'s coef * LM loss on its own batch: the
                pre-training mixture of PPO-ptx, SFT responses as in BatGPT) for the policy,
                clipped value loss for the value model; then the KL controller and the
                policy's EMA update

The trained state is a `PPOState`: the policy (`model`) and its optimizer, the value model
and its optimizer, the KL controller and the policy's EMA, by name; the policy is `model`, so
`flanjax eval`, `flanjax sample` and `flanjax convert to-hf` read a PPO run like an SFT run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import seqio
import tensorflow as tf
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from flanjax.data.availability import check_datasets
from flanjax.data.pipeline import SeqioBatches, check_vocabulary, decoder_prompt_tf
from flanjax.decode import SamplingConfig, check_length, generate
from flanjax.errors import FlanjaxError
from flanjax.models.heads import ScoreModel, ValueHead
from flanjax.models.lora import LoraConfig, without_adapters
from flanjax.models.transformer import Transformer, TransformerConfig, new_model
from flanjax.rlhf.advantages import gae, masked_mean, masked_var, whiten
from flanjax.rlhf.kl import KLConfig, kl_penalty, update_beta
from flanjax.rlhf.reward import load_reward_model, sequence_scores
from flanjax.rundir.checkpoint import CheckpointConfig
from flanjax.rundir.files import check_tokenizer, read_model_config, resolve_checkpoint, restore_weights
from flanjax.sharding import MeshConfig, Partitioner, shardings_of
from flanjax.train import trainer
from flanjax.train.loop import LoopConfig, LoopResult
from flanjax.train.losses import lm_loss
from flanjax.train.optim import OptimizerConfig, make_optimizer, make_schedule
from flanjax.train.steps import gradients
from flanjax.train.trainer import Plot, compile_ahead
from flanjax import paths


class PPOConfigError(FlanjaxError, ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    epochs: int = 4  # passes over each rollout batch
    num_minibatches: int = 4
    clip_ratio: float = 0.2
    clip_value: float = 0.2
    value_coef: float = 0.5
    entropy_coef: float = 0.0
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    reward_clip: float = 5.0  # |normalised score| at most this
    no_stop_penalty: float = -1.0  # added to the score of a response that never emits a stop token
    ptx_coef: float = 0.0  # gamma of PPO-ptx (the coef of `train_ppo(ptx=...)`); InstructGPT 27.8
    ema_decay: float | None = None  # e.g. 0.992 (DeepSpeed-Chat); None: no EMA
    # The value function: a model of its own, from the reward model (False), or a head on the
    # policy's trunk (True: no second transformer to hold and train; the value loss trains the
    # trunk too).
    value_on_policy_trunk: bool = False


# Registered here, not only through the run files' dynamic registration, so that the command
# line can add terms: --gin.ppo.train_ppo.lm_terms=[@ptx/ppo.LMTerm()].
@gin.register
@dataclasses.dataclass(frozen=True)
class LMTerm:
    """An auxiliary term of PPO's policy objective: `coef` * the LM loss (mean cross-entropy on
    the targets, seqio's decoder features) on a batch of its mixture each iteration, split over
    the minibatches like the rollout. A pre-training mixture is PPO-ptx (InstructGPT); a
    prompt/response task keeps the SFT responses likely (BatGPT's instruction-tuning term)."""

    name: str  # logged as `<name>_loss`; its batch keys are `<name>/...`
    mixture_or_task_name: str
    task_feature_lengths: Mapping[str, int]
    batch_size: int  # rows per PPO iteration, split over the minibatches
    coef: float = 1.0


@gin.register
@dataclasses.dataclass(frozen=True)
class PtxConfig:
    """PPO-ptx's first spelling, still read: `train_ppo(ptx=PtxConfig(...))` with
    `PPOConfig.ptx_coef` is the `LMTerm` named "ptx" with that coef (`lm_terms_of`)."""

    mixture_or_task_name: str
    task_feature_lengths: Mapping[str, int]
    batch_size: int  # rows per PPO iteration, split over the minibatches


# The score of each full row (prompt + response, `lengths` tokens): (params, tokens, lengths) -> [b].
RewardFn = Callable[[Any, jax.Array, jax.Array], jax.Array]


class KLController(nnx.Module):
    """The KL coefficient and the iteration count, checkpointed with the models."""

    def __init__(self, beta: float):
        self.beta = nnx.Variable(jnp.asarray(beta, jnp.float32))
        self.iteration = nnx.Variable(jnp.asarray(0, jnp.int32))


# --- batches --------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class PromptBatches(SeqioBatches):
    """Prompts of a seqio task's `inputs`: `prompts` [b, P] (`decoder_prompt_tf`, right-padded) and
    `prompt_lengths` [b]. Pass `task_feature_lengths=None`."""

    prompt_len: int = 64

    def feature_converter(self) -> seqio.FeatureConverter:
        return seqio.PassThroughFeatureConverter()

    def model_features(self, features: dict) -> dict:
        prompt = decoder_prompt_tf(features["inputs"], self.prompt_len)
        n = tf.shape(prompt)[0]
        return {"prompts": tf.ensure_shape(tf.pad(prompt, [[0, self.prompt_len - n]]), [self.prompt_len]), "prompt_lengths": n}


class RLHFBatches:
    """Prompts plus a batch of each LM term's mixture, its keys prefixed `<name>/`. Iterator
    states are kept by term name beside "prompts" (so a PPO-ptx run's "ptx" state resumes)."""

    def __init__(self, prompts: PromptBatches, terms: Mapping[str, SeqioBatches] | None = None):
        self.prompts, self.terms = prompts, dict(terms or {})

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self.prompts)
        for name, source in self.terms.items():
            batch.update({f"{name}/{k}": v for k, v in next(source).items()})
        return batch

    def element_spec(self) -> dict[str, jax.ShapeDtypeStruct]:
        terms = {f"{name}/{k}": v for name, source in self.terms.items() for k, v in source.element_spec().items()}
        return {**self.prompts.element_spec(), **terms}

    def get_state(self) -> dict:
        return {"prompts": self.prompts.get_state(), **{name: source.get_state() for name, source in self.terms.items()}}

    def set_state(self, state: Mapping) -> None:
        self.prompts.set_state(state.get("prompts", {}))
        for name, source in self.terms.items():
            source.set_state(state.get(name, {}))

    def close(self) -> None:
        for source in (self.prompts, *self.terms.values()):
            source.close()


# --- the maths of one rollout batch ---------------------------------------------------------


def concat_responses(prompts: jax.Array, prompt_lengths: jax.Array, responses: jax.Array) -> jax.Array:
    """[b, P + N] rows: each prompt's tokens then its response, 0 after."""
    b, p = prompts.shape
    n = responses.shape[1]
    cols = jnp.arange(p + n)[None, :]
    from_prompt = jnp.take_along_axis(jnp.pad(prompts, ((0, 0), (0, n))), cols.repeat(b, 0), axis=1)
    offset = cols - prompt_lengths[:, None]
    from_response = jnp.take_along_axis(responses, jnp.clip(offset, 0, n - 1), axis=1)
    return jnp.where(offset < 0, from_prompt, jnp.where(offset < n, from_response, 0))


def _sequence_inputs(tokens: jax.Array, total_lengths: jax.Array):
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    return positions, (positions < total_lengths[:, None]).astype(jnp.int32)


def response_logprobs(model: Transformer, tokens, prompt_lengths, response_lengths, num_new: int):
    """log pi(token) and the policy's entropy at every response token ([b, N] each), and the
    hidden states that predicted them ([b, N, d], what a `ValueHead` reads)."""
    positions, segments = _sequence_inputs(tokens, prompt_lengths + response_lengths)
    hidden, _ = model(tokens, positions, segments, return_hidden=True)
    at = prompt_lengths[:, None] - 1 + jnp.arange(num_new)[None, :]  # the position predicting token j
    hidden = jnp.take_along_axis(hidden, at[..., None], axis=1)
    targets = jnp.take_along_axis(tokens, at + 1, axis=1)
    log_probs = jax.nn.log_softmax(model.logits(hidden).astype(jnp.float32))
    chosen = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    entropy = -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1)
    return chosen, entropy, hidden


def response_values(value: ScoreModel | ValueHead, policy_hidden, tokens, prompt_lengths, response_lengths, num_new: int):
    """The value of the state before each response token: [b, N]. A `ValueHead` reads the
    policy's hidden states there; a `ScoreModel` runs on the tokens itself."""
    if isinstance(value, ValueHead):
        return value(policy_hidden)
    positions, segments = _sequence_inputs(tokens, prompt_lengths + response_lengths)
    at = prompt_lengths[:, None] - 1 + jnp.arange(num_new)[None, :]
    return jnp.take_along_axis(value(tokens, positions, segments), at, axis=1)


def episode_rewards(kl: jax.Array, score: jax.Array, mask: jax.Array, beta: jax.Array) -> jax.Array:
    """Per-token rewards: -beta * KL everywhere, plus the score at each row's last token."""
    last = jnp.arange(mask.shape[1])[None, :] == (mask.sum(axis=1, keepdims=True) - 1)
    return (-beta * kl + jnp.where(last, score[:, None], 0.0)) * mask


def ppo_losses(logp, old_logp, advantages, values, old_values, returns, entropy, mask, config: PPOConfig) -> dict:
    """Token-level means over `mask` of the clipped PPO objectives."""
    ratio = jnp.exp(logp - old_logp)
    clipped = jnp.clip(ratio, 1 - config.clip_ratio, 1 + config.clip_ratio)
    policy = masked_mean(jnp.maximum(-advantages * ratio, -advantages * clipped), mask)
    values_clipped = old_values + jnp.clip(values - old_values, -config.clip_value, config.clip_value)
    value = 0.5 * masked_mean(jnp.maximum(jnp.square(values - returns), jnp.square(values_clipped - returns)), mask)
    return {
        "policy_loss": policy,
        "value_loss": value,
        "entropy": masked_mean(entropy, mask),
        "clip_fraction": masked_mean((jnp.abs(ratio - 1) > config.clip_ratio).astype(jnp.float32), mask),
        "approx_kl": masked_mean((ratio - 1) - (logp - old_logp), mask),
    }


def ppo_loss(config: PPOConfig, num_new: int, lm_coefs: Mapping[str, float] | None = None):
    """PPO's loss function of (policy, value model, (rollout minibatch, {term name: LM
    minibatch}), rngs): clipped policy loss - entropy bonus + value_coef * clipped value loss
    + for each LM term, coef * its LM loss (logged as `<name>_loss`). `lm_coefs`: {name: coef}.
    No dropout: the ratios compare with the rollout's deterministic log-probabilities."""
    lm, lm_coefs = lm_loss(), dict(lm_coefs or {})

    def loss_fn(policy: Transformer, value: ScoreModel, batch, rngs: nnx.Rngs | None = None):
        mb, lm_batches = batch
        logp, entropy, hidden = response_logprobs(policy, mb["tokens"], mb["prompt_lengths"], mb["lengths"], num_new)
        values = response_values(value, hidden, mb["tokens"], mb["prompt_lengths"], mb["lengths"], num_new)
        out = ppo_losses(logp, mb["logp"], mb["advantages"], values, mb["values"], mb["returns"], entropy, mb["mask"], config)
        total = out["policy_loss"] - config.entropy_coef * out["entropy"] + config.value_coef * out["value_loss"]
        for name, coef in lm_coefs.items():
            out[f"{name}_loss"] = lm(policy, lm_batches[name], None)[0]
            total = total + coef * out[f"{name}_loss"]
        return total, out

    return loss_fn


# --- the trained state and the phases, jitted -------------------------------------------------


class PPOState(nnx.Module):
    """PPO's trained state, by name. `model` is the policy, so `flanjax eval`, `flanjax sample`
    and `flanjax convert to-hf` read a PPO run like an SFT run; `ema` is None without EMA."""

    def __init__(self, model: Transformer, optimizer: nnx.Optimizer, value: ScoreModel | ValueHead, value_optimizer: nnx.Optimizer,
                 controller: KLController, ema: Transformer | None = None):  # fmt: skip
        self.model, self.optimizer = model, optimizer
        self.value, self.value_optimizer = value, value_optimizer
        self.controller, self.ema = controller, ema


@dataclasses.dataclass(frozen=True)
class Graphs:
    """Static structure of the trained state and of the policy and reference models."""

    state: nnx.GraphDef  # a PPOState
    policy: nnx.GraphDef
    reference: nnx.GraphDef | None  # None: a LoRA policy's own base (`without_adapters`)


def make_scoring(graphs: Graphs, config: PPOConfig, kl: KLConfig, stop_tokens: tuple[int, ...], reward_fn: RewardFn):
    def scoring(state, reference, reward_params, batch, generation):
        s = nnx.merge(graphs.state, state)
        ref = without_adapters(s.model) if reference is None else nnx.merge(graphs.reference, reference)
        prompts, prompt_lengths = batch["prompts"], batch["prompt_lengths"]
        lengths, n = generation.lengths, generation.tokens.shape[1]
        tokens = concat_responses(prompts, prompt_lengths, generation.tokens)
        mask = (jnp.arange(n)[None, :] < lengths[:, None]).astype(jnp.float32)
        logp, entropy, hidden = response_logprobs(s.model, tokens, prompt_lengths, lengths, n)
        ref_logp, _, _ = response_logprobs(ref, tokens, prompt_lengths, lengths, n)
        values = response_values(s.value, hidden, tokens, prompt_lengths, lengths, n) * mask
        score = reward_fn(reward_params, tokens, prompt_lengths + lengths)
        last_token = jnp.take_along_axis(generation.tokens, jnp.maximum(lengths - 1, 0)[:, None], axis=1)[:, 0]
        stopped = jnp.isin(last_token, jnp.asarray(stop_tokens))
        penalised = jnp.clip(score + jnp.where(stopped, 0.0, config.no_stop_penalty), -config.reward_clip, config.reward_clip)
        per_token_kl = kl_penalty(logp, ref_logp, kl.estimator) * mask
        rewards = episode_rewards(per_token_kl, penalised, mask, s.controller.beta[...])
        advantages, returns = gae(rewards, values, mask, config.gamma, config.lam)
        if config.whiten_advantages:
            advantages = whiten(advantages, mask)
        sequence_kl = ((logp - ref_logp) * mask).sum(axis=1)  # k1 summed: the KL the controller tracks
        rollout = dict(tokens=tokens, prompt_lengths=prompt_lengths, lengths=lengths, mask=mask, logp=logp,
                       values=values, advantages=advantages, returns=returns)  # fmt: skip
        metrics = {
            "reward/score_mean": score.mean(),
            "reward/score_std": score.std(),
            "reward/total_mean": rewards.sum(axis=1).mean(),
            "kl": sequence_kl.mean(),
            "kl_penalty_per_token": masked_mean(per_token_kl, mask),
            "entropy_rollout": masked_mean(entropy, mask),
            "response_length": lengths.astype(jnp.float32).mean(),
            "no_stop_fraction": 1.0 - stopped.astype(jnp.float32).mean(),
            "explained_variance": 1.0 - masked_var(returns - values, mask) / jnp.maximum(masked_var(returns, mask), 1e-8),
        }
        return rollout, metrics

    return scoring


def make_update(graphs: Graphs, config: PPOConfig, kl: KLConfig, seed: int, lm_coefs: Mapping[str, float] | None = None):
    def update(state, rollout, lm_batches, observed_kl):
        s = nnx.merge(graphs.state, state)
        trained_def, trained = nnx.split((s.model, s.optimizer, s.value, s.value_optimizer))
        b, n = rollout["mask"].shape
        m = config.num_minibatches
        key = jax.random.fold_in(jax.random.key(seed + 1), s.controller.iteration[...])
        loss_fn = ppo_loss(config, n, lm_coefs)

        def one_minibatch(trained, xs):
            policy, policy_opt, value, value_opt = nnx.merge(trained_def, trained)
            (grads_p, grads_v), out = gradients(loss_fn, [policy, value], [policy_opt.wrt, value_opt.wrt], xs, key)
            policy_opt.update(policy, grads_p)
            value_opt.update(value, grads_v)
            out["grad_norm"] = optax.tree.norm(grads_p)
            return nnx.state((policy, policy_opt, value, value_opt)), out

        def one_epoch(trained, epoch_key):
            order = jax.random.permutation(epoch_key, b).reshape(m, b // m)
            mbs = jax.tree.map(lambda x: x[order], rollout)
            lm_mbs = jax.tree.map(lambda x: x.reshape(m, x.shape[0] // m, *x.shape[1:]), lm_batches)
            return jax.lax.scan(one_minibatch, trained, (mbs, lm_mbs))

        trained, outs = jax.lax.scan(one_epoch, trained, jax.random.split(key, config.epochs))
        nnx.update((s.model, s.optimizer, s.value, s.value_optimizer), trained)
        s.controller.beta[...] = update_beta(s.controller.beta[...], observed_kl, b, kl)
        s.controller.iteration[...] += 1
        if s.ema is not None:
            d, wrt = config.ema_decay, s.optimizer.wrt
            nnx.update(s.ema, jax.tree.map(lambda e, p: d * e + (1 - d) * p, nnx.state(s.ema, wrt), nnx.state(s.model, wrt)))
        metrics = {**{k: v.mean() for k, v in outs.items()}, "beta": s.controller.beta[...]}
        return nnx.state(s), metrics

    return update


class PPOStep:
    """The loop's step: (state, batch) -> (state, metrics), three jitted phases timed apart.
    Rollouts are laid out over the data axes like the prompts they come from. The batch holds
    the prompts and, for each of `lm_terms`, its LM batch under keys `<name>/...`."""

    def __init__(self, graphs: Graphs, abstract_state, partitioner: Partitioner, *, reference, reward_fn: RewardFn,
                 reward_params, sampling: SamplingConfig, eos_id: int, config: PPOConfig, kl: KLConfig, seed: int = 0,
                 lm_terms: Sequence[LMTerm] = ()):  # fmt: skip
        self.graphs, self.partitioner, self.reference, self.reward_params = graphs, partitioner, reference, reward_params
        self.sampling, self.eos_id, self.seed = sampling, eos_id, seed
        self.lm_names = tuple(t.name for t in lm_terms)
        self.shardings = shardings_of(abstract_state)
        self.scoring = jax.jit(make_scoring(graphs, config, kl, (eos_id, *sampling.stop_tokens), reward_fn))
        self.update_fn = make_update(graphs, config, kl, seed, {t.name: t.coef for t in lm_terms})
        self.update = jax.jit(self.update_fn, out_shardings=(self.shardings, None), donate_argnums=0)

    def _rows(self, tree):
        return jax.tree.map(lambda x: self.partitioner.batch_sharding(len(x.shape)), tree)

    def _replicated(self):
        return NamedSharding(self.partitioner.mesh, PartitionSpec())

    def compile_ahead(self, abstract_state, batch_spec) -> PPOStep:
        """Compiles the update phase (two models' gradients and optimizer updates: the most
        memory) for these shapes before any data is read, with its memory report."""
        prompts, lm_batches = self._split(batch_spec)
        generation = jax.eval_shape(lambda state, b: self._generate(state, b, jax.random.key(0)), abstract_state, prompts)
        rollout, metrics = jax.eval_shape(self.scoring, abstract_state, self.reference, self.reward_params, prompts, generation)
        abstract = lambda tree, shardings: jax.tree.map(  # noqa: E731
            lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), tree, shardings)
        args = (abstract_state, abstract(rollout, self._rows(rollout)), lm_batches, abstract(metrics["kl"], self._replicated()))
        jitted = jax.jit(self.update_fn, in_shardings=jax.tree.map(lambda x: x.sharding, args),
                         out_shardings=(self.shardings, None), donate_argnums=0)  # fmt: skip
        self.update = compile_ahead("PPO update", jitted, *args)
        return self

    def _generate(self, state, batch, key):
        return generate(self.graphs.policy, state["model"], batch["prompts"], batch["prompt_lengths"],
                        eos_id=self.eos_id, config=self.sampling, seed=key)  # fmt: skip

    def _split(self, batch: Mapping[str, Any]) -> tuple[dict, dict]:
        prompts, lm_batches = split_batch(batch)
        if set(lm_batches) != set(self.lm_names):
            raise PPOConfigError(f"the batch holds LM batches {sorted(lm_batches)} but the step was built for LM terms "
                                 f"{sorted(self.lm_names)}; give the step and the batches the same terms.")  # fmt: skip
        return prompts, lm_batches

    def __call__(self, state, batch):
        prompts, lm_batches = self._split(batch)
        t0 = time.perf_counter()
        generation = self._generate(state, prompts, jax.random.fold_in(jax.random.key(self.seed), state["controller"]["iteration"][...]))
        jax.block_until_ready(generation)
        t1 = time.perf_counter()
        rollout, metrics = self.scoring(state, self.reference, self.reward_params, prompts, generation)
        jax.block_until_ready(rollout)
        t2 = time.perf_counter()
        rollout, kl = jax.device_put((rollout, metrics["kl"]), (self._rows(rollout), self._replicated()))
        state, train_metrics = self.update(state, rollout, lm_batches, kl)
        jax.block_until_ready(state)
        t3 = time.perf_counter()
        new_tokens = float(jax.device_get(generation.lengths.sum()))
        return state, {
            **metrics,
            **train_metrics,
            "loss_sum": train_metrics["policy_loss"],
            "weight_sum": jnp.ones(()),
            "time/rollout_s": t1 - t0,
            "time/scoring_s": t2 - t1,
            "time/training_s": t3 - t2,
            "rollout_tokens_per_s": new_tokens / max(t1 - t0, 1e-9),
        }


def split_batch(batch: Mapping[str, Any]) -> tuple[dict, dict[str, dict]]:
    """(the prompts' features, {term name: its LM batch}) of an `RLHFBatches` batch."""
    prompts, lm_batches = {}, {}
    for key, value in batch.items():
        name, sep, feature = key.partition("/")
        if sep:
            lm_batches.setdefault(name, {})[feature] = value
        else:
            prompts[key] = value
    return prompts, lm_batches


def ppo_init(policy: TransformerConfig, value: TransformerConfig | None, tx: optax.GradientTransformation,
             value_tx: optax.GradientTransformation, *, lora: LoraConfig | None = None, init_beta: float = 0.02,
             ema: bool = False, seed: int = 0):  # fmt: skip
    """The function building the `PPOState` from the SFT policy's and the reward model's
    states (`lm`, `rm`; None: random): pass it to `Partitioner.create`. `value` None: the
    value function is a `ValueHead` on the policy's trunk (and `rm` goes unused)."""
    wrt = nnx.Param if lora is None else nnx.LoRAParam

    def init(lm=None, rm=None) -> PPOState:
        policy_model = new_model(policy, lora, seed, lm)
        if value is None:
            value_model = ValueHead(policy, rngs=nnx.Rngs(params=seed + 1))
        else:
            value_model = ScoreModel(value, rngs=nnx.Rngs(params=seed + 1))
            if rm is not None:
                nnx.update(value_model, rm)
        return PPOState(policy_model, nnx.Optimizer(policy_model, tx, wrt=wrt), value_model,
                        nnx.Optimizer(value_model, value_tx, wrt=nnx.Param), KLController(init_beta),
                        new_model(policy, lora, seed, lm) if ema else None)  # fmt: skip

    return init


def lm_terms_of(ppo: PPOConfig, ptx: PtxConfig | None, lm_terms: Sequence[LMTerm]) -> tuple[LMTerm, ...]:
    """PPO's LM terms: PPO-ptx's first spelling (`ptx` with `ppo.ptx_coef`) as the term "ptx",
    then `lm_terms`; names checked, since they key batches, iterator states and metrics."""
    if ppo.ptx_coef and ptx is None:
        raise PPOConfigError(
            f"ptx_coef={ppo.ptx_coef} but no pre-training data: bind ppo.train_ppo.ptx = @ppo.PtxConfig() "
            "with its mixture_or_task_name, task_feature_lengths and batch_size, or set ptx_coef to 0 (a "
            "term of ppo.train_ppo.lm_terms carries its own coef)."
        )
    first = () if ptx is None else (LMTerm("ptx", ptx.mixture_or_task_name, ptx.task_feature_lengths, ptx.batch_size, ppo.ptx_coef),)
    terms = (*first, *lm_terms)
    names = [t.name for t in terms]
    for name in names:
        if not name.isidentifier() or name == "prompts":
            raise PPOConfigError(f"LM term name {name!r}: use a Python identifier other than 'prompts' (e.g. 'ptx', 'sft'); "
                                 "it names the term's batch keys and its `<name>_loss` metric.")  # fmt: skip
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        also = " (ppo.train_ppo.ptx is the term 'ptx' already)" if ptx is not None and "ptx" in duplicates else ""
        raise PPOConfigError(f"LM terms named {duplicates} more than once{also}; give each term of ppo.train_ppo.lm_terms its own name.")
    return terms


def _check_batches(batch_size: int, ppo: PPOConfig, lm_terms: Sequence[LMTerm], partitioner: Partitioner) -> None:
    m, shards = ppo.num_minibatches, partitioner.data_parallel_size
    for of, rows in (("", batch_size), *((f" of LM term {t.name!r}", t.batch_size) for t in lm_terms)):
        if rows % m:
            raise PPOConfigError(f"batch_size {rows}{of} does not split into {m} minibatches; pick a multiple of {m}.")
        if (rows // m) % shards:
            raise PPOConfigError(
                f"batch_size {rows}{of}: minibatches of {rows // m} rows do not split over the {shards} "
                "data-parallel shards; raise the batch size or lower num_minibatches."
            )


def _check_lm_vocabularies(lm_terms: Sequence[LMTerm], policy_dir: str, vocab_size: int) -> None:
    """Each term's mixture must read the policy's tokenizer, like the prompts."""
    for t in lm_terms:
        vocabulary = check_vocabulary(t.mixture_or_task_name, vocab_size)
        check_tokenizer(policy_dir, vocabulary, f"LM term {t.name!r} ({t.mixture_or_task_name})")


# --- `flanjax train` with configs/runs/ppo.gin -----------------------------------------------


def train_ppo(
    *,
    model_dir: str,
    policy_checkpoint: str,
    reward_checkpoint: str,
    mixture_or_task_name: str,
    batch_size: int,
    loop: LoopConfig,
    prompt_len: int = 64,
    sampling: SamplingConfig = SamplingConfig(max_new_tokens=64, temperature=1.0),
    ppo: PPOConfig = PPOConfig(),
    kl: KLConfig = KLConfig(),
    ptx: PtxConfig | None = None,
    lm_terms: Sequence[LMTerm] = (),
    optimizer: OptimizerConfig = OptimizerConfig(learning_rate=1e-5, schedule="constant"),
    value_optimizer: OptimizerConfig = OptimizerConfig(learning_rate=1e-5, schedule="constant"),
    lora: LoraConfig | None = None,
    mesh: MeshConfig = MeshConfig(),
    checkpoint: CheckpointConfig = CheckpointConfig(),
    seed: int = 0,
) -> LoopResult:
    """PPO of the SFT policy `policy_checkpoint` against reward model `reward_checkpoint` on the
    prompts (`inputs`) of `mixture_or_task_name`; `loop.num_steps` iterations of `batch_size` prompts.
    `lm_terms` (and PPO-ptx's `ptx`, the term "ptx") add LM losses on other mixtures to the policy's."""
    partitioner = Partitioner.from_config(mesh)
    terms = lm_terms_of(ppo, ptx, lm_terms)
    _check_batches(batch_size, ppo, terms, partitioner)
    per_process = partitioner.per_process_batch_size(batch_size)
    policy_dir, policy_step = resolve_checkpoint(policy_checkpoint)
    config = read_model_config(policy_dir)
    vocabulary = check_vocabulary(mixture_or_task_name, config.vocab_size)
    _check_lm_vocabularies(terms, policy_dir, config.vocab_size)
    check_datasets(mixture_or_task_name, *(t.mixture_or_task_name for t in terms))  # before compiling
    check_length(config, prompt_len, sampling.max_new_tokens)
    reward = load_reward_model(reward_checkpoint, partitioner, vocabulary)  # refuses another tokenizer
    check_length(reward.config, prompt_len, sampling.max_new_tokens)

    prompts = PromptBatches(mixture_or_task_name, None, per_process, seed=seed, prompt_len=prompt_len)
    lm_batches = {t.name: SeqioBatches(t.mixture_or_task_name, t.task_feature_lengths,
                                       partitioner.per_process_batch_size(t.batch_size), seed=seed) for t in terms}  # fmt: skip
    policy_def = nnx.split(nnx.eval_shape(lambda: new_model(config, lora)))[0]
    if lora is None:
        plain_def, reference = restore_weights(policy_dir, policy_step, config, partitioner)
        pretrained = lambda: (reference, reward.state)  # noqa: E731
    else:  # the reference is the policy with its adapters off; the SFT weights are read only to start
        plain_def, reference = None, None
        pretrained = lambda: (restore_weights(policy_dir, policy_step, config, partitioner)[1], reward.state)  # noqa: E731

    def reward_fn(params, tokens, lengths):
        state, shift, scale = params
        return (sequence_scores(nnx.merge(reward.graphdef, state), tokens, lengths) - shift) / scale

    def compile_step(graphdef, abstract, spec):
        step = PPOStep(Graphs(graphdef, policy_def, plain_def), abstract, partitioner, reference=reference,
                       reward_fn=reward_fn, reward_params=(reward.state, jnp.float32(reward.shift), jnp.float32(reward.scale)),
                       sampling=sampling, eos_id=vocabulary.eos_id, config=ppo, kl=kl, seed=seed, lm_terms=terms)  # fmt: skip
        return step.compile_ahead(abstract, spec)

    updates = loop.num_steps * ppo.epochs * ppo.num_minibatches
    result = trainer.run(trainer.Trainer(
        description=f"PPO of {policy_dir} step {policy_step} against {reward_checkpoint} on {mixture_or_task_name}: "
                    f"{loop.num_steps} iterations of {batch_size} prompts",
        model_dir=model_dir, model=config, lora=lora, origin=policy_dir, vocabulary=vocabulary, partitioner=partitioner, loop=loop,
        checkpoint=checkpoint, batches=RLHFBatches(prompts, lm_batches),
        init=ppo_init(config, None if ppo.value_on_policy_trunk else reward.config, make_optimizer(optimizer, updates),
                      make_optimizer(value_optimizer, updates),
                      lora=lora, init_beta=kl.init_beta, ema=ppo.ema_decay is not None, seed=seed),
        pretrained=pretrained, compile_step=compile_step,
        learning_rate=make_schedule(optimizer, updates),
        console_keys=("reward/score_mean", "kl", "beta", "entropy", "clip_fraction", "response_length"),
        # The score is the reward model's, shifted and scaled (`reward_fn`); kl is k1 summed over a response.
        plots=(Plot("reward.png", ("reward/score_mean",), False, ylabel="reward-model score (normalised)"),
               Plot("kl.png", ("kl",), False, ylabel="KL(policy || reference), nats per response",
                    hlines=(("KL target", kl.target),) if kl.adaptive else ()),  # a fixed beta has no target
               Plot("beta.png", ("beta",), False, ylabel="KL coefficient β")),
    ))  # fmt: skip
    if jax.process_index() == 0:
        with paths.open(os.path.join(model_dir, "ppo.json"), "w") as f:
            json.dump({"reward_checkpoint": paths.abspath(reward_checkpoint), "kl_target": kl.target}, f, indent=2)
    return result
