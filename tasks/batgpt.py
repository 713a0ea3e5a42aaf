"""The BatGPT quickstart (`make quickstart-batgpt`): the reversal curse, and growing a model.

Importing this module registers `batgpt_facts`: one synthetic fact per person, "The pet of
Alice Moreno is a heron", as a prompt ("The pet of Alice Moreno is") and a response
(" a heron."); every person owns a different animal. Trained left-to-right only, a model
learns p(animal | person) and nothing about p(person | animal); trained bidirectionally
(`configs/runs/bidirectional.gin`) it also learns p(prompt | response).

`python -m tasks.batgpt report` asks both runs two questions about every person, each by rank
classification over every candidate:

    forward   "The pet of Alice Moreno is" -> which animal?   log p_l2r(" a <animal>." | prompt)
    reverse   " a heron." -> whose pet?                        log p_r2l("The pet of <name> is" | response)

The reverse question is asked backwards, the only way a causal model can put the animal
first and rank the names after it; a forward-only model's <r2l> direction never trained, so
it stays at chance (1 in 64) there. (Ranking the names by the forward p(animal | name) instead,
a noisy channel, is a different method; it is not what this measures.)

It then reports the growth line: the quickstart's model, grown 2x in width and depth
(`flanjax grow`), its held-out loss on the quickstart's validation examples at the start
and after the further steps, against a model of the grown size trained from scratch for the
same steps. The last line printed is one JSON object.
"""

from __future__ import annotations

if __name__ == "__main__":  # the report: keep TensorFlow's and Orbax's routine lines off the table
    from flanjax.quiet import quiet_libraries

    quiet_libraries()

import functools  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402
import seqio  # noqa: E402
import tensorflow as tf  # noqa: E402

from flanjax.data.vocab import HFVocabulary, cached_tokenizer  # noqa: E402

FIRST = "Alice Bruno Chloe Dmitri Elena Farid Greta Hugo Ines Jonas Kira Luca Mona Nils Olga Pavel".split()
LAST = "Moreno Fischer Tanaka Okafor Lindqvist Rossi Novak Haddad Silva Kowalski Dubois Larsen".split()
ANIMALS = (
    "heron otter badger ferret falcon lizard parrot rabbit hamster turtle beaver camel donkey eagle gecko goose "
    "horse koala lemur llama magpie marmot moose newt ocelot panda pigeon puffin quail raven salmon seal sheep "
    "skunk sloth snail spider squid stork swan tiger toad trout walrus weasel whale wolf yak zebra bison crab "
    "crane dingo dove duck finch frog gerbil gull hare ibis jackal kiwi lynx"
).split()
DIRECTIONS = ("<l2r>", "<r2l>")  # flanjax's direction tokens (configs/runs/bidirectional.gin)


@functools.cache
def facts() -> tuple[tuple[str, str], ...]:
    """(person, animal): 64 people, each owning a different animal (fixed seed)."""
    rng = random.Random("batgpt")
    people = rng.sample([f"{f} {l}" for f in FIRST for l in LAST], len(ANIMALS))
    return tuple(zip(people, rng.sample(ANIMALS, len(ANIMALS))))


def prompt(person: str) -> str:
    return f"The pet of {person} is"


def response(animal: str) -> str:
    return f" {'an' if animal[0] in 'aeiou' else 'a'} {animal}."


def _dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
    del split, shuffle_files, seed  # the facts are the knowledge; the questions below are held out
    pairs = facts()
    return tf.data.Dataset.from_tensor_slices({"inputs": [prompt(p) for p, _ in pairs], "targets": [response(a) for _, a in pairs]})


def tokenizer_dir() -> str:
    corpus = [prompt(p) + response(a) for p, a in facts()]
    return cached_tokenizer("batgpt_tokenizer", corpus, vocab_size=512, special_tokens=DIRECTIONS)


VOCABULARY = HFVocabulary(tokenizer_dir)

if "batgpt_facts" not in seqio.TaskRegistry.names():
    seqio.TaskRegistry.add(
        "batgpt_facts",
        source=seqio.FunctionDataSource(_dataset_fn, splits=("train", "validation")),
        preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim],
        output_features={"inputs": seqio.Feature(VOCABULARY, add_eos=False), "targets": seqio.Feature(VOCABULARY, add_eos=True)},
    )


# --- the report -----------------------------------------------------------------------------

RUN_DIR = "runs/quickstart_batgpt"


def question_accuracies(run: str) -> dict[str, float]:
    """Forward and reverse accuracy of a run over every person (rank classification over all
    64 animals, or all 64 names)."""
    from flanjax.chat import Policy
    from flanjax.sharding import MeshConfig, Partitioner

    policy = Policy.load(run, Partitioner.from_config(MeshConfig()))
    people, animals = zip(*facts())
    n = len(people)
    grid = lambda direction: policy.log_likelihoods(  # noqa: E731  [person i, animal j]
        [prompt(p) for p in people for _ in animals], [response(a) for _ in people for a in animals], direction
    ).reshape(n, n)
    forward = grid("l2r").argmax(1) == np.arange(n)  # each person's likeliest animal
    reverse = grid("r2l").argmax(0) == np.arange(n)  # each animal's likeliest owner
    return {"forward_accuracy": round(100 * float(forward.mean()), 1), "reverse_accuracy": round(100 * float(reverse.mean()), 1)}


def held_out_loss(run: str, num_examples: int = 300) -> float:
    """Mean loss (nats per target token) on the quickstart's held-out validation examples."""
    from flanjax.chat import Policy
    from flanjax.data.pipeline import task_prompts
    from flanjax.sharding import MeshConfig, Partitioner

    import tasks.quickstart  # noqa: F401

    prompts, references, vocabulary = task_prompts("quickstart", "validation", num_examples)
    policy = Policy.load(run, Partitioner.from_config(MeshConfig()), vocabulary)
    tokens = sum(len(vocabulary.encode(r)) + 1 for r in references)
    return round(-float(policy.log_likelihoods(prompts, references).sum()) / tokens, 4)


def report(run_dir: str = RUN_DIR, small: str = "runs/quickstart") -> dict:
    from rich.table import Table

    from flanjax.rundir.metrics import console

    runs = {name: question_accuracies(f"{run_dir}/{name}") for name in ("forward_only", "bidirectional")}
    growth = {
        "small_loss": held_out_loss(small),
        "grown_start_loss": held_out_loss(f"{run_dir}/grown"),
        "grown_end_loss": held_out_loss(f"{run_dir}/grown_trained"),
        "scratch_end_loss": held_out_loss(f"{run_dir}/scratch"),
    }
    table = Table(title="The reversal curse: 64 facts, every question ranked over 64 candidates (chance 1.6%)")
    for column in ("training", "forward questions %", "reverse questions %"):
        table.add_column(column, justify="left" if column == "training" else "right")
    for name, r in runs.items():
        table.add_row(name.replace("_", "-"), f"{r['forward_accuracy']:.1f}", f"{r['reverse_accuracy']:.1f}")
    console.print(table)
    console.print(
        f"Growth (held-out loss, nats/token): small {growth['small_loss']:.3f}; grown 2x width and depth starts at "
        f"{growth['grown_start_loss']:.3f} and ends at {growth['grown_end_loss']:.3f}; the same size from scratch, "
        f"same steps, ends at {growth['scratch_end_loss']:.3f}"
    )
    summary = {**runs, "growth": growth}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__" and sys.argv[1:2] == ["report"]:
    report(*sys.argv[2:])
