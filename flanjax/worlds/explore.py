"""Random exploration of a household, E2WM's source of counting and object path tracking
experiences: agents wander a home from `household.py`, picking items up and putting them down
at random; the log is narrated as bAbI-like stories, each with a question whose answer the
logged states make true.

    explore(home, state, key, num_agents, num_steps)   jitted; vmap it over homes
    counting_story(home, log, seed)                     how many items are on/in a holder at the end
    path_story(home, log, seed)                         the rooms an object passed through, in order
    location_question(home, log, seed)                  the room an object was in before a given one

Each step one agent, drawn at random, makes one random applicable move: walk to another room;
pick up an item in its room (fewer than 2 in hand), from a surface or a container, opening a
closed container first as the household's pre-action does; or put a held item on or in a
surface or container in its room (opening it first likewise). Items in hand travel with their
agent. Narration is our own wording; questions come without E2WM's "Q:"/"Question:" prefixes,
which the task formats add.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from flanjax.errors import FlanjaxError
from flanjax.worlds.household import (
    CLASSES,
    CONTAINER,
    GRAB,
    NUM_FURNITURE_CLASSES,
    NUM_ROOM_CLASSES,
    OPENABLE,
    PROPERTIES,
    PUTBACK,
    PUTIN,
    SURFACE,
    WALK,
    Home,
    State,
)

HANDS = 2  # items an agent can carry at once

NAMES = ("Mary", "John", "Sandra", "Daniel", "Emma", "Oliver", "Sophia",
         "Liam", "Ava", "Noah", "Mia", "Lucas", "Chloe", "Ethan")  # fmt: skip
WALK_PHRASES = ("went to", "walked into", "travelled to", "journeyed to", "moved to", "entered")
GRAB_PHRASES = ("grabbed", "took", "got", "picked up")
DROP_PHRASES = ("dropped", "left", "put down")
PLACE_PHRASES = ("put", "placed")

# E2WM's path tracking stories: 13-29 sentences, paths of 2-5 rooms.
PATH_SENTENCES = (13, 29)
PATH_ROOMS = (2, 5)


class NoStory(FlanjaxError, ValueError):
    """The log has nothing to ask about (no holder touched, no object moved far enough); the
    caller skips it or explores again with another key."""


class Log(NamedTuple):
    """What happened in `explore`, as arrays (T steps, K agents, O entities; a leading batch axis
    when vmapped). Step t reads the states at index t and leaves those at t + 1."""

    agent: jax.Array  # int32 [T]: who moved
    verb: jax.Array  # int32 [T]: household.WALK, GRAB, PUTBACK (on a surface) or PUTIN (in a container)
    item: jax.Array  # int32 [T]: the item picked up or put down; -1 on walks
    target: jax.Array  # int32 [T]: the room walked to, the holder taken from, or put on or in
    opens: jax.Array  # bool [T]: the step opened the target (a closed container) first
    holder: jax.Array  # int32 [T+1, O]: the furniture each item is on or in; -1 while carried
    inside: jax.Array  # bool [T+1, O]: in (True) or on its holder
    carrier: jax.Array  # int32 [T+1, O]: the agent carrying each item; -1 for none
    opened: jax.Array  # bool [T+1, O]
    agent_room: jax.Array  # int32 [T+1, K]
    item_room: jax.Array  # int32 [T+1, O]: the room each item is in (its carrier's or its holder's); -1 for non-items


class Story(NamedTuple):
    """A narrated log with its question and answer (E2WM's formats add the prefixes)."""

    sentences: list[str]
    question: str
    answer: str
    steps: int  # the story narrates the log's first `steps` steps
    options: tuple[str, ...] = ()  # multiple-choice answers, for the QA forms


# --- exploration (jnp; one home, vmap for batches) ------------------------------------------


def _pick(noise, mask):
    """A uniformly random index where `mask` holds, given uniform `noise` of its shape (0 where
    none holds: callers check)."""
    return jnp.argmax(jnp.where(mask, noise, -1.0)).astype(jnp.int32)


class _World(NamedTuple):
    holder: jax.Array
    inside: jax.Array
    carrier: jax.Array
    opened: jax.Array
    agent_room: jax.Array


def _item_rooms(home: Home, world: _World):
    items = home.cls >= NUM_ROOM_CLASSES + NUM_FURNITURE_CLASSES
    carried_room = world.agent_room[jnp.maximum(world.carrier, 0)]
    room = jnp.where(world.carrier >= 0, carried_room, home.room[jnp.maximum(world.holder, 0)])
    return jnp.where(items, room, -1).astype(jnp.int32)


def _step(home: Home, world: _World, noise):
    """One random move; `noise` is uniform [5, O], a row for each choice (agent, move kind, room,
    item, holder)."""
    index = jnp.arange(home.cls.shape[0])
    present = home.cls >= 0
    props = jnp.asarray(PROPERTIES)[jnp.maximum(home.cls, 0)] & present[:, None]
    rooms = present & (home.cls < NUM_ROOM_CLASSES)
    items = home.cls >= NUM_ROOM_CLASSES + NUM_FURNITURE_CLASSES

    agent = _pick(noise[0], index < world.agent_room.shape[0])
    here = world.agent_room[agent]
    carried = world.carrier == agent
    walkable = rooms & (index != here)
    grabbable = items & (world.carrier < 0) & (world.holder >= 0) & (home.room[jnp.maximum(world.holder, 0)] == here)
    grabbable &= jnp.sum(carried) < HANDS
    holders = ~rooms & (home.room == here) & (props[:, SURFACE] | props[:, CONTAINER])
    # A move kind first (walk, grab, put), among those possible, then its arguments.
    kind = _pick(noise[1, :3], jnp.stack([walkable.any(), grabbable.any(), carried.any() & holders.any()]))
    walk, grab, put = kind == 0, kind == 1, kind == 2
    item = _pick(noise[3], jnp.where(grab, grabbable, carried))
    target = jnp.where(walk, _pick(noise[2], walkable), jnp.where(grab, world.holder[item], _pick(noise[4], holders)))
    container = props[target, CONTAINER]
    opens = ~walk & props[target, OPENABLE] & ~world.opened[target]

    moved = ~walk & (index == item)
    after = _World(
        holder=jnp.where(moved, jnp.where(grab, -1, target), world.holder),
        inside=jnp.where(moved, put & container, world.inside),
        carrier=jnp.where(moved, jnp.where(grab, agent, -1), world.carrier),
        opened=world.opened | (opens & (index == target)),
        agent_room=world.agent_room.at[agent].set(jnp.where(walk, target, here)),
    )
    verb = jnp.where(walk, WALK, jnp.where(grab, GRAB, jnp.where(container, PUTIN, PUTBACK)))
    record = (agent, verb.astype(jnp.int32), jnp.where(walk, -1, item), target, opens)
    return after, (record, after)


@functools.partial(jax.jit, static_argnames=("num_agents", "num_steps"))
def _explore(home: Home, state: State, key, num_agents: int, num_steps: int) -> Log:
    # One draw for everything (each threefry call adds seconds of compile time): a row per
    # agent's start room, then five per step.
    size = home.cls.shape[0]
    noise = jax.random.uniform(key, (num_agents + 5 * num_steps, size))
    rooms = (home.cls >= 0) & (home.cls < NUM_ROOM_CLASSES)
    # Agent 0 is the state's agent (and carries what it holds); the others start anywhere.
    others = jax.vmap(lambda n: _pick(n, rooms))(noise[:num_agents])
    start = _World(
        holder=jnp.asarray(state.holder, jnp.int32),
        inside=jnp.asarray(state.inside),
        carrier=jnp.where(state.held, 0, -1).astype(jnp.int32),
        opened=jnp.asarray(state.opened),
        agent_room=others.at[0].set(state.agent_room),
    )
    steps = noise[num_agents:].reshape(num_steps, 5, size)
    _, (record, worlds) = jax.lax.scan(functools.partial(_step, home), start, steps)
    worlds = jax.tree.map(lambda first, rest: jnp.concatenate([first[None], rest]), start, worlds)
    item_room = jax.vmap(lambda w: _item_rooms(home, w))(worlds)
    return Log(*record, *worlds, item_room)


def explore(home: Home, state: State, key: jax.Array, num_agents: int, num_steps: int) -> Log:
    """`num_steps` random moves of `num_agents` agents in `home` from `state` (see the module's
    docstring). Jitted; for a batch of homes, vmap it with the counts bound:
    `jax.vmap(functools.partial(explore, num_agents=3, num_steps=26))(homes, states, keys)`."""
    if not 1 <= num_agents <= len(NAMES):
        raise FlanjaxError(f"num_agents={num_agents}: exploration narrates 1 to {len(NAMES)} agents (one name each)")
    if num_steps < 1:
        raise FlanjaxError(f"num_steps={num_steps}: explore at least one step")
    return _explore(home, state, key, num_agents=num_agents, num_steps=num_steps)


# --- narration (NumPy, one home and log) ------------------------------------------------------


def _name(home: Home, entity) -> str:
    return CLASSES[int(home.cls[entity])]


def _relation(home: Home, holder) -> str:
    return "in" if PROPERTIES[int(home.cls[holder]), CONTAINER] else "on"


def _join(phrases: list[str]) -> str:
    """"the a", "the a and the b", "the a, the b, and the c" (E2WM's answers' commas)."""
    if len(phrases) <= 2:
        return " and ".join(phrases)
    return ", ".join(phrases[:-1]) + ", and " + phrases[-1]


def _narrate(home: Home, log: Log, names, steps: int, rng: np.random.Generator, holders: float) -> list[str]:
    """One sentence per agent (where it starts), then one per step. Puts name their holder with
    probability `holders` (else "dropped the cup"); at 1, grabs name theirs too ("from the
    sink"), so a reader can track what is on every holder."""
    sentences = [f"{name} was in the {_name(home, room)}." for name, room in zip(names, log.agent_room[0])]
    for t in range(steps):
        who, verb, item, target = names[log.agent[t]], log.verb[t], log.item[t], log.target[t]
        if verb == WALK:
            sentences.append(f"{who} {rng.choice(WALK_PHRASES)} the {_name(home, target)}.")
        elif verb == GRAB:
            source = f" from the {_name(home, target)}" if holders >= 1 else ""
            sentences.append(f"{who} {rng.choice(GRAB_PHRASES)} the {_name(home, item)}{source}.")
        elif rng.random() < holders:
            where = "in" if verb == PUTIN else "on"
            sentences.append(f"{who} {rng.choice(PLACE_PHRASES)} the {_name(home, item)} {where} the {_name(home, target)}.")
        else:
            sentences.append(f"{who} {rng.choice(DROP_PHRASES)} the {_name(home, item)}.")
    return sentences


def _numpy(log: Log) -> Log:
    if np.ndim(log.agent) != 1:
        raise FlanjaxError(f"narrate one log at a time (agent has shape {np.shape(log.agent)}); index a batch first")
    return Log(*(np.asarray(field) for field in log))


def counting_story(home: Home, log: Log, seed: int) -> Story:
    """A story of the whole log that first says what one holder holds (a holder the story
    touches, drawn by `seed`) and asks how many items it holds at the end, answered as E2WM's
    counting data: "There are 3 items on the X. They are the a, the b, and the c."."""
    log, rng = _numpy(log), np.random.default_rng(seed)
    steps = len(log.agent)
    touched = sorted({int(h) for h, v in zip(log.target, log.verb) if v != WALK})
    if not touched:
        raise NoStory("no holder is touched in this log (every step walks); skip it or explore longer")
    holder = int(rng.choice(touched))
    relation, place = _relation(home, holder), _name(home, holder)
    names = list(rng.choice(NAMES, len(log.agent_room[0]), replace=False))

    def contents(t):
        return [f"the {_name(home, e)}" for e in np.flatnonzero(log.holder[t] == holder)]

    first, last = contents(0), contents(steps)
    intro = f"At first, the {place} held {_join(first) if first else 'nothing'}."
    if not last:
        answer = f"There is no item {relation} the {place}."
    elif len(last) == 1:
        answer = f"There is one item {relation} the {place}. It is {last[0]}."
    else:
        answer = f"There are {len(last)} items {relation} the {place}. They are {_join(last)}."
    sentences = [intro, *_narrate(home, log, names, steps, rng, holders=1.0)]
    return Story(sentences, f"How many items are there {relation} the {place}?", answer, steps)


def _path(log: Log, item: int, steps: int) -> list[int]:
    """The rooms `item` was in within the first `steps` steps, from its first pick-up (the first
    time a story mentions it), consecutive repeats merged."""
    grabs = np.flatnonzero((log.item[:steps] == item) & (log.verb[:steps] == GRAB))
    if not grabs.size:
        return []
    rooms = log.item_room[grabs[0] + 1 : steps + 1, item]
    return [int(r) for i, r in enumerate(rooms) if i == 0 or r != rooms[i - 1]]


def _tracked(home: Home, log: Log, rng: np.random.Generator, accept, what: str, sentences: tuple[int, int] = PATH_SENTENCES):
    """A story length (E2WM's 13-29 sentences) and an object whose path `accept`s, both drawn at
    random among those that exist."""
    agents, total = log.agent_room.shape[1], len(log.agent)
    lengths = np.arange(max(sentences[0] - agents, 1), min(sentences[1] - agents, total) + 1)
    for steps in rng.permutation(lengths):
        moved = sorted({int(i) for i, v in zip(log.item[:steps], log.verb[:steps]) if v == GRAB})
        paths = {item: _path(log, item, steps) for item in moved}
        good = [item for item in moved if accept(paths[item])]
        if good:
            item = int(rng.choice(good))
            return int(steps), item, [_name(home, r) for r in paths[item]]
    raise NoStory(
        f"no object {what} within {sentences[0]}-{sentences[1]} sentences of this {total}-step log "
        f"({agents} agents); skip it or explore with another key"
    )


def path_story(home: Home, log: Log, seed: int, sentences: tuple[int, int] = PATH_SENTENCES) -> Story:
    """E2WM's object path tracking: a story of 13-29 sentences (use 3 agents and at least 26
    steps) and the rooms an object appeared in, in order, from its first mention (2-5 rooms):
    "What is the order of the rooms where the cup appeared?" -> "kitchen, hallway, bedroom"."""
    log, rng = _numpy(log), np.random.default_rng(seed)
    lo, hi = PATH_ROOMS
    steps, item, rooms = _tracked(home, log, rng, lambda path: lo <= len(path) <= hi, f"passes through {lo}-{hi} rooms", sentences)
    names = list(rng.choice(NAMES, log.agent_room.shape[1], replace=False))
    sentences = _narrate(home, log, names, steps, rng, holders=0.5)
    question = f"What is the order of the rooms where the {_name(home, item)} appeared?"
    return Story(sentences, question, ", ".join(rooms), steps)


def location_question(home: Home, log: Log, seed: int, sentences: tuple[int, int] = PATH_SENTENCES) -> Story:
    """E2WM's object location QA over a path tracking story: "Where was the cup before the
    bedroom?", answered by the room before it in the cup's path (asked only of rooms the path
    enters once, so the answer is unique); the options are the home's rooms."""
    log, rng = _numpy(log), np.random.default_rng(seed)

    def once(path):
        return [i for i in range(1, len(path)) if path.count(path[i]) == 1]

    steps, item, rooms = _tracked(home, log, rng, lambda path: bool(once(path)), "enters a room once after its first", sentences)
    asked = int(rng.choice(once(rooms)))
    names = list(rng.choice(NAMES, log.agent_room.shape[1], replace=False))
    sentences = _narrate(home, log, names, steps, rng, holders=0.5)
    options = tuple(CLASSES[c] for c in np.asarray(home.cls) if 0 <= c < NUM_ROOM_CLASSES)
    thing = _name(home, item)
    question = f"Where {'were' if thing.endswith('s') else 'was'} the {thing} before the {rooms[asked]}?"  # keys, glasses
    return Story(sentences, question, rooms[asked - 1], steps, options)
