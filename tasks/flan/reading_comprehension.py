"""FLAN cluster `reading_comprehension`: BoolQ, DROP, MultiRC, OpenBookQA, SQuAD (v1.1 + v2.0)."""

from __future__ import annotations

import seqio
import tensorflow as tf

from flanjax.data.sources import flan_source
from flanjax.data.templated import add_task, label, labelled
from flanjax.data.templates import Template as T
from flanjax.eval import metrics

CLUSTER = "reading_comprehension"
NO_YES = ["no", "yes"]
UNANSWERABLE = "unanswerable"  # SQuAD v2.0's questions that the passage does not answer


def _as_question(text: tf.Tensor) -> tf.Tensor:
    """BoolQ questions come lower-cased and without a question mark: capitalise, add one."""
    text = tf.strings.strip(text)
    first = tf.strings.upper(tf.strings.substr(text, 0, 1, unit="UTF8_CHAR"), encoding="utf-8")
    rest = tf.strings.substr(text, 1, tf.strings.length(text, unit="UTF8_CHAR"), unit="UTF8_CHAR")
    text = first + rest
    ends = tf.strings.regex_full_match(text, r".*\?")
    return tf.where(ends | tf.equal(tf.strings.length(text), 0), text, text + "?")


@seqio.map_over_dataset
def _boolq_question(example):
    return {**example, "question": _as_question(example["question"])}


@seqio.map_over_dataset
def _multirc_markup(example):
    """MultiRC paragraphs number their sentences in HTML: `<b>Sent 1: </b>...<br><b>Sent 2: </b>...`."""
    text = tf.strings.regex_replace(example["paragraph"], r"<b>\s*Sent \d+:\s*</b>", " ")
    text = tf.strings.regex_replace(text, r"<br\s*/?>", " ")
    text = tf.strings.regex_replace(text, r"</?[a-zA-Z]+>", "")
    return {**example, "paragraph": tf.strings.regex_replace(text, r"\s+", " ")}


# --- BoolQ --------------------------------------------------------------------------------

add_task(
    "flan_bool_q",
    # BoolQ has no labelled test split: its validation split is the test split.
    source=flan_source("bool_q:1.0.0", validation="train", num_train_examples=9_427),
    preprocessors=[_boolq_question],
    fields={"passage": "passage", "title": "title", "question": "question", "answer": label(NO_YES, "answer")},
    templates=[
        T("{passage}\n\nAnswer this based on the passage above: {question}", "{answer}"),
        T("Read the text and answer the yes/no question.\n\nText: {passage}\n\nQuestion: {question}", "{answer}"),
        T("{title}\n\n{passage}\n\nQuestion: {question} Answer yes or no.", "{answer}"),
        T("Here is an article about {title}:\n\n{passage}\n\nCan you tell me: {question}", "{answer}"),
        T("{question}\n\nUse the following paragraph to decide.\n\n{passage}", "{answer}"),
        T("Passage: {passage}\n\nAfter reading this, is the answer to \"{question}\" yes or no?", "{answer}"),
        T("I was reading about {title} and found this:\n\n{passage}\n\nSo what's the answer: {question}", "{answer}"),
        T("Does the passage support a yes or a no to the question below?\n\n{passage}\n\n{question}", "{answer}"),
        T("{passage}\n\nWrite a yes/no question about this passage whose correct answer is \"{answer}\".", "{question}", turned_around=True),
        T("Here is a paragraph about {title}:\n\n{passage}\n\nAsk a question about it that can be answered with {answer}.", "{question}", turned_around=True),
    ],
    options=NO_YES,
    cluster=CLUSTER,
)

# --- DROP ---------------------------------------------------------------------------------


def _drop_references(example):
    """The main answer and the annotators' validated answers."""
    return tf.concat([[example["answer"]], example["validated_answers"]], axis=0)


