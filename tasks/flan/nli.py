"""FLAN cluster `nli`: ANLI (R1-R3), CB, MNLI, QNLI, RTE, SNLI, WNLI."""

from __future__ import annotations

from flanjax.data.sources import flan_source
from flanjax.data.templated import add_task, label, labelled
from flanjax.data.templates import Template as T

CLUSTER = "nli"

# Answers and label phrasings in a canonical order: entailment, neutral, contradiction
# (three-way) or entailment, not entailment (two-way). Each dataset maps its own label ids
# onto that order.
THREE_WAY = ["Yes", "It's impossible to say", "No"]
RELATION = ["follows from", "is neither implied nor ruled out by", "contradicts"]
TRUTH = ["definitely true", "neither clearly true nor clearly false", "definitely false"]

TWO_WAY = ["Yes", "No"]
RELATION_2 = ["follows from", "does not follow from"]
TRUTH_2 = ["definitely true", "not guaranteed to be true"]
IMPLIES_2 = ["implies", "does not imply"]


def _three_way_fields(premise: str, hypothesis: str, order=(0, 1, 2)) -> dict:
    return {
        "premise": premise,
        "hypothesis": hypothesis,
        "answer": label([THREE_WAY[i] for i in order]),
        "relation": label([RELATION[i] for i in order]),
        "truth": label([TRUTH[i] for i in order]),
    }


add_task(
    "flan_anli",
    # The three rounds count as one dataset; each has labelled validation and test splits.
    source=flan_source(
        "anli/r1:0.1.0", "anli/r2:0.1.0", "anli/r3:0.1.0",
        validation="validation", test="test", num_train_examples=16_946 + 45_460 + 100_459,
    ),  # fmt: skip
    fields=_three_way_fields("context", "hypothesis"),  # labels: e, n, c
    templates=[
        T("Passage: {premise}\n\nClaim: {hypothesis}\n\nIs the claim backed up by the passage?", "{answer}"),
        T("{premise}\n\nAfter reading this, would you agree that \"{hypothesis}\"?", "{answer}"),
        T("Consider the following text.\n\n{premise}\n\nDoes the text establish that the statement \"{hypothesis}\" is true?", "{answer}"),
        T("Someone read this paragraph:\n\n{premise}\n\nThen they claimed: {hypothesis}\n\nWere they right?", "{answer}"),
        T("Fact-check the statement below using nothing but the paragraph.\n\nParagraph: {premise}\nStatement: {hypothesis}\n\nIs the statement supported?", "{answer}"),
        T("{hypothesis}\n\nIs that sentence a valid inference from the following text?\n\n{premise}", "{answer}"),
        T("Text: {premise}\n\nIf everything in the text is accurate, must this also be true? {hypothesis}", "{answer}"),
        T("{premise}\n\nWrite a sentence that {relation} the paragraph above.", "{hypothesis}", turned_around=True),
        T("Read the passage and come up with a statement about it that is {truth}.\n\n{premise}", "{hypothesis}", turned_around=True),
        T("Write a short paragraph that makes the statement \"{hypothesis}\" {truth}.", "{premise}", turned_around=True),
    ],
    options=THREE_WAY,
    cluster=CLUSTER,
)

add_task(
    "flan_cb",
    # CB's test labels are hidden: its validation split is the test split.
    source=flan_source("super_glue/cb:1.0.2", validation="train", num_train_examples=250),
    fields=_three_way_fields("premise", "hypothesis", order=(0, 2, 1)),  # labels: entailment, contradiction, neutral
    templates=[
        T("{premise}\n\nBased on what is said here, is it the case that \"{hypothesis}\"?", "{answer}"),
        T("Excerpt: {premise}\n\nDoes the speaker or writer treat \"{hypothesis}\" as true?", "{answer}"),
        T("Here is a snippet of conversation or prose:\n\n{premise}\n\nProposed inference: {hypothesis}\n\nIs the inference justified?", "{answer}"),
        T("Does \"{premise}\" imply that \"{hypothesis}\"?", "{answer}"),
        T("{premise}\n\nQuestion: according to the passage, is \"{hypothesis}\" true?", "{answer}"),
        T("First: {premise}\nSecond: {hypothesis}\n\nDoes the second statement follow from the first?", "{answer}"),
        T("Read this and answer the question.\n\n{premise}\n\nWould the author agree with this: {hypothesis}?", "{answer}"),
        T("{premise}\n\nWrite a short statement that is {truth} according to the text above.", "{hypothesis}", turned_around=True),
        T("Here is a passage:\n\n{premise}\n\nGive a sentence that {relation} it.", "{hypothesis}", turned_around=True),
        T("Write a few lines of dialogue or prose that make \"{hypothesis}\" {truth}.", "{premise}", turned_around=True),
    ],
    options=THREE_WAY,
    cluster=CLUSTER,
)

