"""FLAN cluster `coreference`: DPR (definite pronoun resolution), Winogrande, WSC273."""

from __future__ import annotations

import tensorflow as tf

from flanjax.data.sources import TRAIN_EXAMPLES, VALIDATION_EXAMPLES, Read, TfdsSource, flan_source
from flanjax.data.templated import add_task
from flanjax.data.templates import Template as T

CLUSTER = "coreference"


def _pick(choices, label):
    return tf.gather(choices, label), tf.gather(choices, 1 - label)


# ---------------------------------------------------------------- DPR / Winogrande


def _dpr_choice(example):
    return _pick(example["candidates"], example["label"])


def _winogrande_choices(example):
    return tf.stack([example["option1"], example["option2"]])


def _winogrande_choice(example):
    return _pick(_winogrande_choices(example), example["label"])


# ---------------------------------------------------------------- WSC273
#
# WSC273 has only a test split (two candidates per sentence). Training and validation come from
# SuperGLUE's WSC, whose examples each pair the pronoun with ONE candidate and a true/false label:
# examples of one sentence are grouped, and every true candidate is paired with a false candidate
# of the same pronoun occurrence, so both builders yield the same two-choice examples:
#   sentence (plain), marked (the pronoun occurrence in *asterisks*), pronoun, answer, distractor, choices.


def _mark(prefix, pronoun, suffix):
    text = tf.strings.join([prefix, " *", pronoun, "* ", suffix])
    text = tf.strings.regex_replace(text, r"\s+", " ")
    return tf.strings.strip(tf.strings.regex_replace(text, r"\* ([.,;:!?'])", r"*\1"))


def _wsc273(ds: tf.data.Dataset) -> tf.data.Dataset:
    def convert(ex):
        text = ex["text"]
        length = tf.strings.length(text, unit="UTF8_CHAR")
        # (Offsets always lie in the text in the real data; clipped for robustness.)
        start = tf.clip_by_value(ex["pronoun_start"], 0, length)
        end = tf.clip_by_value(ex["pronoun_end"], start, length)
        prefix = tf.strings.substr(text, 0, start, unit="UTF8_CHAR")
        suffix = tf.strings.substr(text, end, length - end, unit="UTF8_CHAR")
        # Candidates as written, their capitals matched to the pronoun's ("the city councilmen").
        choices = tf.stack([ex["option1_normalized"], ex["option2_normalized"]])
        second = tf.cast(tf.not_equal(ex["label"], 0), tf.int32)  # label: 0 option1, 1 option2
        return {
            "sentence": text,
            "marked": _mark(prefix, ex["pronoun_text"], suffix),
            "pronoun": ex["pronoun_text"],
            "answer": tf.gather(choices, second),
            "distractor": tf.gather(choices, 1 - second),
            "choices": choices,
        }

    return ds.map(convert, num_parallel_calls=tf.data.AUTOTUNE)


_GROUP = 32  # at most this many SuperGLUE examples share a sentence


