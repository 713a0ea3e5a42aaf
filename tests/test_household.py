"""The household world: homes from a seed, actions against hand-written expectations, goals,
activities and their errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flanjax.worlds import household as h
from flanjax.worlds.activities import LIBRARY
from flanjax.worlds.world import WorldError, add_activity, get_activity, remove_activity


def small_home():
    return h.build_home(
        ["kitchen", "living room"],
        ["fridge", "kitchen counter", "dishwasher", "sofa", "tv", "coffee table"],
        {"milk": "in fridge", "plate": "on kitchen counter", "cup": "on coffee table", "book": "on coffee table"},
        on=["tv"],
        agent_room="living room",
    )


def run(home, state, actions):
    """Applies (verb, name, name) actions one by one, each checked legal first."""
    for verb, *names in actions:
        a, b = [h.find(home, n) for n in names] + [-1] * (2 - len(names))
        assert bool(h.legal(home, state, verb, a, b)), h.action_text(home, verb, a, b) if a >= 0 else verb
        state = h.act(home, state, verb, a, b)
    return state


def is_legal(home, state, verb, *names):
    a, b = [h.find(home, n) for n in names] + [-1] * (2 - len(names))
    return bool(h.legal(home, state, verb, a, b))


def test_preconditions_refuse_what_cannot_be_done():
    home, state = small_home()
    assert not is_legal(home, state, h.WALK, "living room")  # already there
    assert not is_legal(home, state, h.WALK, "fridge")  # another room: walk there first
    assert not is_legal(home, state, h.GRAB, "cup")  # not at the coffee table
    assert not is_legal(home, state, h.SIT, "sofa")  # not at the sofa
    assert not is_legal(home, state, h.SWITCHON, "tv")  # already on (and not at it)
    assert not is_legal(home, state, h.STANDUP)  # standing
    assert not is_legal(home, state, h.GRAB, "sofa")  # not grabbable
    state = run(home, state, [(h.WALK, "coffee table"), (h.GRAB, "cup"), (h.GRAB, "book")])
    assert bool(state.held[h.find(home, "cup")]) and bool(state.held[h.find(home, "book")])
    state = run(home, state, [(h.WALK, "kitchen"), (h.WALK, "kitchen counter")])
    assert not is_legal(home, state, h.GRAB, "plate")  # two hands full
    assert not is_legal(home, state, h.PUTIN, "cup", "kitchen counter")  # a surface, not a container
    assert is_legal(home, state, h.PUTBACK, "cup", "kitchen counter")
    state = run(home, state, [(h.WALK, "dishwasher"), (h.PUTIN, "cup", "dishwasher")])
    assert not is_legal(home, state, h.SWITCHON, "dishwasher")  # open: close it first
    state = run(home, state, [(h.CLOSE, "dishwasher"), (h.SWITCHON, "dishwasher")])
    assert bool(state.on[h.find(home, "dishwasher")])


def test_effects_and_automatic_pre_actions():
    home, state = small_home()
    fridge, milk = h.find(home, "fridge"), h.find(home, "milk")
    state = run(home, state, [(h.WALK, "sofa"), (h.SIT, "sofa"), (h.TURNTO, "tv")])
    assert (int(state.pose), int(state.seat), int(state.facing)) == (h.SITTING, h.find(home, "sofa"), h.find(home, "tv"))
    # Walking while seated stands up first.
    assert h.pre_actions(home, state, h.WALK, h.find(home, "kitchen"), -1) == [(h.STANDUP, -1, -1)]
    state = run(home, state, [(h.WALK, "kitchen")])
    assert (int(state.pose), int(state.seat), int(state.facing), int(state.at)) == (h.STANDING, -1, -1, -1)
    assert int(state.agent_room) == h.find(home, "kitchen")
    # Reaching into the closed fridge opens it first.
    state = run(home, state, [(h.WALK, "fridge")])
    assert not bool(state.opened[fridge])
    assert h.pre_actions(home, state, h.GRAB, milk, -1) == [(h.OPEN, fridge, -1)]
    state = run(home, state, [(h.GRAB, "milk")])
    assert bool(state.opened[fridge]) and bool(state.held[milk]) and int(state.holder[milk]) == -1
    # A held item travels with the agent.
    assert int(h.room_of(home, state, milk)) == h.find(home, "kitchen")
    state = run(home, state, [(h.WALK, "living room"), (h.WALK, "coffee table"), (h.PUTBACK, "milk", "coffee table")])
    assert int(state.holder[milk]) == h.find(home, "coffee table") and not bool(state.inside[milk])
    assert int(h.room_of(home, state, milk)) == h.find(home, "living room")
    assert h.describe(home, state, [milk, fridge]) == ["The milk is on the coffee table.", "The fridge is open."]


def test_plan_sentences():
    home, _ = small_home()
    f = lambda *n: [h.find(home, x) for x in n] + [-1] * (2 - len(n))  # noqa: E731
    assert h.action_text(home, h.WALK, *f("kitchen")) == "Walk to kitchen."
    assert h.action_text(home, h.PUTIN, *f("plate", "dishwasher")) == "Put plate in dishwasher."
    assert h.action_text(home, h.PUTBACK, *f("cup", "coffee table")) == "Put cup on coffee table."
    assert h.action_text(home, h.SWITCHON, *f("tv")) == "Switch on tv."
    assert h.action_text(home, h.STANDUP, -1, -1) == "Stand up."


def test_goals_hold_after_a_planted_plan():
    home, state = small_home()
    goals = h.encode_goals(home, [("inside", "plate", "dishwasher"), ("closed", "dishwasher"), ("sitting", "sofa")])
    holds = np.asarray(h.goals_hold(home, state, goals))
    assert list(holds[:3]) == [False, True, False]  # the dishwasher starts closed
    assert holds[3:].all()  # empty slots hold
    state = run(home, state, [(h.WALK, "kitchen"), (h.WALK, "kitchen counter"), (h.GRAB, "plate"), (h.WALK, "dishwasher"),
                              (h.PUTIN, "plate", "dishwasher"), (h.CLOSE, "dishwasher"), (h.WALK, "living room"),
                              (h.WALK, "sofa"), (h.SIT, "sofa")])  # fmt: skip
    assert np.asarray(h.goals_hold(home, state, goals)).all()


def test_candidate_actions_cover_the_task_objects():
    home, state = small_home()
    goals = h.encode_goals(home, [("inside", "plate", "dishwasher")])
    table, valid, relevant = h.candidate_actions(home, state, goals)
    texts = {h.action_text(home, *map(int, row)) for row in table[valid]}
    assert {"Walk to kitchen.", "Walk to kitchen counter.", "Grab plate.", "Put plate in dishwasher.", "Open dishwasher."} <= texts
    assert "Grab cup." not in texts  # not a task object
    plate = h.find(home, "plate")
    assert all((row[1] == plate or row[2] == plate or row[1] == h.find(home, "dishwasher")) for row in table[relevant])


def test_a_home_lacking_a_class_reports_it():
    home, _ = small_home()
    assert h.encode_goals(home, [("on", "plate", "dining table"), ("holds", "fork")]) == ["dining table", "fork"]


def test_generated_homes_are_deterministic_and_follow_the_tables():
    for seed in range(30):
        home, state = h.generate_home(seed)
        again = h.generate_home(seed)
        for x, y in zip((*home, *state), (*again[0], *again[1])):
            np.testing.assert_array_equal(x, y)
        names = h.names_of(home)
        rooms = [n for n in names if n in h.ROOMS]
        assert 4 <= len(rooms) <= 6 and set(h.ROOMS[:4]) <= set(rooms)
        for e, name in enumerate(names):
            if name in h.ITEMS:
                where = f"{'in' if state.inside[e] else 'on'} {names[state.holder[e]]}"
                assert where in h.ITEMS[name]
            elif name not in h.ROOMS:
                assert names[home.room[e]] == h.FURNITURE_ROOM[name]
    assert not np.array_equal(h.generate_home(0)[0].cls, h.generate_home(1)[0].cls)


def test_dynamics_vmap_over_homes():
    homes = [h.generate_home(s) for s in range(4)]
    stacked_home = jax.tree.map(lambda *x: jnp.stack(x), *[hm for hm, _ in homes])
    stacked_state = jax.tree.map(lambda *x: jnp.stack(x), *[st for _, st in homes])
    verbs = jnp.array([h.WALK] * 4)
    targets = jnp.array([h.find(hm, "bedroom") for hm, _ in homes])
    batched = jax.jit(jax.vmap(h.legal))(stacked_home, stacked_state, verbs, targets, -jnp.ones(4, jnp.int32))
    single = [bool(h.legal(hm, st, h.WALK, h.find(hm, "bedroom"), -1)) for hm, st in homes]
    assert list(np.asarray(batched)) == single


def test_library_activities_are_valid_and_possible_somewhere():
    homes = [h.generate_home(s)[0] for s in range(100)]
    for name in LIBRARY:
        assert get_activity(name).goals == tuple(map(tuple, LIBRARY[name]))
        assert any(not isinstance(h.encode_goals(home, LIBRARY[name]), list) for home in homes), name


@pytest.mark.parametrize(
    "goals, message",
    [
        ([("inside", "plate", "dishwaser")], "unknown class 'dishwaser'. Did you mean 'dishwasher'"),
        ([("insde", "plate", "dishwasher")], "unknown predicate 'insde'. Did you mean 'inside'"),
        ([("on", "plate", "fridge")], "needs 'fridge' to be surface"),
        ([("holds", "sofa")], "needs 'sofa' to be grabbable"),
        ([("on", "plate")], "on takes 2 class name(s)"),
        ([], "has no goals"),
    ],
)
def test_bad_activities_are_refused(goals, message):
    with pytest.raises(WorldError, match=message.replace("(", r"\(").replace(")", r"\)")):
        add_activity("a test activity", goals)
    with pytest.raises(WorldError, match="already registered"):
        add_activity("watch tv", [("switched_on", "tv")])
    add_activity("a test activity", [("holds", "cup")])
    remove_activity("a test activity")
    with pytest.raises(WorldError, match="Did you mean 'watch tv'"):
        get_activity("watch tvv")