add_task(
    "flan_mnli",
    # Test labels are hidden: evaluate on the matched and mismatched validation splits.
    source=flan_source(
        "glue/mnli:2.0.0",
        validation="train", test=["validation_matched", "validation_mismatched"], num_train_examples=392_702,
    ),  # fmt: skip
    fields=_three_way_fields("premise", "hypothesis"),  # labels: entailment, neutral, contradiction
    templates=[
        T("Sentence A: {premise}\nSentence B: {hypothesis}\n\nIf sentence A is true, is sentence B true as well?", "{answer}"),
        T("{premise}\n\nDoes this mean that \"{hypothesis}\"?", "{answer}"),
        T("Given that \"{premise}\", is it also the case that \"{hypothesis}\"?", "{answer}"),
        T("Check whether the hypothesis is entailed by the premise.\n\nPremise: {premise}\nHypothesis: {hypothesis}", "{answer}"),
        T("{hypothesis}\n\nIs the statement above supported by this one?\n\n{premise}", "{answer}"),
        T("Someone says: \"{premise}\"\n\nShould we conclude from this that \"{hypothesis}\"?", "{answer}"),
        T("Read the two sentences and tell me whether the first guarantees the second.\n\n1. {premise}\n2. {hypothesis}", "{answer}"),
        T("Premise: {premise}\n\nWrite a hypothesis that {relation} this premise.", "{hypothesis}", turned_around=True),
        T("{premise}\n\nTaking this sentence as given, write another sentence that is {truth}.", "{hypothesis}", turned_around=True),
        T("Compose a sentence that makes the following {truth}: {hypothesis}", "{premise}", turned_around=True),
    ],
    options=THREE_WAY,
    cluster=CLUSTER,
)

add_task(
    "flan_qnli",
    # QNLI's test labels are hidden: its validation split is the test split.
    source=flan_source("glue/qnli:2.0.0", validation="train", num_train_examples=104_743),
    fields={
        "question": "question",
        "sentence": "sentence",
        "answer": label(TWO_WAY),  # labels: entailment, not_entailment
        "answered": label(["answered", "not answered"]),
    },
    templates=[
        T("Question: {question}\nSentence: {sentence}\n\nDoes the sentence answer the question?", "{answer}"),
        T("{sentence}\n\nDoes the sentence above contain the answer to \"{question}\"?", "{answer}"),
        T("Can the question \"{question}\" be answered using this sentence? {sentence}", "{answer}"),
        T("I am looking for the answer to this question: {question}\n\nWould this sentence give it to me? {sentence}", "{answer}"),
        T("{question}\n\nIs the answer to that question found in the following text?\n\n{sentence}", "{answer}"),
        T("Sentence: {sentence}\nQuestion: {question}\n\nDoes the sentence respond to what the question asks?", "{answer}"),
        T("Someone asked \"{question}\" and was told \"{sentence}\" Did that reply answer what was asked?", "{answer}"),
        T("Read the sentence and the question below. Is the question answerable from the sentence alone?\n\n{sentence}\n\n{question}", "{answer}"),
        T("{sentence}\n\nWrite a question that is {answered} by the sentence above.", "{question}", turned_around=True),
        T("Sentence: {sentence}\n\nAsk a question on the same topic that is {answered} by this sentence.", "{question}", turned_around=True),
    ],
    options=TWO_WAY,
    cluster=CLUSTER,
)

