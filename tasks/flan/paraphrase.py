"""FLAN cluster `paraphrase`: MRPC, QQP, PAWS (Wiki), STS-B (similarity 0..5)."""

from __future__ import annotations

import seqio
import tensorflow as tf

from flanjax.data.sources import flan_source
from flanjax.data.templated import add_task, label
from tasks.flan.text import detokenize
from flanjax.data.templates import Template as T

CLUSTER = "paraphrase"
NO_YES = ["no", "yes"]
SIMILARITY = ["0", "1", "2", "3", "4", "5"]


def _detokenize(*keys: str):
    """MRPC and PAWS (tokenized config) put spaces around punctuation: `word , word .`"""
    return seqio.map_over_dataset(lambda example: {**example, **{k: detokenize(example[k]) for k in keys}})


@seqio.map_over_dataset
def _similarity_class(example):
    # STS-B scores are floats in [0, 5]; round half up to the nearest integer class.
    score = tf.clip_by_value(tf.cast(example["label"], tf.float32), 0.0, 5.0)
    return {**example, "score": tf.cast(tf.floor(score + 0.5), tf.int32)}


add_task(
    "flan_mrpc",
    # MRPC's test labels are hidden: its validation split is the test split.
    source=flan_source("glue/mrpc:2.0.0", validation="train", num_train_examples=3_668),
    preprocessors=[_detokenize("sentence1", "sentence2")],
    fields={
        "sentence1": "sentence1",
        "sentence2": "sentence2",
        "answer": label(NO_YES),
        "relation": label(["covers the same story as, but does not say the same thing as", "means the same as"]),
    },
    templates=[
        T("{sentence1}\n{sentence2}\n\nDo these two sentences say the same thing?", "{answer}"),
        T("Sentence A: {sentence1}\nSentence B: {sentence2}\n\nIs Sentence B a paraphrase of Sentence A?", "{answer}"),
        T("Here are two sentences taken from news stories.\n\n1. {sentence1}\n2. {sentence2}\n\nAre they equivalent in meaning?", "{answer}"),
        T("Does the sentence \"{sentence2}\" express the same meaning as \"{sentence1}\"?", "{answer}"),
        T("Read both sentences and decide whether one is simply a rewording of the other.\n\n{sentence1}\n\n{sentence2}", "{answer}"),
        T("{sentence1}\n\nIs that the same as saying the following?\n\n{sentence2}", "{answer}"),
        T("Two reporters wrote:\n\"{sentence1}\"\nand\n\"{sentence2}\"\n\nDid they report the same thing?", "{answer}"),
        T("First: {sentence1}\nSecond: {sentence2}\n\nWould a reader learn exactly the same facts from either sentence?", "{answer}"),
        T("Write a sentence that {relation} this one:\n\n{sentence1}", "{sentence2}", turned_around=True),
        T("{sentence1}\n\nGive another news sentence that {relation} the sentence above.", "{sentence2}", turned_around=True),
    ],
    options=NO_YES,
    cluster=CLUSTER,
)

add_task(
    "flan_qqp",
    # QQP's test labels are hidden: its validation split is the test split.
    source=flan_source("glue/qqp:2.0.0", validation="train", num_train_examples=363_846),
    fields={
        "question1": "question1",
        "question2": "question2",
        "answer": label(NO_YES),
        "relation": label(["asks something different from", "asks the same thing as"]),
    },
    templates=[
        T("Question 1: {question1}\nQuestion 2: {question2}\n\nAre these two questions asking the same thing?", "{answer}"),
        T("{question1}\n{question2}\n\nAre the questions above duplicates of each other?", "{answer}"),
        T("Someone on a Q&A site asked \"{question1}\" and someone else asked \"{question2}\". Should the two posts be merged as duplicates?", "{answer}"),
        T("Do the questions \"{question1}\" and \"{question2}\" mean the same?", "{answer}"),
        T("I want to know: {question1}\n\nMy friend wants to know: {question2}\n\nAre we looking for the same information?", "{answer}"),
        T("Decide whether these two questions are paraphrases of each other.\n\nA: {question1}\nB: {question2}", "{answer}"),
        T("{question1}\n\nIf someone answered the question above, would that also answer this one?\n\n{question2}", "{answer}"),
        T("Check these two Quora questions for duplication:\n\n{question1}\n\n{question2}\n\nSame question?", "{answer}"),
        T("Write a question that {relation} this one: {question1}", "{question2}", turned_around=True),
        T("{question1}\n\nPhrase a question that {relation} the question above.", "{question2}", turned_around=True),
    ],
    options=NO_YES,
    cluster=CLUSTER,
)

