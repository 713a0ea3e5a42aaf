"""Few-shot prompts: solved exemplars from the train split before each evaluation prompt.

FLAN's few-shot evaluation puts up to 16 exemplars of the same task before the question,
as many as fit the input budget. Here the exemplars are the first `num_shots` training
examples (in the source's order, so the same for every run), rendered with the same template
as the prompt they precede:

    <exemplar 1 inputs>
    <exemplar 1 targets>

    <exemplar 2 inputs>
    ...

    <prompt inputs>

Exemplars are dropped from the end until the prompt fits `max_input_tokens` tokens of the
task's vocabulary (each part is tokenized on its own and the lengths added).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np
import seqio
import tensorflow as tf

from flanjax.data.templates import Template

SEPARATOR = "\n\n"


@dataclasses.dataclass(frozen=True)
class FewShotConfig:
    num_shots: int = 16  # FLAN's most
    max_input_tokens: int = 1024  # FLAN's input length


def render_exemplar(template: Template, fields) -> str:
    inputs, targets = template.render(fields)
    return f"{inputs.rstrip()}\n{targets.strip()}"


def exemplars_preprocessor(
    templates: Sequence[Template],
    source: seqio.DataSource,
    head: Sequence[Callable],
    vocabulary: seqio.Vocabulary,
    config: FewShotConfig = FewShotConfig(),
):
    """A seqio preprocessor after `templates_preprocessor(templates, ...)`: prepends to each
    rendered prompt the exemplars, rendered with that prompt's template (`template`).

    `head` are the preprocessors that turn the source's raw train examples into fields.
    """

    def apply(ds: tf.data.Dataset) -> tf.data.Dataset:
        train = source.get_dataset("train", shuffle=False)
        for step in head:
            train = step(train)
        shots = [
            {k: v.decode("utf-8") for k, v in ex.items() if isinstance(v, bytes)}
            for ex in train.take(config.num_shots).as_numpy_iterator()
        ]
        texts = [[render_exemplar(t, s) + SEPARATOR for s in shots] for t in templates]
        # prefixes[t, j]: the first j exemplars in template t; lengths[t, j]: their tokens.
        prefixes = tf.constant([["".join(row[:j]) for j in range(len(shots) + 1)] for row in texts])
        lengths = tf.constant([np.cumsum([0] + [len(vocabulary.encode(x)) for x in row]) for row in texts], tf.int32)

        def prepend(example):
            query = tf.size(vocabulary.encode_tf(example["inputs"]), out_type=tf.int32)
            fits = tf.reduce_sum(tf.cast(lengths[example["template"]] + query <= config.max_input_tokens, tf.int32))
            shots_used = tf.maximum(fits - 1, 0)
            return {**example, "inputs": prefixes[example["template"], shots_used] + example["inputs"]}

        return ds.map(prepend, num_parallel_calls=tf.data.AUTOTUNE)

    return apply
