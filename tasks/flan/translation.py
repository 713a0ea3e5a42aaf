"""FLAN cluster `translation`: ParaCrawl EN-ES, WMT-14 FR-EN, WMT-16 DE/TR/CS/FI/RO/RU-EN, both directions."""

from __future__ import annotations

import tensorflow as tf

from flanjax.data.sources import flan_source
from flanjax.data.templated import add_task
from flanjax.data.templates import Template as T
from flanjax.eval.metrics import bleu

CLUSTER = "translation"

TEMPLATES = [
    T("Translate this {source_language} text into {target_language}:\n\n{source}", "{target}"),
    T("{source}\n\nHow would you say that in {target_language}?", "{target}"),
    T("{source_language}: {source}\n{target_language}:", "{target}"),
    T("Here is a sentence in {source_language}: \"{source}\"\n\nGive its {target_language} translation.", "{target}"),
    T("I need this in {target_language}, please. It is written in {source_language}.\n\n{source}", "{target}"),
    T("Render the following {source_language} passage in {target_language}, keeping its meaning.\n\n{source}", "{target}"),
    T("{source}\n\nThe text above is in {source_language}. What does it say in {target_language}?", "{target}"),
    T("What is the {target_language} equivalent of this {source_language} sentence?\n\n{source}", "{target}"),
    T("Source ({source_language}): {source}\n\nWrite the same thing in {target_language}.", "{target}"),
    T("You are a professional {source_language}-to-{target_language} translator. Translate:\n\n{source}", "{target}"),
]

FIELDS = {name: name for name in ("source_language", "target_language", "source", "target")}


def both_directions(code: str, language: str):
    """Each sentence pair becomes two examples: <language> -> English, then English -> <language>.

    Pairs whose two sides are the same text (left untranslated in web-crawled data) are dropped.
    """

    def pair(example):
        foreign, english = example[code], example["en"]
        return {
            "source_language": tf.constant([language, "English"]),
            "target_language": tf.constant(["English", language]),
            "source": tf.stack([foreign, english]),
            "target": tf.stack([english, foreign]),
        }

    def translated(example):
        return tf.not_equal(tf.strings.strip(example[code]), tf.strings.strip(example["en"]))

    def apply(ds: tf.data.Dataset) -> tf.data.Dataset:
        return ds.filter(translated).map(pair, num_parallel_calls=tf.data.AUTOTUNE).unbatch()

    apply.__name__ = f"both_directions_{code}_en"
    return apply


def _add(name: str, source, code: str, language: str) -> None:
    add_task(
        name,
        source=source,
        preprocessors=[both_directions(code, language)],
        fields=FIELDS,
        templates=TEMPLATES,
        metrics=[bleu],
        cluster=CLUSTER,
    )


# ParaCrawl has a train split only: its last 3,000 pairs (about a WMT newstest set) are the test split.
_add(
    "flan_para_crawl_en_es",
    flan_source("para_crawl/enes:1.2.0", test_from_train=3_000, num_train_examples=21_987_267),
    "es",
    "Spanish",
)

_add(
    "flan_wmt14_fr_en",
    flan_source("wmt14_translate/fr-en:1.0.0", validation="validation", test="test", num_train_examples=40_836_876),
    "fr",
    "French",
)

WMT16 = {
    # code: (language, published train size)
    "de": ("German", 4_548_885),
    "tr": ("Turkish", 205_756),
    "cs": ("Czech", 997_240),
    "fi": ("Finnish", 2_073_394),
    "ro": ("Romanian", 610_320),
    "ru": ("Russian", 1_516_162),
}
for _code, (_language, _size) in WMT16.items():
    _add(
        f"flan_wmt16_{_code}_en",
        flan_source(f"wmt16_translate/{_code}-en:1.0.0", validation="validation", test="test", num_train_examples=_size),
        _code,
        _language,
    )
