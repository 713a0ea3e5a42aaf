"""GRPO (group relative policy optimisation, DeepSeekMath): PPO without a value model, on the same
mesh, sampler and loop.

Each iteration samples `group_size` responses to every prompt of the batch, scores them with a
reward source, and gives every token of a response its reward's standing in its group:

    A = (r - mean(group)) / (std(group) + 1e-4)     std with Bessel's correction (TRL's);
                                                   scale_rewards=False: r - mean only (Dr. GRPO)

then takes `num_iterations` passes over `num_minibatches` minibatches of

    loss_t = -min(ratio_t * A, clip(ratio_t, 1 - eps, 1 + eps) * A) + beta * k3_t

with ratio_t = pi(token) / pi_old(token) and k3_t the k3 estimate of KL(policy || reference),
averaged over all the tokens of a minibatch (loss_mean="token", DAPO/BNPO) or over each
response's tokens and then over responses ("sequence", the GRPO paper's). beta = 0 loads no
reference. Reward sources (`reward`):

    "rubric:package.module:function"   fn(prompt, response, reference) -> float, as for
                                       `flanjax label` (reference: the task's target text)
    "model:RUN_DIR"                    a reward model run's normalised score
    "judge:RUN_DIR"                    a model judging the group's responses pairwise (both
                                       orders, `feedback.JudgeLabeler`): each one's mean win
                                       probability against the others
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tensorflow as tf
from flax import nnx

from flanjax.data.availability import check_datasets
from flanjax.data.pipeline import check_vocabulary
from flanjax.decode import SamplingConfig, check_length, generate
from flanjax.errors import FlanjaxError
from flanjax.models.lora import LoraConfig, without_adapters
from flanjax.models.transformer import new_model
from flanjax.rlhf.advantages import masked_mean
from flanjax.rlhf.feedback import JudgeLabeler, load_rubric
from flanjax.rlhf.kl import kl_penalty
from flanjax.rlhf.ppo import PromptBatches, concat_responses, response_logprobs
from flanjax.rlhf.reward import load_reward_model
from flanjax.rundir.checkpoint import CheckpointConfig
from flanjax.rundir.files import read_model_config, resolve_checkpoint, restore_weights
from flanjax.sharding import MeshConfig, Partitioner, shardings_of, to_host
from flanjax.train import trainer
from flanjax.train.loop import LoopConfig, LoopResult
from flanjax.train.optim import OptimizerConfig, make_optimizer, make_schedule
from flanjax.train.steps import gradients, lm_init

LOSS_MEANS = ("token", "sequence")


class GRPOError(FlanjaxError, ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    group_size: int = 8  # G responses sampled per prompt
    beta: float = 0.04  # the KL penalty's coefficient; 0 loads no reference
    clip_ratio: float = 0.2
    num_iterations: int = 1  # passes over each batch of samples (the paper's mu)
    num_minibatches: int = 1
    scale_rewards: bool = True  # divide by the group's std (False: Dr. GRPO)
    loss_mean: str = "token"  # one of LOSS_MEANS
    log_kl: bool | None = None  # log the KL to the reference; None: when there is one (beta > 0)

    def __post_init__(self):
        if self.group_size < 2:
            raise GRPOError(f"GRPOConfig.group_size = {self.group_size}: a group of one response has no spread, so every "
                            "advantage would be 0 and nothing would train. Sample at least 2 per prompt (GRPO used 64).")  # fmt: skip
        if self.loss_mean not in LOSS_MEANS:
            raise GRPOError(f"GRPOConfig.loss_mean = {self.loss_mean!r} is not one of {', '.join(map(repr, LOSS_MEANS))}.")
        if self.beta < 0:
            raise GRPOError(f"GRPOConfig.beta = {self.beta}: the KL coefficient cannot be negative.")
        if self.beta == 0 and self.log_kl:
            raise GRPOError("GRPOConfig.log_kl = True with beta = 0: beta 0 loads no reference policy, so there is no KL "
                            "to measure. Give beta > 0 (e.g. 0.001 for a nearly free policy), or log_kl = False.")  # fmt: skip

    @property
    def logs_kl(self) -> bool:
        return self.beta > 0 and self.log_kl is not False


# --- the maths -------------------------------------------------------------------------------


def group_advantages(rewards: jax.Array, group_size: int, scale: bool = True) -> tuple[jax.Array, jax.Array]:
    """Each reward's standing in its group (consecutive runs of `group_size`): advantages [n] and
    each group's std [n / group_size]."""
    groups = rewards.reshape(-1, group_size)
    mean = groups.mean(axis=1, keepdims=True)
    std = jnp.sqrt(jnp.sum(jnp.square(groups - mean), axis=1, keepdims=True) / (group_size - 1))
    advantages = (groups - mean) / (std + 1e-4) if scale else groups - mean
    return advantages.reshape(-1), std[:, 0]


