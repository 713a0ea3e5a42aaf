"""FLAN cluster `sentiment`: IMDB, Sentiment140, SST-2, Yelp (negative / positive)."""

from __future__ import annotations

import seqio
import tensorflow as tf

from flanjax.data.sources import flan_source
from flanjax.data.templated import add_task, label
from flanjax.data.templates import Template as T

CLUSTER = "sentiment"
POLARITY = ["negative", "positive"]


def _strip_html(ds: tf.data.Dataset) -> tf.data.Dataset:
    """IMDB reviews keep the site's line breaks as `<br />` tags."""

    def clean(example):
        return {**example, "text": tf.strings.regex_replace(example["text"], r"<br\s*/?>", " ")}

    return ds.map(clean, num_parallel_calls=tf.data.AUTOTUNE)


def _unescape_yelp(ds: tf.data.Dataset) -> tf.data.Dataset:
    """Yelp reviews hold literal `\\n` and `\\"` escapes."""

    def clean(example):
        text = tf.strings.regex_replace(example["text"], r"\\n", " ")
        return {**example, "text": tf.strings.regex_replace(text, r'\\"', '"')}

    return ds.map(clean, num_parallel_calls=tf.data.AUTOTUNE)


@seqio.map_over_dataset
def _tweet_polarity(example):
    # Sentiment140 polarity: 0 negative, 2 neutral (test only), 4 positive.
    return {**example, "polarity": tf.where(example["polarity"] >= 2, 1, 0)}


def _binary_tweets(ds: tf.data.Dataset) -> tf.data.Dataset:
    return _tweet_polarity(ds.filter(lambda ex: tf.not_equal(ex["polarity"], 2)))


MOVIE_REVIEW = [
    T("{text}\n\nIs this movie review positive or negative?", "{answer}"),
    T("Review: {text}\n\nWas the reviewer's opinion of the film positive or negative?", "{answer}"),
    T("{text}\n\nHow would you describe the sentiment of this review?", "{answer}"),
    T("Read the following film review and say whether its tone is positive or negative.\n\n{text}", "{answer}"),
    T("Someone wrote this about a movie:\n\n{text}\n\nDid they come away with a positive or a negative impression?", "{answer}"),
    T("Classify the sentiment of the review below.\n\n{text}", "{answer}"),
    T("{text}\n\nIs the writer's verdict on this movie negative or positive?", "{answer}"),
    T("Write a {answer} review of a movie.", "{text}", turned_around=True),
    T("Compose a short film critique that comes across as {answer}.", "{text}", turned_around=True),
    T("Give me an example of a {answer} movie review.", "{text}", turned_around=True),
]

add_task(
    "flan_imdb",
    source=flan_source("imdb_reviews/plain_text:1.0.0", validation="train", test="test", num_train_examples=25_000),
    preprocessors=[_strip_html],
    fields={"text": "text", "answer": label(POLARITY)},
    templates=MOVIE_REVIEW,
    options=POLARITY,
    cluster=CLUSTER,
)

add_task(
    "flan_sentiment140",
    source=flan_source("sentiment140:1.0.0", validation="train", test="test", num_train_examples=1_600_000),
    preprocessors=[_binary_tweets],
    fields={"text": "text", "answer": label(POLARITY, "polarity")},
    templates=[
        T("Tweet: {text}\n\nWhat is the mood of this tweet?", "{answer}"),
        T("{text}\n\nDoes the person who posted this sound positive or negative?", "{answer}"),
        T("Here is a tweet: \"{text}\"\n\nWould you call its sentiment positive or negative?", "{answer}"),
        T("Decide whether this tweet expresses a positive or a negative feeling.\n\n{text}", "{answer}"),
        T("{text}\n\nSentiment of the tweet above:", "{answer}"),
        T("Label this social media post by its tone.\n\nPost: {text}", "{answer}"),
        T("Someone tweeted: {text}\n\nHow do they feel?", "{answer}"),
        T("Write a tweet that sounds {answer}.", "{text}", turned_around=True),
        T("Post something short on social media in a {answer} mood.", "{text}", turned_around=True),
        T("Make up a {answer} tweet about your day.", "{text}", turned_around=True),
    ],
    options=POLARITY,
    cluster=CLUSTER,
)

add_task(
    "flan_sst2",
    # SST-2's test labels are hidden: its validation split is the test split.
    source=flan_source("glue/sst2:2.0.0", validation="train", num_train_examples=67_349),
    fields={"sentence": "sentence", "answer": label(POLARITY)},
    templates=[
        T("\"{sentence}\"\n\nIs this phrase from a movie review positive or negative?", "{answer}"),
        T("What sentiment does this movie review snippet carry?\n\n{sentence}", "{answer}"),
        T("{sentence}\n\nJudging by this sentence, was the critic's view of the film positive or negative?", "{answer}"),
        T("Sentence from a review: {sentence}\n\nIs the tone negative (disapproving) or positive (approving)?", "{answer}"),
        T("Tell me whether the following movie review excerpt is positive or negative: {sentence}", "{answer}"),
        T("{sentence}\n\nHow does the reviewer feel about the movie?", "{answer}"),
        T("Judge the sentiment of this fragment of a film review.\n\n{sentence}", "{answer}"),
        T("A viewer said: {sentence}\n\nWas that a positive remark or a negative one?", "{answer}"),
        T("Write a short {answer} remark about a film.", "{sentence}", turned_around=True),
        T("Give one sentence a critic might write in a {answer} review.", "{sentence}", turned_around=True),
    ],
    options=POLARITY,
    cluster=CLUSTER,
)

add_task(
    "flan_yelp",
    source=flan_source("yelp_polarity_reviews:0.2.0", validation="train", test="test", num_train_examples=560_000),
    preprocessors=[_unescape_yelp],
    fields={"text": "text", "answer": label(POLARITY)},
    templates=[
        T("{text}\n\nIs this business review positive or negative?", "{answer}"),
        T("Yelp review: {text}\n\nWas the customer's experience positive or negative?", "{answer}"),
        T("Here is what a customer wrote:\n\n{text}\n\nHow would you rate the sentiment?", "{answer}"),
        T("Read this review of a local business and tell me whether it is positive or negative.\n\n{text}", "{answer}"),
        T("{text}\n\nDid this person leave a positive or a negative review?", "{answer}"),
        T("Classify the following restaurant or shop review by sentiment: {text}", "{answer}"),
        T("{text}\n\nJudging by their tone, is this reviewer negative or positive about the place?", "{answer}"),
        T("Write a {answer} Yelp review.", "{text}", turned_around=True),
        T("Describe a visit to a restaurant in a {answer} review.", "{text}", turned_around=True),
        T("Imagine you are a customer. Leave a {answer} review for a business you visited.", "{text}", turned_around=True),
    ],
    options=POLARITY,
    cluster=CLUSTER,
)
