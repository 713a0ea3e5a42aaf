"""Goal-directed planning by batched Monte-Carlo tree search in pure JAX (E2WM's planner).

E2WM (Xiang et al. 2023) finds household plans with MCTS: reward +2 per newly satisfied goal
predicate, -0.1 per step, a penalty per goal predicate undone, +5 once all hold (discount 0.99,
depth 25); PUCT selection; random rollouts; the plan is the best cumulative-reward prefix of
any simulation's path, then pruned of actions no goal needs.

The search is generic over a `Problem`: pure functions of per-problem constants `params` and a
dynamic `state` (both pytrees of arrays). `search` plans for one problem; `plan` runs it
vmapped over a batch, jitted, optionally sharded over a mesh's data axes.

Selection is the PUCT form of AlphaZero/MuZero that the VirtualHome MCTS code E2WM builds on
uses: Q + (c_init + log((1 + N + c_base) / c_base)) * prior * sqrt(N) / (1 + n), c_init 10,
c_base 1000. (E2WM's formula as transcribed in methods.md puts c_init inside the log; that code
adds it outside, as here: about 4x more exploration at these N.) Unlike that code, which
visits every child once before any twice, an unvisited action has Q = 0 (mctx's convention),
so the prior decides which to try first: that is what lets a prior bonus for goal objects help.

Why not mctx: its backup is a while loop carrying the whole tree, so under a batch every pass
selects between old and new [batch, nodes, actions] tables (mctx issue 107). Here the descent
carries only a node, a depth and the path, and the backup adds a simulation's returns to its
whole path in one scatter (a path's nodes are distinct). On the toy world of
tests/test_mcts.py, 64 problems x 2,000 simulations with a value function instead of rollouts
took 3.8 CPU-seconds here and 155 in mctx 0.0.71, whose root statistics it equals on small
trees (tested).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from flanjax.errors import FlanjaxError
from flanjax.sharding import BATCH_MESH_AXES, Partitioner, to_host


class PlanningError(FlanjaxError, ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class Problem:
    """A planning problem as pure functions of one problem (`params`: per-problem constants such
    as the home, the goal and the candidate actions; `state`: the dynamic state). Build it once:
    compiled planners are cached per Problem (its functions hash by identity)."""

    legal: Callable[[Any, Any], jax.Array]  # bool[A]: which of the A candidate actions apply now
    step: Callable[[Any, Any, jax.Array], Any]  # the next state after an action index
    goals: Callable[[Any, Any], jax.Array]  # bool[G]: which goal predicates hold (padding holds)
    relevant: Callable[[Any], jax.Array]  # bool[A]: actions touching a goal's objects
    # Optional: prior logits f32[A] per state replacing `relevant_bonus * relevant` (a learned
    # policy, or distinct priors for an exact comparison with another search).
    prior: Callable[[Any, Any], jax.Array] | None = None
    # Optional: a leaf value f32[] replacing random rollouts (a learned value, or a fixed one).
    value: Callable[[Any, Any], jax.Array] | None = None


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    """E2WM's reward and search settings."""

    num_simulations: int = 2000  # E2WM's code used 20,000 on one goal at a time
    max_depth: int = 25  # the longest path (tree + rollout), hence the longest plan
    discount: float = 0.99
    goal_reward: float = 2.0  # per goal predicate newly satisfied
    step_cost: float = 0.1
    # Per goal predicate undone. E2WM's code uses 1.5: undo (-1.5) then redo (+2) nets +0.3
    # after two step costs, so the search profits from toggling a goal; 2.0 makes toggling lose.
    undo_penalty: float = 2.0
    solved_bonus: float = 5.0  # once all goal predicates hold (the state is then terminal)
    c_init: float = 10.0  # PUCT: (c_init + log((1 + N + c_base) / c_base)) * p * sqrt(N) / (1 + n)
    c_base: float = 1000.0
    # Prior logits bonus for `relevant` actions. Uniform priors solved 0% of ~10-step goals in
    # 2,000 simulations on one toy world, this bonus 98-100%. On the toy world of the tests
    # (64 goals of ~9 steps, 2,000 simulations): no bonus anywhere 62-69%, this one alone 94%,
    # the rollout's alone 100%, both 100%.
    relevant_bonus: float = 2.0
    rollout_relevant_bonus: float = 2.0  # the same bias in the random rollouts' action logits
    prune: bool = True  # `plan` drops actions that no goal needs

    def __post_init__(self):
        if self.num_simulations < 1 or self.max_depth < 1:
            raise PlanningError(
                f"num_simulations ({self.num_simulations}) and max_depth ({self.max_depth}) "
                "must be at least 1."
            )


