"""FLAN cluster `struct_to_text`: CommonGen, DART, E2E NLG, WebNLG (English)."""

from __future__ import annotations

import tensorflow as tf

from flanjax.data.sources import flan_source
from flanjax.data.templated import add_task
from flanjax.data.templates import Template as T
from flanjax.eval.metrics import rouge

CLUSTER = "struct_to_text"


def _references(example):
    """Every reference the GEM builder gives (validation/test); the single target where it gives none (train)."""
    refs = example["references"]
    refs = tf.boolean_mask(refs, tf.strings.length(tf.strings.strip(refs)) > 0)
    return tf.cond(tf.size(refs) > 0, lambda: refs, lambda: tf.reshape(example["target"], [1]))


def _concepts(example):
    # CommonGen concept sets: ["dog", "frisbee", "catch", "throw"] -> "dog, frisbee, catch, throw".
    return tf.strings.reduce_join(example["concepts"], separator=", ")


def _dart_triples(example):
    """DART triples come flattened ("subject predicate object"); one per line, with its table markers spelled out."""
    triples = tf.strings.regex_replace(example["tripleset"], r"^\s*\[TABLECONTEXT\]\s*\[TITLE\]\s*", "table title: ")
    triples = tf.strings.regex_replace(triples, r"\[TABLECONTEXT\]", "table")
    triples = tf.strings.regex_replace(triples, r"\[TITLE\]", "title")
    triples = tf.strings.regex_replace(triples, "_", " ")
    return tf.strings.reduce_join(triples, separator="\n")


def _e2e_attributes(example):
    """E2E meaning representations: "name[The Eagle], eatType[coffee shop]" -> "name: The Eagle; eat type: coffee shop"."""
    mr = example["meaning_representation"]
    for key, words in (("eatType", "eat type"), ("priceRange", "price range"), ("familyFriendly", "family friendly")):
        mr = tf.strings.regex_replace(mr, key + r"\[", words + "[")
    mr = tf.strings.regex_replace(mr, r"\]\s*,\s*", "]; ")
    return tf.strings.regex_replace(mr, r"([^;\s\[\]][^;\[\]]*?)\s*\[([^\]]*)\]", r"\1: \2")


def _webnlg_triples(example):
    """WebNLG triples "Aarhus_Airport | cityServed | \\"Aarhus, Denmark\\"" -> "Aarhus Airport | city served | Aarhus, Denmark", one per line."""
    parts = tf.strings.split(example["input"], " | ")  # ragged: triple -> its parts
    lengths = parts.row_lengths()
    position = tf.ragged.range(lengths).flat_values
    in_triple = tf.repeat(lengths, lengths)
    words = tf.strings.regex_replace(parts.flat_values, "_", " ")
    words = tf.strings.strip(tf.strings.regex_replace(words, r'^\s*"(.*)"\s*$', r"\1"))
    predicate = tf.strings.lower(tf.strings.regex_replace(words, "([a-z])([A-Z])", r"\1 \2"))
    words = tf.where((position == 1) & (in_triple == 3), predicate, words)
    triples = tf.strings.reduce_join(parts.with_flat_values(words), axis=1, separator=" | ")
    return tf.strings.reduce_join(triples, separator="\n")


add_task(
    "flan_common_gen",
    # The test split has no references: validation serves as the test split.
    source=flan_source("gem/common_gen:1.1.0", validation="train", num_train_examples=67_389),
    fields={"concepts": _concepts, "target": "target"},
    templates=[
        T("Concepts: {concepts}\n\nWrite a sentence that uses all of these concepts.", "{target}"),
        T("Make up a sentence about an everyday scene with the words {concepts}.", "{target}"),
        T("{concepts}\n\nCombine these words into one natural-sounding sentence.", "{target}"),
        T("Here are some keywords: {concepts}. Write a short sentence that contains every one of them.", "{target}"),
        T("Describe something ordinary that people do, in a single sentence mentioning each of the following: {concepts}", "{target}"),
        T("Words: {concepts}\n\nWhat is a plausible sentence in which all of them appear?", "{target}"),
        T("I am giving you a few concepts ({concepts}). Tie them together in one sentence about daily life.", "{target}"),
        T("Write a sentence that someone might actually say, using these terms: {concepts}", "{target}"),
        T("Sentence: {target}\n\nWhich key concepts is this sentence built around? List them, separated by commas.", "{concepts}", turned_around=True),
        T("{target}\n\nPick out the main nouns and verbs of the sentence above.", "{concepts}", turned_around=True),
    ],
    references=_references,
    metrics=[rouge],
    cluster=CLUSTER,
)

