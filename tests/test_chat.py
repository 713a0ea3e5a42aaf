"""Chat templates in the data pipeline: seqio examples against transformers' apply_chat_template."""

from __future__ import annotations

import json

import numpy as np
import pytest
import seqio
import tensorflow as tf

from flanjax.data.chat import ChatTemplateError, chat_template_preprocessor, render_chat
from flanjax.data.vocab import HFVocabulary, train_tokenizer

TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|eot|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CONVERSATION = [
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "Another one?"},
    {"role": "assistant", "content": "Green."},
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    tokenizer = train_tokenizer(["Name a colour. Blue. Another one? Green."] * 20, 300)
    tokenizer.add_tokens(["<|user|>", "<|assistant|>", "<|eot|>"], special_tokens=True)
    tokenizer.chat_template = TEMPLATE
    path = str(tmp_path_factory.mktemp("chat_tokenizer"))
    tokenizer.save_pretrained(path)
    return path


def test_chat_examples_put_the_last_reply_in_targets(tokenizer_dir):
    vocabulary = HFVocabulary(tokenizer_dir)
    task = seqio.Task(
        "chat_test",
        source=seqio.FunctionDataSource(
            lambda split, shuffle_files: tf.data.Dataset.from_tensors({"messages": json.dumps(CONVERSATION)}),
            splits=["train"],
        ),
        preprocessors=[chat_template_preprocessor(vocabulary), seqio.preprocessors.tokenize],
        output_features={k: seqio.Feature(vocabulary, add_eos=False) for k in ("inputs", "targets")},
    )
    example = next(task.get_dataset(None, split="train", shuffle=False).as_numpy_iterator())
    full = vocabulary.tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert example["inputs_pretokenized"].decode() + example["targets_pretokenized"].decode() == full
    assert example["targets_pretokenized"].decode() == "Green.<|eot|>"
    assert example["inputs_pretokenized"].decode().endswith("<|user|>Another one?<|eot|><|assistant|>")
    # The special tokens are single ids, as the model sees them.
    eot = vocabulary.tokenizer.convert_tokens_to_ids("<|eot|>")
    assert example["targets"][-1] == eot and np.sum(example["inputs"] == eot) == 3


def test_chat_errors(tokenizer_dir):
    tokenizer = HFVocabulary(tokenizer_dir).tokenizer
    with pytest.raises(ChatTemplateError, match="end with an assistant turn"):
        render_chat(tokenizer, CONVERSATION[:-1])
    plain = train_tokenizer(["a b c"] * 5, 270)
    with pytest.raises(ChatTemplateError, match="no chat template"):
        render_chat(plain, CONVERSATION)