class Plan(NamedTuple):
    actions: jax.Array  # int32[max_depth]: action indices, -1 after `length`
    length: jax.Array  # int32[]
    reward: jax.Array  # f32[]: undiscounted sum of the plan's step rewards
    solved: jax.Array  # bool[]: all goal predicates hold after the plan


class Tree(NamedTuple):
    """One problem's tree in fixed-size arrays: node 0 is the root (simulation 0 evaluates it),
    node i the node that simulation i expanded (left unused when it expanded none)."""

    states: Any  # the state pytree, leaves [nodes, ...]
    rewards: jax.Array  # f32[nodes]: the reward of the step into the node
    solved: jax.Array  # bool[nodes]: all goal predicates hold
    visits: jax.Array  # int32[nodes]: simulations through the node (its own evaluation counts)
    values: jax.Array  # f32[nodes]: mean discounted return from the node
    children: jax.Array  # int32[nodes, A]: the child per action, -1 where not expanded
    logits: jax.Array  # f32[nodes, A]: prior logits, -inf where the action is illegal


class Path(NamedTuple):
    """The steps of one simulated path (tree part then rollout), padded to max_depth."""

    actions: jax.Array  # int32[L]
    rewards: jax.Array  # f32[L]
    solved: jax.Array  # bool[L]: all goals hold after the step
    length: jax.Array  # int32[]: the valid steps


def transition_reward(before: jax.Array, after: jax.Array, config: SearchConfig) -> jax.Array:
    """E2WM's reward for one step, from the goal predicates holding before and after it."""
    gained = jnp.sum(after & ~before)
    lost = jnp.sum(before & ~after)
    solved_now = jnp.all(after) & ~jnp.all(before)
    return (
        config.goal_reward * gained
        - config.undo_penalty * lost
        - config.step_cost
        + config.solved_bonus * solved_now
    ).astype(jnp.float32)


def _select_state(pred: jax.Array, a: Any, b: Any) -> Any:
    return jax.tree.map(lambda x, y: jnp.where(pred, x, y), a, b)


def _prior_logits(problem: Problem, params: Any, state: Any, config: SearchConfig) -> jax.Array:
    if problem.prior is not None:
        logits = problem.prior(params, state)
    else:
        logits = config.relevant_bonus * problem.relevant(params)
    return jnp.where(problem.legal(params, state), logits.astype(jnp.float32), -jnp.inf)


def _rollout(
    problem: Problem, params: Any, state: Any, steps: jax.Array, noise: jax.Array, config: SearchConfig
) -> tuple[jax.Array, Path]:
    """Random legal actions (relevant ones favoured) for `steps` steps or until solved, at a
    fixed trip count (max_depth) so that a batch of rollouts runs in lockstep. `noise`:
    uniform f32[max_depth, A]. Returns the discounted return and the path."""
    bias = config.rollout_relevant_bonus * problem.relevant(params).astype(jnp.float32)
    gumbel = -jnp.log(-jnp.log(jnp.clip(noise, jnp.finfo(jnp.float32).tiny, 1.0)))  # argmax samples

    def one(carry, step):
        i, noise = step
        state, held, done, scale, ret = carry
        legal = problem.legal(params, state)
        action = jnp.argmax(jnp.where(legal, bias + noise, -jnp.inf)).astype(jnp.int32)
        active = (i < steps) & ~done & legal.any()
        nxt = problem.step(params, state, action)
        after = problem.goals(params, nxt)
        reward = transition_reward(held, after, config)
        ret = ret + jnp.where(active, scale * reward, 0.0)
        carry = (
            _select_state(active, nxt, state),
            jnp.where(active, after, held),
            done | (active & after.all()),
            scale * config.discount,
            ret,
        )
        return carry, (action, reward, active, after.all())

    held = problem.goals(params, state)
    init = (state, held, held.all(), jnp.float32(1.0), jnp.float32(0.0))
    steps_and_noise = (jnp.arange(config.max_depth), gumbel)
    (_, _, _, _, ret), (actions, rewards, active, solved) = jax.lax.scan(one, init, steps_and_noise)
    return ret, Path(jnp.where(active, actions, -1), rewards, solved, active.sum().astype(jnp.int32))


