"""The RLHF quickstart (`make quickstart-rlhf`): AI feedback from a rubric, a reward model, PPO.

The rubric is the programmatic labeler (AI feedback): a Python function that grades a
response to a quickstart prompt. `python -m tasks.quickstart_rlhf report` compares the SFT and
PPO policies on held-out prompts (the rubric's mean score over sampled responses) and prints
the demo's summary as the last line of JSON.
"""

from __future__ import annotations

import glob
import json
import os
import sys

import numpy as np

import tasks.quickstart  # noqa: F401  registers the prompts' tasks


def rubric(prompt: str, response: str, reference: str) -> float:
    """The demo's labelling guideline: "prefer answers written with larger digits" -- the mean
    digit of the response over 9 (0 without digits).

    A deliberately simple preference, chosen so that the quickstart's 1M-parameter reward model
    learns it in a minute on CPU and its effect on the policy is plain to see. (Grading
    arithmetic correctness instead, that reward model reached only ~0.6 held-out accuracy in the
    same budget: it would first have to learn to add.) Swap in your own rubric, a model judge
    or human labels with `flanjax label --labeler`."""
    del prompt, reference
    digits = [int(c) for c in response if c.isdigit()]
    return sum(digits) / (9 * len(digits)) if digits else 0.0


def rubric_score(policy: str, num_prompts: int = 300, samples: int = 4, seed: int = 1) -> float:
    """Mean rubric score of `samples` sampled responses to held-out prompts (temperature 1)."""
    from flanjax.decode import SamplingConfig
    from flanjax.data.pipeline import task_prompts
    from flanjax.rlhf.sampling import sample
    from flanjax.sharding import MeshConfig, Partitioner

    partitioner = Partitioner.from_config(MeshConfig())
    prompts, references, vocabulary = task_prompts("quickstart", "validation", num_prompts)
    responses = sample(policy, prompts, vocabulary, partitioner, num_samples=samples, prompt_len=64, seed=seed,
                       sampling=SamplingConfig(max_new_tokens=24, temperature=1.0))  # fmt: skip
    return float(np.mean([[rubric(p, r, ref) for r in rs] for p, rs, ref in zip(prompts, responses, references)]))


def report(run_dir: str = "runs/quickstart_rlhf", sft: str = "runs/quickstart") -> dict:
    from flanjax.rundir.metrics import read_metrics

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
        "reward_ppo": float(np.mean([r["reward/score_mean"] for r in ppo[-10:]])),  # the SFT policy's is 0 by normalisation
        "plots": sorted(glob.glob(os.path.join(run_dir, "ppo", "*.png"))),  # whatever the PPO run wrote
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    if sys.argv[1:2] != ["report"]:
        sys.exit("usage: python -m tasks.quickstart_rlhf report [RUN_DIR [SFT_RUN]]")
    report(*sys.argv[2:])
