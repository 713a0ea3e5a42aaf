"""FLAN cluster `summarization`: AESLC, AG News (titles), CNN-DM, Gigaword, Multi-News, Newsroom, Opinion Abstracts (iDebate, Rotten Tomatoes), SAMSum, Wiki Lingua (English), XSum."""

from __future__ import annotations

import seqio
import tensorflow as tf

from flanjax.data.sources import flan_source
from flanjax.data.templated import add_task, label
from tasks.flan.text import detokenize
from flanjax.data.templates import Template as T
from flanjax.eval.metrics import rouge

CLUSTER = "summarization"
AG_TOPICS = ["world news", "sports", "business", "science and technology"]


def _replace(text, *rules):
    for pattern, rewrite in rules:
        text = tf.strings.regex_replace(text, pattern, rewrite)
    return text


def _numbered(values, limit: int = 10):
    """A list of sentences as "1. ...\\n2. ...", empty items dropped, at most `limit` of them."""
    values = tf.strings.strip(values)
    values = tf.boolean_mask(values, tf.strings.length(values) > 0)[:limit]
    numbers = tf.strings.as_string(tf.range(1, tf.size(values) + 1))
    return tf.strings.reduce_join(tf.strings.join([numbers, ". ", values]), separator="\n")


def _title_case(text):
    """Rotten Tomatoes movie names are URL slugs ("the_dark_knight"): spaces and capitals."""
    words = tf.strings.split(tf.strings.regex_replace(text, "_", " "))
    words = tf.strings.join([tf.strings.upper(tf.strings.substr(words, 0, 1)), tf.strings.substr(words, 1, 100_000)])
    return tf.strings.reduce_join(words, separator=" ")


@seqio.map_over_dataset
def _clean_aeslc(example):
    # A subject line can run over several lines of the file.
    return {**example, "subject_line": tf.strings.regex_replace(example["subject_line"], r"\s*\n\s*", " ")}


_AG_ESCAPES = [
    (r" #39;(s|t|ll|re|ve|d|m)\b", r"'\1"),  # "Iraq #39;s" -> "Iraq's"
    (r"#39;", "'"),
    (r"#36;", "$"),
    (r"&?quot;", '"'),
    (r"&lt;.*?&gt;", " "),  # escaped html tags (links, bold)
    (r"&amp;", "&"),
    (r"\\", " "),  # the CSV's stray backslashes ("dwindling\band")
    (r"  +", " "),
]


@seqio.map_over_dataset
def _clean_ag_news(example):
    """AG News keeps html escapes and backslashes; titles end in the wire's name, "(Reuters)"."""
    title = _replace(example["title"], *_AG_ESCAPES, (r"\s+\([A-Za-z][\w.]*(?: [A-Z][\w.]*){0,2}\)$", ""))
    return {**example, "title": title, "description": _replace(example["description"], *_AG_ESCAPES)}


@seqio.map_over_dataset
def _strip_bylines(example):
    """CNN stories open with "PLACE (CNN) -- ", Daily Mail ones with "By . NAME . PUBLISHED: . DATE . "."""
    article = _replace(
        example["article"],
        (r"^.{0,150}?\(CNN\)\s*(?:--\s*)?", ""),
        (r"^(?:.{0,300}?(?:19|20)\d\d \. (?:\| \. )?)+", ""),
        (r"^By \. [^.]{1,80}? \. ", ""),
    )
    return {**example, "article": article}


def _clean_gigaword(ds: tf.data.Dataset) -> tf.data.Dataset:
    """Gigaword is lower-cased and tokenized, with unknown words as <UNK> and digits as #:
    drop examples with either (as FLAN does) and restore brackets and quotes."""

    def usable(example):
        text = tf.strings.join([example["document"], example["summary"]], separator="\n")
        return tf.logical_not(tf.strings.regex_full_match(text, r"(?s).*(UNK|#).*"))

    def clean(example):
        rules = [("-lrb-", "("), ("-rrb-", ")"), ("-lsb-", "["), ("-rsb-", "]"), ("``|''", '"')]
        return {**example, **{k: _replace(example[k], *rules) for k in ("document", "summary")}}

    return ds.filter(usable).map(clean, num_parallel_calls=tf.data.AUTOTUNE)


