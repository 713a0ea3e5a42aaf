"""Random exploration: the dynamics keep the world consistent, and every count and path a story
states is true, both in the logged arrays and for an independent reader that replays the
story's sentences."""

import functools
import re

import jax
import numpy as np
import pytest

from flanjax.errors import FlanjaxError
from flanjax.worlds import explore as ex
from flanjax.worlds import household as hh

HOMES, AGENTS, STEPS, COUNT_STEPS = 6, 3, 30, 16


def _stack(trees):
    return jax.tree.map(lambda *xs: np.stack(xs), *trees)


def _index(tree, i):
    return jax.tree.map(lambda x: np.asarray(x[i]), tree)


@pytest.fixture(scope="module")
def world():
    pairs = [hh.generate_home(seed) for seed in range(HOMES)]
    homes, states = _stack([h for h, _ in pairs]), _stack([s for _, s in pairs])
    keys = jax.random.split(jax.random.key(7), HOMES)

    def run(agents, steps):
        return jax.vmap(functools.partial(ex.explore, num_agents=agents, num_steps=steps))(homes, states, keys)

    return pairs, keys, run(AGENTS, STEPS), run(1, COUNT_STEPS)


def _prefix(log, steps):
    """The log of its first `steps` steps (step fields have T entries, state fields T + 1)."""
    return ex.Log(*(f[:steps] if len(f) == len(log.agent) else f[: steps + 1] for f in log))


# --- the dynamics -----------------------------------------------------------------------------


def _check_log(home, state, log):
    cls, fixed_room = np.asarray(home.cls), np.asarray(home.room)
    items = cls >= hh.NUM_ROOM_CLASSES + hh.NUM_FURNITURE_CLASSES
    props = hh.PROPERTIES[np.maximum(cls, 0)] & (cls >= 0)[:, None]
    assert (log.holder[0] == state.holder).all() and (log.opened[0] == state.opened).all()
    assert log.agent_room[0, 0] == state.agent_room and all(hh.is_room(cls[r]) for r in log.agent_room[0])
    for t in range(len(log.agent) + 1):
        holder, carrier, rooms = log.holder[t], log.carrier[t], log.agent_room[t]
        # One place per item: on/in a holder or in a hand, never both, never neither.
        assert ((holder >= 0) != (carrier >= 0))[items].all()
        assert (holder[~items] == -1).all() and (carrier[~items] == -1).all()
        assert np.bincount(carrier[carrier >= 0], minlength=len(rooms)).max() <= 2
        expected = np.where(carrier >= 0, rooms[np.maximum(carrier, 0)], fixed_room[np.maximum(holder, 0)])
        assert (log.item_room[t][items] == expected[items]).all() and (log.item_room[t][~items] == -1).all()
    for t, (agent, verb, item, target) in enumerate(zip(log.agent, log.verb, log.item, log.target)):
        here = log.agent_room[t, agent]
        changed = np.flatnonzero((log.holder[t] != log.holder[t + 1]) | (log.carrier[t] != log.carrier[t + 1]))
        moved_rooms = np.flatnonzero(log.item_room[t] != log.item_room[t + 1])
        movers = np.flatnonzero(log.agent_room[t] != log.agent_room[t + 1])
        opened = np.flatnonzero(log.opened[t] != log.opened[t + 1])
        assert not log.opened[t][opened].any() and list(opened) == ([target] if log.opens[t] else [])
        if verb == hh.WALK:
            assert item == -1 and hh.is_room(cls[target]) and target != here and list(movers) == [agent]
            assert len(changed) == 0
            # Items change rooms only in their carrier's hands, and all of its items go along.
            assert (log.carrier[t][moved_rooms] == agent).all()
            assert (log.item_room[t + 1][log.carrier[t] == agent] == target).all()
            continue
        assert len(movers) == 0 and len(moved_rooms) == 0 and set(changed) <= {item} and items[item]
        assert fixed_room[target] == here and not hh.is_room(cls[target])
        if props[target, hh.OPENABLE]:
            assert log.opened[t + 1, target]
        if verb == hh.GRAB:
            assert log.carrier[t, item] == -1 and log.holder[t, item] == target and (log.carrier[t] == agent).sum() < 2
            assert log.carrier[t + 1, item] == agent
        else:
            assert verb in (hh.PUTBACK, hh.PUTIN) and log.carrier[t, item] == agent
            assert props[target, hh.CONTAINER if verb == hh.PUTIN else hh.SURFACE]
            assert log.holder[t + 1, item] == target and log.inside[t + 1, item] == (verb == hh.PUTIN)


def test_dynamics_keep_the_world_consistent(world):
    pairs, _, logs, count_logs = world
    for b, (home, state) in enumerate(pairs):
        for log in (_index(logs, b), _index(count_logs, b)):
            _check_log(home, state, log)
    verbs = np.asarray(logs.verb)
    assert {hh.WALK, hh.GRAB} <= set(verbs.ravel()) and np.isin(verbs, [hh.PUTBACK, hh.PUTIN]).any()


