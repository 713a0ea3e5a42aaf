"""Per-example loss weights through seqio's pipeline: E2WM weighs its training formats in the
loss (plan generation 1.0, activity recognition 0.7, counting 1.0, path tracking 1.0).

A weighted task's examples carry a scalar `loss_weight` feature (`with_loss_weight(w)`, after
the usual `inputs` and `targets`). `WeightedFeatureConverter` lays each example out as one
stream, inputs then targets, with a per-token mask, packs it like a dialogue, and makes the
targets' loss weights the example's weight. seqio's packer casts every feature to int32 and
reads 0 as padding, so the mask is 1 on input tokens and 1 + weight * WEIGHT_UNIT on target
tokens (a weight has three decimals).
"""

from __future__ import annotations

from collections.abc import Mapping

import seqio
import tensorflow as tf

from flanjax.data.dialogue import DialogueFeatureConverter

WEIGHT_UNIT = 1000
LOSS_WEIGHT = seqio.Feature(seqio.PassThroughVocabulary(1), add_eos=False, rank=0, required=False)


def with_loss_weight(weight: float):
    """A seqio preprocessor giving every example the scalar feature `loss_weight`."""
    if not weight > 0:
        raise ValueError(f"a task's loss weight must be positive, got {weight!r}.")
    units = int(round(weight * WEIGHT_UNIT))

    @seqio.map_over_dataset
    def add(example):
        return {**example, "loss_weight": tf.constant(units, tf.int32)}

    return add


def is_weighted(task: seqio.Task) -> bool:
    return "loss_weight" in task.output_features


class WeightedFeatureConverter(DialogueFeatureConverter):
    """`inputs` + `targets` + `loss_weight` -> seqio's decoder features, the loss on the target
    tokens weighted by their example's weight. Task feature lengths name `inputs` and
    `targets`; each is trimmed to its own before they join (the stream is then validated as a
    dialogue's)."""

    MODEL_FEATURES = {**DialogueFeatureConverter.MODEL_FEATURES,
                      "decoder_loss_weights": seqio.FeatureConverter.FeatureSpec(dtype=tf.float32)}  # fmt: skip

    def __call__(self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]) -> tf.data.Dataset:
        lengths = task_feature_lengths

        def stream(example):
            inputs, targets = example["inputs"][: lengths["inputs"]], example["targets"][: lengths["targets"]]
            mask = tf.concat([tf.ones_like(inputs), tf.fill(tf.shape(targets), 1 + example["loss_weight"])], 0)
            return {"targets": tf.concat([inputs, targets], 0), "loss_mask": mask}

        return super().__call__(ds.map(stream, num_parallel_calls=tf.data.AUTOTUNE), self._stream_lengths(lengths))

    @staticmethod
    def _stream_lengths(lengths: Mapping[str, int]) -> dict[str, int]:
        """The joined stream's length (seqio asks again with the stream's own lengths)."""
        return {"targets": lengths.get("inputs", 0) + lengths["targets"]}

    @staticmethod
    def _loss_weights(mask: tf.Tensor) -> tf.Tensor:
        return tf.cast(tf.maximum(mask - 1, 0), tf.float32) / WEIGHT_UNIT

    def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]) -> dict[str, int]:
        return super().get_model_feature_lengths(self._stream_lengths(task_feature_lengths))
