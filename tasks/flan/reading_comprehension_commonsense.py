"""FLAN cluster `reading_comprehension_commonsense`: CosmosQA, ReCoRD (entity options)."""

from __future__ import annotations

import tensorflow as tf

from flanjax.data.sources import flan_source
from flanjax.data.templated import add_task, labelled
from flanjax.data.templates import Template as T

CLUSTER = "reading_comprehension_commonsense"
BLANK = "___"  # how ReCoRD's "@placeholder" is shown in a query

# --- CosmosQA -----------------------------------------------------------------------------


def _cosmos_options(example):
    return tf.stack([example[f"answer{i}"] for i in range(4)])


add_task(
    "flan_cosmos_qa",
    # The test labels are hidden: the validation split is the test split.
    source=flan_source("cosmos_qa:1.0.0", validation="train", num_train_examples=25_262),
    preprocessors=[labelled],
    fields={
        "context": "context",
        "question": "question",
        "answer": lambda ex: tf.gather(_cosmos_options(ex), ex["label"]),
    },
    templates=[
        T("{context}\n\nQuestion: {question}", "{answer}"),
        T("Read the story and pick the most sensible answer, reading between the lines where you need to.\n\n"
          "{context}\n\n{question}", "{answer}"),
        T("{context}\n\nThinking about what is probably going on here: {question}", "{answer}"),
        T("Here is a short personal account:\n\n{context}\n\nBased on it, answer the following. {question}", "{answer}"),
        T("{question}\n\nUse common sense and this passage to decide:\n\n{context}", "{answer}"),
        T("Someone wrote:\n\"{context}\"\n\nWhat is the best answer to this question about it? {question}", "{answer}"),
        T("Context: {context}\n\nThe answer is not spelled out in the text, so infer it. {question}", "{answer}"),
        T("{context}\n\nWhich answer fits best? {question}", "{answer}"),
        T("{context}\n\nWrite a question about this passage whose answer is \"{answer}\".", "{question}", turned_around=True),
        T("Read the following and ask a question about it that needs some everyday reasoning to answer, "
          "such as why something happened or what might happen next.\n\n{context}", "{question}", turned_around=True),
    ],
    options=_cosmos_options,
    cluster=CLUSTER,
)

# --- ReCoRD -------------------------------------------------------------------------------


def _record_clean(ds: tf.data.Dataset) -> tf.data.Dataset:
    """ReCoRD passages end in CNN/Daily Mail highlights, each introduced by a line "@highlight":
    join them to the text as sentences. Queries without an answer (test) are dropped."""

    def clean(example):
        text = example["passage"]
        text = tf.strings.regex_replace(text, r"([.!?\"'])\s*\n@highlight\n", r"\1 ")
        text = tf.strings.regex_replace(text, r"\s*\n@highlight\n", ". ")
        text = tf.strings.regex_replace(text, r"([^.!?\"'\s])\s*$", r"\1.")
        return {**example, "passage": text}

    ds = ds.filter(lambda ex: tf.size(ex["answers"]) > 0)
    return ds.map(clean, num_parallel_calls=tf.data.AUTOTUNE)


def _record_options(example):
    """The passage's entities (already unique in TFDS). The answer is one of them in real data;
    it is added when missing so that mock data, whose answers are random, stays consistent."""
    entities = tf.strings.strip(tf.concat([example["entities"], example["answers"][:1]], axis=0))
    return tf.unique(entities).y


def _record_answer(example):
    return tf.strings.strip(example["answers"][0])


def _record_query(example):
    return tf.strings.regex_replace(example["query"], "@placeholder", BLANK)


def _record_completed(example):
    answer = tf.strings.regex_replace(_record_answer(example), r"\\", r"\\\\")  # literal in the rewrite
    return tf.strings.regex_replace(example["query"], "@placeholder", answer)


add_task(
    "flan_record",
    # SuperGLUE's test labels are hidden: its validation split is the test split.
    source=flan_source("super_glue/record:1.0.2", validation="train", num_train_examples=100_730),
    preprocessors=[_record_clean],
    fields={
        "passage": "passage",
        "query": _record_query,
        "completed": _record_completed,
        "answer": _record_answer,
    },
    templates=[
        T("{passage}\n\nWhich of the names below belongs in the blank?\n\n{query}", "{answer}"),
        T("Read the news story, then fill in the missing entity.\n\nStory: {passage}\n\nSentence: {query}", "{answer}"),
        T("{passage}\n\n{query}\n\nWhat should replace the ___ in the sentence above?", "{answer}"),
        T("Here is an article:\n{passage}\n\nA follow-up sentence is missing a name: \"{query}\" Who or what is it?", "{answer}"),
        T("Complete the statement using the news report.\n\n{query}\n\nReport: {passage}", "{answer}"),
        T("{passage}\n\nContinue the article with this sentence, choosing the right entity for the gap: {query}", "{answer}"),
        T("Article: {passage}\n\nGap-filling question: {query}\n\nWhich entity from the article fills the gap?", "{answer}"),
        T("I'm reading this report:\n\n{passage}\n\nThe next line reads \"{query}\". What goes in the blank?", "{answer}"),
        T("{passage}\n\nWrite a sentence that could come next in this article and mentions {answer}.", "{completed}", turned_around=True),
        T("Here is the start of a news story:\n\n{passage}\n\nWhat might the story say next?", "{completed}", turned_around=True),
    ],
    options=_record_options,
    cluster=CLUSTER,
)
