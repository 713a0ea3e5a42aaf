"""FLAN cluster `commonsense`: COPA, HellaSwag, PIQA, StoryCloze (2016)."""

from __future__ import annotations

import tensorflow as tf

from flanjax.data.sources import flan_source
from flanjax.data.templated import add_task
from flanjax.data.templates import Template as T

CLUSTER = "commonsense"


# COPA: "cause" or "effect" decides how the question is put and how its turned-around form reads.
def _copa_is_cause(example):
    return tf.equal(example["question"], "cause")


def _copa_choices(example):
    return tf.stack([example["choice1"], example["choice2"]])


def _copa_asked(example):
    return tf.where(_copa_is_cause(example), "What was the cause of this?", "What happened as a result?")


def _copa_connective(example):
    return tf.where(_copa_is_cause(example), "because", "so")


def _copa_reverse(example):
    return tf.where(_copa_is_cause(example), "What might this have led to?", "What might have caused this?")


def _copa_clause(example):
    """The premise without its final full stop, to be followed by "because ..." or "so ..."."""
    return tf.strings.regex_replace(tf.strings.strip(example["premise"]), r"[.!]+$", "")


def _has_answer(ds: tf.data.Dataset, choices: str = "endings", base: int = 0) -> tf.data.Dataset:
    """Keeps examples whose (`base`-based) label indexes one of their choices: HellaSwag's and
    StoryCloze's hidden test labels are -1, and StoryCloze counts its endings from 1."""

    def ok(ex):
        return tf.logical_and(tf.cast(ex["label"], tf.int64) - base >= 0, tf.size(ex[choices]) > 0)

    return ds.filter(ok)


def _chosen(ex, choices: str = "endings", base: int = 0):
    # Real labels always index a choice; the modulo keeps TFDS mock data (random labels) usable.
    return tf.gather(ex[choices], (tf.cast(ex["label"], tf.int64) - base) % tf.size(ex[choices], out_type=tf.int64))


def _clean_wikihow(text):
    """HellaSwag's WikiHow half keeps the site's markup: `[header] How to X [title] Do Y. [step] ...`."""
    text = tf.strings.regex_replace(text, r"\.?\s*\[title\]\s*", ". ")
    text = tf.strings.regex_replace(text, r"\[[a-z][a-z -]*\]", " ")  # [header], [step], [substeps], ...
    text = tf.strings.regex_replace(text, r"^\s*\.\s*", "")
    return tf.strings.strip(tf.strings.regex_replace(text, r"\s+", " "))


def _hellaswag(ds: tf.data.Dataset) -> tf.data.Dataset:
    def clean(example):
        return {**example, "context": _clean_wikihow(example["context"]), "endings": _clean_wikihow(example["endings"])}

    return _has_answer(ds).map(clean, num_parallel_calls=tf.data.AUTOTUNE)


def _story_cloze(ds: tf.data.Dataset) -> tf.data.Dataset:
    return _has_answer(ds, base=1)  # StoryCloze numbers its two endings 1 and 2


add_task(
    "flan_copa",
    # COPA's test labels are hidden: its validation split is the test split (only 200 left to train on).
    source=flan_source("super_glue/copa:1.0.2", validation="train", num_train_examples=400),
    fields={
        "premise": "premise",
        "question": "question",
        "asked": _copa_asked,
        "connective": _copa_connective,
        "clause": _copa_clause,
        "reverse": _copa_reverse,
        "answer": lambda ex: tf.gather(_copa_choices(ex), ex["label"]),
    },
    templates=[
        T("{premise}\n\nWhat is the more plausible {question}?", "{answer}"),
        T("Premise: {premise}\n\n{asked}", "{answer}"),
        T("Complete the sentence in the way that makes the most sense.\n\n{clause} {connective}...", "{answer}"),
        T("Here is something that happened: \"{premise}\"\n\nWhich of the alternatives below is its likelier {question}?", "{answer}"),
        T("Think about cause and effect.\n\n{premise} {asked}", "{answer}"),
        T("Event: {premise}\n\nSelect the {question} that is easiest to believe.", "{answer}"),
        T("{clause} {connective} what?", "{answer}"),
        T("Which option is a better {question} for the situation described here?\n\n{premise}", "{answer}"),
        T("{answer}\n\n{reverse}", "{premise}", turned_around=True),
        T("Write a sentence describing an event whose {question} could be: {answer}", "{premise}", turned_around=True),
    ],
    options=_copa_choices,
    cluster=CLUSTER,
)

