"""The RLHF quickstart (`make quickstart-rlhf`): AI feedback from a rubric, a reward model, PPO,
DPO on the same comparisons and GRPO on the rubric itself.

The rubric is the programmatic labeler (AI feedback): a Python function that grades a
response to a quickstart prompt. `python -m tasks.quickstart_rlhf report` compares the SFT,
PPO, DPO and GRPO policies on held-out prompts (the rubric's mean score over sampled
responses, and the KL to the SFT policy), with each method's wall time (`timed`), and prints
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


def held_out(policy: str, sft: str, num_prompts: int = 300, samples: int = 4, seed: int = 1) -> dict[str, float]:
    """A policy on `samples` sampled responses (temperature 1) to each of `num_prompts` held-out
    prompts: the rubric's mean score, and the mean of log pi(y|x) - log pi_sft(y|x) over those
    responses (+ EOS), which estimates KL(policy || SFT) per response (k1)."""
    from flanjax.chat import Policy
    from flanjax.data.pipeline import task_prompts
    from flanjax.decode import SamplingConfig
    from flanjax.rlhf.sampling import sample
    from flanjax.sharding import MeshConfig, Partitioner

    partitioner = Partitioner.from_config(MeshConfig())
    prompts, references, vocabulary = task_prompts("quickstart", "validation", num_prompts)
    model = Policy.load(policy, partitioner, vocabulary)
    responses = sample(model, prompts, vocabulary, partitioner, num_samples=samples, prompt_len=64, seed=seed,
                       sampling=SamplingConfig(max_new_tokens=24, temperature=1.0))  # fmt: skip
    flat = [(p, r) for p, rs in zip(prompts, responses) for r in rs]
    xs, ys = [p for p, _ in flat], [r for _, r in flat]
    kl = model.log_likelihoods(xs, ys) - Policy.load(sft, partitioner, vocabulary).log_likelihoods(xs, ys)
    score = np.mean([[rubric(p, r, ref) for r in rs] for p, rs, ref in zip(prompts, responses, references)])
    return {"rubric_score": float(score), "kl_to_sft": float(np.mean(kl))}


def timed(run_dir: str, name: str, *command: str) -> int:
    """Runs `command` (the training of run `name`) and adds its wall time to RUN_DIR/wall_s.json
    when it trained (a finished run, asked again, adds nothing; a resumed one adds its part)."""
    import subprocess
    import time

    from flanjax.rundir.metrics import read_metrics

    def rows():
        path = os.path.join(run_dir, name, "metrics.jsonl")
        return len(read_metrics(path)) if os.path.exists(path) else 0

    before, start = rows(), time.perf_counter()
    code = subprocess.call(command)
    if code == 0 and rows() > before:
        path = os.path.join(run_dir, "wall_s.json")
        times = json.load(open(path)) if os.path.exists(path) else {}
        times[name] = round(times.get(name, 0.0) * (before > 0) + time.perf_counter() - start, 1)
        with open(path, "w") as f:
            json.dump(times, f, indent=2)
    return code


def report(run_dir: str = "runs/quickstart_rlhf", sft: str = "runs/quickstart") -> dict:
    from flanjax.rundir.metrics import read_metrics

    rm = [r for r in read_metrics(os.path.join(run_dir, "reward", "metrics.jsonl")) if "validation/pair_accuracy" in r]
    ppo = [r for r in read_metrics(os.path.join(run_dir, "ppo", "metrics.jsonl")) if "kl" in r]
    with open(os.path.join(run_dir, "ppo", "ppo.json")) as f:
        target = json.load(f)["kl_target"]
    times_path = os.path.join(run_dir, "wall_s.json")
    times = json.load(open(times_path)) if os.path.exists(times_path) else {}
    methods = {"sft": held_out(sft, sft), **{m: held_out(os.path.join(run_dir, m), sft) for m in ("ppo", "dpo", "grpo")}}
    walls = {m: (f"{times[m]:.0f} s", "") for m in ("dpo", "grpo") if m in times}
    if "ppo" in times:  # PPO needs its reward model first
        walls["ppo"] = (f"{times.get('reward', 0) + times['ppo']:.0f} s", f"  (reward model {times.get('reward', 0):.0f} s + PPO {times['ppo']:.0f} s)")
    print(f"{'policy':<8} {'rubric score':>12} {'KL to SFT':>10} {'wall time':>10}")
    for name, row in methods.items():
        wall, note = walls.get(name, ("", ""))
        print(f"{name:<8} {row['rubric_score']:>12.3f} {row['kl_to_sft']:>10.2f} {wall:>10}{note}".rstrip())
    summary = {
        "rm_heldout_accuracy": rm[-1]["validation/pair_accuracy"],
        **{f"rubric_score_{m}": round(row["rubric_score"], 3) for m, row in methods.items()},
        **{f"kl_to_sft_{m}": round(row["kl_to_sft"], 2) for m, row in methods.items() if m != "sft"},
        **{f"wall_s_{m}": t for m, t in times.items()},
        "kl": float(np.mean([r["kl"] for r in ppo[-10:]])),  # PPO's own, the last iterations' mean
        "kl_target": target,
        "reward_ppo": float(np.mean([r["reward/score_mean"] for r in ppo[-10:]])),  # the SFT policy's is 0 by normalisation
        "plots": sorted(glob.glob(os.path.join(run_dir, "*", "*.png"))),
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    if sys.argv[1:2] == ["report"]:
        report(*sys.argv[2:])
    elif sys.argv[1:2] == ["timed"] and len(sys.argv) > 4:
        sys.exit(timed(*sys.argv[2:]))
    else:
        sys.exit("usage: python -m tasks.quickstart_rlhf report [RUN_DIR [SFT_RUN]]\n"
                 "       python -m tasks.quickstart_rlhf timed RUN_DIR NAME COMMAND...")
