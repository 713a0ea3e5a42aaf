"""Choosing a run's checkpoint, and comparing two runs, by a judge of their answers (LIMA).

LIMA found that held-out perplexity does not track answer quality, so it chose its checkpoint
(between epochs 5 and 10) by the answers to 50 dev prompts, and compared models pairwise.

    select(run, prompts, judge)    every candidate checkpoint answers the dev prompts (LIMA's
                                   decoding); the judge scores the answers; the table has the
                                   judge's score and the dev perplexity per checkpoint, and the
                                   best step is recorded in RUN/selected.json, which `eval`,
                                   `sample`, `chat` and `convert` then read
    compare(a, b, prompts, judge)  wins, ties and losses of run A's answers against run B's

Prompts are a JSONL file of conversations (see `data.dialogue`); one that ends with the
assistant's reply gives it as the reference (for the perplexity and for rubrics). Judges:

    rubric:MODULE:FUNCTION   fn(prompt, response, reference) -> float, per answer
    reward:RUN               a reward model's normalised score, per answer
    judge:RUN                a judge model asked which of two answers is better, in both
                             orders (`feedback.JudgeLabeler`); a pair whose verdict flips with
                             the order is a tie
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence

import numpy as np

from flanjax.chat import LIMA_SAMPLING, Policy
from flanjax.data.dialogue import Message, read_conversations
from flanjax.decode import SamplingConfig
from flanjax import paths
from flanjax.errors import FlanjaxError
from flanjax.rlhf.feedback import JudgeLabeler, load_rubric
from flanjax.rundir.checkpoint import Checkpointer
from flanjax.rundir.files import SELECTED_FILE, resolve_checkpoint, run_vocabulary
from flanjax.rundir.metrics import console
from flanjax.sharding import Partitioner


class SelectionError(FlanjaxError, ValueError):
    pass


def read_prompts(path: str) -> tuple[list[list[Message]], list[str]]:
    """(conversations ending on a user turn, reference replies or "") of a prompts file."""
    prompts, references = [], []
    for conversation in read_conversations(path, require_reply=False):
        has_reply = conversation[-1].role == "assistant"
        prompts.append(conversation[:-1] if has_reply else conversation)
        references.append(conversation[-1].content if has_reply else "")
    return prompts, references


@dataclasses.dataclass
class Judge:
    """One of the three judges. `scores` for rubric and reward judges (each answer alone),
    `model` (a `JudgeLabeler`) for a pairwise judge."""

    name: str
    scores: object = None  # (prompts, responses, references) -> np.ndarray
    model: JudgeLabeler | None = None

    @classmethod
    def parse(cls, spec: str, partitioner: Partitioner, vocabulary) -> Judge:
        kind, _, value = spec.partition(":")
        if kind == "rubric":
            fn = load_rubric(value)
            return cls(spec, scores=lambda p, r, ref: np.asarray([float(fn(*x)) for x in zip(p, r, ref)]))
        if kind == "reward":
            from flanjax.rlhf.reward import load_reward_model

            reward = load_reward_model(value, partitioner, vocabulary)
            return cls(spec, scores=lambda p, r, ref: reward.scores(vocabulary, p, r))
        if kind == "judge":
            return cls(spec, model=JudgeLabeler.from_run(value, vocabulary, partitioner))
        raise SelectionError(f"judge {spec!r}: use rubric:MODULE:FUNCTION, reward:RUN_DIR or judge:RUN_DIR.")


def _text(conversation: Sequence[Message]) -> str:
    """What a judge reads as the prompt: the user's last message."""
    return conversation[-1].content