def grpo_losses(logp, old_logp, ref_logp, advantages, mask, config: GRPOConfig) -> dict[str, jax.Array]:
    """The clipped objective plus beta * k3 KL, meaned as `config.loss_mean` says: logp, old_logp,
    ref_logp (None: no reference), mask [b, N]; advantages [b]."""
    ratio = jnp.exp(logp - old_logp)
    a = advantages[:, None]
    per_token = -jnp.minimum(ratio * a, jnp.clip(ratio, 1 - config.clip_ratio, 1 + config.clip_ratio) * a)
    kl = jnp.zeros_like(logp) if ref_logp is None else kl_penalty(logp, ref_logp, "k3")
    per_token = per_token + config.beta * kl
    if config.loss_mean == "token":
        loss = masked_mean(per_token, mask)
    else:
        loss = jnp.mean(masked_mean(per_token, mask, axis=1))
    clipped = (jnp.abs(ratio - 1) > config.clip_ratio).astype(jnp.float32)
    return {"loss": loss, "kl": masked_mean(kl, mask), "clip_fraction": masked_mean(clipped, mask)}


# --- reward sources ----------------------------------------------------------------------------

RewardSource = Callable[[Sequence[str], Sequence[str], Sequence[str]], np.ndarray]


def reward_source(spec: str, partitioner: Partitioner, vocabulary, group_size: int) -> RewardSource:
    """`rewards(prompts, responses, references)` (flat lists, each prompt's group consecutive) of a
    "rubric:...", "model:..." or "judge:..." spec."""
    kind, _, name = spec.partition(":")
    if kind == "rubric":
        rubric = load_rubric(name)
        return lambda prompts, responses, references: np.asarray([rubric(*x) for x in zip(prompts, responses, references)], np.float32)
    if kind == "model":
        model = load_reward_model(name, partitioner, vocabulary)
        return lambda prompts, responses, references: model.scores(vocabulary, prompts, responses).astype(np.float32)
    if kind == "judge":
        judge = JudgeLabeler.from_run(name, vocabulary, partitioner)

        def judged(prompts, responses, references) -> np.ndarray:
            rewards = []
            for k in range(0, len(prompts), group_size):  # each response's mean win probability in its group
                wins = judge.pairwise_probabilities(prompts[k], responses[k : k + group_size], references[k])
                rewards.append((wins.sum(axis=1) - 0.5) / (group_size - 1))
            judge.verdicts.clear()  # kept for `judge_report`; not needed here, and they would pile up
            return np.concatenate(rewards).astype(np.float32)

        return judged
    raise GRPOError(f"reward {spec!r} is none of 'rubric:package.module:function', 'model:RUN_DIR' (a reward model run) "
                    "and 'judge:RUN_DIR' (a model asked which of two responses is better).")  # fmt: skip


@dataclasses.dataclass(eq=False)
class GroupPrompts(PromptBatches):
    """`PromptBatches` plus the task's target text, when it has one, as `references` [b, R] (what
    a rubric compares a response with)."""

    reference_len: int = 64

    def model_features(self, features: dict) -> dict:
        targets = features.get("targets", tf.zeros([0], tf.int32))[: self.reference_len]
        padded = tf.pad(targets, [[0, self.reference_len - tf.shape(targets)[0]]])
        return {**super().model_features(features), "references": tf.ensure_shape(tf.cast(padded, tf.int32), [self.reference_len])}


# --- the step ----------------------------------------------------------------------------------


