"""The batched MCTS planner (flanjax/worlds/mcts.py) on a toy array world.

The toy world: an agent walks between PLACES places, picks up and puts down OBJECTS objects
(one in hand at a time) and toggles SWITCHES switches fixed to places. Goals are "object k at
place p" and "switch s on/off"; every object, switch and place not in a goal is a decoy.
Actions: walk(p) | pick(k) | put(k) | toggle(s). Its `step` leaves the state unchanged where an
action does not apply, so a variant that calls every action legal can reuse it.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flanjax.sharding import MeshConfig, Partitioner
from flanjax.worlds import mcts

PLACES, OBJECTS, SWITCHES, GOALS = 6, 6, 4, 3
WALK, PICK, PUT, TOGGLE = 0, PLACES, PLACES + OBJECTS, PLACES + 2 * OBJECTS
ACTIONS = TOGGLE + SWITCHES
NONE, OBJECT_AT, SWITCH_ON, SWITCH_OFF = 0, 1, 2, 3  # goal kinds (NONE: a padding slot)


def toy_legal(params, state):
    return jnp.concatenate([
        jnp.arange(PLACES) != state["agent"],
        (state["held"] < 0) & (state["where"] == state["agent"]),
        jnp.arange(OBJECTS) == state["held"],
        params["switch_place"] == state["agent"],
    ])


def toy_step(params, state, action):
    applies = toy_legal(params, state)[action]
    picked = (jnp.arange(OBJECTS) == action - PICK) & applies
    put = (jnp.arange(OBJECTS) == action - PUT) & applies
    return {
        "agent": jnp.where((action < PICK) & applies, action, state["agent"]).astype(jnp.int32),
        "held": jnp.select([picked.any(), put.any()], [action - PICK, -1], state["held"]).astype(jnp.int32),
        "where": jnp.where(picked, -1, jnp.where(put, state["agent"], state["where"])).astype(jnp.int32),
        "on": state["on"] ^ ((jnp.arange(SWITCHES) == action - TOGGLE) & applies),
    }


def toy_goals(params, state):
    kind, item, place = params["goal_kind"], params["goal_item"], params["goal_place"]
    switch = state["on"][jnp.minimum(item, SWITCHES - 1)]
    return jnp.select(
        [kind == OBJECT_AT, kind == SWITCH_ON, kind == SWITCH_OFF],
        [state["where"][item] == place, switch, ~switch],
        default=True,
    )


TOY = mcts.Problem(legal=toy_legal, step=toy_step, goals=toy_goals, relevant=lambda p: p["relevant"])


def toy_problem(rng: np.random.Generator, objects: int, switches: int) -> tuple[dict, dict]:
    """A random home and a goal moving `objects` objects and flipping `switches` switches."""
    root = {
        "agent": np.int32(rng.integers(PLACES)),
        "held": np.int32(-1),
        "where": rng.integers(PLACES, size=OBJECTS).astype(np.int32),
        "on": rng.random(SWITCHES) < 0.5,
    }
    switch_place = rng.integers(PLACES, size=SWITCHES).astype(np.int32)
    kind, item, place = np.zeros(GOALS, np.int32), np.zeros(GOALS, np.int32), np.zeros(GOALS, np.int32)
    relevant = np.zeros(ACTIONS, bool)
    for slot, k in enumerate(rng.choice(OBJECTS, objects, replace=False)):
        target = rng.choice([p for p in range(PLACES) if p != root["where"][k]])
        kind[slot], item[slot], place[slot] = OBJECT_AT, k, target
        relevant[[PICK + k, PUT + k, WALK + root["where"][k], WALK + target]] = True
    for slot, s in enumerate(rng.choice(SWITCHES, switches, replace=False), start=objects):
        kind[slot], item[slot] = (SWITCH_OFF if root["on"][s] else SWITCH_ON), s
        relevant[[TOGGLE + s, WALK + switch_place[s]]] = True
    params = {"switch_place": switch_place, "goal_kind": kind, "goal_item": item, "goal_place": place}
    params["relevant"] = relevant
    return params, root


def stack(rows):
    return jax.tree.map(lambda *xs: np.stack(xs), *rows)


def row(tree, i):
    return jax.tree.map(lambda x: x[i], tree)


@jax.jit
@functools.partial(jax.vmap, in_axes=(None, 0))
def successors(params, state):
    """Every action's next state, which actions apply, and whether the goals all hold."""
    nxt = jax.vmap(lambda a: toy_step(params, state, a))(jnp.arange(ACTIONS))
    return nxt, toy_legal(params, state), toy_goals(params, state).all()