@seqio.map_over_dataset
def _clean_multi_news(example):
    """Multi-News joins its source documents with "|||||" and opens each summary with "– "."""
    return {
        **example,
        "document": tf.strings.regex_replace(example["document"], r"\s*\|\|\|\|\|\s*", "\n\n"),
        "summary": tf.strings.regex_replace(example["summary"], r"^\s*–\s*", ""),
    }


@seqio.map_over_dataset
def _clean_samsum(example):
    return {**example, "dialogue": tf.strings.regex_replace(example["dialogue"], r"\r\n?", "\n")}


def _debate_arguments(example):
    return _numbered(detokenize(example["_argument_sentences"]["value"]))


add_task(
    "flan_aeslc",
    source=flan_source("aeslc:1.0.0", validation="validation", test="test", num_train_examples=14_436),
    preprocessors=[_clean_aeslc],
    fields={"body": "email_body", "subject": "subject_line"},
    templates=[
        T("{body}\n\nWrite a subject line for this email.", "{subject}"),
        T("Email:\n{body}\n\nWhat would be a good subject for it?", "{subject}"),
        T("Suggest a short subject line for the message below.\n\n{body}", "{subject}"),
        T("Here is the text of an email:\n\n{body}\n\nGive it a concise subject.", "{subject}"),
        T("{body}\n\nIn a few words, what is this email about?", "{subject}"),
        T("You are about to send this email:\n\n{body}\n\nWhat will you type into the subject field?", "{subject}"),
        T("Sum up the following email as a subject line.\n\n{body}", "{subject}"),
        T("Body of the email: {body}\n\nSubject line:", "{subject}"),
        T("Write an email with the subject line \"{subject}\".", "{body}", turned_around=True),
        T("Subject: {subject}\n\nDraft the body of this email.", "{body}", turned_around=True),
    ],
    metrics=[rouge],
    cluster=CLUSTER,
)

add_task(
    "flan_ag_news_subset",
    # No validation split: the 200 come from train, the test split is evaluated.
    source=flan_source("ag_news_subset:1.0.0", validation="train", test="test", num_train_examples=120_000),
    preprocessors=[_clean_ag_news],
    fields={"description": "description", "title": "title", "topic": label(AG_TOPICS)},
    templates=[
        T("{description}\n\nWrite a headline for this news story.", "{title}"),
        T("Give a title to the following piece of news.\n\n{description}", "{title}"),
        T("News: {description}\n\nWhat would be a fitting headline?", "{title}"),
        T("Here is the opening of a {topic} story:\n\n{description}\n\nSuggest a title for it.", "{title}"),
        T("{description}\n\nHeadline:", "{title}"),
        T("Come up with a short newspaper headline for this text: {description}", "{title}"),
        T("An editor needs a title for this {topic} article. Write one.\n\n{description}", "{title}"),
        T("What title would you give this news item?\n\n{description}", "{title}"),
        T("Write the first lines of a news story with the headline \"{title}\".", "{description}", turned_around=True),
        T("Headline: {title}\n\nWrite a short description of this {topic} article.", "{description}", turned_around=True),
    ],
    metrics=[rouge],
    cluster=CLUSTER,
)