class GRPOStep:
    """The loop's step: (state, batch of prompts) -> (state, metrics): sample groups, score them
    on the host, then update; the phases timed apart."""

    def __init__(self, graphdef, policy_def, reference_def, reference, abstract_state, partitioner: Partitioner, *,
                 rewards: RewardSource, vocabulary, sampling: SamplingConfig, config: GRPOConfig, seed: int):  # fmt: skip
        self.partitioner, self.rewards, self.vocabulary, self.sampling, self.config, self.seed = (
            partitioner, rewards, vocabulary, sampling, config, seed)  # fmt: skip
        self.policy_def, self.reference = policy_def, reference
        self.repeat = jax.jit(lambda x: jnp.repeat(x, config.group_size, axis=0))  # a prompt's group: consecutive rows

        def scoring(state, reference, prompts, generation):
            policy = nnx.merge(graphdef, state).model
            n = generation.tokens.shape[1]
            tokens = concat_responses(prompts["prompts"], prompts["prompt_lengths"], generation.tokens)
            args = (tokens, prompts["prompt_lengths"], generation.lengths, n)
            logp, entropy, _ = response_logprobs(policy, *args)
            ref = None
            if config.beta > 0:
                ref = response_logprobs(without_adapters(policy) if reference is None else nnx.merge(reference_def, reference), *args)[0]
            mask = (jnp.arange(n)[None, :] < generation.lengths[:, None]).astype(jnp.float32)
            return {"tokens": tokens, "prompt_lengths": prompts["prompt_lengths"], "lengths": generation.lengths, "mask": mask,
                    "logp": logp, "ref_logp": ref}, masked_mean(entropy, mask)  # fmt: skip

        def update(state, rollout, advantages):
            s = nnx.merge(graphdef, state)
            rollout = {**rollout, "advantages": advantages}
            m, b = config.num_minibatches, advantages.shape[0]
            key = jax.random.fold_in(jax.random.key(seed + 1), s.optimizer.step[...])

            def loss_fn(policy, mb, rngs=None):
                logp, _, _ = response_logprobs(policy, mb["tokens"], mb["prompt_lengths"], mb["lengths"], mb["mask"].shape[1])
                out = grpo_losses(logp, mb["logp"], mb.get("ref_logp"), mb["advantages"], mb["mask"], config)
                return out["loss"], out

            def one_minibatch(trained, mb):
                model, optimizer = nnx.merge(trained_def, trained)
                (grads,), out = gradients(loss_fn, [model], [optimizer.wrt], mb, key)
                optimizer.update(model, grads)
                return nnx.state((model, optimizer)), {**out, "grad_norm": optax.tree.norm(grads)}

            def one_pass(trained, pass_key):
                order = jax.random.permutation(pass_key, b).reshape(m, b // m)
                return jax.lax.scan(one_minibatch, trained, jax.tree.map(lambda x: x[order], {k: v for k, v in rollout.items() if v is not None}))

            trained_def, trained = nnx.split((s.model, s.optimizer))
            trained, outs = jax.lax.scan(one_pass, trained, jax.random.split(key, config.num_iterations))
            nnx.update((s.model, s.optimizer), trained)
            return nnx.state(s), {k: v.mean() for k, v in outs.items()}

        self.scoring = jax.jit(scoring)
        self.update = jax.jit(update, out_shardings=(shardings_of(abstract_state), None), donate_argnums=0)

    def _texts(self, ids: np.ndarray, lengths: np.ndarray, skip: int = 0) -> list[str]:
        stops = {self.vocabulary.eos_id, *self.sampling.stop_tokens}
        return [self.vocabulary.decode([int(t) for t in row[skip:n] if int(t) not in stops and t != 0]) for row, n in zip(ids, lengths)]

    def __call__(self, state, batch):
        t0 = time.perf_counter()
        prompts = {k: self.repeat(batch[k]) for k in ("prompts", "prompt_lengths")}
        key = jax.random.fold_in(jax.random.key(self.seed), state["optimizer"]["step"][...])
        generation = generate(self.policy_def, state["model"], prompts["prompts"], prompts["prompt_lengths"],
                              eos_id=self.vocabulary.eos_id, config=self.sampling, seed=key)  # fmt: skip
        host = to_host(generation.tokens), to_host(generation.lengths)
        t1 = time.perf_counter()
        g = self.config.group_size
        prompt_texts = np.repeat(self._texts(to_host(batch["prompts"]), to_host(batch["prompt_lengths"]), skip=1), g).tolist()
        references = to_host(batch["references"])
        reference_texts = np.repeat(self._texts(references, (references != 0).sum(axis=1)), g).tolist()
        rewards = self.rewards(prompt_texts, self._texts(*host), reference_texts)
        t2 = time.perf_counter()
        advantages, std = group_advantages(jnp.asarray(rewards), g, self.config.scale_rewards)
        rollout, entropy = self.scoring(state, self.reference, prompts, generation)
        state, metrics = self.update(state, rollout, self.partitioner.shard_global_batch({"a": np.asarray(advantages)})["a"])
        jax.block_until_ready(state)
        t3 = time.perf_counter()
        if not self.config.logs_kl:
            del metrics["kl"]
        return state, {
            **metrics, "loss_sum": metrics.pop("loss"), "weight_sum": jnp.ones(()),
            "reward/mean": float(rewards.mean()), "reward/std": float(rewards.std()),
            "zero_std_fraction": float(np.mean(np.asarray(std) < 1e-6)), "entropy": entropy,
            "response_length": float(host[1].mean()),
            "time/rollout_s": t1 - t0, "time/reward_s": t2 - t1, "time/training_s": t3 - t2,
        }  # fmt: skip


# --- `flanjax train` with configs/runs/grpo.gin -------------------------------------------------


def train_grpo(
    *,
    model_dir: str,
    policy_checkpoint: str,
    reward: str,
    mixture_or_task_name: str,
    batch_size: int,
    loop: LoopConfig,
    prompt_len: int = 64,
    sampling: SamplingConfig = SamplingConfig(max_new_tokens=64, temperature=1.0),
    grpo: GRPOConfig = GRPOConfig(),
    optimizer: OptimizerConfig = OptimizerConfig(learning_rate=1e-6, schedule="constant"),
    lora: LoraConfig | None = None,
    mesh: MeshConfig = MeshConfig(),
    checkpoint: CheckpointConfig = CheckpointConfig(),
    seed: int = 0,
) -> LoopResult:
    """GRPO of the SFT policy `policy_checkpoint` on the prompts of `mixture_or_task_name`, rewarded
    by `reward` (see the module): `loop.num_steps` iterations of `batch_size` prompts, each
    sampled `grpo.group_size` times."""
    partitioner = Partitioner.from_config(mesh)
    per_process = partitioner.per_process_batch_size(batch_size)
    rows = batch_size * grpo.group_size
    if rows % (grpo.num_minibatches * partitioner.data_parallel_size):
        raise GRPOError(f"{batch_size} prompts x {grpo.group_size} responses = {rows} rows do not split into "
                        f"{grpo.num_minibatches} minibatches over {partitioner.data_parallel_size} data shards.")  # fmt: skip
    policy_dir, policy_step = resolve_checkpoint(policy_checkpoint)
    config = read_model_config(policy_dir)
    vocabulary = check_vocabulary(mixture_or_task_name, config.vocab_size)
    check_datasets(mixture_or_task_name)
    check_length(config, prompt_len, sampling.max_new_tokens)
    rewards = reward_source(reward, partitioner, vocabulary, grpo.group_size)
    policy_def = nnx.split(nnx.eval_shape(lambda: new_model(config, lora)))[0]
    reference_def, reference = None, None
    if grpo.beta > 0 and lora is None:  # a LoRA policy's reference is its base: no copy
        reference_def, reference = restore_weights(policy_dir, policy_step, config, partitioner)
    tx = make_optimizer(optimizer, loop.num_steps * grpo.num_iterations * grpo.num_minibatches)

    def compile_step(graphdef, abstract, spec):
        return GRPOStep(graphdef, policy_def, reference_def, reference, abstract, partitioner, rewards=rewards,
                        vocabulary=vocabulary, sampling=sampling, config=grpo, seed=seed)  # fmt: skip

    return trainer.run(trainer.Trainer(
        description=f"GRPO of {policy_dir} step {policy_step} rewarded by {reward} on {mixture_or_task_name}: "
                    f"{loop.num_steps} iterations of {batch_size} prompts x {grpo.group_size} responses",
        model_dir=model_dir, model=config, lora=lora, origin=policy_dir, vocabulary=vocabulary, partitioner=partitioner,
        loop=loop, checkpoint=checkpoint, batches=GroupPrompts(mixture_or_task_name, None, per_process, seed=seed, prompt_len=prompt_len),
        init=lm_init(config, tx, seed, lora),
        pretrained=lambda: (restore_weights(policy_dir, policy_step, config, partitioner)[1],),
        compile_step=compile_step, learning_rate=make_schedule(optimizer, loop.num_steps * grpo.num_iterations * grpo.num_minibatches),
        console_keys=("reward/mean", "kl", "clip_fraction", "entropy", "response_length"),
        plots=(trainer.Plot("reward.png", ("reward/mean",), False, ylabel=f"reward ({reward})"),
               *([trainer.Plot("kl.png", ("kl",), False, ylabel="KL(policy || reference), k3 per token")] if grpo.logs_kl else [])),
    ))  # fmt: skip