def test_vmap_equals_one_home_at_a_time(world):
    pairs, keys, logs, _ = world
    for b, (home, state) in enumerate(pairs):
        one = ex.explore(home, state, keys[b], AGENTS, STEPS)
        for batched, single in zip(_index(logs, b), one):
            np.testing.assert_array_equal(batched, single)


def test_determinism_by_key_and_seed(world):
    pairs, keys, logs, _ = world
    home, state = pairs[0]
    again = ex.explore(home, state, keys[0], AGENTS, STEPS)
    other = ex.explore(home, state, jax.random.key(99), AGENTS, STEPS)
    assert all((np.asarray(a) == b).all() for a, b in zip(again, _index(logs, 0)))
    assert not all(np.array_equal(a, b) for a, b in zip(again, other))
    log = _index(logs, 0)
    assert ex.path_story(home, log, 3) == ex.path_story(home, log, 3)
    assert ex.location_question(home, log, 3) == ex.location_question(home, log, 3)
    assert len({tuple(ex.path_story(home, log, s).sentences) for s in range(4)}) > 1


# --- an independent reader of the stories -----------------------------------------------------

WALKS = "went to|walked into|travelled to|journeyed to|moved to|entered"
GRABS = "grabbed|took|got|picked up"


def _things(listed):
    if listed == "nothing":
        return []
    parts = listed.replace(", and ", ", ").replace(" and ", ", ").split(", ")
    assert all(p.startswith("the ") for p in parts), listed
    return [p[4:] for p in parts]


class Reader:
    """Replays a story sentence by sentence: where each agent is, who carries what, what each
    holder holds, and the rooms each item appeared in since its first mention."""

    def __init__(self):
        self.room, self.carrier, self.place, self.paths = {}, {}, {}, {}

    def read(self, sentence):
        if m := re.fullmatch(r"At first, the (.+) held (.+)\.", sentence):
            for thing in _things(m[2]):
                self.place[thing] = m[1]
        elif m := re.fullmatch(r"(\w+) was in the (.+)\.", sentence):
            assert m[1] not in self.room
            self.room[m[1]] = m[2]
        elif m := re.fullmatch(rf"(\w+) (?:{WALKS}) the (.+)\.", sentence):
            assert self.room[m[1]] != m[2]
            self.room[m[1]] = m[2]
            for thing, who in self.carrier.items():
                if who == m[1]:
                    self.paths[thing].append(m[2])
        elif m := re.fullmatch(rf"(\w+) (?:{GRABS}) the (.+?)(?: from the (.+))?\.", sentence):
            who, thing, source = m.groups()
            assert thing not in self.carrier and sum(w == who for w in self.carrier.values()) < 2
            if source and thing in self.place:
                assert self.place[thing] == source
            self.carrier[thing], self.place[thing] = who, None
            path = self.paths.setdefault(thing, [self.room[who]])
            if path[-1] != self.room[who]:
                path.append(self.room[who])
        elif m := re.fullmatch(r"(\w+) (?:put|placed) the (.+) (?:on|in) the (.+)\.", sentence):
            assert self.carrier.pop(m[2]) == m[1]
            self.place[m[2]] = m[3]
        elif m := re.fullmatch(r"(\w+) (?:dropped|left|put down) the (.+)\.", sentence):
            assert self.carrier.pop(m[2]) == m[1]
            self.place[m[2]] = "somewhere in the " + self.room[m[1]]
        else:
            raise AssertionError(f"the reader cannot parse {sentence!r}")

    def holds(self, holder):
        return {thing for thing, place in self.place.items() if place == holder}


def _read(story):
    reader = Reader()
    for sentence in story.sentences:
        reader.read(sentence)
    return reader


def _name(home, entity):
    return hh.CLASSES[int(home.cls[entity])]


def _agrees_with_log(home, log, story, reader):
    """The reader's view after the story equals the logged state after its last step."""
    names = [re.fullmatch(r"(\w+) was in the .+\.", s)[1] for s in story.sentences if " was in the " in s]
    intro = story.sentences[0].startswith("At first")
    assert len(names) == log.agent_room.shape[1] and len(story.sentences) == intro + len(names) + story.steps
    for k, name in enumerate(names):
        assert reader.room[name] == _name(home, log.agent_room[story.steps, k])
    carried = {_name(home, e): names[c] for e, c in enumerate(log.carrier[story.steps]) if c >= 0}
    assert reader.carrier == carried