def _evaluate(
    problem: Problem,
    params: Any,
    state: Any,
    terminal: jax.Array,
    steps: jax.Array,
    noise: jax.Array,
    config: SearchConfig,
) -> tuple[jax.Array, Path]:
    """A leaf's value (0 at a terminal node) and the rollout path behind it (empty when a value
    function replaces rollouts)."""
    if problem.value is None:
        return _rollout(problem, params, state, steps, noise, config)
    value = jnp.where(terminal, 0.0, problem.value(params, state)).astype(jnp.float32)
    length = config.max_depth
    empty = Path(
        jnp.full(length, -1, jnp.int32), jnp.zeros(length, jnp.float32), jnp.zeros(length, bool), jnp.int32(0)
    )
    return value, empty


def best_prefix(path: Path) -> Plan:
    """The prefix of a path with the highest cumulative (undiscounted) reward; among equal ones
    the shortest, so the empty prefix (reward 0) wins over a path that only costs."""
    length = path.actions.shape[0]
    steps = jnp.arange(length)
    rewards = jnp.where(steps < path.length, path.rewards, 0.0)
    cumulative = jnp.concatenate([jnp.zeros(1, jnp.float32), jnp.cumsum(rewards)])
    cumulative = jnp.where(jnp.arange(length + 1) <= path.length, cumulative, -jnp.inf)
    k = jnp.argmax(cumulative).astype(jnp.int32)  # the first maximum: the shortest
    return Plan(
        actions=jnp.where(steps < k, path.actions, -1).astype(jnp.int32),
        length=k,
        reward=cumulative[k],
        solved=(k > 0) & path.solved[jnp.maximum(k - 1, 0)],
    )


def _better(a: Plan, b: Plan) -> Plan:
    """`b` if it earns more than `a`, or as much in fewer steps; else `a`."""
    take = (b.reward > a.reward) | ((b.reward == a.reward) & (b.length < a.length))
    return jax.tree.map(lambda x, y: jnp.where(take, y, x), a, b)


def _terminal(tree: Tree, node: jax.Array) -> jax.Array:
    return tree.solved[node] | ~jnp.isfinite(tree.logits[node]).any()


def _choose(tree: Tree, node: jax.Array, noise: jax.Array, config: SearchConfig) -> jax.Array:
    """PUCT (E2WM's score; mctx's `muzero_policy` form with raw Q): Q + (c_init + log((1 + N +
    c_base) / c_base)) * sqrt(N) * prior / (1 + n), Q = r + discount * V(child) and 0 for an
    unvisited action, N the node's visits. Illegal actions never; ties broken at random."""
    children = tree.children[node]
    seen = children >= 0
    child = jnp.maximum(children, 0)
    q = jnp.where(seen, tree.rewards[child] + config.discount * tree.values[child], 0.0)
    n_child = jnp.where(seen, tree.visits[child], 0)
    n = tree.visits[node]
    pb_c = config.c_init + jnp.log((n + config.c_base + 1.0) / config.c_base)
    logits = tree.logits[node]
    explore = jnp.sqrt(n) * pb_c * jax.nn.softmax(logits) / (n_child + 1)
    score = jnp.where(jnp.isfinite(logits), q + explore, -jnp.inf)
    ties = score == score.max()
    return jnp.argmax(jnp.where(ties, noise, -1.0)).astype(jnp.int32)


