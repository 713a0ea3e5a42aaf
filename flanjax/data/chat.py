"""Conversations in the data pipeline, rendered by the tokenizer's own chat template.

A chat example holds `messages`, a JSON list of {"role", "content"} turns ending with the
assistant's reply. `chat_template_preprocessor` renders it with the model's chat template
(transformers' `apply_chat_template`) into seqio's `inputs` (everything up to and including
the assistant's header) and `targets` (the reply and whatever closes the turn, e.g. an
end-of-turn token), so the decoder feature converter puts the loss on the reply only.
"""

from __future__ import annotations

import json

import seqio
import tensorflow as tf

from flanjax.data.vocab import HFVocabulary
from flanjax.errors import FlanjaxError


class ChatTemplateError(FlanjaxError, ValueError):
    pass


def render_chat(tokenizer, messages: list[dict[str, str]]) -> dict[str, str]:
    """{"inputs", "targets"} of a conversation whose last turn is the assistant's."""
    if not messages or messages[-1].get("role") != "assistant":
        raise ChatTemplateError("a chat example must end with an assistant turn (the reply to learn).")
    if not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateError(
            "the tokenizer has no chat template; set tokenizer.chat_template (a Jinja string) and save it "
            "with the tokenizer, or use a model's tokenizer that ships one."
        )
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full.startswith(prompt):
        raise ChatTemplateError("the chat template renders the prompt differently with and without the reply.")
    return {"inputs": prompt, "targets": full[len(prompt) :]}


def chat_template_preprocessor(vocabulary: HFVocabulary, key: str = "messages"):
    """A seqio preprocessor: `key` (a JSON string of messages) -> rendered `inputs`/`targets`."""

    def render(encoded: bytes) -> tuple[bytes, bytes]:
        example = render_chat(vocabulary.tokenizer, json.loads(encoded.decode("utf-8")))
        return example["inputs"].encode("utf-8"), example["targets"].encode("utf-8")

    @seqio.map_over_dataset
    def preprocess(example):
        inputs, targets = tf.numpy_function(render, [example[key]], (tf.string, tf.string), stateful=False)
        inputs.set_shape([])
        targets.set_shape([])
        return {**{k: v for k, v in example.items() if k != key}, "inputs": inputs, "targets": targets}

    return preprocess