add_task(
    "flan_dart",
    source=flan_source("gem/dart:1.1.0", validation="validation", test="test", num_train_examples=62_659),
    fields={"triples": _dart_triples, "target": "target"},
    templates=[
        T("Triples:\n{triples}\n\nWrite a sentence that states these facts.", "{target}"),
        T("{triples}\n\nDescribe the data above in plain English.", "{target}"),
        T("Turn these subject-relation-object facts into a fluent sentence:\n\n{triples}", "{target}"),
        T("Here is some structured data:\n{triples}\n\nExpress it as natural text.", "{target}"),
        T("Facts:\n{triples}\n\nWhat would a sentence that conveys all of this information look like?", "{target}"),
        T("Write one or two sentences covering every fact in this excerpt from a table.\n\n{triples}", "{target}"),
        T("Put the following data records into words.\n\n{triples}", "{target}"),
        T("Data:\n{triples}\n\nSentence:", "{target}"),
        T("Sentence: {target}\n\nExtract the facts in this sentence as data triples, one per line.", "{triples}", turned_around=True),
        T("{target}\n\nWhat structured data could this sentence have been written from?", "{triples}", turned_around=True),
    ],
    references=_references,
    metrics=[rouge],
    cluster=CLUSTER,
)

add_task(
    "flan_e2e_nlg",
    source=flan_source("gem/e2e_nlg:1.1.0", validation="validation", test="test", num_train_examples=33_525),
    fields={"attributes": _e2e_attributes, "target": "target"},
    templates=[
        T("Restaurant attributes: {attributes}\n\nWrite a description of this restaurant.", "{target}"),
        T("{attributes}\n\nTurn these details into a sentence someone might say when recommending the place.", "{target}"),
        T("Here is information about an eatery: {attributes}. Describe it in natural language.", "{target}"),
        T("Write a short blurb for a restaurant guide based on these facts: {attributes}", "{target}"),
        T("Details: {attributes}\n\nWhat is a sentence that includes all of these details?", "{target}"),
        T("Using the data below, write a sentence or two about the restaurant.\n\n{attributes}", "{target}"),
        T("A dining database lists the following for one place: {attributes}\n\nHow would you tell a friend about it?", "{target}"),
        T("{attributes}\n\nDescribe this place in plain English.", "{target}"),
        T("Description: {target}\n\nList the attributes of the restaurant described, as 'attribute: value' pairs.", "{attributes}", turned_around=True),
        T("{target}\n\nExtract the structured data (name, food, area, price range and so on) from this text.", "{attributes}", turned_around=True),
    ],
    metrics=[rouge],
    cluster=CLUSTER,
)

add_task(
    "flan_web_nlg_en",
    source=flan_source("gem/web_nlg_en:1.1.0", validation="validation", test="test", num_train_examples=35_426),
    fields={"triples": _webnlg_triples, "target": "target"},
    templates=[
        T("{triples}\n\nWrite a short text that expresses these facts.", "{target}"),
        T("Knowledge base entries (subject | relation | object):\n{triples}\n\nDescribe them in fluent English.", "{target}"),
        T("Generate a sentence from this data:\n\n{triples}", "{target}"),
        T("Here are some facts taken from DBpedia:\n{triples}\n\nWrite them up as a short passage.", "{target}"),
        T("Facts:\n{triples}\n\nWhat would be a natural way to say all of this?", "{target}"),
        T("Turn the following RDF triples into readable text.\n\n{triples}", "{target}"),
        T("{triples}\n\nA sentence that contains all of the above information:", "{target}"),
        T("You are writing an encyclopedia entry. Work these facts into it:\n{triples}", "{target}"),
        T("Text: {target}\n\nRepresent the facts in this text as triples of the form subject | relation | object, one per line.", "{triples}", turned_around=True),
        T("{target}\n\nWhich facts does this text state? Write them down as triples.", "{triples}", turned_around=True),
    ],
    references=_references,
    metrics=[rouge],
    cluster=CLUSTER,
)