def _superglue_wsc_pairs(ds: tf.data.Dataset) -> tf.data.Dataset:
    """SuperGLUE WSC (one candidate per example, true/false) -> two-candidate examples."""

    def mark(ex):
        words = tf.strings.split(ex["text"])  # span indices count whitespace-separated words
        i = tf.cast(ex["span2_index"], tf.int32)
        n = tf.size(tf.strings.split(ex["span2_text"]))
        prefix = tf.strings.reduce_join(words[:i], separator=" ")
        span = tf.strings.reduce_join(words[i : i + n], separator=" ")
        suffix = tf.strings.reduce_join(words[i + n :], separator=" ")
        # The span word may carry punctuation ("him."): keep it outside the asterisks.
        pronoun = tf.strings.regex_replace(span, r"[.,;:!?'\"]+$", "")
        trailing = tf.strings.substr(span, tf.strings.length(pronoun), tf.strings.length(span))
        return {
            "sentence": tf.strings.reduce_join(words, separator=" "),
            "marked": _mark(prefix, pronoun, tf.strings.join([trailing, suffix], separator=" ")),
            "pronoun": ex["span2_text"],
            "candidate": ex["span1_text"],
            "occurrence": tf.cast(ex["span2_index"], tf.int32),
            "true": tf.equal(ex["label"], 1),
        }

    def pairs(group):
        cand = tf.strings.lower(tf.strings.strip(group["candidate"]))
        same = tf.equal(group["occurrence"][:, None], group["occurrence"][None, :])
        other = tf.not_equal(cand[:, None], cand[None, :])
        wrong = tf.logical_and(tf.logical_and(same, other), tf.logical_not(group["true"])[None, :])
        has = tf.logical_and(group["true"], tf.reduce_any(wrong, axis=1))
        distractor = tf.gather(group["candidate"], tf.argmax(tf.cast(wrong, tf.int32), axis=1, output_type=tf.int32))
        return tf.data.Dataset.from_tensor_slices(
            {
                "sentence": group["sentence"], "marked": group["marked"], "pronoun": group["pronoun"],
                "answer": group["candidate"], "distractor": tf.where(has, distractor, ""), "true": group["true"],
            }
        ).filter(lambda ex: ex["true"])  # fmt: skip

    def fallback(last, ex):
        """A true candidate whose sentence lists no false one for its pronoun takes the candidate
        of the example before it instead (a weak distractor; expected to be uncommon in the real
        data, but it is every example under TFDS mock data)."""
        alone = tf.equal(ex["distractor"], "")
        return ex["answer"], {**ex, "distractor": tf.where(alone, last, ex["distractor"])}

    def finish(ex):
        # Candidates in a pseudo-random but fixed order.
        first = tf.equal(tf.strings.to_hash_bucket_fast(tf.strings.join([ex["sentence"], ex["answer"]]), 2), 0)
        choices = tf.where(first, tf.stack([ex["answer"], ex["distractor"]]), tf.stack([ex["distractor"], ex["answer"]]))
        return {k: ex[k] for k in ("sentence", "marked", "pronoun", "answer", "distractor")} | {"choices": choices}

    def usable(ex):
        answer, distractor = (tf.strings.lower(tf.strings.strip(ex[k])) for k in ("answer", "distractor"))
        return tf.logical_and(tf.strings.length(distractor) > 0, tf.not_equal(answer, distractor))

    ds = ds.map(mark, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.group_by_window(
        key_func=lambda ex: tf.strings.to_hash_bucket_fast(ex["sentence"], 1 << 62),
        reduce_func=lambda _, window: window.batch(_GROUP),
        window_size=_GROUP,
    )  # fmt: skip
    ds = ds.flat_map(pairs).scan(tf.constant(""), fallback).filter(usable)
    return ds.map(finish, num_parallel_calls=tf.data.AUTOTUNE)


def _wsc(ds: tf.data.Dataset) -> tf.data.Dataset:
    """Either builder -> the same two-candidate examples (see above)."""
    return _wsc273(ds) if "pronoun_start" in ds.element_spec else _superglue_wsc_pairs(ds)


# SuperGLUE's WSC sentences for training and validation, WSC273's test set for testing.
_WSC_TRAIN = "super_glue/wsc.fixed:1.0.2"
_WSC_SOURCE = TfdsSource(
    {
        "train": [Read(_WSC_TRAIN, f"train[:{TRAIN_EXAMPLES}]")],
        "validation": [Read(_WSC_TRAIN, f"validation[:{VALIDATION_EXAMPLES}]")],
        "test": [Read("wsc273:1.0.0", "test")],
    },
    limits={"train": TRAIN_EXAMPLES, "validation": VALIDATION_EXAMPLES},
    num_train_examples=554,
)


add_task(
    "flan_dpr",
    # DPR has no validation split: 200 are carved from train.
    source=flan_source("definite_pronoun_resolution:1.1.0", validation="train", test="test", num_train_examples=1_322),
    fields={
        "sentence": "sentence",
        "pronoun": "pronoun",
        "answer": lambda ex: _dpr_choice(ex)[0],
        "distractor": lambda ex: _dpr_choice(ex)[1],
    },
    templates=[
        T("{sentence}\n\nWho or what does \"{pronoun}\" refer to in the sentence above?", "{answer}"),
        T("In the sentence \"{sentence}\", what is the antecedent of the pronoun \"{pronoun}\"?", "{answer}"),
        T("Resolve the pronoun.\n\nSentence: {sentence}\nPronoun: {pronoun}", "{answer}"),
        T("{sentence}\n\nWho is \"{pronoun}\" here?", "{answer}"),
        T("Read the sentence and decide what the word \"{pronoun}\" points back to.\n\n{sentence}", "{answer}"),
        T("Pronoun: {pronoun}\nSentence: {sentence}\n\nWhich of the candidates does the pronoun stand for?", "{answer}"),
        T("When this sentence says \"{pronoun}\", which one does it mean? {sentence}", "{answer}"),
        T("{sentence}\n\nUsing common sense, work out the referent of \"{pronoun}\".", "{answer}"),
        T("Write a sentence in which the pronoun \"{pronoun}\" refers to {answer} and not to {distractor}.", "{sentence}", turned_around=True),
        T("Make up a sentence that mentions both {distractor} and {answer}, where \"{pronoun}\" can only sensibly mean {answer}.", "{sentence}", turned_around=True),
    ],
    options=lambda ex: ex["candidates"],
    cluster=CLUSTER,
)

add_task(
    "flan_winogrande",
    # Trains on the largest training set (XL); test labels are hidden: validation is the test split.
    source=flan_source("winogrande:1.2.0", train="train_xl", validation="train", num_train_examples=40_398),
    fields={
        "sentence": "sentence",
        "option1": "option1",
        "option2": "option2",
        "answer": lambda ex: _winogrande_choice(ex)[0],
        "distractor": lambda ex: _winogrande_choice(ex)[1],
    },
    templates=[
        T("{sentence}\n\nWhat should go in place of the _?", "{answer}"),
        T("Fill in the blank: {sentence}", "{answer}"),
        T("Which option best completes the sentence below?\n\n{sentence}", "{answer}"),
        T("{sentence}\n\nIn the sentence above, who or what does the underscore stand for?", "{answer}"),
        T("Choose the word or phrase that makes this sentence make sense.\n\n{sentence}", "{answer}"),
        T("Sentence: {sentence}\n\nReplace the _ with the most logical choice.", "{answer}"),
        T("Common-sense test: {sentence}\n\nWhat is missing?", "{answer}"),
        T("There is a gap (_) in this sentence. Pick the right filler for it.\n\n{sentence}", "{answer}"),
        T("Write a sentence with a blank (_) that should be filled with \"{answer}\" rather than \"{distractor}\".", "{sentence}", turned_around=True),
        T("Write a fill-in-the-blank question, marking the gap with _, whose options are \"{option1}\" and \"{option2}\" and whose answer is \"{answer}\".", "{sentence}", turned_around=True),
    ],
    options=_winogrande_choices,
    cluster=CLUSTER,
)

add_task(
    "flan_wsc273",
    source=_WSC_SOURCE,
    preprocessors=[_wsc],
    fields={"sentence": "sentence", "marked": "marked", "pronoun": "pronoun", "answer": "answer", "distractor": "distractor"},
    templates=[
        T("{marked}\n\nWho or what does the pronoun *{pronoun}* refer to?", "{answer}"),
        T("In the following sentence, the word in asterisks is a pronoun. Which noun phrase does it point back to?\n\n{marked}", "{answer}"),
        T("Sentence: {marked}\n\nWhat is \"{pronoun}\" (marked with asterisks) referring to?", "{answer}"),
        T("Work out what the starred pronoun refers to.\n\n{marked}", "{answer}"),
        T("{marked}\n\nHere, *{pronoun}* means:", "{answer}"),
        T("Who is meant by *{pronoun}* in this sentence? {marked}", "{answer}"),
        T("Read carefully: {marked}\n\nThe pronoun in asterisks stands for which of the following?", "{answer}"),
        T("{marked}\n\nUse common sense to decide which candidate the starred word is about.", "{answer}"),
        T("Give an example of a Winograd-style sentence: in it, \"{pronoun}\" must mean {answer}, not {distractor}.", "{sentence}", turned_around=True),
        T("Compose a tricky sentence about {distractor} and {answer} where common sense tells you that \"{pronoun}\" means {answer}.", "{sentence}", turned_around=True),
    ],
    options=lambda ex: ex["choices"],
    cluster=CLUSTER,
)