add_task(
    "flan_cnn_dailymail",
    source=flan_source("cnn_dailymail:3.4.0", validation="validation", test="test", num_train_examples=287_113),
    preprocessors=[_strip_bylines],
    fields={"article": "article", "highlights": "highlights"},
    templates=[
        T("{article}\n\nWhat are the key points of this article?", "{highlights}"),
        T("Summarize this news story in a few short sentences.\n\n{article}", "{highlights}"),
        T("Article: {article}\n\nHighlights:", "{highlights}"),
        T("Read the news report below and write its main highlights.\n\n{article}", "{highlights}"),
        T("{article}\n\nGive me a brief summary of the story above.", "{highlights}"),
        T("Write the highlights a news website would show above this article:\n\n{article}", "{highlights}"),
        T("Here is a news article:\n{article}\n\nCondense it into a short summary.", "{highlights}"),
        T("{article}\n\nIn short, what happened?", "{highlights}"),
        T("Write a news article based on these highlights:\n\n{highlights}", "{article}", turned_around=True),
        T("Highlights:\n{highlights}\n\nExpand these points into a full news story.", "{article}", turned_around=True),
    ],
    metrics=[rouge],
    cluster=CLUSTER,
)

add_task(
    "flan_gigaword",
    source=flan_source("gigaword:1.2.0", validation="validation", test="test", num_train_examples=3_803_957),
    preprocessors=[_clean_gigaword],
    fields={"document": "document", "summary": "summary"},
    templates=[
        T("Generate a short headline for the following news lead: {document}", "{summary}"),
        T("{document}\n\nWhat is a good title for this?", "{summary}"),
        T("News snippet: {document}\n\nHeadline:", "{summary}"),
        T("Compress this sentence into a brief headline.\n\n{document}", "{summary}"),
        T("{document}\n\nSummarize the sentence above in a few words.", "{summary}"),
        T("Give a newspaper-style headline that captures this: {document}", "{summary}"),
        T("Here is the opening sentence of a wire story:\n\n{document}\n\nWhat headline would the story run under?", "{summary}"),
        T("Shorten the following into a headline.\n{document}", "{summary}"),
        T("Write the first sentence of a news story with this headline: {summary}", "{document}", turned_around=True),
        T("Headline: {summary}\n\nWhat might the article's opening sentence say?", "{document}", turned_around=True),
    ],
    metrics=[rouge],
    cluster=CLUSTER,
)

add_task(
    "flan_multi_news",
    # multi_news:1.0.0 (FLAN's) no longer loads in TFDS; 2.1.0 holds the same data from fixed URLs.
    source=flan_source("multi_news:2.1.0", validation="validation", test="test", num_train_examples=44_972),
    preprocessors=[_clean_multi_news],
    fields={"document": "document", "summary": "summary"},
    templates=[
        T("The following are several news reports on the same event.\n\n{document}\n\nWrite a summary combining them.", "{summary}"),
        T("{document}\n\nSummarize the articles above in a single piece.", "{summary}"),
        T("Articles:\n{document}\n\nSummary:", "{summary}"),
        T("Read these news stories and write a short overview of what they report.\n\n{document}", "{summary}"),
        T("{document}\n\nWhat is the gist of these reports?", "{summary}"),
        T("Combine the information from these sources into one concise news summary:\n\n{document}", "{summary}"),
        T("Here are some articles covering one story:\n\n{document}\n\nBriefly, what happened?", "{summary}"),
        T("Write a digest of the news coverage below.\n\n{document}", "{summary}"),
        T("Here is a summary of a news story:\n\n{summary}\n\nWrite the source articles it could have been drawn from.", "{document}", turned_around=True),
        T("{summary}\n\nExpand the summary above into full-length news coverage.", "{document}", turned_around=True),
    ],
    metrics=[rouge],
    cluster=CLUSTER,
)

