"""Regenerated bAbI-style question answering (after Weston et al.'s 20 tasks, which E2WM evaluates
on): our own seeded generator, sentences, names and places; not the published data.

Importing this module registers, for each of the seven tasks below, a generation task
`babi_regen_<task>` (exact match on the answer) and a multiple-choice twin
`babi_regen_<task>_mc` (rank classification, answers scored per token as E2WM does), with
train / validation / test splits generated in memory from `SEED`, plus the mixture
`babi_regen` of the generation tasks.

    single_supporting_fact   Where is Alice?                          -> garage
    two_supporting_facts     Where is the key?                         -> cellar  (who holds it, where they went)
    three_supporting_facts   Where was the key before the porch?       -> attic   (the key's route)
    yes_no_questions         Is Bruno in the library?                  -> yes / no
    counting                 How many objects is Chloe carrying?       -> none / one / two / three
    lists_sets               What is Chloe carrying?                   -> book, hat  (alphabetical; "nothing")
    simple_negation          Is Hugo in the attic?                     -> yes / no  ("Hugo is not in the attic.")

An example's inputs are the story, one sentence a line, then `Question: <q>\\nAnswer:`; its
target is " <answer>". Every question asked is decided by the story: a person acts on
objects only after a sentence has placed them, and negation asks only about the place denied.
"""

from __future__ import annotations

import dataclasses
import functools
import random
from collections.abc import Callable

import numpy as np
import seqio
import tensorflow as tf

from flanjax.data.rank_classification import AnswerScoring, rank_classification_targets
from flanjax.data.vocab import DEFAULT_VOCABULARY
from flanjax.eval.metrics import exact_match

SEED = 0
NUM_EXAMPLES = {"train": 1000, "validation": 200, "test": 200}

PEOPLE = ("Alice", "Bruno", "Chloe", "Dmitri", "Esme", "Farid", "Greta", "Hugo")
PLACES = ("attic", "cellar", "garage", "garden", "kitchen", "library", "porch", "studio")
THINGS = ("apple", "ball", "book", "candle", "hat", "key", "lamp", "umbrella")
MOVE = ("went to", "walked to", "moved to", "travelled to", "journeyed to", "ran to")
TAKE = ("picked up", "took", "grabbed", "got")
DROP = ("dropped", "put down", "left", "discarded")
NUMBERS = ("none", "one", "two", "three")
MAX_CARRIED = len(NUMBERS) - 1


@dataclasses.dataclass
class _World:
    """What the story so far says: where each person is (None: denied, so unknown), what they
    hold (in pick-up order), where dropped things lie, and each thing's route of places."""

    where: dict[str, str | None] = dataclasses.field(default_factory=dict)
    holding: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    lying: dict[str, str] = dataclasses.field(default_factory=dict)
    route: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    denied: dict[str, str] = dataclasses.field(default_factory=dict)  # person -> the place a sentence denied

    def holder(self, thing: str) -> str | None:
        return next((p for p, held in self.holding.items() if thing in held), None)

    def place_of(self, thing: str) -> str | None:
        holder = self.holder(thing)
        return self.where.get(holder) if holder else self.lying.get(thing)

    def visit(self, thing: str, place: str) -> None:
        route = self.route.setdefault(thing, [])
        if not route or route[-1] != place:
            route.append(place)


# --- story actions: (world, rng, people) -> a sentence, or None when not applicable --------


def _move(world: _World, rng: random.Random, people: list[str]) -> str:
    person = rng.choice(people)
    place = rng.choice([p for p in PLACES if p != world.where.get(person)])
    world.where[person] = place
    world.denied.pop(person, None)
    for thing in world.holding.get(person, []):
        world.visit(thing, place)
    return f"{person} {rng.choice(MOVE)} the {place}."


def _take(world: _World, rng: random.Random, people: list[str]) -> str | None:
    placed = [p for p in people if world.where.get(p) and len(world.holding.get(p, [])) < MAX_CARRIED]
    if not placed:
        return None
    person = rng.choice(placed)
    here = world.where[person]
    # Unmentioned things are wherever they are first picked up; dropped ones only where they lie.
    free = [t for t in THINGS if t not in world.route or (world.holder(t) is None and world.lying.get(t) == here)]
    if not free:
        return None
    thing = rng.choice(free)
    world.holding.setdefault(person, []).append(thing)
    world.lying.pop(thing, None)
    world.visit(thing, here)
    return f"{person} {rng.choice(TAKE)} the {thing}."


