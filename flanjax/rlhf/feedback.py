"""Labelers: sampled responses to a prompt -> a preference `Comparison` (or None).

A labeler is any callable `labeler(prompt, responses, reference) -> Comparison | None`;
`reference` is the task's target text when known, "" otherwise, and None means "no usable
preference" (fewer than two distinct responses, or all tied). Four kinds:

    RubricLabeler(fn)    fn(prompt, response, reference) -> float scores each response
                         (e.g. exact match against the reference); `load_rubric("pkg.mod:fn")`
    JudgeLabeler(...)    a flanjax model judges every pair under a judging prompt by how
                         likely it answers " A" rather than " B", both orders averaged
                         (AI feedback: RLAIF, BatGPT)
    HumanLabels(path)    the human comparison stored for the prompt in a preferences JSONL
    MixedLabeler([...])  the first labeler with an answer wins (human where present, AI else)

`label_all` runs a labeler over many prompts; `write_comparisons` saves what it returns.
`judge_report` says how far to trust a judge: how often its verdict flips when the two
answers swap places (`position_bias`), and how often it agrees with humans (`agreement`).
"""

from __future__ import annotations

import collections
import dataclasses
import importlib
import itertools
import math
import string
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

import numpy as np
from flax import nnx

from flanjax.data.preferences import Comparison, comparison, read_comparisons
from flanjax.decode import decoder_features, score_rows
from flanjax.errors import FlanjaxError
from flanjax.rundir.files import check_tokenizer, resolve_checkpoint, restore


class LabelError(FlanjaxError, ValueError):
    pass


class RubricNotFoundError(FlanjaxError, ImportError):
    pass


class JudgeInputTooLongError(FlanjaxError, ValueError):
    pass


class Labeler(Protocol):
    def __call__(self, prompt: str, responses: Sequence[str], reference: str) -> Comparison | None: ...


def unique(responses: Iterable[str]) -> list[str]:
    """The responses without exact duplicates, first occurrences kept in order."""
    return list(dict.fromkeys(responses))


def scores_to_comparison(
    prompt: str, responses: Sequence[str], scores: Sequence[float], *, source: str, min_gap: float = 0.0
) -> Comparison | None:
    """Ranks `responses` by `scores` (higher is better) into a comparison, best first.

    Exact duplicates count once (the first one's score). Ranks are dense: walking down the
    sorted scores, a score more than `min_gap` below the one just above it starts a new rank,
    so equal scores (and, with `min_gap` > 0, near-equal ones) tie. None when fewer than two
    distinct responses remain or every one ties."""
    if len(responses) != len(scores):
        raise LabelError(f"{len(scores)} scores for {len(responses)} responses; give one score per response.")
    best: dict[str, float] = {}
    for response, value in zip(responses, scores):
        value = float(value)
        if math.isnan(value):
            raise LabelError(f"score of response {response!r} to {prompt!r} is NaN; the scorer must return a number.")
        best.setdefault(response, value)  # duplicates: the first one counts
    if len(best) < 2:
        return None
    kept = list(best)
    order = sorted(range(len(kept)), key=lambda i: -best[kept[i]])
    ranks = [0] * len(kept)
    for previous, i in zip(order, order[1:]):
        gap = best[kept[previous]] - best[kept[i]]
        ranks[i] = ranks[previous] + (gap > min_gap)
    if max(ranks) == 0:
        return None
    return comparison(prompt, kept, ranks, source=source)


# --- rubrics ----------------------------------------------------------------------------------


@dataclasses.dataclass
class RubricLabeler:
    """Scores each response with `fn(prompt, response, reference) -> float` (higher is better)."""

    fn: Callable[[str, str, str], float]
    name: str = "rubric"

    def __call__(self, prompt: str, responses: Sequence[str], reference: str = "") -> Comparison | None:
        responses = unique(responses)  # each distinct response is scored once
        scores = []
        for response in responses:
            value = self.fn(prompt, response, reference)
            try:
                scores.append(float(value))
            except (TypeError, ValueError):
                raise LabelError(
                    f"rubric {self.name!r} returned {value!r} for response {response!r}; a rubric "
                    "must return a number (higher is better)."
                ) from None
        return scores_to_comparison(prompt, responses, scores, source=self.name)


