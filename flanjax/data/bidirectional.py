"""BatGPT's bidirectional autoregressive objective: one causal model trained left-to-right and
right-to-left, on any seqio task.

Each tokenized example (inputs x, targets y ending in EOS) becomes two streams, each started
by a direction token that flanjax adds to the vocabulary (BatGPT publishes no marker; this is
flanjax's reading):

    left-to-right   <l2r> x y                     loss on y       p(response | prompt)
    right-to-left   <r2l> rev(y) rev(x) EOS       loss on rev(x)  p(prompt | response)
                                                  and EOS

Tokens are reversed after tokenization, so BPE pieces stay whole. A task without inputs (plain
text) trains every token in both directions. The streams are separate packed segments.
The loss weighs each direction's tokens by its weight (a weighted mean over the batch's
tokens), or `sample` keeps one direction per example, drawn in proportion to the weights.
A direction of weight 0 is not produced: `Directions(r2l_weight=0)` is forward-only
training in the same format, the baseline of `make quickstart-batgpt`.

A run trained this way records its tokens in directions.json, so that sampling and
evaluation start every prompt with <l2r> (`PrefixedFeatureConverter`) and rescoring can ask the
same model backwards (`flanjax.chat.Policy.rescore`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Mapping, Sequence

import gin
import numpy as np
import seqio
import tensorflow as tf

from flanjax import paths
from flanjax.data.weighted import WEIGHT_UNIT, WeightedFeatureConverter
from flanjax.decode import score_ids
from flanjax.errors import FlanjaxError


class DirectionTokenError(FlanjaxError, ValueError):
    pass


@gin.configurable
@dataclasses.dataclass(frozen=True)
class Directions:
    l2r_token: str = "<l2r>"
    r2l_token: str = "<r2l>"
    l2r_weight: float = 1.0
    r2l_weight: float = 1.0
    sample: bool = False  # one direction per example, drawn with probability ∝ weight
    seed: int = 0

    def __post_init__(self):
        if min(self.l2r_weight, self.r2l_weight) < 0 or self.l2r_weight + self.r2l_weight == 0:
            raise ValueError(f"direction weights must be >= 0 and not both 0, got {self.l2r_weight}, {self.r2l_weight}.")


def direction_ids(vocabulary: seqio.Vocabulary, directions: Directions) -> tuple[int, int]:
    """The ids of the two direction tokens; an error says how to add them when missing."""
    vocab = vocabulary.tokenizer.get_vocab()
    missing = [t for t in (directions.l2r_token, directions.r2l_token) if t not in vocab]
    if missing:
        tokens = " ".join(f"'{t}'" for t in (directions.l2r_token, directions.r2l_token))
        raise DirectionTokenError(
            f"the tokenizer ({getattr(vocabulary, 'path', vocabulary)}) has no direction token(s) {', '.join(missing)}. "
            f"Add them as special tokens and grow the model to fit: `flanjax convert from-hf --in HF_DIR --out RUN "
            f"--add_tokens {tokens}` (or `flanjax.models.hf.add_tokens(model, tokenizer, [...])`); or name tokens the "
            "vocabulary has with bidirectional.Directions.l2r_token / r2l_token."
        )
    return vocab[directions.l2r_token], vocab[directions.r2l_token]


def streams(x: tf.Tensor, y: tf.Tensor, l2r: int, r2l: int, eos: int, has_inputs: bool = True) -> tuple[tuple[tf.Tensor, tf.Tensor], ...]:
    """((tokens, trained) left-to-right, (tokens, trained) right-to-left) of one example; trained
    is a bool per token."""
    core = y[: tf.size(y) - tf.cast(tf.reduce_any(tf.equal(y[-1:], eos)), tf.int32)]  # y less its EOS
    one = lambda t: tf.constant([t], tf.int32)  # noqa: E731
    forward = tf.concat([one(l2r), x, y], 0)
    forward_trained = tf.concat([[False], tf.fill(tf.shape(x), False), tf.fill(tf.shape(y), True)], 0)
    backward = tf.concat([one(r2l), tf.reverse(core, [0]), tf.reverse(x, [0]), one(eos)], 0)
    # Trained on the prompt given the response; a plain text is all "prompt".
    backward_trained = tf.concat([[False], tf.fill(tf.shape(core), not has_inputs), tf.fill(tf.shape(x), True), [True]], 0)
    return (forward, forward_trained), (backward, backward_trained)


def pair_rows(x: Sequence[int], y: Sequence[int], ids: tuple[int, int], eos: int) -> tuple[tuple[list[int], list[int]], ...]:
    """`streams` of a tokenized prompt x and response y (without EOS) as lists of ids and 0/1
    weights, to score: log p(y | x) on the first, log p(x | y) on the second."""
    pairs = streams(tf.constant(list(x), tf.int32), tf.constant([*y, eos], tf.int32), *ids, eos)
    return tuple((tokens.numpy().tolist(), trained.numpy().astype(int).tolist()) for tokens, trained in pairs)


def bidirectional_scores(graphdef, state, partitioner, xs: Sequence[Sequence[int]], ys: Sequence[Sequence[int]],
                         ids: tuple[int, int], eos: int, lam: float, batch_size: int, max_len: int) -> np.ndarray:  # fmt: skip
    """BatGPT's rescoring score of each tokenized (prompt x, response y) pair, by one model:
    log p_l2r(y + EOS | x) + lam * log p_r2l(x | y)."""
    rows = [pair_rows(x, y, ids, eos) for x, y in zip(xs, ys, strict=True)]
    score = lambda k: score_ids(graphdef, state, [r[k] for r in rows], partitioner, batch_size, max_len)  # noqa: E731
    return score(0) + lam * score(1)


class BidirectionalFeatureConverter(WeightedFeatureConverter):
    """`inputs` (optional) + `targets` -> seqio's decoder features of both directions' streams,
    packed as separate segments, each direction's tokens weighted by its weight (times the
    example's `loss_weight` for weighted tasks). Task feature lengths are the usual ones; each
    stream fits in their sum (the prompt gives up one token to the direction token)."""

    def __init__(self, ids: tuple[int, int], eos_id: int, directions: Directions, **kwargs):
        self.ids, self.eos_id, self.directions = ids, eos_id, directions
        super().__init__(**kwargs)

    @classmethod
    def of(cls, directions: Directions, vocabulary: seqio.Vocabulary, pack: bool = True) -> BidirectionalFeatureConverter:
        return cls(direction_ids(vocabulary, directions), vocabulary.eos_id, directions, pack=pack)

    def __call__(self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]) -> tf.data.Dataset:
        d, lengths = self.directions, task_feature_lengths
        width = lengths.get("inputs", 0) + lengths["targets"]
        weights = tf.constant([d.l2r_weight, d.r2l_weight], tf.float32)
        keep = [i for i, w in enumerate((d.l2r_weight, d.r2l_weight)) if w > 0]

        def both(example, draw):
            has_inputs = "inputs" in example
            x = example["inputs"][: max(lengths.get("inputs", 0) - 1, 0)] if has_inputs else tf.zeros([0], tf.int32)
            pairs = streams(tf.cast(x, tf.int32), tf.cast(example["targets"][: lengths["targets"]], tf.int32), *self.ids,
                            self.eos_id, has_inputs)  # fmt: skip
            scale = tf.cast(example.get("loss_weight", WEIGHT_UNIT), tf.float32) / WEIGHT_UNIT
            if d.sample:  # one direction, weight 1: P(l2r) = w_l2r / (w_l2r + w_r2l)
                chosen = tf.cast(draw < d.r2l_weight / (d.l2r_weight + d.r2l_weight), tf.int32)
                w = tf.one_hot(chosen, 2) * scale
            else:
                w = weights * scale
            rows = [self._row(*pairs[i], w[i], width) for i in keep]
            return tf.data.Dataset.from_tensor_slices({k: tf.stack([r[k] for r in rows]) for k in rows[0]})

        draws = tf.data.Dataset.random(seed=d.seed).map(lambda r: tf.cast(r % 2**24, tf.float32) / 2**24)
        ds = tf.data.Dataset.zip((ds, draws)).flat_map(both).filter(lambda r: tf.reduce_any(r["loss_mask"] > 1))
        ds = ds.map(lambda r: {"targets": r["targets"][: r["length"]], "loss_mask": r["loss_mask"][: r["length"]]})
        return super(WeightedFeatureConverter, self).__call__(ds, {"targets": width})

    @staticmethod
    def _row(tokens: tf.Tensor, trained: tf.Tensor, weight: tf.Tensor, width: int) -> dict[str, tf.Tensor]:
        """A stream cut to `width`, padded to it for stacking (`length` undoes the padding); the
        mask is 1 + weight * WEIGHT_UNIT on trained tokens (0 weight: 1, i.e. context)."""
        units = tf.cast(tf.round(weight * WEIGHT_UNIT), tf.int32)
        mask = tf.where(trained, 1 + units, 1)[:width]
        tokens = tokens[:width]
        pad = width - tf.size(tokens)
        return {"targets": tf.pad(tokens, [[0, pad]]), "loss_mask": tf.pad(mask, [[0, pad]]), "length": tf.size(tokens)}


class PrefixedFeatureConverter(seqio.DecoderFeatureConverter):
    """seqio's decoder converter (loss on targets) with `prefix` ids before every prompt: a
    bidirectional model's <l2r>, at evaluation. The prompt gives up as many tokens."""

    def __init__(self, prefix: Sequence[int], **kwargs):
        self.prefix = tf.constant(list(prefix), tf.int32)
        super().__init__(loss_on_targets_only=True, **kwargs)

    def __call__(self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]) -> tf.data.Dataset:
        n = int(self.prefix.shape[0])
        cut = task_feature_lengths["inputs"] - n

        def add(example):
            return {**example, "inputs": tf.concat([self.prefix, tf.cast(example["inputs"], tf.int32)[:cut]], 0)}

        return super().__call__(ds.map(add, num_parallel_calls=tf.data.AUTOTUNE), task_feature_lengths)


# Where a run records its direction tokens, for sampling, evaluation and rescoring.
DIRECTIONS_FILE = "directions.json"


def write_directions(run_dir: str, directions: Directions) -> None:
    paths.makedirs(run_dir)
    with paths.open(os.path.join(run_dir, DIRECTIONS_FILE), "w") as f:
        json.dump({"l2r_token": directions.l2r_token, "r2l_token": directions.r2l_token}, f, indent=2)


def run_direction_ids(run_dirs: Iterable[str], vocabulary: seqio.Vocabulary) -> tuple[int, int] | None:
    """(<l2r>, <r2l>) ids of a run trained bidirectionally (it or an ancestor recorded its
    directions), else None."""
    directions = read_directions(run_dirs)
    return None if directions is None else direction_ids(vocabulary, directions)


def read_directions(run_dirs: Iterable[str]) -> Directions | None:
    """The direction tokens of the first of `run_dirs` (a run and its ancestors) that recorded them."""
    record = paths.first_json(run_dirs, DIRECTIONS_FILE)
    return None if record is None else Directions(**record)
