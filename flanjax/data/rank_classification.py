"""Rank classification: score every option of a classification example, the likeliest wins.

The layout follows T5/seqio's rank-classification convention, so its preprocessed
examples, target postprocessing and metric interoperate with theirs:

    preprocessor  one example with `options` -> one row per option:
                  {"idx": [example, option], "inputs", "targets": the option, "is_correct"}
    postprocessor a row -> (idx, is_correct, weight, number of target tokens)
    metric        (targets, scores) -> accuracy (and F1 when the classes are fixed)

A task built this way is a scoring task: `seqio.Evaluator` asks the model for the
log-likelihood of each row's target (`flanjax.decode.score`) and hands the scores to the
metric, which takes the best-scoring option of every example as its prediction.

`AnswerScoring` picks how an option is scored, E2WM's two ways besides T5's plain sum:
"ln" divides by the option's token count, "un" subtracts log p(option | "Answer:"), for
which the preprocessor adds a calibration row after each option row (marked
`calibration`; the model scores it like any other row).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping, Sequence

import numpy as np
import sklearn.metrics
import tensorflow as tf

from flanjax.errors import FlanjaxError


class AnswerScoringError(FlanjaxError, ValueError):
    pass


def rank_classification(ds: tf.data.Dataset, options_key: str = "options", calibration_prompt: str | None = None) -> tf.data.Dataset:
    """Rendered examples (`inputs`, `targets`, `options`) -> one row per option.

    A row is correct when its option equals the example's `targets`. Rows of one example
    share `idx[0]`, a running example number. With a `calibration_prompt`, every option row
    is followed by its calibration row: the same idx and option, that prompt as `inputs`,
    `calibration` True (False on the option rows); adjacent, so cutting the rows at an even
    count never parts a pair.
    """

    def expand(index, example):
        options = example[options_key]
        n = tf.size(options)
        rows = {
            "idx": tf.stack([tf.fill([n], tf.cast(index, tf.int32)), tf.range(n, dtype=tf.int32)], axis=1),
            "inputs": tf.fill([n], example["inputs"]),
            "targets": options,
            "is_correct": tf.equal(options, example["targets"]),
        }
        if calibration_prompt is None:
            return rows
        calibration = {**rows, "inputs": tf.fill([n], tf.constant(calibration_prompt))}
        pair = lambda a, b: tf.reshape(tf.stack([a, b], axis=1), tf.concat([[2 * n], tf.shape(a)[1:]], 0))  # noqa: E731
        flags = tf.range(2 * n) % 2 == 1
        return {**{k: pair(rows[k], calibration[k]) for k in rows}, "calibration": flags}

    return ds.enumerate().map(expand, num_parallel_calls=tf.data.AUTOTUNE).unbatch()


def rank_classification_targets(output, example: Mapping | None = None, is_target: bool = False):
    """seqio postprocess_fn: a target row -> (idx, is_correct, weight, target length), and
    `calibration` fifth on rows that have it; scores pass."""
    if not is_target:
        return output
    target = (tuple(int(i) for i in example["idx"]), bool(example["is_correct"]), float(example.get("weight", 1.0)), len(example["targets"]))
    return (*target, bool(example["calibration"])) if "calibration" in example else target  # T5's 4 fields otherwise


def rank_classification_metric(
    targets: Sequence[tuple], scores: Sequence[float], num_classes: int | None = None, normalize_by_length: bool = False
) -> dict[str, float]:
    """Accuracy of picking each example's highest-scoring option; with a fixed number of
    classes (option i is class i) also F1: binary for two classes, else the mean over classes.
    As a task's metric: `functools.partial(rank_classification_metric, num_classes=N)`.

    `scores` are summed log-likelihoods; `normalize_by_length` divides them by the number of
    target tokens first (favours long options less). Calibration rows (a fifth target field,
    True) are subtracted from their option row of the same idx.
    """
    if len(targets) != len(scores):
        raise ValueError(f"{len(targets)} targets but {len(scores)} scores.")
    if not len(targets):
        raise ValueError("no examples to compute a metric on: the evaluation split is empty.")
    scored = [(tuple(t[0]), t[1], t[2], s / t[3] if normalize_by_length else s, len(t) > 4 and t[4]) for t, s in zip(targets, scores)]
    calibration = {row[0]: row[3] for row in scored if row[4]}
    if calibration:
        unpaired = sorted({row[0] for row in scored if not row[4]} ^ calibration.keys())
        if unpaired:
            raise AnswerScoringError(
                f"{len(unpaired)} option rows lack their calibration row or the other way round (idx "
                f"{unpaired[:3]}...): every example needs both, from rank_classification(..., "
                "calibration_prompt=...). If the evaluation was cut by num_examples, make it even (a pair "
                "of rows per option) or None."
            )
    rows = sorted(
        ((idx, correct, weight, score - calibration.get(idx, 0.0)) for idx, correct, weight, score, is_calibration in scored
         if not is_calibration),
        key=lambda row: row[0],
    )  # fmt: skip
    hits, weights, labels, predictions = [], [], [], []
    for _, group in itertools.groupby(rows, key=lambda row: row[0][0]):
        group = list(group)
        best = max(range(len(group)), key=lambda i: group[i][3])
        hits.append(group[best][1])
        weights.append(group[best][2])
        labels.append(next((i for i, row in enumerate(group) if row[1]), -1))
        predictions.append(best)
    result = {"accuracy": 100.0 * float(np.average(hits, weights=weights))}
    if num_classes == 2:
        result["f1"] = 100.0 * sklearn.metrics.f1_score(labels, predictions, sample_weight=weights)
    elif num_classes:
        result["f1"] = 100.0 * sklearn.metrics.f1_score(
            labels, predictions, labels=range(num_classes), average="macro", sample_weight=weights
        )
    return result


SCORINGS = {
    "sum": "log p(option | prompt), T5's rank classification",
    "ln": "log p(option | prompt) per option token",
    "un": "log p(option | prompt) - log p(option | calibration prompt)",
}


@dataclasses.dataclass(frozen=True)
class AnswerScoring:
    """How a multiple-choice task scores its options. E2WM scores activity recognition,
    counting and object location by "ln" (long options are not penalised for their length)
    and the housework questions by "un" (an option likely whatever the question, a common
    item, loses its head start). The preprocessor and the metric go into one task together:

        scoring = AnswerScoring("un")
        seqio.TaskRegistry.add(..., preprocessors=[render, scoring.preprocessor, *tokenize],
                               postprocess_fn=rank_classification_targets, metric_fns=[scoring.metric])
    """

    method: str = "sum"  # one of SCORINGS
    calibration_prompt: str = "Answer:"  # "un" only
    num_classes: int | None = None  # a fixed option list: also report F1 (see rank_classification_metric)
    options_key: str = "options"

    def __post_init__(self):
        if self.method not in SCORINGS:
            choices = "; ".join(f"{k!r}: {v}" for k, v in SCORINGS.items())
            raise AnswerScoringError(f"unknown answer scoring {self.method!r}: choose one of {choices}.")

    def preprocessor(self, ds: tf.data.Dataset) -> tf.data.Dataset:
        prompt = self.calibration_prompt if self.method == "un" else None
        return rank_classification(ds, self.options_key, calibration_prompt=prompt)

    def metric(self, targets: Sequence[tuple], scores: Sequence[float]) -> dict[str, float]:
        return rank_classification_metric(targets, scores, self.num_classes, normalize_by_length=self.method == "ln")
