"""Sampling a policy for feedback and at inference: `flanjax label` and `flanjax sample`.

`label` samples K responses to each prompt of a task, has a labeler (rubric, model judge,
human labels, or a mix) rank them, and writes the comparisons as preference JSONL, which
`reward.preference_task` reads as a seqio task. `best_of_n` samples n responses and keeps
the reward model's favourite (InstructGPT's rejection-sampling baseline);
`best_of_n_bidirectional` keeps the one a bidirectional model finds likeliest both ways (BatGPT).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax
import numpy as np

from flanjax.data.pipeline import task_prompts
from flanjax.data.preferences import Comparison, write_comparisons
from flanjax.chat import Policy
from flanjax.data.dialogue import Message
from flanjax.decode import SamplingConfig
from flanjax.rlhf.feedback import Labeler, label_all
from flanjax.rlhf.reward import TOKENIZER_FILE, RewardModel
from flanjax.rundir.metrics import console
from flanjax.sharding import Partitioner
from flanjax import paths


def sample(policy: str | Policy, prompts: Sequence[str], vocabulary, partitioner: Partitioner, *, num_samples: int,
           sampling: SamplingConfig, prompt_len: int, batch_size: int = 64, seed: int = 0) -> list[list[str]]:  # fmt: skip
    """`num_samples` responses to each prompt from a run's policy (refused if `vocabulary` is
    not the tokenizer the policy recorded). A policy trained on conversations gets each prompt
    as a user turn and stops at its end-of-turn token."""
    model = policy if isinstance(policy, Policy) else Policy.load(policy, partitioner, vocabulary)
    flat = [[Message("user", p)] for p in prompts for _ in range(num_samples)]
    texts = model.replies(flat, sampling, prompt_len=prompt_len, batch_size=batch_size, seed=seed)
    return [texts[i * num_samples : (i + 1) * num_samples] for i in range(len(prompts))]


def label(policy: str, task: str, labeler: Labeler, out: str, partitioner: Partitioner, *, split: str = "train",
          num_prompts: int = 256, num_samples: int = 4, sampling: SamplingConfig = SamplingConfig(temperature=1.0),
          prompt_len: int = 64, batch_size: int = 64, seed: int = 0) -> list[Comparison]:  # fmt: skip
    prompts, references, vocabulary = task_prompts(task, split, num_prompts)
    console.print(f"Sampling {num_samples} responses to each of {len(prompts)} prompts of {task} ({split})")
    responses = sample(policy, prompts, vocabulary, partitioner, num_samples=num_samples, sampling=sampling,
                       prompt_len=prompt_len, batch_size=batch_size, seed=seed)  # fmt: skip
    comparisons, sources, skipped = label_all(labeler, prompts, responses, references)
    if jax.process_index() == 0:  # every process sampled and labelled the same: one writes
        write_comparisons(out, comparisons)
        with paths.open(os.path.join(os.path.dirname(paths.abspath(out)), TOKENIZER_FILE), "w") as f:
            f.write(vocabulary.path)  # the token ids the reward model will see are the policy's
    console.print(f"Wrote {len(comparisons)} comparisons to {out} (by source: {dict(sources)}; {skipped} prompts without a preference)")
    return comparisons


def best_of_n(policy: str, reward: RewardModel, prompts: Sequence[str], vocabulary, partitioner: Partitioner, *,
              n: int, sampling: SamplingConfig, prompt_len: int, batch_size: int = 64, seed: int = 0) -> list[dict]:  # fmt: skip
    """For each prompt: n samples, their normalised rewards, and the best one."""
    candidates = sample(policy, prompts, vocabulary, partitioner, num_samples=n, sampling=sampling,
                        prompt_len=prompt_len, batch_size=batch_size, seed=seed)  # fmt: skip
    flat_prompts = [p for p in prompts for _ in range(n)]
    flat = [r for rs in candidates for r in rs]
    rewards = reward.scores(vocabulary, flat_prompts, flat, batch_size).reshape(len(prompts), n)
    return [
        {"prompt": p, "response": rs[int(np.argmax(r))], "reward": float(r.max()), "candidates": list(rs),
         "rewards": [float(x) for x in r]}  # fmt: skip
        for p, rs, r in zip(prompts, candidates, rewards)
    ]


def best_of_n_bidirectional(policy: str, prompts: Sequence[str], vocabulary, partitioner: Partitioner, *, n: int, lam: float,
                            sampling: SamplingConfig, prompt_len: int, batch_size: int = 64, seed: int = 0) -> list[dict]:  # fmt: skip
    """For each prompt: n samples from a bidirectionally trained run, each scored by the same
    model as log p_l2r(y | x) + lam * log p_r2l(x | y) (`Policy.rescore`), and the best one: a
    response that does not fit its prompt scores low backwards."""
    model = Policy.load(policy, partitioner, vocabulary)
    candidates = sample(model, prompts, vocabulary, partitioner, num_samples=n, sampling=sampling, prompt_len=prompt_len,
                        batch_size=batch_size, seed=seed)  # fmt: skip
    best, scores = model.rescore(prompts, candidates, lam, batch_size)
    return [
        {"prompt": p, "response": ys[b], "score": float(s[b]), "candidates": list(ys), "scores": [float(x) for x in s]}
        for p, ys, b, s in zip(prompts, candidates, best, scores)
    ]
