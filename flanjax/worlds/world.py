"""The `World` interface the planner and the experience generators use, its registry, and the
activities registry (seqio-like: `add_activity` by name, looked up with `get_activity`).

A world is a set of pure functions over a home (what never changes) and a state (what
actions change), both pytrees of fixed-size arrays so that homes batch. An action is a
(verb, a, b) triple of ints (b = -1 for one-object verbs); a goal is a (predicate, a, b)
triple over a home's entities, predicate 0 an empty slot. Users register their own world
with `add_world` and their activities with `add_activity(..., world=NAME)`.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from flanjax.errors import FlanjaxError


class WorldError(FlanjaxError, ValueError):
    """An unknown world or activity, or an activity that names unknown classes or predicates."""


@dataclasses.dataclass(frozen=True)
class World:
    name: str
    classes: Sequence[str]  # the class names activities may use
    predicates: Mapping[str, Any]  # the predicate names activities may use
    check_goal: Callable[[tuple[str, ...]], None]  # raises ValueError naming what is wrong
    generate: Callable[[int], tuple[Any, Any]]  # seed -> (home, initial state), deterministic
    legal: Callable[..., Any]  # (home, state, verb, a, b) -> bool (jnp; jit/vmap-able)
    act: Callable[..., Any]  # (home, state, verb, a, b) -> state (jnp; the action must be legal)
    goals_hold: Callable[..., Any]  # (home, state, goals [G, 3]) -> bool [G] (jnp)
    encode_goals: Callable[..., np.ndarray | list[str]]  # (home, goals) -> [G, 3], or the missing classes
    candidate_actions: Callable[..., tuple[np.ndarray, np.ndarray, np.ndarray]]  # (home, state, goals [G, 3]) -> (actions, valid, relevant)
    action_text: Callable[..., str]  # (home, verb, a, b) -> one plan sentence
    pre_actions: Callable[..., list[tuple[int, int, int]]]  # (home, state, verb, a, b) -> actions done first
    describe: Callable[..., list[str]]  # (home, state, entities) -> sentences on their conditions


_WORLDS: dict[str, World] = {}


def add_world(world: World) -> World:
    if world.name in _WORLDS:
        raise WorldError(f"a world named {world.name!r} is already registered; choose another name.")
    _WORLDS[world.name] = world
    return world


def _unknown(kind: str, name: str, known) -> WorldError:
    close = difflib.get_close_matches(name, sorted(known), n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    return WorldError(f"unknown {kind} {name!r}.{hint}")


def get_world(name: str) -> World:
    if name not in _WORLDS:
        raise _unknown("world", name, _WORLDS)
    return _WORLDS[name]


@dataclasses.dataclass(frozen=True)
class Activity:
    name: str
    goals: tuple[tuple[str, ...], ...]  # (predicate, class[, class]): all must hold at the end
    world: str = "household"


_ACTIVITIES: dict[str, Activity] = {}


def add_activity(name: str, goals: Sequence[Sequence[str]], *, world: str = "household") -> Activity:
    """Registers an activity: `goals` are (predicate, class) or (predicate, class, class), e.g.
    ("inside", "plate", "dishwasher"), checked against the world's names and properties."""
    known = get_world(world)
    if name in _ACTIVITIES:
        raise WorldError(f"an activity named {name!r} is already registered; choose another name.")
    if not goals:
        raise WorldError(f"activity {name!r} has no goals; give at least one (predicate, class[, class]).")
    goals = tuple(tuple(g) for g in goals)
    for goal in goals:
        if not goal or goal[0] not in known.predicates:
            raise WorldError(f"activity {name!r}: {_unknown('predicate', goal[0] if goal else '', known.predicates)} "
                             f"Predicates: {', '.join(known.predicates)}.")  # fmt: skip
        for cls in goal[1:]:
            if cls not in known.classes:
                raise WorldError(f"activity {name!r}, goal {goal}: {_unknown('class', cls, known.classes)}")
        try:
            known.check_goal(goal)
        except ValueError as e:
            raise WorldError(f"activity {name!r}: {e}") from None
    activity = Activity(name, goals, world)
    _ACTIVITIES[name] = activity
    return activity


def get_activity(name: str) -> Activity:
    if name not in _ACTIVITIES:
        raise _unknown("activity", name, _ACTIVITIES)
    return _ACTIVITIES[name]


def activities(world: str | None = None) -> list[Activity]:
    return [a for a in _ACTIVITIES.values() if world is None or a.world == world]


def remove_activity(name: str) -> None:
    """Forgets an activity (tests, notebooks that redefine one)."""
    _ACTIVITIES.pop(name, None)