add_task(
    "flan_newsroom",
    # Manual download (https://summari.es): put train/dev/test.jsonl in TFDS's manual_dir.
    source=flan_source("newsroom:1.0.0", validation="validation", test="test", num_train_examples=995_041),
    fields={"text": "text", "summary": "summary"},
    templates=[
        T("{text}\n\nWrite a short summary of this article.", "{summary}"),
        T("Article: {text}\n\nSummary:", "{summary}"),
        T("What is this news story about? Answer in a sentence or two.\n\n{text}", "{summary}"),
        T("Summarize:\n\n{text}", "{summary}"),
        T("{text}\n\nGive a one- or two-sentence blurb for the article above.", "{summary}"),
        T("Here is an article from a news site:\n\n{text}\n\nWrite the teaser that would appear under its link.", "{summary}"),
        T("Boil this article down to its main point.\n\n{text}", "{summary}"),
        T("{text}\n\nHow would you sum this up for a reader in a hurry?", "{summary}"),
        T("Write a news article that matches this summary: {summary}", "{text}", turned_around=True),
        T("Summary: {summary}\n\nNow write the full story.", "{text}", turned_around=True),
    ],
    metrics=[rouge],
    cluster=CLUSTER,
)

add_task(
    "flan_opinion_abstracts_idebate",
    # Opinion Abstracts has a train split only: its last 500 examples are the test split.
    source=flan_source("opinion_abstracts/idebate:1.0.0", test_from_train=500, num_train_examples=2_259),
    fields={
        "debate": lambda ex: tf.strings.regex_replace(ex["_debate_name"], "_", " "),
        "arguments": _debate_arguments,
        "claim": lambda ex: detokenize(ex["_claim"]),
    },
    templates=[
        T("Debate topic: {debate}\n\nArguments:\n{arguments}\n\nWhat claim do these arguments support?", "{claim}"),
        T("{arguments}\n\nSum up the point being argued above in one sentence.", "{claim}"),
        T("In a debate on \"{debate}\", someone made these points:\n{arguments}\n\nState their main claim.", "{claim}"),
        T("Read the arguments below and write the claim they back up.\n\n{arguments}", "{claim}"),
        T("Arguments:\n{arguments}\n\nClaim:", "{claim}"),
        T("What is the central claim of this reasoning about {debate}?\n\n{arguments}", "{claim}"),
        T("{arguments}\n\nWrite a short, headline-style claim that these sentences defend.", "{claim}"),
        T("Debate: {debate}\n{arguments}\n\nWhich position is being argued for here?", "{claim}"),
        T("Write some arguments supporting the claim \"{claim}\" in a debate about {debate}.", "{arguments}", turned_around=True),
        T("Claim: {claim}\n\nGive a few reasons why someone might hold this view.", "{arguments}", turned_around=True),
    ],
    metrics=[rouge],
    cluster=CLUSTER,
)

add_task(
    "flan_opinion_abstracts_rotten_tomatoes",
    source=flan_source("opinion_abstracts/rotten_tomatoes:1.0.0", test_from_train=500, num_train_examples=3_731),
    fields={
        "movie": lambda ex: _title_case(ex["_movie_name"]),
        "reviews": lambda ex: _numbered(ex["_critics"]["value"]),
        "consensus": "_critic_consensus",
    },
    templates=[
        T("Critics' reviews of {movie}:\n{reviews}\n\nWrite the critics' consensus.", "{consensus}"),
        T("Movie: {movie}\n\n{reviews}\n\nSummarize what these critics think of the film.", "{consensus}"),
        T("Here is what several critics said about {movie}:\n{reviews}\n\nIn one or two sentences, what is their overall verdict?", "{consensus}"),
        T("Reviews:\n{reviews}\n\nConsensus:", "{consensus}"),
        T("Combine these critic quotes about {movie} into a single summary opinion.\n\n{reviews}", "{consensus}"),
        T("{movie}\n\nCritics said:\n{reviews}\n\nHow was the film received overall?", "{consensus}"),
        T("{reviews}\n\nWrite a Rotten Tomatoes-style consensus for the film these reviews discuss.", "{consensus}"),
        T("Read the following snippets from reviews of {movie} and describe the general opinion.\n\n{reviews}", "{consensus}"),
        T("The critical consensus on {movie} was: \"{consensus}\"\n\nWrite a few short quotes critics might have given it.", "{reviews}", turned_around=True),
        T("Write some one-line critic reviews of {movie} that fit this overall verdict: {consensus}", "{reviews}", turned_around=True),
    ],
    metrics=[rouge],
    cluster=CLUSTER,
)

