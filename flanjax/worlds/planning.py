"""Plans for activities in homes: a world's functions as an MCTS `Problem`, a batch of
(home, activity) goals planned at once, and the plans turned into E2WM's sentences.

A goal impossible in a home (its activity names a class the home lacks) is reported and
skipped, never planned; `Outcome` counts them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flanjax.sharding import Partitioner
from flanjax.worlds.mcts import Plan, Problem, SearchConfig, plan
from flanjax.worlds.world import Activity, World


_PROBLEMS: dict[str, Problem] = {}


def world_problem(world: World) -> Problem:
    """`world` as a planning problem: params hold the home, the candidate actions (verb, a, b)
    with their valid and relevant masks, and the goals; an action is an index into them. One
    Problem per world, so that its compiled planner is reused."""
    if world.name not in _PROBLEMS:
        _PROBLEMS[world.name] = _problem(world)
    return _PROBLEMS[world.name]


def _problem(world: World) -> Problem:

    def legal(params, state):
        rows = params["actions"]
        ok = jax.vmap(lambda row: world.legal(params["home"], state, row[0], row[1], row[2]))(rows)
        return params["valid"] & ok

    def step(params, state, action):
        row = params["actions"][action]
        return world.act(params["home"], state, row[0], row[1], row[2])

    return Problem(
        legal=legal,
        step=step,
        goals=lambda params, state: world.goals_hold(params["home"], state, params["goals"]),
        relevant=lambda params: params["relevant"],
    )


@dataclasses.dataclass(frozen=True)
class Goal:
    """One activity to do in one home (seeded), with its planning params."""

    activity: Activity
    seed: int
    home: Any
    state: Any
    params: dict


def goals_in_homes(world: World, seeds: Sequence[int], chosen: Sequence[Activity]) -> tuple[list[Goal], list[tuple[str, int, list[str]]]]:
    """Every activity of `chosen` possible in each home of `seeds`, and (activity, seed,
    missing classes) for those that are not."""
    goals, impossible = [], []
    for seed in seeds:
        home, state = world.generate(seed)
        for activity in chosen:
            encoded = world.encode_goals(home, activity.goals)
            if isinstance(encoded, list):
                impossible.append((activity.name, seed, encoded))
                continue
            actions, valid, relevant = world.candidate_actions(home, state, encoded)
            params = {"home": home, "actions": actions, "valid": valid, "relevant": relevant, "goals": encoded}
            goals.append(Goal(activity, seed, home, state, params))
    return goals, impossible


def _stack(trees):
    return jax.tree.map(lambda *x: jnp.stack([jnp.asarray(v) for v in x]), *trees)


def plan_goals(world: World, goals: Sequence[Goal], key: jax.Array, config: SearchConfig = SearchConfig(),
               partitioner: Partitioner | None = None, batch_size: int = 64) -> list[Plan]:  # fmt: skip
    """Plans for `goals`, `batch_size` at a time (one compiled search; the last batch padded
    with copies of its first goal); one host-side Plan per goal."""
    problem = world_problem(world)
    plans: list[Plan] = []
    for start in range(0, len(goals), batch_size):
        chunk = list(goals[start : start + batch_size])
        padded = chunk + [chunk[0]] * (batch_size - len(chunk))
        found = plan(problem, _stack([g.params for g in padded]), _stack([g.state for g in padded]),
                     jax.random.fold_in(key, start), config, partitioner)  # fmt: skip
        found = jax.tree.map(np.asarray, found)
        plans += [jax.tree.map(lambda x, i=i: x[i], found) for i in range(len(chunk))]
    return plans


def plan_sentences(world: World, goal: Goal, found: Plan) -> list[str]:
    """The plan as E2WM's sentences, each automatic pre-action written out before its action
    ("Open fridge." before "Grab milk." when the fridge is closed)."""
    home, state = goal.home, jax.tree.map(jnp.asarray, goal.state)
    sentences = []
    for index in np.asarray(found.actions)[: int(found.length)]:
        verb, a, b = (int(x) for x in goal.params["actions"][index])
        for pre in world.pre_actions(home, state, verb, a, b):
            sentences.append(world.action_text(home, *pre))
        sentences.append(world.action_text(home, verb, a, b))
        state = world.act(home, state, verb, a, b)
    return sentences