def _log_path(home, log, thing, steps):
    """The thing's rooms from its first pick-up, read from holders, carriers and agents' rooms."""
    entity = hh.find(home, thing)
    first = np.flatnonzero((log.item[:steps] == entity) & (log.verb[:steps] == hh.GRAB))[0]
    rooms = []
    for t in range(first + 1, steps + 1):
        c, h = log.carrier[t, entity], log.holder[t, entity]
        room = _name(home, log.agent_room[t, c] if c >= 0 else home.room[h])
        if not rooms or rooms[-1] != room:
            rooms.append(room)
    return rooms


def _count_answer(answer):
    if m := re.fullmatch(r"There is no item (on|in) the (.+)\.", answer):
        return m[1], m[2], []
    if m := re.fullmatch(r"There is one item (on|in) the (.+)\. It is the (.+)\.", answer):
        return m[1], m[2], [m[3]]
    m = re.fullmatch(r"There are (\d+) items (on|in) the (.+)\. They are (.+)\.", answer)
    things = _things(m[4])
    assert int(m[1]) == len(things) >= 2 and (len(things) == 2 or ", and the " in m[4])
    return m[2], m[3], things


def test_counting_stories_are_true(world):
    pairs, _, _, logs = world
    counts, changed = [], 0
    for b, (home, _) in enumerate(pairs):
        for seed, steps in enumerate((3, 6, 9, 12, 16)):  # stories of the log's prefixes too
            log = _prefix(_index(logs, b), steps)
            try:
                story = ex.counting_story(home, log, seed)
            except ex.NoStory:
                assert (log.verb == hh.WALK).all()
                continue
            relation, place, things = _count_answer(story.answer)
            holder = hh.find(home, place)
            assert story.question == f"How many items are there {relation} the {place}?"
            assert (relation == "in") == bool(hh.PROPERTIES[home.cls[holder], hh.CONTAINER])
            assert story.sentences[0].startswith(f"At first, the {place} held ")
            reader = _read(story)
            _agrees_with_log(home, log, story, reader)
            assert reader.holds(place) == set(things)
            at_start = {_name(home, e) for e in np.flatnonzero(log.holder[0] == holder)}
            assert set(_things(re.fullmatch(r"At first, the .+ held (.+)\.", story.sentences[0])[1])) == at_start
            assert {_name(home, e) for e in np.flatnonzero(log.holder[story.steps] == holder)} == set(things)
            counts.append(len(things))
            changed += at_start != set(things)
    assert len(set(counts)) >= 3  # the stories ask about empty, single and several-item holders
    assert len(counts) >= 20 and changed >= 5  # ... and many counts differ from the first sentence's


def test_path_stories_are_true(world):
    pairs, _, logs, _ = world
    for b, (home, _) in enumerate(pairs):
        log = _index(logs, b)
        for seed in range(3):
            story = ex.path_story(home, log, seed)
            thing = re.fullmatch(r"What is the order of the rooms where the (.+) appeared\?", story.question)[1]
            rooms = story.answer.split(", ")
            assert 2 <= len(rooms) <= 5 and 13 <= len(story.sentences) <= 29
            reader = _read(story)
            _agrees_with_log(home, log, story, reader)
            assert reader.paths[thing] == rooms == _log_path(home, log, thing, story.steps)


def test_location_questions_are_true(world):
    pairs, _, logs, _ = world
    for b, (home, _) in enumerate(pairs):
        log = _index(logs, b)
        for seed in range(3):
            story = ex.location_question(home, log, seed)
            thing, room = re.fullmatch(r"Where (?:was|were) the (.+) before the (.+)\?", story.question).groups()
            reader = _read(story)
            _agrees_with_log(home, log, story, reader)
            path = reader.paths[thing]
            assert path == _log_path(home, log, thing, story.steps) and path.count(room) == 1
            assert story.answer == path[path.index(room) - 1]
            assert story.options == tuple(hh.names_of(home)[: len(story.options)]) and story.answer in story.options
            assert all(hh.is_room(hh.CLASS_IDS[o]) for o in story.options)


def test_no_story_and_bad_input(world):
    pairs, _, logs, count_logs = world
    home, state = pairs[0]
    with pytest.raises(ex.NoStory, match="13-29 sentences"):
        ex.path_story(home, _prefix(_index(logs, 0), 8), 0)
    walked = [b for b in range(HOMES) if count_logs.verb[b, 0] == hh.WALK]
    assert walked, "no home's first step was a walk: pick another key"
    b = walked[0]
    with pytest.raises(ex.NoStory, match="no holder is touched"):
        ex.counting_story(pairs[b][0], _prefix(_index(count_logs, b), 1), 0)
    with pytest.raises(FlanjaxError, match="one log at a time"):
        ex.path_story(home, logs, 0)
    for agents, steps in ((0, 5), (len(ex.NAMES) + 1, 5), (1, 0)):
        with pytest.raises(FlanjaxError):
            ex.explore(home, state, jax.random.key(0), agents, steps)
