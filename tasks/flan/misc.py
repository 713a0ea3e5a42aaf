"""FLAN cluster `misc`: CoQA, QuAC, TREC, CoLA, WiC, Math (linear 1-d), fix punctuation (ParaCrawl EN)."""

from __future__ import annotations

import seqio
import tensorflow as tf

from flanjax.data.sources import flan_source
from flanjax.data.templated import add_task, label
from tasks.flan.text import detokenize
from flanjax.data.templates import Template as T
from flanjax.eval.metrics import bleu, exact_match, squad

CLUSTER = "misc"
# TREC's coarse classes, in the builder's label order (DESC, ENTY, ABBR, HUM, NUM, LOC).
QUESTION_TYPES = ["description", "entity", "abbreviation", "human", "numeric value", "location"]
ACCEPTABILITY = ["unacceptable", "acceptable"]
WORD_SENSE = ["different meanings", "the same meaning"]
CANNOT_ANSWER = "CANNOTANSWER"  # QuAC's marker for unanswerable questions


def _coqa_turn(ds: tf.data.Dataset) -> tf.data.Dataset:
    """One example per CoQA conversation: a turn picked by a hash of the story (never the first,
    so there is always a dialogue so far), with the turns before it as the history."""

    def turns(example):
        return tf.minimum(tf.size(example["questions"]), tf.size(example["answers"]["input_text"]))

    def pick(example):
        questions, answers = example["questions"], example["answers"]["input_text"]
        k = 1 + tf.strings.to_hash_bucket_fast(example["story"], 1 << 30) % (tf.cast(turns(example), tf.int64) - 1)
        lines = tf.strings.join(["Q: ", tf.strings.strip(questions[:k]), "\nA: ", tf.strings.strip(answers[:k])])
        history = tf.strings.reduce_join(lines, separator="\n")
        return {"story": example["story"], "history": history, "question": questions[k], "answer": answers[k]}

    ds = ds.filter(lambda ex: turns(ex) >= 2).map(pick, num_parallel_calls=tf.data.AUTOTUNE)
    # CoQA marks unanswerable questions "unknown": no use as a target or for asking a question back.
    return ds.filter(lambda ex: tf.not_equal(tf.strings.lower(tf.strings.strip(ex["answer"])), "unknown"))


def _quac_answerable(ds: tf.data.Dataset) -> tf.data.Dataset:
    """QuAC: drop unanswerable questions and the CANNOTANSWER marker appended to every context."""

    def clean(example):
        context = tf.strings.regex_replace(example["context"], r"\s*" + CANNOT_ANSWER + r"\s*$", "")
        title, section = example["title"], example["section_title"]
        topic = tf.where(tf.strings.length(tf.strings.strip(section)) > 0, tf.strings.join([title, section], " - "), title)
        return {**example, "context": context, "topic": topic}

    ds = ds.filter(lambda ex: tf.not_equal(tf.strings.strip(ex["orig_answer"]["text"]), CANNOT_ANSWER))
    return ds.map(clean, num_parallel_calls=tf.data.AUTOTUNE)


def _quac_references(example):
    """The original answer and the other annotators' answers (validation has several)."""
    answers = tf.concat([[example["orig_answer"]["text"]], example["answers"]["text"]], axis=0)
    answers = tf.boolean_mask(answers, tf.not_equal(tf.strings.strip(answers), CANNOT_ANSWER))
    return tf.unique(tf.strings.strip(answers)).y


@seqio.map_over_dataset
def _detokenize_trec(example):
    """TREC questions are tokenized: `What is Australia 's national flower ?`, ``quotes''."""
    return {**example, "text": detokenize(example["text"])}


@seqio.map_over_dataset
def _unwrap_math(example):
    """Prepared math_dataset files may hold Python bytes reprs: `b'Solve 3*x = 6 for x.\\n'`."""

    def clean(text):
        text = tf.strings.regex_replace(text, r"(?s)^b'(.*)'$", r"\1")
        text = tf.strings.regex_replace(text, r'(?s)^b"(.*)"$', r"\1")
        return tf.strings.strip(tf.strings.regex_replace(text, r"(\\n|\s)+$", ""))

    return {**example, "question": clean(example["question"]), "answer": clean(example["answer"])}


