"""Metric functions in seqio's form: fn(targets, predictions) -> {name: value}, in percent.

They compute what T5's evaluation library computes (FLAN reports with it), on top of the
packages that do the work: sacrebleu (BLEU), rouge-score (ROUGE), scikit-learn (F1),
scipy (correlations). Targets may hold several references per example where a metric
takes the best over them (BLEU, ROUGE, SQuAD). Besides T5's: E2WM's object path score, and
perplexity, a scoring metric fn(targets, scores) and the one value not in percent.
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Sequence

import numpy as np
import sacrebleu
import scipy.stats
import sklearn.metrics
from rouge_score import rouge_scorer, scoring

References = Sequence[str] | Sequence[Sequence[str]]


def _check(targets: Sequence, predictions: Sequence) -> None:
    if len(targets) != len(predictions):
        raise ValueError(f"{len(targets)} targets but {len(predictions)} predictions.")
    if not len(targets):
        raise ValueError("no examples to compute a metric on: the evaluation split is empty.")


def _as_lists(targets: References) -> list[list[str]]:
    return [[t] if isinstance(t, str) else list(t) for t in targets]


def exact_match(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
    """Percentage of predictions equal to their target after stripping surrounding spaces."""
    _check(targets, predictions)
    hits = sum(str(t).strip() == str(p).strip() for t, p in zip(targets, predictions))
    return {"exact_match": 100.0 * hits / len(targets)}


def accuracy(targets: Sequence, predictions: Sequence) -> dict[str, float]:
    """Percentage of predictions equal to their target (labels or strings, compared as they are)."""
    _check(targets, predictions)
    return {"accuracy": 100.0 * float(np.mean([t == p for t, p in zip(targets, predictions)]))}


def macro_f1(targets: Sequence, predictions: Sequence) -> dict[str, float]:
    """F1 of each class present in the targets, averaged with equal weight."""
    _check(targets, predictions)
    labels = sorted(set(targets))
    return {"f1": 100.0 * sklearn.metrics.f1_score(targets, predictions, labels=labels, average="macro")}


def bleu(targets: References, predictions: Sequence[str]) -> dict[str, float]:
    """Corpus BLEU (sacrebleu, international tokenisation, exponential smoothing), as T5.

    With several references per example, every example needs the same number of them.
    """
    _check(targets, predictions)
    refs = _as_lists(targets)
    if len({len(r) for r in refs}) != 1:
        raise ValueError("bleu needs the same number of references for every example.")
    streams = [list(stream) for stream in zip(*refs)]  # sacrebleu: one stream per reference
    score = sacrebleu.corpus_bleu(
        list(predictions), streams, smooth_method="exp", smooth_value=0.0, lowercase=False, tokenize="intl",
        use_effective_order=False, force=False,
    )  # fmt: skip
    return {"bleu": score.score}


ROUGE_TYPES = ("rouge1", "rouge2", "rougeLsum")


def rouge(targets: References, predictions: Sequence[str], seed: int = 0) -> dict[str, float]:
    """ROUGE-1/2/Lsum F-measure, the bootstrap median over examples (rouge-score's aggregator, as T5).

    Sentences split at " . " for ROUGE-Lsum; with several references, the best one counts.
    The bootstrap is seeded, so the same inputs give the same numbers.
    """
    _check(targets, predictions)
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES))
    aggregator = scoring.BootstrapAggregator()
    split = lambda text: text.replace(" . ", " .\n")  # noqa: E731
    for refs, prediction in zip(_as_lists(targets), predictions):
        aggregator.add_scores(scorer.score_multi([split(r) for r in refs], split(prediction)))
    rng_state = np.random.get_state()  # the aggregator draws from numpy's global generator
    np.random.seed(seed)
    try:
        result = aggregator.aggregate()
    finally:
        np.random.set_state(rng_state)
    return {key: 100.0 * result[key].mid.fmeasure for key in ROUGE_TYPES}


_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """The SQuAD evaluation script's normalisation: lower case, no punctuation or articles."""
    text = "".join(c for c in text.lower() if c not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _token_f1(reference: str, prediction: str) -> float:
    ref, pred = reference.split(), prediction.split()
    common = sum((collections.Counter(ref) & collections.Counter(pred)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def squad(targets: References, predictions: Sequence[str]) -> dict[str, float]:
    """SQuAD exact match and token F1 after normalisation, the best over each example's answers."""
    _check(targets, predictions)
    em, f1 = [], []
    for answers, prediction in zip(_as_lists(targets), predictions):
        answers, prediction = [normalize_answer(a) for a in answers], normalize_answer(prediction)
        em.append(max(float(a == prediction) for a in answers))
        f1.append(max(_token_f1(a, prediction) for a in answers))
    return {"em": 100.0 * float(np.mean(em)), "f1": 100.0 * float(np.mean(f1))}


def pearson_corrcoef(targets: Sequence[float], predictions: Sequence[float]) -> dict[str, float]:
    _check(targets, predictions)
    return {"pearson_corrcoef": 100.0 * float(scipy.stats.pearsonr(targets, predictions)[0])}


def spearman_corrcoef(targets: Sequence[float], predictions: Sequence[float]) -> dict[str, float]:
    _check(targets, predictions)
    return {"spearman_corrcoef": 100.0 * float(scipy.stats.spearmanr(targets, predictions)[0])}


# --- E2WM: object path tracking -------------------------------------------------------------


def parse_rooms(text: str) -> list[str]:
    """"Kitchen,  home office, hallway." -> ["kitchen", "home office", "hallway"]: split at
    commas, lower case, single spaces, a final full stop and empty items dropped."""
    rooms = (" ".join(room.lower().split()) for room in text.strip().rstrip(".").split(","))
    return [room for room in rooms if room]


def longest_common_run(a: Sequence, b: Sequence) -> int:
    """Length of the longest contiguous run that `a` and `b` share (dynamic programming over
    run lengths ending at each pair of positions)."""
    best, previous = 0, [0] * (len(b) + 1)
    for x in a:
        current = [0] * (len(b) + 1)
        for j, y in enumerate(b, 1):
            if x == y:
                current[j] = previous[j - 1] + 1
                best = max(best, current[j])
        previous = current
    return best


def object_path(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
    """E2WM's object path tracking score: the longest common contiguous run of the target and
    predicted room lists over the longer list's length, averaged (two empty lists agree)."""
    _check(targets, predictions)
    scores = []
    for target, prediction in zip(targets, predictions):
        a, b = parse_rooms(target), parse_rooms(prediction)
        scores.append(longest_common_run(a, b) / max(len(a), len(b)) if a or b else 1.0)
    return {"object_path": 100.0 * float(np.mean(scores))}


# --- perplexity -----------------------------------------------------------------------------


def target_token_count(output, example=None, is_target: bool = False):
    """seqio postprocess_fn of a perplexity task: a target -> its number of tokens (those the
    model scores, EOS included when the feature adds it); scores pass through."""
    return len(example["targets"]) if is_target else output


def perplexity(targets: Sequence[int], scores: Sequence[float]) -> dict[str, float]:
    """exp of the mean token loss over all target tokens (`targets`: token counts from
    `target_token_count`; `scores`: each text's summed log-likelihood). Not a percentage:
    lower is better, and the mean is over tokens, so long texts weigh more."""
    _check(targets, scores)
    tokens = sum(targets)
    if not tokens:
        raise ValueError("perplexity over no tokens: every target is empty.")
    loss = -float(np.sum(np.asarray(scores, np.float64))) / tokens
    return {"perplexity": float(np.exp(loss)), "token_loss": loss}