def select(run: str, prompts_file: str, judge_spec: str, partitioner: Partitioner, *, sampling: SamplingConfig = LIMA_SAMPLING,
           steps: tuple[int | None, int | None] = (None, None), seed: int = 0) -> dict:  # fmt: skip
    """Judges every checkpoint of `run` with a step in `steps` (inclusive bounds) on the prompts,
    records the best in RUN/selected.json and returns the table and choice."""
    run_dir = paths.abspath(run)
    resolve_checkpoint(run_dir)  # a run with checkpoints
    lo, hi = steps
    candidates = [s for s in Checkpointer(run_dir, read_only=True).all_steps() if (lo is None or s >= lo) and (hi is None or s <= hi)]
    if not candidates:
        raise SelectionError(f"{run_dir} has no checkpoint with a step in [{lo}, {hi}]; it has {Checkpointer(run_dir, read_only=True).all_steps()}.")
    conversations, references = read_prompts(prompts_file)
    vocabulary = run_vocabulary(run_dir)
    judge = Judge.parse(judge_spec, partitioner, vocabulary)
    answers, perplexities = {}, {}
    for step in candidates:
        console.print(f"Sampling step {step} on {len(conversations)} prompts")
        policy = Policy.load(os.path.join(run_dir, "checkpoints", str(step)), partitioner, vocabulary)
        answers[step] = policy.replies(conversations, sampling, seed=seed)
        perplexities[step] = policy.perplexity(conversations, references)
    scores = _judge_all(judge, conversations, references, [answers[s] for s in candidates])
    table = [{"step": s, "judge_score": float(scores[i]), "dev_perplexity": perplexities[s]} for i, s in enumerate(candidates)]
    best = candidates[int(np.argmax(scores))]  # the earliest of equals
    result = {"run": run_dir, "selected_step": best, "judge": judge_spec, "prompts": paths.abspath(prompts_file), "table": table}
    with paths.open(os.path.join(run_dir, SELECTED_FILE), "w") as f:
        json.dump({"step": best, **result}, f, indent=2)
    return result


def _judge_all(judge: Judge, conversations, references, answers: list[list[str]]) -> np.ndarray:
    """Each candidate's score: its mean answer score, or with a pairwise judge its mean
    probability of beating each other candidate's answer to the same prompt."""
    texts = [_text(c) for c in conversations]
    if judge.model is None:
        return np.asarray([judge.scores(texts, a, references).mean() for a in answers])
    wins = np.zeros(len(answers))
    for p, (text, reference) in enumerate(zip(texts, references)):
        probs = judge.model.pairwise_probabilities(text, [a[p] for a in answers], reference)
        wins += (probs.sum(axis=1) - 0.5) / max(len(answers) - 1, 1)
    return wins / len(texts)


def compare(run_a: str, run_b: str, prompts_file: str, judge_spec: str, partitioner: Partitioner, *,
            sampling: SamplingConfig = LIMA_SAMPLING, seed: int = 0) -> dict:  # fmt: skip
    """Wins, ties and losses of A's answers against B's on the prompts. A pairwise judge sees
    each pair in both orders: A wins only if both verdicts prefer A; `order_agreement` is the
    share of pairs whose two verdicts agree."""
    conversations, references = read_prompts(prompts_file)
    a = Policy.load(run_a, partitioner)
    vocabulary = a.vocabulary
    b = Policy.load(run_b, partitioner, vocabulary)
    answers_a = a.replies(conversations, sampling, seed=seed)
    answers_b = b.replies(conversations, sampling, seed=seed)
    judge = Judge.parse(judge_spec, partitioner, vocabulary)
    texts = [_text(c) for c in conversations]
    if judge.model is None:
        margin = judge.scores(texts, answers_a, references) - judge.scores(texts, answers_b, references)
        outcomes, agreement = np.sign(margin), None
    else:
        first = judge.model.log_odds(texts, answers_a, answers_b, references)  # A's answer shown first
        second = -judge.model.log_odds(texts, answers_b, answers_a, references)  # ... and second
        agree = np.sign(first) == np.sign(second)
        outcomes = np.where(agree, np.sign(first), 0.0)
        same = np.asarray([x == y for x, y in zip(answers_a, answers_b)])
        outcomes[same] = 0.0
        agreement = float(agree[~same].mean()) if (~same).any() else None
    return {
        "a": paths.abspath(run_a), "b": paths.abspath(run_b), "judge": judge_spec, "prompts": len(texts),
        "wins": int((outcomes > 0).sum()), "ties": int((outcomes == 0).sum()), "losses": int((outcomes < 0).sum()),
        "order_agreement": agreement,
        "examples": [{"prompt": t, "a": x, "b": y, "outcome": ("loss", "tie", "win")[int(o) + 1]}
                     for t, x, y, o in zip(texts, answers_a, answers_b, outcomes)][:5],
    }  # fmt: skip
