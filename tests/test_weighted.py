"""Per-example loss weights through seqio's pipeline (`flanjax.data.weighted`)."""

import numpy as np
import pytest
import seqio
import tensorflow as tf

from flanjax.data.weighted import WeightedFeatureConverter, with_loss_weight

EXAMPLES = [([3, 4, 5], [8, 9]), ([6, 7], [10]), ([11], [12, 13, 14]), ([15, 16, 17, 18], [19])]


def dataset(weight=None):
    ds = tf.data.Dataset.from_generator(
        lambda: ({"inputs": np.array(i, np.int32), "targets": np.array(t + [1], np.int32)} for i, t in EXAMPLES),
        output_signature={"inputs": tf.TensorSpec([None], tf.int32), "targets": tf.TensorSpec([None], tf.int32)},
    )
    return ds if weight is None else with_loss_weight(weight)(ds)


def as_lists(ds):
    return [{k: v.tolist() for k, v in ex.items()} for ex in ds.as_numpy_iterator()]


@pytest.mark.parametrize("pack", [True, False])
def test_weight_one_equals_seqios_decoder_converter(pack):
    lengths = {"inputs": 4, "targets": 4}
    ours = as_lists(WeightedFeatureConverter(pack=pack)(dataset(1.0), lengths))
    theirs = as_lists(seqio.DecoderFeatureConverter(pack=pack, loss_on_targets_only=True)(dataset(), lengths))
    for a, b in zip(ours, theirs, strict=True):
        for key in a:
            np.testing.assert_allclose(a[key], b[key], err_msg=key)


@pytest.mark.parametrize("pack", [True, False])
def test_the_weight_scales_the_target_tokens_only(pack):
    lengths = {"inputs": 4, "targets": 4}
    one = as_lists(WeightedFeatureConverter(pack=pack)(dataset(1.0), lengths))
    weighted = as_lists(WeightedFeatureConverter(pack=pack)(dataset(0.7), lengths))
    for a, b in zip(one, weighted, strict=True):
        np.testing.assert_allclose(np.asarray(b["decoder_loss_weights"]), 0.7 * np.asarray(a["decoder_loss_weights"]), rtol=1e-6)
        assert a["decoder_target_tokens"] == b["decoder_target_tokens"]


def test_a_weight_must_be_positive():
    with pytest.raises(ValueError, match="must be positive"):
        with_loss_weight(0.0)