def _drop(world: _World, rng: random.Random, people: list[str]) -> str | None:
    holders = [p for p in people if world.holding.get(p)]
    if not holders:
        return None
    person = rng.choice(holders)
    thing = rng.choice(world.holding[person])
    world.holding[person].remove(thing)
    world.lying[thing] = world.where[person]
    return f"{person} {rng.choice(DROP)} the {thing}."


def _deny(world: _World, rng: random.Random, people: list[str]) -> str:
    """"X is no longer in the P" (P where X was) or "X is not in the P": X's place is now unknown."""
    person = rng.choice(people)
    current = world.where.get(person)
    if current and rng.random() < 0.5:
        place, phrase = current, "is no longer in"
    else:
        place, phrase = rng.choice([p for p in PLACES if p != current]), "is not in"
    world.where[person] = None
    world.denied[person] = place
    return f"{person} {phrase} the {place}."


# --- questions: (world, rng, people in the story) -> (question, answer), or None -------------


def _where_person(world, rng, people):
    placed = [p for p in people if world.where.get(p)]
    if not placed:
        return None
    person = rng.choice(placed)
    return f"Where is {person}?", world.where[person]


def _where_thing(world, rng, people):
    known = [t for t in world.route if world.place_of(t)]
    held = [t for t in known if world.holder(t)]
    if not known:
        return None
    thing = rng.choice(held if held and rng.random() < 0.8 else known)  # mostly two facts: holder and their move
    return f"Where is the {thing}?", world.place_of(thing)


def _where_before(world, rng, people):
    # A place the thing visited once, after another one: "before" then names one place.
    asks = [(t, i) for t, route in world.route.items() for i in range(1, len(route)) if route.count(route[i]) == 1]
    if not asks:
        return None
    thing, i = rng.choice(asks)
    return f"Where was the {thing} before the {world.route[thing][i]}?", world.route[thing][i - 1]


def _is_in(world, rng, people):
    """Yes or no with equal odds; a denied person is asked only about the place denied (no)."""
    want_yes = rng.random() < 0.5
    asks = [(p, world.where[p]) for p in people if world.where.get(p)]
    if not want_yes:
        asks = [(p, rng.choice([q for q in PLACES if q != place])) for p, place in asks]
        asks += [(p, place) for p, place in world.denied.items()]
    if not asks:
        return None
    person, place = rng.choice(asks)
    return f"Is {person} in the {place}?", "yes" if want_yes else "no"


def _by_answer(people, answer, rng):
    """A person drawn so that every answer the story allows is equally likely (most people
    carry nothing, so "none" would otherwise dominate)."""
    answers = {}
    for person in people:
        answers.setdefault(answer(person), []).append(person)
    return rng.choice(answers[rng.choice(sorted(answers))])


def _how_many(world, rng, people):
    count = lambda p: NUMBERS[len(world.holding.get(p, []))]  # noqa: E731
    person = _by_answer(people, count, rng)
    return f"How many objects is {person} carrying?", count(person)


def _what_carried(world, rng, people):
    carried = lambda p: carried_answer(world.holding.get(p, []))  # noqa: E731
    person = _by_answer(people, carried, rng)
    return f"What is {person} carrying?", carried(person)


def carried_answer(things) -> str:
    """The lists/sets answer: the things in alphabetical order, or "nothing"."""
    return ", ".join(sorted(things)) or "nothing"


# --- tasks ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BabiTask:
    name: str
    actions: tuple[tuple[Callable, float], ...]  # (action, weight)
    question: Callable
    num_people: tuple[int, int]
    num_sentences: tuple[int, int]
    options: tuple[str, ...] | None  # the fixed answer set; None: drawn per example (lists/sets)


OBJECT_ACTIONS = ((_move, 0.5), (_take, 0.3), (_drop, 0.2))
CARRY_ACTIONS = ((_move, 0.3), (_take, 0.45), (_drop, 0.25))  # counting, lists: more in hand
TASKS = {
    t.name: t
    for t in (
        BabiTask("single_supporting_fact", ((_move, 1.0),), _where_person, (2, 4), (2, 8), PLACES),
        BabiTask("two_supporting_facts", OBJECT_ACTIONS, _where_thing, (2, 4), (4, 12), PLACES),
        BabiTask("three_supporting_facts", OBJECT_ACTIONS, _where_before, (1, 3), (6, 16), PLACES),
        BabiTask("yes_no_questions", OBJECT_ACTIONS, _is_in, (2, 4), (2, 8), ("yes", "no")),
        BabiTask("counting", CARRY_ACTIONS, _how_many, (1, 3), (3, 10), NUMBERS),
        BabiTask("lists_sets", CARRY_ACTIONS, _what_carried, (1, 3), (3, 10), None),
        BabiTask("simple_negation", ((_move, 0.6), (_deny, 0.4)), _is_in, (2, 4), (2, 8), ("yes", "no")),
    )
}


