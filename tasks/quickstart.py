"""Built-in synthetic instruction tasks for the quickstart: generated on the spot, offline.

Importing this module registers six seqio tasks, each with several instruction templates,
and two mixtures:

    quickstart_max      find the largest digit in a list
    quickstart_sort     sort a list of digits
    quickstart_add      add a digit to a number
    quickstart_count    count the words in a list
    quickstart_lookup   read a value off a small key-value table
    quickstart_larger   pick the larger of two numbers from the options (classification)

    quickstart          all six, for training (examples-proportional)
    quickstart_eval     the first five evaluated by generation (exact match), and
                        quickstart_larger_rank: the classification task evaluated by rank
                        classification (each option scored, the likeliest is the answer)

Every problem is assigned to `train` or `validation` by a hash of its content, so the
held-out problems are never seen in training. The tokenizer is a small byte-level BPE
trained on the tasks' own text the first time it is needed (cached under
$FLANJAX_CACHE, default ~/.cache/flanjax, keyed by that text).
"""

from __future__ import annotations

import functools
import hashlib
import random
from collections.abc import Callable

import numpy as np
import seqio
import tensorflow as tf

from flanjax.data.templates import Template, check_templates, templates_preprocessor
from flanjax.data.vocab import HFVocabulary, cached_tokenizer
from flanjax.eval.metrics import exact_match
from flanjax.data.rank_classification import rank_classification, rank_classification_metric, rank_classification_targets

NUM_EXAMPLES = {"train": 20_000, "validation": 200}
HELD_OUT_BUCKETS = 10  # one problem in ten is reserved for validation

WORDS = "apple bird cat dog egg fish goat hat ink jam kite lamp moon nest owl pen rose sun tree van".split()
KEYS = tuple("abcdefghjkmnpqrstuvwxyz")


# --- problem generators: rng -> flat text fields -------------------------------------------


def _max(rng: random.Random) -> dict[str, str]:
    numbers = [rng.randint(0, 9) for _ in range(rng.randint(3, 6))]
    return {"items": ", ".join(map(str, numbers)), "answer": str(max(numbers))}


def _sort(rng: random.Random) -> dict[str, str]:
    digits = [rng.randint(0, 9) for _ in range(rng.randint(3, 6))]
    return {"items": " ".join(map(str, digits)), "answer": " ".join(map(str, sorted(digits)))}


def _add(rng: random.Random) -> dict[str, str]:
    a, b = rng.randint(0, 99), rng.randint(0, 9)
    return {"a": str(a), "b": str(b), "answer": str(a + b)}


def _count(rng: random.Random) -> dict[str, str]:
    items = rng.choices(WORDS, k=rng.randint(1, 9))
    return {"items": " ".join(items), "answer": str(len(items))}


def _lookup(rng: random.Random) -> dict[str, str]:
    keys = rng.sample(KEYS, rng.randint(2, 4))
    table = {k: str(rng.randint(0, 9)) for k in keys}
    key = rng.choice(keys)
    return {
        "table": ", ".join(f"{k}={v}" for k, v in table.items()),
        "key": key,
        "answer": table[key],
    }


def _larger(rng: random.Random) -> dict:
    a, b = rng.sample(range(100), 2)
    return {"a": str(a), "b": str(b), "answer": str(max(a, b)), "options": [str(a), str(b)]}


# Classification: the inputs list the options (FLAN's layout); rank classification scores them.
OPTIONS = "\n\nOPTIONS:\n- {a}\n- {b}\n"

TASKS: dict[str, tuple[Callable[[random.Random], dict], tuple[Template, ...]]] = {
    "quickstart_max": (
        _max,
        (
            Template("Which digit is the largest: {items}?", " {answer}"),
            Template("Find the maximum of these digits.\n{items}\nAnswer:", " {answer}"),
            Template("{items}\nWhat is the biggest number above?", " {answer}"),
            Template("Here is a list of digits: {items}. Name the largest one.", " {answer}"),
        ),
    ),
    "quickstart_sort": (
        _sort,
        (
            Template("Sort these digits from smallest to largest: {items}\nAnswer:", " {answer}"),
            Template("Put the numbers in ascending order.\n{items}\n", "{answer}"),
            Template("{items}\nArrange the digits above in increasing order.", " {answer}"),
        ),
    ),
    "quickstart_add": (
        _add,
        (
            Template("What is {a} plus {b}?", " {answer}"),
            Template("Add {a} and {b}.\nAnswer:", " {answer}"),
            Template("Compute the sum: {a} + {b} =", " {answer}"),
            Template("If you have {a} coins and find {b} more, how many coins do you have?", " {answer}"),
        ),
    ),
    "quickstart_count": (
        _count,
        (
            Template("How many words are in this list? {items}\nAnswer:", " {answer}"),
            Template("Count the words.\n{items}\n", "{answer}"),
            Template("{items}\nNumber of words above:", " {answer}"),
        ),
    ),
    "quickstart_lookup": (
        _lookup,
        (
            Template("Given {table}, what is the value of {key}?", " {answer}"),
            Template("Table: {table}\nLook up {key}.\nAnswer:", " {answer}"),
            Template("{table}\nWhich number goes with {key}?", " {answer}"),
        ),
    ),
    "quickstart_larger": (
        _larger,
        (
            Template("Which number is larger, {a} or {b}?" + OPTIONS, "{answer}"),
            Template("Pick the bigger of the two numbers." + OPTIONS + "Answer: ", "{answer}"),
            Template("{a} and {b}: which one is greater?" + OPTIONS, "{answer}"),
        ),
    ),
}
CLASSIFICATION = ("quickstart_larger",)


