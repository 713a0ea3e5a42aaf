"""Text clean-ups that several FLAN datasets need (TF ops: they run inside tf.data maps)."""

from __future__ import annotations

import tensorflow as tf

_DETOKENIZE = (
    (r"``\s*|\s*''", '"'),  # PTB quotes
    (r"\s+([,.;:!?%)\]])", r"\1"),  # `word , word .`
    (r"([(\[$])\s+", r"\1"),  # `( word`, `$ 5`
    (r"\s+(n't|'s|'re|'ve|'ll|'d|'m)\b", r"\1"),  # `do n't`, `Australia 's`
)


def detokenize(text: tf.Tensor) -> tf.Tensor:
    """Undoes Penn-Treebank-style tokenization (MRPC, PAWS, TREC, Opinion Abstracts)."""
    for pattern, rewrite in _DETOKENIZE:
        text = tf.strings.regex_replace(text, pattern, rewrite)
    return text