add_task(
    "flan_samsum",
    # Manual download (the corpus.7z of arXiv 1911.12237): train/val/test.json in manual_dir.
    source=flan_source("samsum:1.0.0", validation="validation", test="test", num_train_examples=14_732),
    preprocessors=[_clean_samsum],
    fields={"dialogue": "dialogue", "summary": "summary"},
    templates=[
        T("{dialogue}\n\nSummarize this conversation.", "{summary}"),
        T("Dialogue:\n{dialogue}\n\nSummary:", "{summary}"),
        T("Read the chat below and say briefly what it is about.\n\n{dialogue}", "{summary}"),
        T("{dialogue}\n\nWhat happened in this conversation? Answer in a sentence or two.", "{summary}"),
        T("Here is a messenger chat:\n\n{dialogue}\n\nWrite a short summary of it.", "{summary}"),
        T("Give a brief third-person account of the following exchange.\n\n{dialogue}", "{summary}"),
        T("{dialogue}\n\nIf you had to explain this chat to someone who missed it, what would you say?", "{summary}"),
        T("Sum up these text messages:\n\n{dialogue}", "{summary}"),
        T("Write a short chat conversation that fits this summary: {summary}", "{dialogue}", turned_around=True),
        T("{summary}\n\nWrite the text messages that could have led to this summary.", "{dialogue}", turned_around=True),
    ],
    metrics=[rouge],
    cluster=CLUSTER,
)

add_task(
    "flan_wiki_lingua_english_en",
    source=flan_source("gem/wiki_lingua_english_en:1.1.0", validation="validation", test="test", num_train_examples=99_020),
    fields={"source": "source", "target": "target"},
    templates=[
        T("{source}\n\nSummarize the instructions above.", "{target}"),
        T("Write a short summary of this how-to guide.\n\n{source}", "{target}"),
        T("How-to article:\n{source}\n\nSummary:", "{target}"),
        T("{source}\n\nWhat are the main steps described here? Keep it brief.", "{target}"),
        T("Condense the following instructions into a few sentences.\n\n{source}", "{target}"),
        T("Here is part of a how-to article:\n\n{source}\n\nGive the key points.", "{target}"),
        T("{source}\n\nIn a nutshell, what does this text tell you to do?", "{target}"),
        T("Read this guide and write an overview of it: {source}", "{target}"),
        T("Write a detailed how-to article based on this outline:\n\n{target}", "{source}", turned_around=True),
        T("Summary: {target}\n\nExpand this into step-by-step instructions with explanations.", "{source}", turned_around=True),
    ],
    metrics=[rouge],
    cluster=CLUSTER,
)

add_task(
    "flan_xsum",
    # Manual download (XSum's extraction scripts): xsum-extracts-from-downloads.tar.gz in manual_dir.
    source=flan_source("xsum:1.1.0", validation="validation", test="test", num_train_examples=203_577),
    fields={"document": "document", "summary": "summary"},
    templates=[
        T("{document}\n\nWhat is this article about, in one sentence?", "{summary}"),
        T("Summarize the following news article in a single sentence.\n\n{document}", "{summary}"),
        T("Article: {document}\n\nOne-sentence summary:", "{summary}"),
        T("{document}\n\nWrite a one-line summary of the text above.", "{summary}"),
        T("Read this BBC story and describe it in a single sentence.\n\n{document}", "{summary}"),
        T("Here is a news report:\n\n{document}\n\nGive the gist in one sentence.", "{summary}"),
        T("{document}\n\nSum up this article in a sentence.", "{summary}"),
        T("What is the main point of this story? Answer with one sentence.\n\n{document}", "{summary}"),
        T("Write a news article that this one-sentence summary describes: {summary}", "{document}", turned_around=True),
        T("Summary: {summary}\n\nWrite the article.", "{document}", turned_around=True),
    ],
    metrics=[rouge],
    cluster=CLUSTER,
)