add_task(
    "flan_drop",
    # DROP's test answers are hidden; TFDS calls its official validation split "dev".
    source=flan_source("drop:2.0.0", validation="train", test="dev", num_train_examples=77_409),
    fields={"passage": "passage", "question": "question", "answer": "answer"},
    templates=[
        T("{passage}\n\n{question}", "{answer}"),
        T("Read the passage and answer the question. You may need to count, add, subtract or compare.\n\n"
          "Passage: {passage}\n\nQuestion: {question}", "{answer}"),
        T("Question: {question}\n\nWork out the answer from this text:\n\n{passage}", "{answer}"),
        T("{passage}\n\nUse the numbers and facts in the paragraph above to answer: {question}", "{answer}"),
        T("Here is some background:\n{passage}\n\nNow answer briefly: {question}", "{answer}"),
        T("Answer the question using only the passage. Give just the answer (a number, a date or a short span).\n\n"
          "{passage}\n\n{question}", "{answer}"),
        T("{passage}\n\nQ: {question}\nA:", "{answer}"),
        T("I need help with a reading question. The text says:\n\n{passage}\n\nThe question is: {question} "
          "What is the answer?", "{answer}"),
        T("{passage}\n\nWrite a question about this passage whose answer is \"{answer}\".", "{question}", turned_around=True),
        T("Make up a question about the text below that can only be answered by counting, adding or comparing "
          "details in it.\n\n{passage}", "{question}", turned_around=True),
    ],
    metrics=[metrics.squad],
    references=_drop_references,
    cluster=CLUSTER,
)

# --- MultiRC ------------------------------------------------------------------------------

add_task(
    "flan_multirc",
    # SuperGLUE's test labels are hidden: its validation split is the test split.
    source=flan_source("super_glue/multirc:1.0.2", validation="train", num_train_examples=27_243),
    preprocessors=[labelled, _multirc_markup],
    fields={
        "paragraph": "paragraph",
        "question": "question",
        "answer": "answer",
        "label": label(NO_YES),
        "verdict": label(["wrong", "correct"]),
    },
    templates=[
        T("{paragraph}\n\nQuestion: {question}\n\nIs \"{answer}\" a correct answer?", "{label}"),
        T("Read the paragraph and judge the proposed answer.\n\nParagraph: {paragraph}\n\n"
          "Question: {question}\nProposed answer: {answer}\n\nIs the proposed answer right?", "{label}"),
        T("{paragraph}\n\nSomeone was asked \"{question}\" and replied \"{answer}\". Does the text back them up?", "{label}"),
        T("Question: {question}\nAnswer: {answer}\n\nCheck this answer against the passage below. Is it true?\n\n{paragraph}", "{label}"),
        T("{paragraph}\n\nAccording to the text, would \"{answer}\" be an acceptable response to \"{question}\"?", "{label}"),
        T("Here is a passage:\n{paragraph}\n\nI think the answer to \"{question}\" is \"{answer}\". Am I right?", "{label}"),
        T("Decide whether the answer fits the question, given the paragraph.\n\n{paragraph}\n\n{question}\n{answer}", "{label}"),
        T("{paragraph}\n\nAfter reading the above, is it correct to answer \"{question}\" with \"{answer}\"?", "{label}"),
        T("{paragraph}\n\nBased on the text, write a {verdict} answer to this question: {question}", "{answer}", turned_around=True),
        T("Read this:\n\n{paragraph}\n\nGive an answer to \"{question}\" that the paragraph shows to be {verdict}.", "{answer}", turned_around=True),
    ],
    options=NO_YES,
    cluster=CLUSTER,
)

# --- OpenBookQA ---------------------------------------------------------------------------

_OBQA_CHOICES = ("choice_A", "choice_B", "choice_C", "choice_D")


def _obqa_options(example):
    return tf.stack([example["question"][c] for c in _OBQA_CHOICES])