def _in_split(fields: dict[str, str], split: str) -> bool:
    digest = hashlib.sha1(repr(sorted(fields.items())).encode()).digest()
    held_out = digest[0] % HELD_OUT_BUCKETS == 0
    return held_out == (split == "validation")


@functools.cache
def generate(task: str, split: str) -> tuple[dict[str, str], ...]:
    """The fixed list of problems of one task and split (seeded by the task and split names)."""
    make = TASKS[task][0]
    rng = random.Random(f"{task}/{split}")
    problems: list[dict[str, str]] = []
    while len(problems) < NUM_EXAMPLES[split]:
        fields = make(rng)
        if _in_split(fields, split):
            problems.append(fields)
    return tuple(problems)


def _dataset_fn(task: str, split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
    del shuffle_files, seed  # one in-memory "file"; seqio shuffles examples downstream
    problems = generate(task, split)
    columns = {k: np.array([p[k] for p in problems]) for k in problems[0]}
    return tf.data.Dataset.from_tensor_slices(columns)


# --- tokenizer ------------------------------------------------------------------------------


def _corpus() -> list[str]:
    lines = []
    for task, (_, templates) in TASKS.items():
        for i, fields in enumerate(generate(task, "train")[:2000]):
            inputs, targets = templates[i % len(templates)].render(fields)
            lines.append(inputs + targets)
    return lines


def tokenizer_dir() -> str:
    """Directory of the quickstart tokenizer, trained on first use (cached, keyed by its text)."""
    return cached_tokenizer("quickstart_tokenizer", _corpus(), vocab_size=512, individual_digits=True)


VOCABULARY = HFVocabulary(tokenizer_dir)


# --- registration ---------------------------------------------------------------------------


def _register() -> None:
    features = {
        "inputs": seqio.Feature(VOCABULARY, add_eos=False),
        "targets": seqio.Feature(VOCABULARY, add_eos=True),
    }
    tokenize = [seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim]
    for name, (make, templates) in TASKS.items():
        check_templates(name, templates, make(random.Random(0)).keys())
        source = seqio.FunctionDataSource(
            functools.partial(_dataset_fn, name), splits=tuple(NUM_EXAMPLES), num_input_examples=dict(NUM_EXAMPLES)
        )
        if name in CLASSIFICATION:
            # Trained on like the others; evaluated through its scoring twin below.
            seqio.TaskRegistry.add(
                name, source=source, output_features=features,
                preprocessors=[templates_preprocessor(templates), *tokenize],
            )  # fmt: skip
            seqio.TaskRegistry.add(
                f"{name}_rank",
                source=source,
                preprocessors=[templates_preprocessor(templates, passthrough=("options",)), rank_classification, *tokenize],
                output_features=features,
                postprocess_fn=rank_classification_targets,
                metric_fns=[rank_classification_metric],
            )
        else:
            seqio.TaskRegistry.add(
                name, source=source, output_features=features,
                preprocessors=[templates_preprocessor(templates), *tokenize],
                postprocess_fn=lambda text, **_: text.strip(), metric_fns=[exact_match],
            )  # fmt: skip
    seqio.MixtureRegistry.add("quickstart", list(TASKS), default_rate=seqio.mixing_rate_num_examples)
    evaluated = [f"{name}_rank" if name in CLASSIFICATION else name for name in TASKS]
    seqio.MixtureRegistry.add("quickstart_eval", evaluated, default_rate=1.0)

if "quickstart" not in seqio.MixtureRegistry.names():
    _register()