# Marks inside numbers (3.5, 1,000, 10:30) are kept when punctuation is stripped: without them
# the number itself would change, which no reader could restore.
_NUMBER_MARKS = ((r"\.", ".", "\x01"), (",", ",", "\x02"), (":", ":", "\x03"))


def _strip_punctuation(ds: tf.data.Dataset) -> tf.data.Dataset:
    """ParaCrawl's English side as the target; the same sentence without punctuation (Unicode
    category P) and with its spaces collapsed as the input. Fragments of under 3 words are dropped."""

    def strip(example):
        text = tf.strings.strip(example["en"])
        bare = text
        for pattern, _, placeholder in _NUMBER_MARKS:
            bare = tf.strings.regex_replace(bare, r"(\d)" + pattern + r"(\d)", r"\1" + placeholder + r"\2")
        bare = tf.strings.regex_replace(bare, r"\pP", "")
        for _, mark, placeholder in _NUMBER_MARKS:
            bare = tf.strings.regex_replace(bare, placeholder, mark)
        return {"text": text, "unpunctuated": tf.strings.regex_replace(bare, r"\s+", " ")}

    ds = ds.map(strip, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.filter(lambda ex: tf.size(tf.strings.split(ex["text"])) >= 3)


add_task(
    "flan_coqa",
    # CoQA's dev set is TFDS's `test` split; no validation split: carve it from train.
    source=flan_source("coqa:1.0.0", validation="train", test="test", num_train_examples=7_199),
    preprocessors=[_coqa_turn],
    fields={"story": "story", "history": "history", "question": "question", "answer": "answer"},
    templates=[
        T("{story}\n\nConversation so far:\n{history}\n\nNext question: {question}\n\nAnswer:", "{answer}"),
        T("Read the passage, then keep the conversation about it going by answering the last question.\n\n"
          "Passage: {story}\n\n{history}\nQ: {question}\nA:", "{answer}"),
        T("Here is a text:\n\n{story}\n\nTwo people are talking about it. So far they have said:\n{history}\n\n"
          "How would you answer the question that comes next: {question}", "{answer}"),
        T("{history}\nQ: {question}\n\nThe questions above are all about the following story.\n\n{story}\n\n"
          "Give a short answer to the last question.", "{answer}"),
        T("Story: {story}\n\nEarlier questions and answers:\n{history}\n\n"
          "Using the story and what was already discussed, answer this: {question}", "{answer}"),
        T("Answer the final question of this dialogue from the story below, in a few words.\n\n{story}\n\n"
          "{history}\nQ: {question}", "{answer}"),
        T("{story}\n\nAfter this exchange:\n{history}\n\nsomeone asks \"{question}\" What is the reply?", "{answer}"),
        T("Background reading:\n{story}\n\nChat transcript:\n{history}\n\nThe next message is a question: "
          "{question}\nRespond briefly, based on the reading.", "{answer}"),
        T("{story}\n\n{history}\n\nWhat follow-up question about the story would get the answer \"{answer}\"?",
          "{question}", turned_around=True),
        T("Someone read this story:\n\n{story}\n\nand is being quizzed about it:\n{history}\n\n"
          "Write the next question of the quiz, one whose answer is: {answer}", "{question}", turned_around=True),
    ],  # fmt: skip
    metrics=[squad],
    cluster=CLUSTER,
)

add_task(
    "flan_quac",
    # QuAC's test set is hidden: its validation split is the test split.
    source=flan_source("quac:1.0.0", validation="train", num_train_examples=83_568),
    preprocessors=[_quac_answerable],
    fields={"topic": "topic", "context": "context", "question": "question", "answer": lambda ex: ex["orig_answer"]["text"]},
    templates=[
        T("{topic}\n\n{context}\n\nWhile discussing this text, a student asked: {question}\n\n"
          "Answer with a passage from the text.", "{answer}"),
        T("Section of an article about {topic}:\n\n{context}\n\nQ: {question}\nA:", "{answer}"),
        T("Read the text below and answer the question that follows by quoting the relevant part.\n\n"
          "Topic: {topic}\n{context}\n\nQuestion: {question}", "{answer}"),
        T("{context}\n\nThis passage is about {topic}. Someone curious about it wants to know: {question} "
          "What does the passage say?", "{answer}"),
        T("Question asked in a conversation about {topic}: {question}\n\nFind the answer in this text:\n\n{context}",
          "{answer}"),
        T("Here is part of a Wikipedia article ({topic}).\n\n{context}\n\nUsing only this text, respond to: {question}",
          "{answer}"),
        T("{question}\n\nAnswer the question above using this excerpt on {topic}:\n{context}", "{answer}"),
        T("Text: {context}\n\nA reader of this article on {topic} asks \"{question}\". "
          "Which words of the text answer it?", "{answer}"),
        T("{topic}\n\n{context}\n\nWrite a question about this text that is answered by: \"{answer}\"",
          "{question}", turned_around=True),
        T("You are quizzing a friend on this article about {topic}.\n\n{context}\n\n"
          "What could you ask so that the answer is \"{answer}\"?", "{question}", turned_around=True),
    ],  # fmt: skip
    references=_quac_references,
    metrics=[squad],
    cluster=CLUSTER,
)

add_task(
    "flan_trec",
    # TREC has train and test only: validation comes from train.
    source=flan_source("trec:1.0.0", validation="train", test="test", num_train_examples=5_452),
    preprocessors=[_detokenize_trec],
    fields={"question": "text", "answer": label(QUESTION_TYPES, "label-coarse")},
    templates=[
        T("{question}\n\nWhat kind of thing is this question asking for?", "{answer}"),
        T("Classify the question below by the type of answer it expects.\n\nQuestion: {question}", "{answer}"),
        T("What category best describes the answer to \"{question}\"?", "{answer}"),
        T("Question: {question}\n\nWould the answer be a description, an entity, an abbreviation, a person, "
          "a number or a place?", "{answer}"),
        T("If you had to answer \"{question}\", what type of information would you give?", "{answer}"),
        T("Here is a question someone typed into a search engine:\n\n{question}\n\n"
          "Which answer type does it belong to?", "{answer}"),
        T("Determine the expected answer type of this question: {question}", "{answer}"),
        T("{question}\n\nTo answer this, what sort of information would you need to look up?", "{answer}"),
        T("Write a question whose answer would be of the type \"{answer}\".", "{question}", turned_around=True),
        T("Give me an example of a trivia question in the category {answer}.", "{question}", turned_around=True),
    ],  # fmt: skip
    options=QUESTION_TYPES,
    cluster=CLUSTER,
)

add_task(
    "flan_cola",
    # CoLA's test labels are hidden: its validation split is the test split.
    source=flan_source("glue/cola:2.0.0", validation="train", num_train_examples=8_551),
    fields={"sentence": "sentence", "answer": label(ACCEPTABILITY)},
    templates=[
        T("\"{sentence}\"\n\nIs this sentence grammatically acceptable in English?", "{answer}"),
        T("Would a linguist judge the following sentence acceptable or unacceptable?\n\n{sentence}", "{answer}"),
        T("Sentence: {sentence}\n\nDoes this sound like something a native English speaker could say?", "{answer}"),
        T("Check the grammar of this sentence: {sentence}", "{answer}"),
        T("{sentence}\n\nIs that a well-formed English sentence?", "{answer}"),
        T("A student wrote: \"{sentence}\"\n\nShould the teacher mark it as grammatical?", "{answer}"),
        T("Rate the linguistic acceptability of the sentence below.\n\n{sentence}", "{answer}"),
        T("{sentence}\n\nHow would you judge the sentence above, from a purely grammatical point of view?", "{answer}"),
        T("Write a sentence that a linguist would find {answer} in English.", "{sentence}", turned_around=True),
        T("Give an example of a grammatically {answer} English sentence.", "{sentence}", turned_around=True),
    ],  # fmt: skip
    options=ACCEPTABILITY,
    cluster=CLUSTER,
)

add_task(
    "flan_wic",
    # WiC's test labels are hidden: its validation split is the test split.
    source=flan_source("super_glue/wic:1.0.2", validation="train", num_train_examples=5_428),
    fields={"word": "word", "sentence1": "sentence1", "sentence2": "sentence2", "answer": label(WORD_SENSE)},
    templates=[
        T("In the two sentences below, does the word \"{word}\" have the same meaning or different meanings?\n\n"
          "1. {sentence1}\n2. {sentence2}", "{answer}"),
        T("{sentence1}\n{sentence2}\n\nCompare how \"{word}\" is used in these two sentences.", "{answer}"),
        T("Sentence A: {sentence1}\nSentence B: {sentence2}\n\nIs \"{word}\" used in the same sense in A and B?",
          "{answer}"),
        T("The word \"{word}\" appears in both of these sentences:\n\n{sentence1}\n\n{sentence2}\n\n"
          "Does it mean the same thing each time?", "{answer}"),
        T("Decide whether \"{word}\" carries the same meaning in \"{sentence1}\" and in \"{sentence2}\".",
          "{answer}"),
        T("First: {sentence1}\nSecond: {sentence2}\n\nA dictionary lists several senses of \"{word}\". "
          "Would it use one sense for both sentences or two different ones?", "{answer}"),
        T("Word: {word}\n\n- {sentence1}\n- {sentence2}\n\nWord sense comparison:", "{answer}"),
        T("Here are two uses of \"{word}\".\n\n\"{sentence1}\"\n\"{sentence2}\"\n\n"
          "Could you swap in the same synonym for \"{word}\" in both?", "{answer}"),
        T("Here is a sentence containing \"{word}\": {sentence1}\n\n"
          "Write another sentence using \"{word}\" so that the two uses have {answer}.",
          "{sentence2}", turned_around=True),
        T("Write two sentences that both use the word \"{word}\", where the two uses have {answer}.",
          "{sentence1}\n{sentence2}", turned_around=True),
    ],  # fmt: skip
    options=WORD_SENSE,
    cluster=CLUSTER,
)

add_task(
    "flan_math_dataset",
    # train and test (the interpolation set) only: validation comes from train.
    source=flan_source("math_dataset/algebra__linear_1d:1.0.0", validation="train", test="test",
                       num_train_examples=1_999_998),  # fmt: skip
    preprocessors=[_unwrap_math],
    fields={"question": "question", "answer": "answer"},
    templates=[
        T("{question}", "{answer}"),
        T("Solve this problem: {question}", "{answer}"),
        T("Math problem: {question}\n\nWhat is the solution?", "{answer}"),
        T("{question}\n\nGive only the final value.", "{answer}"),
        T("Here is a linear equation to solve.\n\n{question}\n\nAnswer:", "{answer}"),
        T("What is the answer to this algebra exercise? {question}", "{answer}"),
        T("Work out the unknown. {question}", "{answer}"),
        T("Homework question: {question}\nThe answer is", "{answer}"),
        T("Write a linear equation in one variable whose solution is {answer}, and ask for it to be solved.",
          "{question}", turned_around=True),
        T("Make up an algebra exercise with the answer {answer}.", "{question}", turned_around=True),
    ],  # fmt: skip
    metrics=[exact_match],
    cluster=CLUSTER,
)

add_task(
    "flan_fix_punctuation",
    # ParaCrawl has only a train split: validation, training and test are disjoint slices of it.
    source=flan_source("para_crawl/enda:1.2.0", test_from_train=1_000, num_train_examples=2_414_895),
    preprocessors=[_strip_punctuation],
    fields={"unpunctuated": "unpunctuated", "text": "text"},
    templates=[
        T("Add punctuation to this sentence: {unpunctuated}", "{text}"),
        T("{unpunctuated}\n\nThe sentence above has lost its punctuation. Please put it back.", "{text}"),
        T("Rewrite the following text with correct punctuation.\n\n{unpunctuated}", "{text}"),
        T("Someone typed this without any commas, periods or apostrophes:\n\n{unpunctuated}\n\n"
          "How should it be written?", "{text}"),
        T("Fix the punctuation: {unpunctuated}", "{text}"),
        T("Text with no punctuation: {unpunctuated}\n\nThe same text, properly punctuated:", "{text}"),
        T("{unpunctuated}\n\nInsert the missing punctuation marks.", "{text}"),
        T("Please punctuate this line so it reads as proper English.\n\n{unpunctuated}", "{text}"),
        T("Remove every punctuation mark from this sentence: {text}", "{unpunctuated}", turned_around=True),
        T("{text}\n\nHow would this sentence look if it were typed without any punctuation at all?",
          "{unpunctuated}", turned_around=True),
    ],  # fmt: skip
    # Exact match: restoring punctuation has one right output. BLEU (international tokenisation,
    # punctuation as tokens) gives partial credit; ROUGE would not do, its tokenizer drops punctuation.
    metrics=[exact_match, bleu],
    cluster=CLUSTER,
)