def load_rubric(name: str) -> Callable[[str, str, str], float]:
    """The function `name` = "package.module:function" (the function may be "Class.attr")."""
    module_name, sep, attr = name.partition(":")
    if not sep or not module_name or not attr:
        raise RubricNotFoundError(
            f"rubric {name!r} is not of the form 'package.module:function'; name the module, a "
            "colon, then the function, e.g. 'my_rubrics:exact_match'."
        )
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        raise RubricNotFoundError(
            f"rubric {name!r}: cannot import module {module_name!r} ({e}). Check the spelling, and "
            "that its directory is on PYTHONPATH."
        ) from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise RubricNotFoundError(
                f"rubric {name!r}: {obj.__name__ if hasattr(obj, '__name__') else obj!r} has no attribute "
                f"{part!r}. Check the function's name after the colon."
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise RubricNotFoundError(f"rubric {name!r} is a {type(obj).__name__}, not a function (prompt, response, reference) -> float.")
    return obj


# --- an AI judge ------------------------------------------------------------------------------

DEFAULT_TEMPLATE = (
    "Question: {prompt}\nAnswer A: {a}\nAnswer B: {b}\nWhich answer is better, A or B? The better answer is"
)


def _check_template(template: str) -> None:
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as e:
        raise LabelError(f"judging template {template!r} is not a valid format string ({e}); write braces as {{{{ }}}}.") from None
    missing, unknown = {"prompt", "a", "b"} - fields, fields - {"prompt", "a", "b", "reference"}
    if missing or unknown:
        raise LabelError(
            f"judging template {template!r}: it must use the fields {{prompt}}, {{a}} and {{b}} (and "
            f"may use {{reference}}); missing {sorted(missing)}, unknown {sorted(unknown)}."
        )


@dataclasses.dataclass(frozen=True)
class Verdict:
    """A pair the judge scored in both orders: P(the answer shown first is better) with `a`
    shown first (`p_ab`), then with `b` shown first (`p_ba`)."""

    prompt: str
    a: str
    b: str
    p_ab: float
    p_ba: float

    @property
    def p_a(self) -> float:
        """P(a beats b), both orders averaged: the judge's verdict without position bias."""
        return 0.5 * (self.p_ab + 1.0 - self.p_ba)


class JudgeLabeler:
    """A flanjax model judges responses pairwise: P(i beats j) is the mean over both orders
    (i as A, then as B: this cancels position bias) of sigmoid(log p(i's letter) - log p(the
    other letter)) after the judging prompt. A response's score is its summed win
    probability; `scores_to_comparison` turns those into ranks. Every pair judged is kept in
    `verdicts` (both orders), for `judge_report`.

    Every pair costs four scored rows (two orders x two letters), in fixed-shape batches of
    `batch_size` rows (rounded up to a multiple of the data-parallel shards) whose width is
    rounded up to a multiple of `width_multiple`, so few shapes are compiled."""

    def __init__(
        self,
        graphdef: nnx.GraphDef,
        state: nnx.State,
        vocabulary,  # a seqio.Vocabulary (HFVocabulary)
        partitioner,  # a flanjax.sharding.Partitioner
        *,
        template: str = DEFAULT_TEMPLATE,
        letters: tuple[str, str] = (" A", " B"),
        batch_size: int = 64,
        width_multiple: int = 64,
        name: str = "judge",
        min_gap: float = 0.0,
    ):
        _check_template(template)
        self.graphdef, self.state, self.vocabulary, self.partitioner = graphdef, state, vocabulary, partitioner
        self.template, self.name, self.min_gap, self.width_multiple = template, name, min_gap, width_multiple
        config = nnx.merge(graphdef, state).config
        self.max_len = config.max_len
        if vocabulary.vocab_size > config.vocab_size:
            raise LabelError(
                f"the judge's vocabulary has {vocabulary.vocab_size} tokens but the model only "
                f"{config.vocab_size}; give the vocabulary the judge model was trained with."
            )
        self.letter_ids = [list(vocabulary.encode(letter)) for letter in letters]
        if not all(self.letter_ids) or self.letter_ids[0] == self.letter_ids[1]:
            raise LabelError(f"answer letters {letters!r} must encode to distinct, non-empty token sequences.")
        shards = partitioner.data_parallel_size
        self.batch_size = -(-batch_size // shards) * shards  # every shard gets whole rows
        self.verdicts: list[Verdict] = []

    @classmethod
    def from_run(cls, checkpoint_path: str, vocabulary, partitioner, **kwargs) -> JudgeLabeler:
        """The judge of a trained run (a run directory, or RUN/checkpoints/STEP)."""
        check_tokenizer(resolve_checkpoint(checkpoint_path)[0], vocabulary, "the judge's prompts")
        graphdef, state, _ = restore(checkpoint_path, partitioner)
        return cls(graphdef, state, vocabulary, partitioner, **kwargs)

    def __call__(self, prompt: str, responses: Sequence[str], reference: str = "") -> Comparison | None:
        responses = unique(responses)
        if len(responses) < 2:
            return None
        wins = self.pairwise_probabilities(prompt, responses, reference)
        scores = wins.sum(axis=1) - 0.5  # the diagonal (0.5) is no win
        return scores_to_comparison(prompt, responses, scores, source=self.name, min_gap=self.min_gap)

    def pairwise_probabilities(self, prompt: str, responses: Sequence[str], reference: str = "") -> np.ndarray:
        """[n, n]: entry (i, j) is P(response i beats response j); P + P.T = 1 off the diagonal."""
        n = len(responses)
        pairs = [(i, j) for i in range(n) for j in range(n) if i != j]  # (A, B): both orders of each pair
        log_odds = self.log_odds([prompt] * len(pairs), [responses[i] for i, _ in pairs], [responses[j] for _, j in pairs],
                                 [reference] * len(pairs))  # fmt: skip
        first_wins = {pair: _sigmoid(x) for pair, x in zip(pairs, log_odds)}  # P(A is better) per order
        probs = np.full((n, n), 0.5)
        for i, j in pairs:
            # i is A in (i, j) and B in (j, i); average its win probability over both.
            probs[i, j] = 0.5 * (first_wins[i, j] + 1.0 - first_wins[j, i])
            if i < j:
                self.verdicts.append(Verdict(prompt, responses[i], responses[j], first_wins[i, j], first_wins[j, i]))
        return probs

    def log_odds(self, prompts: Sequence[str], first: Sequence[str], second: Sequence[str], references: Sequence[str]) -> np.ndarray:
        """Per row, `first` shown as answer A and `second` as B: log p(A's letter) - log p(B's
        letter) after the judging prompt; > 0 prefers `first`."""
        contexts = [self.vocabulary.encode(self.template.format(prompt=p, a=a, b=b, reference=r))
                    for p, a, b, r in zip(prompts, first, second, references)]  # fmt: skip
        logp = self._log_likelihoods([(ctx, letter) for ctx in contexts for letter in self.letter_ids]).reshape(-1, 2)
        return logp[:, 0] - logp[:, 1]

    def _log_likelihoods(self, rows: list[tuple[list[int], list[int]]]) -> np.ndarray:
        """log p(target | context) of each (context, target) row, through `decode.score`."""
        longest = max(len(c) + len(t) for c, t in rows)
        if longest > self.max_len:
            raise JudgeInputTooLongError(
                f"a judging prompt plus answer letter is {longest} tokens, more than the judge's "
                f"max_len={self.max_len}. Shorten the responses (fewer new tokens when sampling) or "
                "the judging template, or use a judge model with a longer max_len."
            )
        width = min(self.max_len, -(-longest // self.width_multiple) * self.width_multiple)
        tokens = np.zeros((len(rows), width), np.int32)
        weights = np.zeros((len(rows), width), np.float32)
        for r, (context, target) in enumerate(rows):
            tokens[r, : len(context) + len(target)] = [*context, *target]
            weights[r, len(context) : len(context) + len(target)] = 1.0
        scores = score_rows(self.graphdef, self.state, decoder_features(tokens, weights), self.partitioner, self.batch_size)
        return scores.astype(np.float64)


def _sigmoid(x: float) -> float:
    return 0.5 * (1.0 + math.tanh(0.5 * x))  # no overflow for large |x|


# --- human labels and mixing -----------------------------------------------------------------


class HumanLabels:
    """The human comparisons of a preferences JSONL, looked up by prompt.

    Labels a prompt with its stored comparison (whatever responses were sampled; source as
    in the file, "human" where it names none), or None when no one labelled it. Where a
    prompt was labelled more than once, the first comparison in the file is used."""

    def __init__(self, path: str):
        self.path = path
        self.by_prompt: dict[str, Comparison] = {}
        for c in read_comparisons(path):
            self.by_prompt.setdefault(c.prompt, dataclasses.replace(c, source=c.source or "human"))

    def __len__(self) -> int:
        return len(self.by_prompt)

    def __call__(self, prompt: str, responses: Sequence[str] = (), reference: str = "") -> Comparison | None:
        del responses, reference  # the human judged their own set of responses
        return self.by_prompt.get(prompt)


class MixedLabeler:
    """Asks each labeler in turn; the first comparison wins and keeps its own `source`."""

    def __init__(self, labelers: Sequence[Labeler]):
        self.labelers = list(labelers)
        if not self.labelers:
            raise LabelError("MixedLabeler needs at least one labeler, e.g. [HumanLabels(path), RubricLabeler(fn)].")

    def __call__(self, prompt: str, responses: Sequence[str], reference: str = "") -> Comparison | None:
        for labeler in self.labelers:
            result = labeler(prompt, responses, reference)
            if result is not None:
                return result
        return None


def label_all(
    labeler: Labeler,
    prompts: Sequence[str],
    responses_per_prompt: Sequence[Sequence[str]],
    references: Sequence[str] | None = None,
) -> tuple[list[Comparison], dict[str, int], int]:
    """(comparisons, how many came from each source, how many prompts got none)."""
    references = [""] * len(prompts) if references is None else references
    if not len(prompts) == len(responses_per_prompt) == len(references):
        raise LabelError(
            f"{len(prompts)} prompts, {len(responses_per_prompt)} response lists and "
            f"{len(references)} references; give one of each per prompt (references may be None)."
        )
    comparisons, counts, skipped = [], collections.Counter(), 0
    for prompt, responses, reference in zip(prompts, responses_per_prompt, references):
        result = labeler(prompt, list(responses), reference or "")
        if result is None:
            skipped += 1
            continue
        comparisons.append(result)
        counts[result.source] += 1
    return comparisons, dict(counts), skipped


# --- how far to trust a judge ------------------------------------------------------------------


def position_bias(p_ab: Sequence[float], p_ba: Sequence[float]) -> dict[str, float | int | None]:
    """The judge's position bias over n pairs, from P(the first-shown answer is better) with
    each pair in one order (`p_ab`) and swapped (`p_ba`). A verdict prefers the first-shown
    answer when that probability is > 1/2; it flips when swapping the answers leaves it on the
    same position (so it picks the other answer). None where n = 0."""
    p_ab, p_ba = np.asarray(p_ab, np.float64), np.asarray(p_ba, np.float64)
    if p_ab.shape != p_ba.shape or p_ab.ndim != 1:
        raise LabelError(f"position_bias needs one probability per pair in each order; got shapes {p_ab.shape} and {p_ba.shape}.")
    n = len(p_ab)
    return {
        "position_flip_rate": float(np.mean((p_ab > 0.5) == (p_ba > 0.5))) if n else None,
        "first_position_preference": float(np.mean(np.concatenate([p_ab, p_ba]))) if n else None,
        "judged_pairs": n,
    }


def agreement(judge_p: Sequence[float], human_prefers_first: Sequence[bool]) -> dict[str, float | int | None]:
    """How often the judge's order-averaged verdict (P(first of the pair is better) > 1/2)
    matches the human's, over the pairs both labelled. None where there are none."""
    judge_p, human = np.asarray(judge_p, np.float64), np.asarray(human_prefers_first, bool)
    if judge_p.shape != human.shape:
        raise LabelError(f"agreement needs one judge probability per human label; got {judge_p.shape} and {human.shape}.")
    return {"human_agreement": float(np.mean((judge_p > 0.5) == human)) if len(human) else None, "human_pairs": len(human)}


def human_preferences(comparisons: Iterable[Comparison]) -> dict[tuple[str, frozenset[str]], str]:
    """{(prompt, {x, y}): the response the human preferred} for every untied pair; the first
    comparison of a pair wins."""
    preferred: dict[tuple[str, frozenset[str]], str] = {}
    for c in comparisons:
        for i, j in itertools.combinations(range(len(c.responses)), 2):
            if c.ranks[i] != c.ranks[j] and c.responses[i] != c.responses[j]:  # best first: i is better
                preferred.setdefault((c.prompt, frozenset((c.responses[i], c.responses[j]))), c.responses[i])
    return preferred


def judge_report(judge: JudgeLabeler, human: Sequence[Comparison] = ()) -> dict[str, float | int | None]:
    """Position bias over every pair `judge` has judged, and its agreement with the `human`
    comparisons (same prompt, same two responses in either order). The judge first judges the
    human-labelled pairs it has not seen (4 scored rows per pair), so the two overlap."""
    seen = {(v.prompt, frozenset((v.a, v.b))) for v in judge.verdicts}
    for c in human:
        responses = unique(c.responses)
        if any((c.prompt, frozenset(pair)) not in seen for pair in itertools.combinations(responses, 2)):
            judge.pairwise_probabilities(c.prompt, responses)
    verdicts = {(v.prompt, frozenset((v.a, v.b))): v for v in judge.verdicts}
    preferred = human_preferences(human)
    matched = [(verdicts[key], better) for key, better in preferred.items() if key in verdicts]
    return {
        **position_bias([v.p_ab for v in verdicts.values()], [v.p_ba for v in verdicts.values()]),
        **agreement([v.p_a for v, _ in matched], [v.a == better for v, better in matched]),
    }


def report_table(judge: str, report: dict) -> str:
    """`judge_report` for people: a few aligned lines."""
    percent = lambda x: "n/a" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    first = report["first_position_preference"]
    return "\n".join([
        f"Judge {judge}, {report['judged_pairs']} pairs judged in both orders:",
        f"  verdict flips when A and B swap   {percent(report['position_flip_rate'])}",
        f"  P(first-shown answer is better)   {'n/a' if first is None else f'{first:.3f}'}  (0.5: no position bias)",
        f"  agrees with humans                {percent(report['human_agreement'])} of {report['human_pairs']} pairs",
    ])  # fmt: skip
