"""The RLHF quickstart (`make quickstart-rlhf`): AI feedback from a rubric, a reward model, PPO.

The rubric is the programmatic labeler: it grades a response to a quickstart prompt against
the task's reference answer. `python -m tasks.quickstart_rlhf report` compares the SFT and
PPO policies on held-out prompts (the rubric's mean score over sampled responses) and prints
the demo's summary as the last line of JSON.
"""

from __future__ import annotations

import difflib
import json
import os
import sys

import numpy as np

import tasks.quickstart  # noqa: F401  registers the prompts' tasks


def rubric(prompt: str, response: str, reference: str) -> float:
    """1 for the reference answer; otherwise partial credit for how close the text is (at most 0.5)."""
    del prompt
    got, want = response.strip(), reference.strip()
    if got == want:
        return 1.0
    return 0.5 * difflib.SequenceMatcher(None, got, want).ratio()


def rubric_score(policy: str, num_prompts: int = 300, samples: int = 4, seed: int = 1) -> float:
    """Mean rubric score of `samples` sampled responses to held-out prompts (temperature 1)."""
    from flanjax.decode import SamplingConfig
    from flanjax.rlhf.sampling import sample, task_prompts
    from flanjax.sharding import MeshConfig, Partitioner

    partitioner = Partitioner.from_config(MeshConfig())
    prompts, references, vocabulary = task_prompts("quickstart", "validation", num_prompts)
    responses = sample(policy, prompts, vocabulary, partitioner, num_samples=samples, prompt_len=64, seed=seed,
                       sampling=SamplingConfig(max_new_tokens=24, temperature=1.0))  # fmt: skip
    return float(np.mean([[rubric(p, r, ref) for r in rs] for p, rs, ref in zip(prompts, responses, references)]))


def report(run_dir: str = "runs/quickstart_rlhf", sft: str = "runs/quickstart") -> dict:
    from flanjax.train.metrics import read_metrics

    rm = [r for r in read_metrics(os.path.join(run_dir, "reward", "metrics.jsonl")) if "validation/pair_accuracy" in r]
    ppo = [r for r in read_metrics(os.path.join(run_dir, "ppo", "metrics.jsonl")) if "kl" in r]
    with open(os.path.join(run_dir, "ppo", "ppo.json")) as f:
        target = json.load(f)["kl_target"]
    summary = {
        "rm_heldout_accuracy": rm[-1]["validation/pair_accuracy"],
        "rubric_score_sft": rubric_score(sft),
        "rubric_score_ppo": rubric_score(os.path.join(run_dir, "ppo")),
        "kl": float(np.mean([r["kl"] for r in ppo[-10:]])),  # the last iterations' mean
        "kl_target": target,
        "reward_sft": ppo[0]["reward/score_mean"],
        "reward_ppo": float(np.mean([r["reward/score_mean"] for r in ppo[-10:]])),
        "plots": [os.path.join(run_dir, "ppo", p) for p in ("reward.png", "kl.png")],
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    if sys.argv[1:2] != ["report"]:
        sys.exit("usage: python -m tasks.quickstart_rlhf report [RUN_DIR [SFT_RUN]]")
    report(*sys.argv[2:])
