"""Planning household activities: MCTS plans on planted problems against breadth-first search,
plan sentences with their pre-actions, impossible goals, experience generation by seed."""

import itertools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flanjax.worlds import activities as _household  # noqa: F401
from flanjax.worlds import household as h
from flanjax.worlds.experiences import FILES, ExperienceConfig, generate
from flanjax.worlds.mcts import SearchConfig
from flanjax.worlds.planning import Goal, goals_in_homes, plan_goals, plan_sentences, world_problem
from flanjax.worlds.world import Activity, get_activity, get_world

WORLD = get_world("household")
SEARCH = SearchConfig(num_simulations=300)
BATCH = 8  # one compiled planner for the whole module


def planted(goals, **home):
    home, state = h.build_home(**home)
    encoded = h.encode_goals(home, goals)
    actions, valid, relevant = h.candidate_actions(home, state, encoded)
    params = {"home": home, "actions": actions, "valid": valid, "relevant": relevant, "goals": encoded}
    return Goal(Activity("planted", tuple(goals)), 0, home, state, params)


KITCHEN = dict(rooms=["kitchen", "living room"], furniture=["fridge", "kitchen counter", "sink", "sofa", "tv"],
               items={"milk": "on kitchen counter", "cup": "in sink", "apple": "in fridge"}, agent_room="living room")  # fmt: skip
PROBLEMS = [
    ([("inside", "milk", "fridge")], 5),  # walk kitchen, walk milk, grab, walk fridge, put in (opens it)
    ([("sitting", "sofa"), ("switched_on", "tv")], 4),  # the tv starts off
    ([("holds", "apple")], 3),  # walk kitchen, walk apple, grab (opens the fridge)
    ([("inside", "cup", "fridge"), ("closed", "fridge")], 6),
]


def shortest_plan(goal: Goal, limit: int) -> int | None:
    """Breadth-first search over the candidate actions: the fewest actions that satisfy every
    goal, or None within `limit`. Frontiers are padded to powers of two (few compilations)."""
    problem = world_problem(WORLD)

    @jax.jit
    def expand(params, states):
        return jax.vmap(problem.legal, in_axes=(None, 0))(params, states), jax.vmap(lambda s: problem.goals(params, s).all())(states)

    step = jax.jit(jax.vmap(problem.step, in_axes=(None, 0, 0)))
    pad = lambda n: 1 << max(n - 1, 0).bit_length()  # noqa: E731
    params = jax.tree.map(jnp.asarray, goal.params)
    frontier, count = jax.tree.map(lambda x: jnp.asarray(x)[None], goal.state), 1
    for depth in range(limit + 1):
        rows = np.resize(np.arange(count), pad(count))
        ok, done = (np.asarray(x)[:count] for x in expand(params, jax.tree.map(lambda x: x[rows], frontier)))
        if done.any():
            return depth
        parents, actions = np.nonzero(ok)
        rows = np.resize(np.arange(len(parents)), pad(len(parents)))
        frontier = step(params, jax.tree.map(lambda x: x[parents[rows]], frontier), jnp.asarray(actions[rows]))
        flat = np.concatenate([np.asarray(x)[: len(parents)].reshape(len(parents), -1).astype(np.int32)
                               for x in jax.tree.leaves(frontier)], 1)  # fmt: skip
        _, unique = np.unique(flat, axis=0, return_index=True)
        frontier, count = jax.tree.map(lambda x: x[np.sort(unique)], frontier), len(unique)
    return None


@pytest.fixture(scope="module")
def planted_plans():
    goals = [planted(g, **KITCHEN) for g, _ in PROBLEMS]
    return goals, plan_goals(WORLD, goals, jax.random.key(0), SEARCH, batch_size=BATCH)


def test_planted_plans_are_found_and_optimal(planted_plans):
    goals, plans = planted_plans
    for (goal_list, optimum), goal, plan in zip(PROBLEMS, goals, plans):
        assert bool(plan.solved), goal_list
        assert int(plan.length) == optimum, (goal_list, plan_sentences(WORLD, goal, plan))
        # The solved plan reaches the goals in `optimum` actions; no shorter plan does (deeper
        # searches cost minutes; the six-step problem adds two steps to the first).
        if optimum <= 5:
            assert shortest_plan(goal, optimum - 1) is None, goal_list


def test_plan_sentences_write_out_pre_actions(planted_plans):
    goals, plans = planted_plans
    sentences = plan_sentences(WORLD, goals[2], plans[2])
    assert sentences == ["Walk to kitchen.", "Walk to apple.", "Open fridge.", "Grab apple."]
    assert plan_sentences(WORLD, goals[0], plans[0])[-2:] == ["Open fridge.", "Put milk in fridge."]


def test_the_plans_replay_to_their_goals(planted_plans):
    goals, plans = planted_plans
    for goal, plan in zip(goals, plans):
        state = jax.tree.map(jnp.asarray, goal.state)
        for index in np.asarray(plan.actions)[: int(plan.length)]:
            verb, a, b = (int(x) for x in goal.params["actions"][index])
            assert bool(h.legal(goal.home, state, verb, a, b))
            state = h.act(goal.home, state, verb, a, b)
        assert bool(np.asarray(h.goals_hold(goal.home, state, goal.params["goals"])).all())


def test_impossible_goals_are_reported_not_planned():
    chosen = [get_activity("eat dinner"), get_activity("watch tv")]
    goals, impossible = goals_in_homes(WORLD, range(6), chosen)
    assert {g.activity.name for g in goals} <= {"eat dinner", "watch tv"}
    assert len(goals) + len(impossible) == 12
    for name, seed, missing in impossible:
        home, _ = h.generate_home(seed)
        assert missing and all(h.find(home, m) < 0 for m in missing)


def test_generation_is_deterministic_by_seed(tmp_path):
    config = ExperienceConfig(homes=2, seed=3, stories_per_home=1, search=SEARCH, batch_size=BATCH)
    chosen = [get_activity(n) for n in ("watch tv", "find the keys", "go to sleep", "use the toilet")]
    first, second = tmp_path / "a", tmp_path / "b"
    summary = generate(str(first), config, chosen=chosen)
    generate(str(second), config, chosen=chosen)
    for name in FILES:
        assert (first / name).read_text() == (second / name).read_text(), name
    plans = [json.loads(line) for line in (first / "plans.jsonl").read_text().splitlines()]
    assert summary["solved"] == len(plans) > 0
    assert summary["goals"] + summary["impossible"] == 2 * len(chosen)
    assert {p["split"] for p in plans} <= {"train", "test"} and not any(os.path.exists(str(first / n) + ".partial") for n in FILES)
    assert all(p["plan"] and p["activity"] in {a.name for a in chosen} for p in plans)
    assert list(itertools.chain.from_iterable(p["items"] for p in plans))