def shortest_plan_length(params, root, limit: int = 10) -> int:
    """Breadth-first search over the toy world: the length of the shortest solving plan."""

    def key(state):
        return tuple(np.concatenate([np.ravel(state[k]).astype(np.int64) for k in sorted(state)]))

    frontier, seen = [root], {key(root)}
    for depth in range(limit + 1):
        size = -(-len(frontier) // 256) * 256  # chunks of one shape: one compile
        batch = stack(frontier + [frontier[0]] * (size - len(frontier)))
        outputs = [successors(params, row(batch, slice(i, i + 256))) for i in range(0, size, 256)]
        nxt, legal, solved = jax.tree.map(lambda *x: np.concatenate(x), *outputs)
        if solved[: len(frontier)].any():
            return depth
        new = []
        for i, a in zip(*np.nonzero(legal[: len(frontier)])):
            state = jax.tree.map(lambda x: x[i, a], nxt)
            if key(state) not in seen:
                seen.add(key(state))
                new.append(state)
        frontier = new
    raise AssertionError("no plan within the limit")


def replay_eagerly(params, root, actions):
    """Steps the toy world through a plan, asserting every action applies; the final goals."""
    state = root
    for a in actions:
        assert bool(toy_legal(params, state)[a]), f"illegal action {a}"
        state = toy_step(params, state, a)
    return np.asarray(toy_goals(params, state))


# One configuration and one batch shape for most tests: each new one compiles the planner.
CONFIG = mcts.SearchConfig(num_simulations=300, max_depth=12)
KEY = jax.random.key(7)


@functools.cache
def small_goals():
    """Eight planted goals: one object to move, and half of them a switch to flip too."""
    rng = np.random.default_rng(3)
    problems = [toy_problem(rng, 1, i % 2) for i in range(8)]
    return stack([p for p, _ in problems]), stack([r for _, r in problems])


@functools.cache
def planned():
    params, roots = small_goals()
    return mcts.plan(TOY, params, roots, KEY, CONFIG)


def test_planted_goals_are_solved_by_shortest_legal_plans():
    params, roots = small_goals()
    plans = planned()
    assert plans.solved.all()
    for i in range(8):
        actions = plans.actions[i, : plans.length[i]]
        assert (plans.actions[i, plans.length[i] :] == -1).all()
        assert replay_eagerly(row(params, i), row(roots, i), actions).all()
        assert plans.length[i] == shortest_plan_length(row(params, i), row(roots, i))


def test_plan_is_deterministic_by_seed():
    params, roots = small_goals()
    again = mcts.plan(TOY, params, roots, KEY, CONFIG)
    jax.tree.map(np.testing.assert_array_equal, again, planned())


def test_batched_plans_equal_one_problem_at_a_time_and_the_tree_holds_only_legal_actions():
    """The unbatched search (no vmap) plans each problem as the batch does; every expanded edge
    of its tree is a legal action of the parent's stored state, even where the prior favours
    illegal ones (putting down a goal object not held is `relevant`)."""
    params, roots = small_goals()
    keys = mcts.row_keys(KEY, 8)

    @jax.jit
    def one(p, r, k):
        tree, best = mcts.search(TOY, p, r, k, CONFIG)
        return tree, mcts.prune(TOY, p, r, best, CONFIG)

    for i in (0, 5):
        tree, alone = one(row(params, i), row(roots, i), keys[i])
        jax.tree.map(np.testing.assert_array_equal, alone, row(planned(), i))
        legal = np.asarray(jax.vmap(lambda s: toy_legal(row(params, i), s))(tree.states))
        expanded = np.asarray(tree.children) >= 0
        assert expanded.sum() == CONFIG.num_simulations - (np.asarray(tree.visits)[1:] == 0).sum()
        assert legal[expanded].all()
        assert (np.asarray(row(params, i)["relevant"]) & ~legal[0]).any()


def test_sharded_plans_equal_unsharded_ones():
    """Six rows over 2 x 2 data shards (padded to eight): each row as the unsharded batch."""
    params, roots = small_goals()
    partitioner = Partitioner.from_config(MeshConfig(data=2, fsdp=2, tensor=2))
    six = lambda tree: jax.tree.map(lambda x: x[:6], tree)
    sharded = mcts.plan(TOY, six(params), six(roots), KEY, CONFIG, partitioner)
    jax.tree.map(np.testing.assert_array_equal, sharded, six(planned()))


def test_best_prefix_is_the_highest_cumulative_reward_and_the_shortest_among_equals():
    def path(rewards, length, solved_at=None):
        n = 8
        solved = np.zeros(n, bool)
        if solved_at is not None:
            solved[solved_at] = True
        padded = np.zeros(n, np.float32)
        padded[: len(rewards)] = rewards
        actions = jnp.arange(n, dtype=jnp.int32) + 10
        return mcts.Path(actions, jnp.asarray(padded), jnp.asarray(solved), jnp.int32(length))

    # Cumulative: -0.1, 1.8, 1.7, -0.4, 6.5, 6.4: the fifth step (solving) ends the best prefix.
    best = mcts.best_prefix(path([-0.1, 1.9, -0.1, -2.1, 6.9, -0.1], 6, solved_at=4))
    assert int(best.length) == 5 and bool(best.solved)
    np.testing.assert_allclose(best.reward, 6.5, rtol=1e-6)
    np.testing.assert_array_equal(best.actions, [10, 11, 12, 13, 14, -1, -1, -1])
    # Equal cumulative rewards (1.0 after steps 1, 2 and 4): the shortest prefix.
    best = mcts.best_prefix(path([1.0, 0.0, -0.5, 0.5], 4))
    assert int(best.length) == 1 and not bool(best.solved)
    # Only costs: the empty plan. Steps past the path's length never count.
    best = mcts.best_prefix(path([-0.1, -0.1, 9.0], 2))
    assert int(best.length) == 0 and float(best.reward) == 0.0
    assert (np.asarray(best.actions) == -1).all()


def test_prune_drops_redundant_actions_and_keeps_needed_ones():
    """Object 0 from place 1 to place 4 and switch 0 (at place 1) on, from place 0. The plan
    wanders (walk to 2, walk to 3), flips a decoy switch, and needs the rest: dropping `walk
    to 1` would make the toggle and the pick illegal, dropping `walk to 4` would leave the
    object at 3."""
    params = {
        "switch_place": np.array([1, 1, 5, 5], np.int32),
        "goal_kind": np.array([OBJECT_AT, SWITCH_ON, NONE], np.int32),
        "goal_item": np.array([0, 0, 0], np.int32),
        "goal_place": np.array([4, 0, 0], np.int32),
        "relevant": np.zeros(ACTIONS, bool),
    }
    root = {
        "agent": np.int32(0),
        "held": np.int32(-1),
        "where": np.array([1, 2, 3, 5, 5, 5], np.int32),
        "on": np.zeros(SWITCHES, bool),
    }
    wandering = [WALK + 2, WALK + 1, TOGGLE + 0, TOGGLE + 1, PICK + 0, WALK + 3, WALK + 4, PUT + 0]
    needed = [WALK + 1, TOGGLE + 0, PICK + 0, WALK + 4, PUT + 0]
    actions = np.full(CONFIG.max_depth, -1, np.int32)
    actions[: len(wandering)] = wandering
    plan = mcts.Plan(jnp.asarray(actions), jnp.int32(len(wandering)), jnp.float32(0.0), jnp.bool_(True))
    pruned = jax.jit(lambda p, r, plan: mcts.prune(TOY, p, r, plan, CONFIG))(params, root, plan)
    assert pruned.length == len(needed) and bool(pruned.solved)
    np.testing.assert_array_equal(pruned.actions[: len(needed)], needed)
    assert (np.asarray(pruned.actions[len(needed) :]) == -1).all()
    # Two goals (+4), all solved (+5), five steps (-0.5).
    np.testing.assert_allclose(pruned.reward, 8.5, rtol=1e-6)


def test_prune_cuts_loops_that_single_removals_cannot():
    """Switch 0 on, off and on again, and a walk away and back: removing any one of those
    actions changes the end state, but each stretch returns to a state the plan was in."""
    params = {
        "switch_place": np.array([1, 1, 5, 5], np.int32),
        "goal_kind": np.array([SWITCH_ON, NONE, NONE], np.int32),
        "goal_item": np.array([0, 0, 0], np.int32),
        "goal_place": np.array([0, 0, 0], np.int32),
        "relevant": np.zeros(ACTIONS, bool),
    }
    root = {"agent": np.int32(0), "held": np.int32(-1), "where": np.array([1, 2, 3, 5, 5, 5], np.int32), "on": np.zeros(SWITCHES, bool)}
    looping = [WALK + 1, WALK + 2, WALK + 1, TOGGLE + 0, TOGGLE + 0, TOGGLE + 0]
    actions = np.full(CONFIG.max_depth, -1, np.int32)
    actions[: len(looping)] = looping
    plan = mcts.Plan(jnp.asarray(actions), jnp.int32(len(looping)), jnp.float32(0.0), jnp.bool_(True))
    keep = jax.jit(lambda p, r, plan: mcts.outside_loops(TOY, p, r, plan))(params, root, plan)
    # After walk to 1 the plan is back in that state after action 4 (switch off again): it jumps
    # there and takes the last toggle.
    np.testing.assert_array_equal(np.flatnonzero(keep), [0, 5])
    pruned = jax.jit(lambda p, r, plan: mcts.prune(TOY, p, r, plan, CONFIG))(params, root, plan)
    np.testing.assert_array_equal(pruned.actions[: int(pruned.length)], [WALK + 1, TOGGLE + 0])
    assert bool(pruned.solved)


def test_undo_penalty_decides_whether_toggling_a_goal_pays():
    """E2WM's code: -1.5 per goal undone against +2 per goal done, so undo then redo nets
    +0.3 after two step costs and the search could farm it; the default 2.0 nets -0.2."""
    one, none = jnp.array([True, False]), jnp.array([False, False])

    def cycle(undo_penalty):
        config = mcts.SearchConfig(undo_penalty=undo_penalty)
        return float(mcts.transition_reward(one, none, config) + mcts.transition_reward(none, one, config))

    np.testing.assert_allclose(cycle(1.5), 0.3, rtol=1e-6)
    np.testing.assert_allclose(cycle(2.0), -0.2, rtol=1e-6)
    both = jnp.array([True, True])
    solving = mcts.transition_reward(one, both, mcts.SearchConfig())
    np.testing.assert_allclose(solving, 2.0 - 0.1 + 5.0, rtol=1e-6)


def test_search_statistics_equal_mctx_muzero_policy():
    """The same search in mctx 0.0.71 and here: root visit counts, Q values and root value
    agree on four 40-simulation trees.

    Made comparable: every action legal (the toy step is a no-op where an action does not
    apply; mctx masks invalid actions only at the root), leaf values from a fixed function of
    the state instead of rollouts (mctx has none), distinct random prior logits (ties are then
    absent, so tie breaking cannot differ), and mctx's MuZero PUCT (`muzero_policy`'s search
    with no Dirichlet noise) with our c_init/c_base and a Q transform that returns the raw Q
    (r + discount * V, 0 if unvisited), as E2WM's score uses. A solved state is terminal
    here; in mctx it becomes absorbing with reward, value and discount 0, which gives the same
    Q above it. Depth never binds (mctx re-evaluates a node at max depth, we do not)."""
    mctx = pytest.importorskip("mctx")
    sims, batch = 40, 4
    config = mcts.SearchConfig(num_simulations=sims, max_depth=sims + 1)

    def value(params, state):
        mix = state["agent"] + 2.0 * state["where"].sum() + 3.0 * state["held"] + 5.0 * state["on"].sum()
        return jnp.sin(1.0 + mix)

    problem = dataclasses.replace(
        TOY, legal=lambda p, s: jnp.ones(ACTIONS, bool), prior=lambda p, s: p["prior"], value=value
    )
    rng = np.random.default_rng(11)
    rows = [toy_problem(rng, 1, 1) for _ in range(batch)]
    params, roots = stack([p for p, _ in rows]), stack([r for _, r in rows])
    params["prior"] = rng.normal(size=(batch, ACTIONS)).astype(np.float32)

    ours = jax.jit(jax.vmap(lambda p, r, k: mcts.search(problem, p, r, k, config)))
    trees, _ = ours(params, roots, mcts.row_keys(KEY, batch))
    visits, q = jax.vmap(lambda t: mcts.root_statistics(t, config))(trees)

    def recurrent(p, key, action, state):
        def one(p, s, a):
            done = toy_goals(p, s).all()
            nxt = jax.tree.map(lambda x, y: jnp.where(done, x, y), s, toy_step(p, s, a))
            after = toy_goals(p, nxt)
            reward = jnp.where(done, 0.0, mcts.transition_reward(toy_goals(p, s), after, config))
            output = mctx.RecurrentFnOutput(
                reward=reward,
                discount=jnp.where(done, 0.0, config.discount),
                prior_logits=p["prior"],
                value=jnp.where(done | after.all(), 0.0, value(p, nxt)),
            )
            return output, nxt

        return jax.vmap(one)(p, state, action)

    root_values = jax.vmap(value)(params, roots)
    root = mctx.RootFnOutput(prior_logits=params["prior"], value=root_values, embedding=roots)
    # muzero_policy's search without its Dirichlet noise (here 0) and final action sample.
    select = functools.partial(
        mctx.muzero_action_selection, pb_c_init=config.c_init, pb_c_base=config.c_base,
        qtransform=lambda tree, node: tree.qvalues(node),
    )
    tree = jax.jit(lambda p, r: mctx.search(
        p, KEY, root=r, recurrent_fn=recurrent, root_action_selection_fn=functools.partial(select, depth=0),
        interior_action_selection_fn=select, num_simulations=sims,
    ))(params, root)
    summary = tree.summary()
    np.testing.assert_array_equal(visits, summary.visit_counts)
    np.testing.assert_allclose(q, summary.qvalues, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(trees.values[:, 0], summary.value, rtol=1e-5, atol=1e-6)
    assert (np.asarray(visits) > 1).sum() > batch  # the trees grew below the root


def test_measure_reports_speed_and_goals_solved():
    params, roots = small_goals()
    planned()  # compiled already: measure's first call is then quick too
    report = mcts.measure(TOY, params, roots, KEY, CONFIG)
    assert report["goals"] == 8 and report["solved"] == 8 and report["simulations_per_second"] > 0


def test_bad_settings_and_batches_are_refused():
    with pytest.raises(mcts.PlanningError, match="num_simulations"):
        mcts.SearchConfig(num_simulations=0)
    params, roots = small_goals()
    with pytest.raises(mcts.PlanningError, match=r"leading sizes \[1, 8\]"):
        mcts.plan(TOY, params, row(roots, slice(0, 1)), KEY, CONFIG)
    with pytest.raises(mcts.PlanningError, match="None"):
        mcts.plan(TOY, params, row(roots, 0), KEY, CONFIG)