add_task(
    "flan_openbookqa",
    source=flan_source("openbookqa:0.1.0", validation="validation", test="test", num_train_examples=4_957),
    fields={
        "fact": "fact1",
        "question": lambda ex: ex["question"]["stem"],
        "answer": lambda ex: tf.gather(_obqa_options(ex), ex["answerKey"]),
    },
    templates=[
        T("Fact: {fact}\n\nUsing the fact above, answer this question: {question}", "{answer}"),
        T("{question}\n\nHint: {fact}", "{answer}"),
        T("Keep this in mind: {fact}\n\nNow complete or answer this: {question}", "{answer}"),
        T("Here is a piece of science knowledge:\n{fact}\n\nWhich option best completes or answers the following?\n{question}", "{answer}"),
        T("Answer the question. You may find this fact useful: \"{fact}\"\n\nQuestion: {question}", "{answer}"),
        T("Given that {fact} --\n\n{question}", "{answer}"),
        T("{question}\n\nChoose the right answer, using what you know and this fact: {fact}", "{answer}"),
        T("A student learned that {fact}\n\nHow should they answer this test question?\n\n{question}", "{answer}"),
        T("Fact: {fact}\n\nWrite a test question that uses this fact and has the answer \"{answer}\".", "{question}", turned_around=True),
        T("Question: {question}\nAnswer: {answer}\n\nState a general fact that explains why this answer is right.", "{fact}", turned_around=True),
    ],
    options=_obqa_options,
    cluster=CLUSTER,
)

# --- SQuAD v1.1 + v2.0 --------------------------------------------------------------------


def _squad_references(example):
    """Every annotated answer; v2.0's unanswerable questions have none and take `UNANSWERABLE`."""
    texts = example["answers"]["text"]
    return tf.cond(tf.size(texts) > 0, lambda: texts, lambda: tf.constant([UNANSWERABLE]))


def _squad_answer(example):
    return _squad_references(example)[0]


add_task(
    "flan_squad",
    # Test answers are hidden: the validation splits are the test split. The two builders
    # are interleaved; v2.0's unanswerable questions are kept, answered "unanswerable".
    source=flan_source(
        "squad/v1.1:3.0.0", "squad/v2.0:3.0.0", validation="train", num_train_examples=87_599 + 130_319
    ),
    fields={
        "context": "context",
        "title": lambda ex: tf.strings.regex_replace(ex["title"], "_", " "),
        "question": "question",
        "answer": _squad_answer,
    },
    templates=[
        T("{context}\n\nQuestion: {question}\n\nAnswer with a phrase from the text, or say \"unanswerable\" if the "
          "text does not say.", "{answer}"),
        T("Read this passage about {title} and answer the question. If the passage gives no answer, reply "
          "\"unanswerable\".\n\n{context}\n\n{question}", "{answer}"),
        T("{question}\n\nFind the answer in the following text (write \"unanswerable\" when it isn't there):\n\n{context}", "{answer}"),
        T("Article: {context}\n\nWhat does the article say in reply to \"{question}\"? If nothing, the answer is "
          "\"unanswerable\".", "{answer}"),
        T("Here is a paragraph on {title}:\n{context}\n\nUsing only this paragraph, answer: {question} "
          "(Say \"unanswerable\" if it can't be told from the paragraph.)", "{answer}"),
        T("Extract the answer to the question from the context. Questions the context cannot answer get the reply "
          "\"unanswerable\".\n\nContext: {context}\nQuestion: {question}", "{answer}"),
        T("{context}\n\nQ: {question} (answer \"unanswerable\" if the passage doesn't cover it)\nA:", "{answer}"),
        T("I have a question about {title}: {question}\n\nCan this text answer it? Give the answer, or \"unanswerable\".\n\n{context}", "{answer}"),
        T("{context}\n\nWrite a question a reader might ask about this passage.", "{question}", turned_around=True),
        T("Come up with a reading-comprehension question on the following text about {title}.\n\n{context}", "{question}", turned_around=True),
    ],
    metrics=[metrics.squad],
    references=_squad_references,
    cluster=CLUSTER,
)