def _descend(
    tree: Tree, noise: jax.Array, config: SearchConfig
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
    """Selects from the root down to an action not yet expanded, a terminal node or max depth
    (`noise`: uniform f32[max_depth, A] for tie breaks). An unvisited root is the leaf itself.

    Returns the path's nodes int32[max_depth + 1] (out-of-range padding), the actions taken
    int32[max_depth], the last node reached, its depth and the action to expand there (-1:
    none)."""
    nodes = tree.visits.shape[0]
    depth_limit = config.max_depth

    def down(carry):
        node, depth, path, actions, _, _ = carry
        action = _choose(tree, node, noise[depth], config)
        child = tree.children[node, action]
        new = child < 0
        nxt = jnp.where(new, node, child)
        deeper = depth + (~new)
        going = ~new & ~_terminal(tree, nxt) & (deeper < depth_limit)
        path, actions = path.at[deeper].set(nxt), actions.at[depth].set(action)
        return nxt, deeper, path, actions, jnp.where(new, action, -1), going

    path = jnp.full(depth_limit + 1, nodes, jnp.int32).at[0].set(0)
    going = ~_terminal(tree, 0) & (tree.visits[0] > 0)
    init = (jnp.int32(0), jnp.int32(0), path, jnp.full(depth_limit, -1, jnp.int32), jnp.int32(-1), going)
    node, depth, path, actions, expand, _ = jax.lax.while_loop(lambda c: c[-1], down, init)
    return path, actions, node, depth, expand


def _backup(
    tree: Tree, path: jax.Array, leaf_depth: jax.Array, value: jax.Array, config: SearchConfig
) -> Tree:
    """Adds the simulation's discounted return at each node of its path to the node's mean:
    the returns by one reverse scan over max_depth + 1 steps, then one scatter."""
    nodes = tree.visits.shape[0]
    inside = jnp.minimum(path, nodes - 1)
    next_rewards = jnp.append(tree.rewards[inside][1:], 0.0)

    def back(ret, step):
        i, reward = step
        ret = jnp.where(i == leaf_depth, value, reward + config.discount * ret)
        return ret, ret

    positions = jnp.arange(path.shape[0])
    _, returns = jax.lax.scan(back, jnp.float32(0.0), (positions, next_rewards), reverse=True)
    count = tree.visits[inside]
    mean = (tree.values[inside] * count + returns) / (count + 1.0)
    return tree._replace(
        visits=tree.visits.at[path].add(1, mode="drop"),
        values=tree.values.at[path].set(mean, mode="drop"),
    )


def _path_of(
    tree: Tree, path: jax.Array, actions: jax.Array, leaf_depth: jax.Array, rollout: Path
) -> Path:
    """The simulation's whole path: its steps in the tree, then its rollout."""
    length = actions.shape[0]
    steps = jnp.arange(length)
    nodes = jnp.minimum(path[1:], tree.visits.shape[0] - 1)
    behind = jnp.clip(steps - leaf_depth, 0, length - 1)
    in_tree = steps < leaf_depth
    return Path(
        actions=jnp.where(in_tree, actions, rollout.actions[behind]),
        rewards=jnp.where(in_tree, tree.rewards[nodes], rollout.rewards[behind]),
        solved=jnp.where(in_tree, tree.solved[nodes], rollout.solved[behind]),
        length=jnp.minimum(leaf_depth + rollout.length, length),
    )


def _new_tree(problem: Problem, params: Any, root: Any, config: SearchConfig) -> Tree:
    nodes = config.num_simulations + 1
    logits = _prior_logits(problem, params, root, config)
    return Tree(
        states=jax.tree.map(lambda x: jnp.broadcast_to(x, (nodes, *jnp.shape(x))), root),  # root copies
        rewards=jnp.zeros(nodes, jnp.float32),
        solved=jnp.zeros(nodes, bool).at[0].set(problem.goals(params, root).all()),
        visits=jnp.zeros(nodes, jnp.int32),
        values=jnp.zeros(nodes, jnp.float32),
        children=jnp.full((nodes, logits.shape[0]), -1, jnp.int32),
        logits=jnp.zeros((nodes, logits.shape[0]), jnp.float32).at[0].set(logits),
    )


def _simulate(
    problem: Problem,
    params: Any,
    config: SearchConfig,
    key: jax.Array,
    sim: jax.Array,
    tree: Tree,
    best: Plan,
) -> tuple[Tree, Plan]:
    """Simulation `sim`: descend, expand node `sim` (simulation 0 evaluates the root instead),
    evaluate it, back up, and keep the best prefix of its path."""
    nodes = tree.visits.shape[0]
    noise = jax.random.uniform(jax.random.fold_in(key, sim), (2, config.max_depth, tree.logits.shape[1]))
    path, actions, node, depth, action = _descend(tree, noise[0], config)
    expand = action >= 0
    parent = jax.tree.map(lambda x: x[node], tree.states)
    child = problem.step(params, parent, jnp.maximum(action, 0))
    after = problem.goals(params, child)
    reward = transition_reward(problem.goals(params, parent), after, config)
    slot = jnp.where(expand, sim, nodes)  # out of range: the writes below are dropped
    tree = tree._replace(
        states=jax.tree.map(lambda buf, x: buf.at[slot].set(x, mode="drop"), tree.states, child),
        rewards=tree.rewards.at[slot].set(reward, mode="drop"),
        solved=tree.solved.at[slot].set(after.all(), mode="drop"),
        logits=tree.logits.at[slot].set(_prior_logits(problem, params, child, config), mode="drop"),
        children=tree.children.at[jnp.where(expand, node, nodes), jnp.maximum(action, 0)].set(
            sim, mode="drop"
        ),
    )
    leaf = jnp.where(expand, sim, node)
    leaf_depth = depth + expand
    path = path.at[leaf_depth].set(leaf)
    leaf_state = _select_state(expand, child, parent)
    steps_left = config.max_depth - leaf_depth
    value, rollout = _evaluate(
        problem, params, leaf_state, _terminal(tree, leaf), steps_left, noise[1], config
    )
    tree = _backup(tree, path, leaf_depth, value, config)
    return tree, _better(best, best_prefix(_path_of(tree, path, actions, leaf_depth, rollout)))


def search(
    problem: Problem, params: Any, root: Any, key: jax.Array, config: SearchConfig
) -> tuple[Tree, Plan]:
    """MCTS from `root` for one problem: the tree and the best plan found (unpruned).

    Simulation 0 evaluates the root (one rollout, or the value function); simulations 1 to
    num_simulations each add one node."""
    tree = _new_tree(problem, params, root, config)
    empty = Plan(jnp.full(config.max_depth, -1, jnp.int32), jnp.int32(0), jnp.float32(0.0), tree.solved[0])

    def body(sim, carry):
        return _simulate(problem, params, config, key, sim, *carry)

    return jax.lax.fori_loop(0, config.num_simulations + 1, body, (tree, empty))


def root_statistics(tree: Tree, config: SearchConfig) -> tuple[jax.Array, jax.Array]:
    """Visit counts int32[A] and Q values f32[A] of the root's actions (0 where unvisited)."""
    children = tree.children[0]
    child = jnp.maximum(children, 0)
    seen = children >= 0
    q = jnp.where(seen, tree.rewards[child] + config.discount * tree.values[child], 0.0)
    return jnp.where(seen, tree.visits[child], 0), q


def replay(
    problem: Problem, params: Any, root: Any, actions: jax.Array, keep: jax.Array, config: SearchConfig
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Runs the kept actions from `root`: whether each was legal when taken, the goal
    predicates holding at the end, and the undiscounted reward."""

    def one(carry, step):
        state, held, ok, total = carry
        action, kept = step
        action = jnp.maximum(action, 0)
        nxt = problem.step(params, state, action)
        after = problem.goals(params, nxt)
        carry = (
            _select_state(kept, nxt, state),
            jnp.where(kept, after, held),
            ok & (~kept | problem.legal(params, state)[action]),
            total + jnp.where(kept, transition_reward(held, after, config), 0.0),
        )
        return carry, None

    init = (root, problem.goals(params, root), jnp.bool_(True), jnp.float32(0.0))
    (_, held, ok, total), _ = jax.lax.scan(one, init, (actions, keep))
    return ok, held, total


def outside_loops(problem: Problem, params: Any, root: Any, plan: Plan) -> jax.Array:
    """bool[max_depth]: the plan's actions that are not part of a loop. A stretch of actions
    that brings the state back to one it was in before does nothing ("Walk to bedroom. Walk to
    kitchen. Walk to fork." back at the cabinet it left), so it goes: from each state the plan
    jumps to its last return to that state."""
    length = plan.actions.shape[0]
    steps = jnp.arange(length)

    def one(state, action):
        after = problem.step(params, state, jnp.maximum(action, 0))
        return after, after

    _, after = jax.lax.scan(one, root, plan.actions)
    states = jax.tree.map(lambda first, rest: jnp.concatenate([first[None], rest]), root, after)
    flat = jnp.concatenate([x.reshape(length + 1, -1).astype(jnp.float32) for x in jax.tree.leaves(states)], axis=1)
    reached = jnp.arange(length + 1) <= plan.length
    same = jnp.all(flat[:, None] == flat[None], axis=-1) & reached[:, None] & reached[None]
    last_return = jnp.max(jnp.where(same, jnp.arange(length + 1)[None], -1), axis=1)  # >= its own index

    def jump(carry):
        here, keep = carry
        back = last_return[here]
        return back + 1, keep & ~((steps >= here) & (steps < back))  # action `back` is taken

    _, keep = jax.lax.while_loop(lambda c: c[0] < plan.length, jump, (jnp.int32(0), steps < plan.length))
    return keep


def prune(problem: Problem, params: Any, root: Any, plan: Plan, config: SearchConfig) -> Plan:
    """Cuts the plan's loops (`outside_loops`), then drops, one at a time (the earliest first),
    actions whose removal keeps every remaining action legal and every goal predicate the plan
    achieved satisfied at the end, until none can go.

    Each round replays the plan without each one of its actions, and the plan itself (the
    last candidate), in one vmapped call; the last round removes nothing, so its replay of
    the plan gives the result's reward and goals."""
    length = plan.actions.shape[0]
    steps = jnp.arange(length)

    def one_round(carry):
        keep, achieved, _, _, _, first = carry
        masks = jax.vmap(lambda i: keep.at[i].set(False, mode="drop"))(jnp.arange(length + 1))
        ok, held, reward = jax.vmap(lambda m: replay(problem, params, root, plan.actions, m, config))(masks)
        achieved = jnp.where(first, held[length], achieved)
        can = keep & ok[:length] & jnp.all(held[:length] | ~achieved, axis=1)
        keep = keep.at[jnp.argmax(can)].set(keep[jnp.argmax(can)] & ~can.any())
        return keep, achieved, held[length], reward[length], can.any(), jnp.bool_(False)

    goals = problem.goals(params, root)
    init = (outside_loops(problem, params, root, plan), goals, goals, jnp.float32(0.0), jnp.bool_(True), jnp.bool_(True))
    keep, _, held, reward, _, _ = jax.lax.while_loop(lambda c: c[4], one_round, init)
    order = jnp.argsort(~keep, stable=True)  # kept actions first, in their order
    count = keep.sum().astype(jnp.int32)
    actions = jnp.where(steps < count, plan.actions[order], -1).astype(jnp.int32)
    return Plan(actions, count, reward, held.all())


def _plan_one(
    problem: Problem, config: SearchConfig, params: Any, root: Any, key: jax.Array
) -> Plan:
    _, best = search(problem, params, root, key, config)
    return prune(problem, params, root, best, config) if config.prune else best


@functools.cache
def _planner(
    problem: Problem, config: SearchConfig, mesh: jax.sharding.Mesh | None
) -> Callable:
    rows = jax.vmap(functools.partial(_plan_one, problem, config))
    if mesh is None:
        return jax.jit(rows)
    spec = PartitionSpec(BATCH_MESH_AXES)  # each device plans its own rows: no communication
    return jax.jit(jax.shard_map(rows, mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False))


def row_keys(key: jax.Array, rows: int) -> jax.Array:
    """The per-problem keys `plan` uses: problem i gets `fold_in(key, i)` whatever the batch
    size, as raw uint32 keys (they shard like data)."""
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(rows))
    return jax.random.key_data(keys) if jnp.issubdtype(keys.dtype, jax.dtypes.prng_key) else keys


def _batch_size(params_batch: Any, roots: Any) -> int:
    sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in jax.tree.leaves((params_batch, roots))}
    if len(sizes) != 1 or None in sizes or 0 in sizes:
        raise PlanningError(
            f"plan takes a batch of problems: every array of params_batch and roots needs the same "
            f"leading (batch) axis of at least one row; found leading sizes {sorted(sizes, key=str)}."
        )
    return sizes.pop()


def plan(
    problem: Problem,
    params_batch: Any,
    roots: Any,
    key: jax.Array,
    config: SearchConfig = SearchConfig(),
    partitioner: Partitioner | None = None,
) -> Plan:
    """Plans for a batch of problems (leading axis of `params_batch` and `roots`); problem i
    uses key `fold_in(key, i)`, so a plan depends neither on the batch size nor on the mesh.
    With a partitioner the rows are split over its data axes (padded to a multiple of their
    size). Returns the plans as host (NumPy) arrays."""
    rows = _batch_size(params_batch, roots)
    keys = row_keys(key, rows)
    if partitioner is None:
        return jax.tree.map(np.asarray, _planner(problem, config, None)(params_batch, roots, keys))
    shards = partitioner.data_parallel_size
    padded = -(-rows // shards) * shards
    leaves, treedef = jax.tree.flatten((params_batch, roots, keys))
    # Padding repeats the last row; shard_global_batch takes a flat mapping of host arrays.
    host = {
        str(i): np.concatenate([np.asarray(x), np.repeat(np.asarray(x)[-1:], padded - rows, 0)])
        for i, x in enumerate(leaves)
    }
    with partitioner.activate():
        sharded = partitioner.shard_global_batch(host)
        inputs = jax.tree.unflatten(treedef, [sharded[str(i)] for i in range(len(leaves))])
        plans = _planner(problem, config, partitioner.mesh)(*inputs)
    return jax.tree.map(lambda x: to_host(x)[:rows], plans)


def measure(
    problem: Problem,
    params_batch: Any,
    roots: Any,
    key: jax.Array,
    config: SearchConfig = SearchConfig(),
    partitioner: Partitioner | None = None,
) -> dict:
    """Times `plan` on a batch (the second call; the first compiles): simulations per second
    and goals solved. For `flanjax bench plan`."""
    rows = _batch_size(params_batch, roots)
    start = time.perf_counter()
    plan(problem, params_batch, roots, key, config, partitioner)
    first = time.perf_counter() - start
    start, cpu_start = time.perf_counter(), time.process_time()
    plans = plan(problem, params_batch, roots, key, config, partitioner)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    solved = plans.solved.astype(bool)
    return {
        "goals": rows,
        "num_simulations": config.num_simulations,
        "max_depth": config.max_depth,
        "seconds": round(seconds, 3),
        "cpu_seconds": round(cpu_seconds, 3),  # all threads; on a busy host wall time overstates
        "compile_seconds": round(max(first - seconds, 0.0), 3),
        "simulations_per_second": round(rows * config.num_simulations / seconds, 1),
        "solved": int(solved.sum()),
        "solved_fraction": round(float(solved.mean()), 4),
        "mean_plan_length": round(float(plans.length[solved].mean()), 2) if solved.any() else None,
        "devices": 1 if partitioner is None else partitioner.data_parallel_size,
    }
