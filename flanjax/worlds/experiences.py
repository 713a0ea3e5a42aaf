"""E2WM's embodied experiences, generated into a directory of JSON lines that the seqio tasks
in `tasks/e2wm/` read (`flanjax world generate --out DIR --homes N --seed S`):

    plans.jsonl      goal-directed experience: an activity in a home, the conditions of its
                     objects, and the MCTS plan that does it (solved plans only)
    counting.jsonl   a one-agent random-exploration story and how many items a holder holds
    paths.jsonl      a three-agent story and the rooms an object passed through, in order
    locations.jsonl  a three-agent story and the room an object was in before another
    summary.json     what was generated, solved, skipped (impossible goals) and how fast

Homes are split by index: the last `test_fraction` are held out ("test"); a fixed share of
the activities is "unseen": the training formats never show them. Everything is a function
of the seed, so a directory can be regenerated exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from rich.progress import Progress

from flanjax import paths
from flanjax.sharding import Partitioner
from flanjax.worlds import explore
from flanjax.worlds.household import CLASSES, is_item, is_room
from flanjax.worlds.mcts import SearchConfig
from flanjax.worlds.planning import Goal, goals_in_homes, plan_goals, plan_sentences
from flanjax.worlds.world import Activity, World, activities, get_world

FILES = ("plans.jsonl", "counting.jsonl", "paths.jsonl", "locations.jsonl")
SUMMARY = "summary.json"


@dataclasses.dataclass(frozen=True)
class ExperienceConfig:
    homes: int = 100
    seed: int = 0
    world: str = "household"
    test_fraction: float = 0.2  # the last homes, held out for evaluation
    unseen_fraction: float = 0.25  # activities never shown in training
    stories_per_home: int = 4  # of each kind: counting, path tracking, object location
    counting_steps: int = 12  # moves of the one agent a counting story narrates
    path_steps: int = 30  # moves of the three agents path stories draw from
    path_sentences: tuple[int, int] = explore.PATH_SENTENCES  # a path story's length (E2WM: 13-29 sentences)
    search: SearchConfig = SearchConfig()
    batch_size: int = 64  # goals planned at once


def unseen_activities(names: Sequence[str], fraction: float) -> set[str]:
    """Every k-th activity by name (k = 1 / fraction): held out from the training formats."""
    if fraction <= 0:
        return set()
    every = max(int(round(1 / fraction)), 1)
    return set(sorted(names)[every - 1 :: every])


def home_seed(seed: int, index: int) -> int:
    return seed * 1_000_003 + index


def split_of(config: ExperienceConfig, index: int) -> str:
    return "test" if index >= config.homes - int(round(config.homes * config.test_fraction)) else "train"


def plan_record(world: World, goal: Goal, sentences: list[str], split: str, seen: bool) -> dict:
    home, state = goal.home, goal.state
    goal_objects = sorted({int(e) for g in goal.params["goals"] if g[0] > 0 for e in g[1:] if e >= 0})
    holders = sorted({int(state.holder[e]) for e in goal_objects if state.holder[e] >= 0} - set(goal_objects))
    task = [e for e in goal_objects + holders if not is_room(int(home.cls[e]))]
    others = [e for e in np.flatnonzero(np.asarray(home.cls) >= 0) if is_item(int(home.cls[e])) and e not in task]
    return {
        "split": split, "seed": goal.seed, "activity": goal.activity.name, "seen": seen,
        "items": [CLASSES[int(home.cls[e])] for e in task],
        "distractors": [CLASSES[int(home.cls[e])] for e in others],
        "conditions": world.describe(home, state, task), "plan": sentences,
    }  # fmt: skip


@functools.partial(jax.jit, static_argnames=("num_agents", "num_steps"))
def _explore_homes(homes, states, keys, num_agents: int, num_steps: int):
    return jax.vmap(functools.partial(explore.explore, num_agents=num_agents, num_steps=num_steps))(homes, states, keys)


def _stories(world: World, config: ExperienceConfig, seeds: list[int], splits: list[str]) -> tuple[dict[str, list[dict]], int]:
    """Counting, path and location stories from random exploration of every home; the number
    of stories skipped (a log with nothing to ask)."""
    pairs = [world.generate(s) for s in seeds]
    homes = jax.tree.map(lambda *x: jnp.stack([jnp.asarray(v) for v in x]), *[h for h, _ in pairs])
    states = jax.tree.map(lambda *x: jnp.stack([jnp.asarray(v) for v in x]), *[s for _, s in pairs])
    base = jax.random.key(config.seed)
    out: dict[str, list[dict]] = {"counting": [], "paths": [], "locations": []}
    skipped = 0
    kinds = (("counting", 1, config.counting_steps, explore.counting_story),
             ("paths", 3, config.path_steps, functools.partial(explore.path_story, sentences=config.path_sentences)),
             ("locations", 3, config.path_steps, functools.partial(explore.location_question, sentences=config.path_sentences)))  # fmt: skip
    for k, (kind, agents, steps, make) in enumerate(kinds):
        for r in range(config.stories_per_home):
            keys = jax.vmap(lambda s: jax.random.fold_in(jax.random.fold_in(base, 1000 * k + r), s))(jnp.asarray(seeds))
            logs = jax.tree.map(np.asarray, _explore_homes(homes, states, keys, agents, steps))
            for i, ((home, _), seed, split) in enumerate(zip(pairs, seeds, splits)):
                log = jax.tree.map(lambda x, i=i: x[i], logs)
                try:
                    story = make(home, log, seed * 31 + r)
                except explore.NoStory:
                    skipped += 1
                    continue
                out[kind].append({"split": split, "seed": seed, "story": story.sentences, "question": story.question,
                                  "answer": story.answer, **({"options": list(story.options)} if story.options else {})})  # fmt: skip
    return out, skipped


def generate(out_dir: str, config: ExperienceConfig = ExperienceConfig(), partitioner: Partitioner | None = None,
             chosen: Sequence[Activity] | None = None) -> dict:  # fmt: skip
    """Writes the experience files of `config` into `out_dir`; returns the summary."""
    world = get_world(config.world)
    chosen = list(chosen if chosen is not None else activities(config.world))
    unseen = unseen_activities([a.name for a in chosen], config.unseen_fraction)
    seeds = [home_seed(config.seed, i) for i in range(config.homes)]
    splits = [split_of(config, i) for i in range(config.homes)]
    split_by_seed = dict(zip(seeds, splits))
    goals, impossible = goals_in_homes(world, seeds, chosen)
    paths.makedirs(out_dir)
    start = time.perf_counter()
    plans = []
    with Progress(transient=True) as progress:
        bar = progress.add_task(f"Planning {len(goals)} goals in {config.homes} homes", total=len(goals))
        for first in range(0, len(goals), config.batch_size):
            chunk = goals[first : first + config.batch_size]
            plans += plan_goals(world, chunk, jax.random.fold_in(jax.random.key(config.seed), first), config.search,
                                partitioner, config.batch_size)  # fmt: skip
            progress.advance(bar, len(chunk))
    planning_s = time.perf_counter() - start
    records = [plan_record(world, g, plan_sentences(world, g, p), split_by_seed[g.seed], g.activity.name not in unseen)
               for g, p in zip(goals, plans) if bool(p.solved)]  # fmt: skip
    stories, skipped = _stories(world, config, seeds, splits)
    for name, rows in zip(FILES, (records, stories["counting"], stories["paths"], stories["locations"])):
        # whole or not at all: a killed run leaves no half-written file under the real name
        paths.write_atomic(os.path.join(out_dir, name), "".join(json.dumps(r) + "\n" for r in rows))
    missing: dict[str, int] = {}
    for activity, _, _ in impossible:
        missing[activity] = missing.get(activity, 0) + 1
    summary = {
        "config": {**dataclasses.asdict(config), "search": dataclasses.asdict(config.search)},
        "unseen_activities": sorted(unseen),
        "goals": len(goals), "solved": len(records), "unsolved": len(goals) - len(records),
        "impossible": len(impossible), "impossible_by_activity": missing,
        "plan_steps_mean": float(np.mean([len(r["plan"]) for r in records])) if records else 0.0,
        "planning_s": round(planning_s, 2),
        "simulations_per_s": round(len(goals) * config.search.num_simulations / max(planning_s, 1e-9), 1),
        "stories": {k: len(v) for k, v in stories.items()}, "stories_skipped": skipped,
    }  # fmt: skip
    paths.write_atomic(os.path.join(out_dir, SUMMARY), json.dumps(summary, indent=2))
    return summary
