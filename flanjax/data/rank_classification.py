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
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

import numpy as np
import sklearn.metrics
import tensorflow as tf


def rank_classification(ds: tf.data.Dataset, options_key: str = "options") -> tf.data.Dataset:
    """Rendered examples (`inputs`, `targets`, `options`) -> one row per option.

    A row is correct when its option equals the example's `targets`. Rows of one example
    share `idx[0]`, a running example number.
    """

    def expand(index, example):
        options = example[options_key]
        n = tf.size(options)
        return {
            "idx": tf.stack([tf.fill([n], tf.cast(index, tf.int32)), tf.range(n, dtype=tf.int32)], axis=1),
            "inputs": tf.fill([n], example["inputs"]),
            "targets": options,
            "is_correct": tf.equal(options, example["targets"]),
        }

    return ds.enumerate().map(expand, num_parallel_calls=tf.data.AUTOTUNE).unbatch()


def rank_classification_targets(output, example: Mapping | None = None, is_target: bool = False):
    """seqio postprocess_fn: a target row -> (idx, is_correct, weight, target length); scores pass."""
    if not is_target:
        return output
    return (tuple(int(i) for i in example["idx"]), bool(example["is_correct"]), float(example.get("weight", 1.0)), len(example["targets"]))


def rank_classification_metric(
    targets: Sequence[tuple], scores: Sequence[float], num_classes: int | None = None, normalize_by_length: bool = False
) -> dict[str, float]:
    """Accuracy of picking each example's highest-scoring option; with a fixed number of
    classes (option i is class i) also F1: binary for two classes, else the mean over classes.
    As a task's metric: `functools.partial(rank_classification_metric, num_classes=N)`.

    `scores` are summed log-likelihoods; `normalize_by_length` divides them by the number of
    target tokens first (favours long options less).
    """
    if len(targets) != len(scores):
        raise ValueError(f"{len(targets)} targets but {len(scores)} scores.")
    if not len(targets):
        raise ValueError("no examples to compute a metric on: the evaluation split is empty.")
    rows = sorted(
        ((idx, correct, weight, score / length if normalize_by_length else score)
         for (idx, correct, weight, length), score in zip(targets, scores)),
        key=lambda row: tuple(row[0]),
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