add_task(
    "flan_paws_wiki",
    source=flan_source("paws_wiki:1.1.0", validation="validation", test="test", num_train_examples=49_401),
    preprocessors=[_detokenize("sentence1", "sentence2")],
    fields={
        "sentence1": "sentence1",
        "sentence2": "sentence2",
        "answer": label(NO_YES),
        "relation": label(["uses nearly the same words as, but does not mean the same as", "means the same as"]),
    },
    templates=[
        T("{sentence1}\n{sentence2}\n\nDespite the similar wording, do these sentences mean the same thing?", "{answer}"),
        T("Sentence 1: {sentence1}\nSentence 2: {sentence2}\n\nIs the second sentence a paraphrase of the first?", "{answer}"),
        T("These two sentences use almost the same words. Do they also carry the same meaning?\n\n{sentence1}\n{sentence2}", "{answer}"),
        T("Does \"{sentence2}\" say the same as \"{sentence1}\"?", "{answer}"),
        T("Pay attention to who does what to whom. Is the meaning of these two sentences identical?\n\nA: {sentence1}\nB: {sentence2}", "{answer}"),
        T("{sentence1}\n\nCan this sentence be restated as follows without changing its meaning?\n\n{sentence2}", "{answer}"),
        T("Are the following two sentences equivalent?\n\n(a) {sentence1}\n(b) {sentence2}", "{answer}"),
        T("Here is a sentence from Wikipedia: {sentence1}\n\nAnd here is a rewrite of it: {sentence2}\n\nDoes the rewrite keep the original meaning?", "{answer}"),
        T("Write a sentence that {relation} the one below.\n\n{sentence1}", "{sentence2}", turned_around=True),
        T("{sentence1}\n\nProduce a sentence that {relation} the sentence above.", "{sentence2}", turned_around=True),
    ],
    options=NO_YES,
    cluster=CLUSTER,
)

add_task(
    "flan_stsb",
    # STS-B's test labels are hidden: its validation split is the test split.
    source=flan_source("glue/stsb:2.0.0", validation="train", num_train_examples=5_749),
    preprocessors=[_similarity_class],
    fields={"sentence1": "sentence1", "sentence2": "sentence2", "answer": label(SIMILARITY, "score")},
    templates=[
        T("{sentence1}\n{sentence2}\n\nOn a scale from 0 (unrelated) to 5 (same meaning), how similar are these two sentences?", "{answer}"),
        T("Rate the semantic similarity of the following sentences, where 0 means completely different and 5 means equivalent.\n\nSentence 1: {sentence1}\nSentence 2: {sentence2}", "{answer}"),
        T("How close in meaning are \"{sentence1}\" and \"{sentence2}\"? Give a score from 0 to 5.", "{answer}"),
        T("First sentence: {sentence1}\nSecond sentence: {sentence2}\n\nScore their similarity (0 = nothing in common, 5 = they mean exactly the same).", "{answer}"),
        T("{sentence1}\n\nFrom 0 to 5, how much does the following sentence overlap in meaning with the one above?\n\n{sentence2}", "{answer}"),
        T("Give a similarity rating between 0 and 5 for this pair of sentences.\n\nA: {sentence1}\nB: {sentence2}", "{answer}"),
        T("Do these sentences mean the same thing? Answer with a number from 0 (not at all) to 5 (completely).\n\n{sentence1}\n{sentence2}", "{answer}"),
        T("Annotators scored sentence pairs for similarity on a 0-5 scale. What score would this pair get?\n\n\"{sentence1}\"\n\"{sentence2}\"", "{answer}"),
        T("Write a sentence whose similarity to the one below is {answer} on a scale of 0 to 5.\n\n{sentence1}", "{sentence2}", turned_around=True),
        T("{sentence1}\n\nCompose a new sentence that would get a similarity score of {answer} out of 5 when compared with the sentence above.", "{sentence2}", turned_around=True),
    ],
    options=SIMILARITY,
    cluster=CLUSTER,
)