def task_name(task: str, multiple_choice: bool = False) -> str:
    return f"babi_regen_{task}" + ("_mc" if multiple_choice else "")


def render(story: list[str], question: str) -> str:
    return "\n".join(story) + f"\nQuestion: {question}\nAnswer:"


def first_line(text: str, **_) -> str:
    """seqio postprocess_fn: the answer is the first line, as E2WM cuts its generations."""
    return text.strip().split("\n")[0].strip()


def _example(task: BabiTask, rng: random.Random) -> dict:
    while True:  # rarely a story leaves nothing to ask (no one placed, no route): draw again
        people = rng.sample(PEOPLE, rng.randint(*task.num_people))
        world, story, length = _World(), [], rng.randint(*task.num_sentences)
        actions, weights = zip(*task.actions)
        while len(story) < length:
            sentence = rng.choices(actions, weights)[0](world, rng, people)
            if sentence:
                story.append(sentence)
        named = [p for p in people if any(s.startswith(p + " ") for s in story)]
        asked = task.question(world, rng, named)
        if asked:
            break
    question, answer = asked
    options = task.options or _list_options(answer, rng)
    return {"inputs": render(story, question), "targets": f" {answer}", "answer": answer, "options": [f" {o}" for o in options]}


def _list_options(answer: str, rng: random.Random, k: int = 4) -> tuple[str, ...]:
    """The answer and k-1 other sets of up to MAX_CARRIED things, in random order."""
    options = {answer}
    while len(options) < k:
        options.add(carried_answer(rng.sample(THINGS, rng.randint(0, MAX_CARRIED))))
    return tuple(rng.sample(sorted(options), k))


@functools.cache
def generate(task: str, split: str, seed: int = SEED, num_examples: int | None = None) -> tuple[dict, ...]:
    """The examples of one task and split: the same for the same seed, on any machine."""
    rng = random.Random(f"babi_regen/{seed}/{task}/{split}")
    return tuple(_example(TASKS[task], rng) for _ in range(num_examples or NUM_EXAMPLES[split]))


def _dataset_fn(task: str, split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
    del shuffle_files, seed  # one in-memory "file"; the data's seed is SEED
    examples = generate(task, split)
    columns = {k: [ex[k] for ex in examples] for k in ("inputs", "targets", "answer")}
    options = tf.ragged.constant([ex["options"] for ex in examples])
    return tf.data.Dataset.from_tensor_slices({**{k: np.array(v) for k, v in columns.items()}, "options": options})


def _register() -> None:
    features = {
        "inputs": seqio.Feature(DEFAULT_VOCABULARY, add_eos=False),
        "targets": seqio.Feature(DEFAULT_VOCABULARY, add_eos=True),
    }
    tokenize = [seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim]
    for name, task in TASKS.items():
        source = seqio.FunctionDataSource(
            functools.partial(_dataset_fn, name), splits=tuple(NUM_EXAMPLES), num_input_examples=dict(NUM_EXAMPLES)
        )
        seqio.TaskRegistry.add(
            task_name(name), source=source, output_features=features, preprocessors=tokenize,
            postprocess_fn=first_line, metric_fns=[exact_match],
        )  # fmt: skip
        scoring = AnswerScoring("ln", num_classes=len(task.options) if task.options else None)
        seqio.TaskRegistry.add(
            task_name(name, multiple_choice=True), source=source, output_features=features,
            preprocessors=[scoring.preprocessor, *tokenize], postprocess_fn=rank_classification_targets,
            metric_fns=[scoring.metric],
        )  # fmt: skip
    seqio.MixtureRegistry.add("babi_regen", [task_name(name) for name in TASKS], default_rate=seqio.mixing_rate_num_examples)


if task_name("single_supporting_fact") not in seqio.TaskRegistry.names():
    _register()