add_task(
    "flan_hellaswag",
    # HellaSwag's test labels are hidden: its validation split is the test split.
    source=flan_source("hellaswag:1.1.0", validation="train", num_train_examples=39_905),
    preprocessors=[_hellaswag],
    fields={"context": "context", "activity": "activity_label", "answer": _chosen},
    templates=[
        T("{context}\n\nWhat is the most natural way for this to continue?", "{answer}"),
        T("Topic: {activity}\n\n{context}\n\nWhich ending fits best?", "{answer}"),
        T("Finish the following description of {activity}.\n\n{context}", "{answer}"),
        T("How does this most likely go on?\n\n{context}", "{answer}"),
        T("{context}\n\nPick the next sentence that makes the most sense.", "{answer}"),
        T("Here is the start of a passage: \"{context}\"\n\nChoose the continuation that follows logically.", "{answer}"),
        T("Read the beginning of this text about {activity}, then select the best way to complete it.\n\n{context}", "{answer}"),
        T("What comes next?\n\n{context}", "{answer}"),
        T("Write the opening of a passage about {activity} that could be followed by this: {answer}", "{context}", turned_around=True),
        T("\"{answer}\"\n\nThe sentence above continues a short text. What could have come just before it?", "{context}", turned_around=True),
    ],
    options=lambda ex: ex["endings"],
    cluster=CLUSTER,
)

add_task(
    "flan_piqa",
    # PIQA's test labels are not public (no test split in TFDS): its validation split is the test split.
    source=flan_source("piqa:1.0.0", validation="train", num_train_examples=16_113),
    fields={"goal": "goal", "answer": lambda ex: tf.gather(tf.stack([ex["sol1"], ex["sol2"]]), ex["label"])},
    templates=[
        T("Goal: {goal}\n\nWhich way of doing it is more likely to work?", "{answer}"),
        T("How would you accomplish this? {goal}", "{answer}"),
        T("{goal}\n\nPick the better solution.", "{answer}"),
        T("Here is a practical problem: {goal}\n\nWhich of these two approaches makes more physical sense?", "{answer}"),
        T("Use your common sense about everyday objects.\n\n{goal}", "{answer}"),
        T("Choose the most sensible way to carry out the task below.\n\nTask: {goal}", "{answer}"),
        T("{goal}\n\nWhat should you do?", "{answer}"),
        T("Which of the following achieves the goal \"{goal}\"?", "{answer}"),
        T("Here is a way to do something: {answer}\n\nWhat is it a way to do?", "{goal}", turned_around=True),
        T("Write a how-to question that the following instructions answer.\n\n{answer}", "{goal}", turned_around=True),
    ],
    options=lambda ex: tf.stack([ex["sol1"], ex["sol2"]]),
    cluster=CLUSTER,
)

add_task(
    "flan_story_cloze",
    # StoryCloze has no train split: FLAN trains on its validation split (200 of it kept for
    # validation) and tests on its test split. Manual download in TFDS.
    source=flan_source(
        "story_cloze/2016:1.0.0", train="validation", validation="train", test="test", num_train_examples=1_871,
    ),  # fmt: skip
    preprocessors=[_story_cloze],
    fields={"context": "context", "answer": lambda ex: _chosen(ex, base=1)},
    templates=[
        T("{context}\n\nWhat is the best ending for this story?", "{answer}"),
        T("Read the story and choose the sentence that finishes it.\n\n{context}", "{answer}"),
        T("Story: {context}\n\nWhich ending makes sense?", "{answer}"),
        T("{context}\n\nWhat happens next?", "{answer}"),
        T("Here are the first four sentences of a short story: {context}\n\nPick the most fitting fifth sentence.", "{answer}"),
        T("Complete the story.\n\n{context}", "{answer}"),
        T("How does this story most likely end? {context}", "{answer}"),
        T("{context}\n\nWhich continuation is consistent with the story so far?", "{answer}"),
        T("Write the first four sentences of a story that ends like this: {answer}", "{context}", turned_around=True),
        T("{answer}\n\nThat is the last sentence of a short story. Tell the story up to that point.", "{context}", turned_around=True),
    ],
    options=lambda ex: ex["endings"],
    cluster=CLUSTER,
)
