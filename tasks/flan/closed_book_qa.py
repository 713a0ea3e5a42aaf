"""FLAN cluster `closed_book_qa`: ARC (easy + challenge), Natural Questions (open), TriviaQA."""

from __future__ import annotations

import tensorflow as tf

from flanjax.data.sources import flan_source
from flanjax.data.templated import add_task
from flanjax.data.templates import Template as T
from flanjax.eval.metrics import squad

CLUSTER = "closed_book_qa"


def _arc_correct(example):
    return tf.equal(example["choices"]["label"], example["answerKey"])


def _arc_answerable(ds: tf.data.Dataset) -> tf.data.Dataset:
    """Keeps questions whose answer key names exactly one of their choices."""
    return ds.filter(lambda ex: tf.equal(tf.reduce_sum(tf.cast(_arc_correct(ex), tf.int32)), 1))


def _arc_answer(example):
    return tf.boolean_mask(example["choices"]["text"], _arc_correct(example))[0]


def _nq_answered(ds: tf.data.Dataset) -> tf.data.Dataset:
    """Drops questions without an answer; NQ-open questions are lower case with no question mark: add one."""

    def clean(example):
        question = tf.strings.regex_replace(example["question"], r"([^?\s])\s*$", r"\1?")
        return {**example, "question": question}

    ds = ds.filter(lambda ex: tf.size(ex["answer"]) > 0)
    return ds.map(clean, num_parallel_calls=tf.data.AUTOTUNE)


def _trivia_references(example):
    answer = example["answer"]
    return tf.concat([[answer["value"]], answer["aliases"]], axis=0)


add_task(
    "flan_arc",
    # Easy and challenge sets are one dataset: each split interleaves both builders.
    source=flan_source(
        "ai2_arc/ARC-Easy:1.0.0", "ai2_arc/ARC-Challenge:1.0.0",
        validation="validation", test="test", num_train_examples=2_251 + 1_119,
    ),  # fmt: skip
    preprocessors=[_arc_answerable],
    fields={"question": "question", "answer": _arc_answer},
    templates=[
        T("{question}", "{answer}"),
        T("Answer this science question.\n\n{question}", "{answer}"),
        T("Question: {question}\n\nWhich of the answers is correct?", "{answer}"),
        T("{question}\n\nPick the best answer.", "{answer}"),
        T("Here is a question from a grade-school science exam: {question}", "{answer}"),
        T("Use what you know about science to answer the following.\n\n{question}", "{answer}"),
        T("{question}\n\nWhat is the right answer?", "{answer}"),
        T("A student taking a science test sees this question:\n\n{question}\n\nWhat should they choose?", "{answer}"),
        T("Write a multiple-choice science question whose correct answer is \"{answer}\".", "{question}", turned_around=True),
        T("The answer is: {answer}\n\nWhat might the science exam question have been?", "{question}", turned_around=True),
    ],
    options=lambda ex: ex["choices"]["text"],
    cluster=CLUSTER,
)

add_task(
    "flan_natural_questions_open",
    # NQ-open has no test split: its validation split is the test split.
    source=flan_source("natural_questions_open:1.0.0", validation="train", num_train_examples=87_925),
    preprocessors=[_nq_answered],
    fields={"question": "question", "answer": lambda ex: ex["answer"][0]},
    templates=[
        T("{question}", "{answer}"),
        T("Answer the following question: {question}", "{answer}"),
        T("Question: {question}\nAnswer:", "{answer}"),
        T("{question}\n\nGive a short answer.", "{answer}"),
        T("Here is something people often search for: {question}\n\nWhat is the answer?", "{answer}"),
        T("Please answer this general knowledge question from memory.\n\n{question}", "{answer}"),
        T("{question}\n\nReply with just the answer, no explanation.", "{answer}"),
        T("Someone typed \"{question}\" into a search engine. What answer should they get?", "{answer}"),
        T("Write a question whose answer is \"{answer}\".", "{question}", turned_around=True),
        T("The answer is {answer}. What was the question?", "{question}", turned_around=True),
    ],
    references=lambda ex: ex["answer"],
    metrics=[squad],
    cluster=CLUSTER,
)

add_task(
    "flan_trivia_qa",
    # TriviaQA's test answers are hidden: its validation split is the test split.
    source=flan_source("trivia_qa/rc.nocontext:1.1.0", validation="train", num_train_examples=138_384),
    fields={"question": "question", "answer": lambda ex: ex["answer"]["value"]},
    templates=[
        T("{question}", "{answer}"),
        T("Trivia question: {question}\nAnswer:", "{answer}"),
        T("Answer this quiz question.\n\n{question}", "{answer}"),
        T("{question}\n\nWhat is the answer?", "{answer}"),
        T("Here's a pub quiz question for you: {question}", "{answer}"),
        T("Test your general knowledge: {question}", "{answer}"),
        T("You are a contestant on a quiz show. The host asks: \"{question}\" What do you say?", "{answer}"),
        T("Write a trivia question whose answer is {answer}.", "{question}", turned_around=True),
        T("Make up a quiz question where the correct response would be \"{answer}\".", "{question}", turned_around=True),
        T("Answer: {answer}\n\nWhat trivia question could lead to this answer?", "{question}", turned_around=True),
    ],
    references=_trivia_references,
    metrics=[squad],
    cluster=CLUSTER,
)