add_task(
    "flan_rte",
    # RTE's test labels are hidden: its validation split is the test split.
    source=flan_source("super_glue/rte:1.0.2", validation="train", num_train_examples=2_490),
    fields={
        "premise": "premise",
        "hypothesis": "hypothesis",
        "answer": label(TWO_WAY),  # labels: entailment, not_entailment
        "relation": label(RELATION_2),
        "truth": label(TRUTH_2),
        "implies": label(IMPLIES_2),
    },
    templates=[
        T("{premise}\n\nDoes this text support the claim that \"{hypothesis}\"?", "{answer}"),
        T("Passage: {premise}\n\nStatement: {hypothesis}\n\nIs the statement true, given the passage?", "{answer}"),
        T("Read this news excerpt:\n\n{premise}\n\nCan you infer that \"{hypothesis}\"?", "{answer}"),
        T("\"{hypothesis}\" Does this follow from the paragraph below?\n\n{premise}", "{answer}"),
        T("Text: {premise}\nHypothesis: {hypothesis}\n\nIs the hypothesis entailed by the text?", "{answer}"),
        T("If \"{premise}\" is true, does it follow that \"{hypothesis}\"?", "{answer}"),
        T("{premise}\n\nBased only on this information, is the following correct? {hypothesis}", "{answer}"),
        T("{premise}\n\nWrite a sentence that {relation} the text above.", "{hypothesis}", turned_around=True),
        T("{premise}\n\nWrite a claim about this passage that is {truth}.", "{hypothesis}", turned_around=True),
        T("Write a short news-style paragraph that {implies} the following: {hypothesis}", "{premise}", turned_around=True),
    ],
    options=TWO_WAY,
    cluster=CLUSTER,
)

add_task(
    "flan_snli",
    source=flan_source("snli:1.1.0", validation="validation", test="test", num_train_examples=550_152),
    preprocessors=[labelled],  # pairs without annotator agreement are labelled -1
    fields=_three_way_fields("premise", "hypothesis"),  # labels: entailment, neutral, contradiction
    templates=[
        T("Caption: {premise}\n\nIs it safe to say, from this caption, that \"{hypothesis}\"?", "{answer}"),
        T("{premise}\n\nIf that describes a scene, does this describe it too? {hypothesis}", "{answer}"),
        T("A scene is described as follows: {premise}\n\nIs the following also true of the scene? {hypothesis}", "{answer}"),
        T("Premise: {premise}\nHypothesis: {hypothesis}\n\nGiven the premise, must the hypothesis hold?", "{answer}"),
        T("Look at these two descriptions of a picture.\n\nFirst: {premise}\nSecond: {hypothesis}\n\nIs the second one necessarily correct if the first one is?", "{answer}"),
        T("{hypothesis}\n\nDoes that follow from this caption? {premise}", "{answer}"),
        T("Is \"{hypothesis}\" a correct conclusion from \"{premise}\"?", "{answer}"),
        T("Image description: {premise}\n\nWrite another description of the same image that {relation} this one.", "{hypothesis}", turned_around=True),
        T("{premise}\n\nWrite a sentence about this scene that is {truth}.", "{hypothesis}", turned_around=True),
        T("Describe a photo in one sentence so that \"{hypothesis}\" is {truth}.", "{premise}", turned_around=True),
    ],
    options=THREE_WAY,
    cluster=CLUSTER,
)

add_task(
    "flan_wnli",
    # WNLI's test labels are hidden: its validation split is the test split.
    source=flan_source("glue/wnli:2.0.0", validation="train", num_train_examples=635),
    fields={
        "premise": "sentence1",
        "hypothesis": "sentence2",
        "answer": label(TWO_WAY[::-1]),  # labels: not_entailment, entailment
        "relation": label(RELATION_2[::-1]),
        "reading": label(["mistaken", "correct"]),
    },
    templates=[
        T("{premise}\n\nGiven the text above, is it true that \"{hypothesis}\"?", "{answer}"),
        T("Sentence 1: {premise}\nSentence 2: {hypothesis}\n\nIs sentence 2 implied by sentence 1?", "{answer}"),
        T("Read this: {premise}\n\nNow, is this a correct reading of it? {hypothesis}", "{answer}"),
        T("Work out who or what each pronoun refers to.\n\n{premise}\n\nDoes the text mean that \"{hypothesis}\"?", "{answer}"),
        T("\"{hypothesis}\"\n\nIs this a valid conclusion from the passage below?\n\n{premise}", "{answer}"),
        T("If we know that \"{premise}\", do we also know that \"{hypothesis}\"?", "{answer}"),
        T("{premise}\n\nOne reader concluded: {hypothesis}\n\nDid they interpret the text correctly?", "{answer}"),
        T("Passage: {premise}\nClaim: {hypothesis}\n\nDoes the passage entail the claim?", "{answer}"),
        T("{premise}\n\nRewrite part of this text with a pronoun replaced by a noun, giving a {reading} reading.", "{hypothesis}", turned_around=True),
        T("{premise}\n\nWrite a sentence that {relation} what is said above.", "{hypothesis}", turned_around=True),
    ],
    options=TWO_WAY,
    cluster=CLUSTER,
)
