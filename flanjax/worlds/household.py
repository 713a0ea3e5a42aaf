"""A household world in pure JAX, after E2WM's use of VirtualHome (which needs downloads and
cannot ship): homes of 4-6 rooms generated from a seed, furniture per room type, household
items placed on or in the holders they belong to, and one agent acting with E2WM's verbs.

Everything about a home is a fixed-size array, padded to `MAX_OBJECTS` entities, so that
homes batch: rooms, furniture and items are all entities with a class; a `Home` holds what
never changes (classes, the rooms furniture stands in) and a `State` what actions change:

    holder, inside   the furniture an item is on or in (-1 while held)
    held             the agent's hands (two)
    opened, on       open/closed and on/off states
    agent_room, at   where the agent is, and the entity it stands at (-1: nowhere in particular)
    pose, seat       standing, sitting or lying, and on what
    facing           what the agent turned to

`legal(home, state, verb, a, b)` and `act(home, state, verb, a, b)` are the preconditions and
effects; both also run E2WM's automatic pre-actions: walking stands the agent up first, and
reaching into a closed container opens it first. Generation is NumPy (seeded, once per home);
the dynamics are jnp, so the planner and the explorer jit and vmap them over homes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

MAX_OBJECTS = 64  # entities per home: rooms, furniture and items, padded

# --- classes ------------------------------------------------------------------------------

# Properties of a class, one column each in PROPERTIES.
GRABBABLE, CONTAINER, SURFACE, OPENABLE, SWITCHABLE, SITTABLE, LIEABLE = range(7)
PROPERTY_NAMES = ("grabbable", "container", "surface", "openable", "switchable", "sittable", "lieable")
_LETTERS = "gcsowtl"  # the same properties as letters, for the tables below

ROOMS = ("kitchen", "living room", "bedroom", "bathroom", "home office", "dining room", "hallway")
REQUIRED_ROOMS = 4  # every home has the first four; up to two of the others join them

# Furniture by the room it stands in: name -> properties.
FURNITURE = {
    "kitchen": {"fridge": "co", "stove": "sw", "microwave": "cow", "dishwasher": "cow", "kitchen cabinet": "co",
                "kitchen counter": "s", "sink": "c", "kitchen table": "s"},
    "living room": {"sofa": "stl", "tv": "w", "coffee table": "s", "bookshelf": "s", "floor lamp": "w"},
    "bedroom": {"bed": "stl", "nightstand": "s", "wardrobe": "co", "bedside lamp": "w"},
    "bathroom": {"toilet": "t", "bathroom sink": "c", "bathroom cabinet": "co", "bathtub": "cl", "washing machine": "cow"},
    "home office": {"desk": "s", "office chair": "t", "computer": "w", "shelf": "s"},
    "dining room": {"dining table": "s", "dining chair": "t", "sideboard": "co"},
    "hallway": {"shoe rack": "s", "hall table": "s"},
}  # fmt: skip

_DISHES = ("in kitchen cabinet", "in dishwasher", "on kitchen counter", "in sink", "on kitchen table", "on dining table", "in sideboard")
_CUTLERY = ("in kitchen cabinet", "in dishwasher", "on kitchen counter", "on dining table", "in sideboard")
_FOOD = ("in fridge", "on kitchen counter", "on kitchen table", "on dining table")
_CHILLED = ("in fridge", "on kitchen counter")
_READING = ("on bookshelf", "on coffee table", "on nightstand", "on desk", "on shelf")
_SMALL = ("on nightstand", "on desk", "on coffee table", "on hall table")
_TOILETRIES = ("in bathroom cabinet", "in bathroom sink")
# Items (all grabbable) and the holders they start on or in.
ITEMS = {
    "plate": _DISHES, "bowl": _DISHES, "cup": _DISHES + ("on coffee table", "on desk"), "mug": _DISHES + ("on desk",),
    "fork": _CUTLERY, "knife": _CUTLERY, "spoon": _CUTLERY, "pot": ("on stove", "in kitchen cabinet", "on kitchen counter"),
    "pan": ("on stove", "in kitchen cabinet", "on kitchen counter"), "apple": _FOOD, "bread": _FOOD, "milk": _CHILLED,
    "cheese": _CHILLED, "juice": _CHILLED, "book": _READING, "magazine": _READING + ("on sofa",),
    "remote control": ("on coffee table", "on sofa"), "pillow": ("on bed", "on sofa", "in wardrobe"),
    "blanket": ("on bed", "on sofa", "in wardrobe"), "towel": ("in bathroom cabinet", "in wardrobe", "in washing machine"),
    "toothbrush": _TOILETRIES, "toothpaste": _TOILETRIES, "soap": _TOILETRIES,
    "clothes": ("in wardrobe", "on bed", "in washing machine"), "shoes": ("on shoe rack", "in wardrobe"),
    "phone": _SMALL, "keys": _SMALL + ("on shoe rack",), "glasses": _SMALL,
}  # fmt: skip

PLURAL = {"keys", "glasses", "clothes", "shoes"}  # "The keys are ...", not "is"


def be(name: str) -> str:
    return "are" if name in PLURAL else "is"


CLASSES: tuple[str, ...] = (*ROOMS, *(f for room in ROOMS for f in FURNITURE[room]), *ITEMS)
CLASS_IDS = {name: i for i, name in enumerate(CLASSES)}
NUM_ROOM_CLASSES, NUM_FURNITURE_CLASSES = len(ROOMS), sum(map(len, FURNITURE.values()))
FURNITURE_ROOM = {f: room for room, pieces in FURNITURE.items() for f in pieces}


def _property_table() -> np.ndarray:
    table = np.zeros((len(CLASSES), len(PROPERTY_NAMES)), bool)
    for pieces in FURNITURE.values():
        for name, letters in pieces.items():
            table[CLASS_IDS[name], [_LETTERS.index(c) for c in letters]] = True
    for name in ITEMS:
        table[CLASS_IDS[name], GRABBABLE] = True
    return table


PROPERTIES = _property_table()  # bool [classes, properties]


def is_room(cls) -> bool:
    return cls < NUM_ROOM_CLASSES


def is_item(cls) -> bool:
    return cls >= NUM_ROOM_CLASSES + NUM_FURNITURE_CLASSES


# --- verbs ----------------------------------------------------------------------------------

WALK, GRAB, PUTBACK, PUTIN, OPEN, CLOSE, SWITCHON, SWITCHOFF, SIT, LIE, STANDUP, TURNTO = range(12)
VERBS = ("Walk", "Grab", "PutBack", "PutIn", "Open", "Close", "SwitchOn", "SwitchOff", "Sit", "Lie", "StandUp", "TurnTo")
STANDING, SITTING, LYING = range(3)


# --- homes and states -----------------------------------------------------------------------


class Home(NamedTuple):
    """What never changes in a home: each entity's class (-1: padding) and, for rooms and
    furniture, the room (entity index) it is or stands in (-1 for items: they move)."""

    cls: np.ndarray  # int32 [MAX_OBJECTS]
    room: np.ndarray  # int32 [MAX_OBJECTS]


class State(NamedTuple):
    holder: jax.Array  # int32 [O]: the furniture an item is on or in; -1 while held or not an item
    inside: jax.Array  # bool [O]: in (True) or on (False) its holder
    held: jax.Array  # bool [O]
    opened: jax.Array  # bool [O]
    on: jax.Array  # bool [O]: switched on
    agent_room: jax.Array  # int32 []
    at: jax.Array  # int32 []: the entity the agent stands at, -1 for none
    pose: jax.Array  # int32 []: STANDING, SITTING or LYING
    seat: jax.Array  # int32 []: what the agent sits or lies on, -1 standing
    facing: jax.Array  # int32 []: what the agent turned to, -1 for nothing


def build_home(
    rooms: Sequence[str],
    furniture: Sequence[str],
    items: Mapping[str, str],
    *,
    opened: Sequence[str] = (),
    on: Sequence[str] = (),
    agent_room: str | None = None,
) -> tuple[Home, State]:
    """A home from names: its rooms, its furniture (each stands in its room type, which must
    be among `rooms`), and its items with where they start ({"cup": "in kitchen cabinet"}),
    the openables that start open and the switchables that start on. The agent stands in
    `agent_room` (default: the first room)."""
    names = [*rooms, *furniture, *items]
    if len(set(names)) != len(names) or len(names) > MAX_OBJECTS:
        raise ValueError(f"a home holds each class at most once and at most {MAX_OBJECTS} entities: {names}.")
    index = {name: i for i, name in enumerate(names)}
    cls = np.full(MAX_OBJECTS, -1, np.int32)
    cls[: len(names)] = [CLASS_IDS[name] for name in names]
    room = np.full(MAX_OBJECTS, -1, np.int32)
    room[: len(rooms) + len(furniture)] = [*range(len(rooms)), *(index[FURNITURE_ROOM[f]] for f in furniture)]
    holder = np.full(MAX_OBJECTS, -1, np.int32)
    inside = np.zeros(MAX_OBJECTS, bool)
    for item, where in items.items():
        relation, place = where.split(" ", 1)
        holder[index[item]], inside[index[item]] = index[place], relation == "in"
    flags = lambda chosen: np.isin(np.arange(MAX_OBJECTS), [index[c] for c in chosen])  # noqa: E731
    state = State(
        holder=holder, inside=inside, held=np.zeros(MAX_OBJECTS, bool), opened=flags(opened), on=flags(on),
        agent_room=np.int32(index[agent_room or rooms[0]]), at=np.int32(-1), pose=np.int32(STANDING),
        seat=np.int32(-1), facing=np.int32(-1),
    )  # fmt: skip
    return Home(cls, room), state


def generate_home(seed: int) -> tuple[Home, State]:
    """A home and its initial state from `seed` (deterministic): 4-6 rooms, most of their
    furniture, about three quarters of the items that have a holder in the home, each on or
    in one of its allowed holders; containers open and appliances on at random."""
    rng = np.random.default_rng(seed)
    extra = rng.choice(np.arange(REQUIRED_ROOMS, len(ROOMS)), size=rng.integers(0, 3), replace=False)
    rooms = [ROOMS[i] for i in sorted([*range(REQUIRED_ROOMS), *extra])]
    furniture = []
    for room in rooms:
        pieces = list(FURNITURE[room])
        keep = rng.random(len(pieces)) < 0.85
        keep[:2] = True  # a room always has its first two pieces
        furniture += [p for p, k in zip(pieces, keep) if k]
    items = {}
    for item, places in ITEMS.items():
        places = [p for p in places if p.split(" ", 1)[1] in furniture]
        if places and rng.random() < 0.75:
            items[item] = str(rng.choice(places))
    openables = [f for f in furniture if PROPERTIES[CLASS_IDS[f], OPENABLE]]
    switchables = [f for f in furniture if PROPERTIES[CLASS_IDS[f], SWITCHABLE]]
    opened = [f for f, r in zip(openables, rng.random(len(openables))) if r < 0.3]
    on = [f for f, r in zip(switchables, rng.random(len(switchables))) if r < 0.2]
    return build_home(rooms, furniture, items, opened=opened, on=on, agent_room=str(rng.choice(rooms)))


def names_of(home: Home) -> list[str]:
    """Each present entity's class name, by entity index."""
    return [CLASSES[c] for c in np.asarray(home.cls) if c >= 0]


def find(home: Home, name: str) -> int:
    """The entity index of class `name` in `home`, -1 if the home has none (a home holds at
    most one entity of a class)."""
    hits = np.flatnonzero(np.asarray(home.cls) == CLASS_IDS[name])
    return int(hits[0]) if hits.size else -1


# --- dynamics (jnp; one home, vmap for batches) ------------------------------------------------


def _jnp(home: Home, state: State) -> tuple[Home, State]:
    """NumPy homes and states (as generated) indexed by traced entities need jnp arrays."""
    return jax.tree.map(jnp.asarray, home), jax.tree.map(jnp.asarray, state)


def _has(home: Home, entity, prop: int):
    cls = home.cls[entity]
    return (entity >= 0) & (cls >= 0) & jnp.asarray(PROPERTIES)[jnp.maximum(cls, 0), prop]


def room_of(home: Home, state: State, entity):
    """The room an entity is in now (items: their holder's room, or the agent's if held)."""
    home, state = _jnp(home, state)
    fixed = home.room[entity]
    holder = state.holder[entity]
    item_room = jnp.where(state.held[entity], state.agent_room, home.room[jnp.maximum(holder, 0)])
    return jnp.where(fixed >= 0, fixed, item_room)


def _kind(home: Home, entity):
    cls = home.cls[entity]
    return cls < NUM_ROOM_CLASSES, (cls >= NUM_ROOM_CLASSES) & (cls < NUM_ROOM_CLASSES + NUM_FURNITURE_CLASSES)


def legal(home: Home, state: State, verb, a, b):
    """Whether (verb, a, b) can be done now, counting the automatic pre-actions as done."""
    home, state = _jnp(home, state)
    valid = (a >= 0) & (home.cls[jnp.maximum(a, 0)] >= 0)
    a = jnp.maximum(a, 0)
    b_ok = (b >= 0) & (home.cls[jnp.maximum(b, 0)] >= 0)
    b = jnp.maximum(b, 0)
    room, furniture = _kind(home, a)
    here = room_of(home, state, a) == state.agent_room
    at_a = state.at == a
    holder = state.holder[a]
    hands_free = jnp.sum(state.held) < 2
    openable = _has(home, a, OPENABLE)
    checks = jnp.stack([
        jnp.where(room, a != state.agent_room, here & ~state.held[a] & (state.at != jnp.where(furniture, a, holder))),  # Walk
        _has(home, a, GRABBABLE) & ~state.held[a] & (holder >= 0) & (state.at == holder) & hands_free,  # Grab
        b_ok & state.held[a] & _has(home, b, SURFACE) & (state.at == b),  # PutBack
        b_ok & state.held[a] & _has(home, b, CONTAINER) & (state.at == b),  # PutIn
        openable & ~state.opened[a] & at_a,  # Open
        openable & state.opened[a] & at_a,  # Close
        _has(home, a, SWITCHABLE) & ~state.on[a] & at_a & ~(openable & state.opened[a]),  # SwitchOn: closed first
        _has(home, a, SWITCHABLE) & state.on[a] & at_a,  # SwitchOff
        _has(home, a, SITTABLE) & at_a & (state.pose == STANDING),  # Sit
        _has(home, a, LIEABLE) & at_a & ~((state.pose == LYING) & (state.seat == a)),  # Lie
        state.pose != STANDING,  # StandUp
        furniture & here & (state.facing != a),  # TurnTo
    ])  # fmt: skip
    return (valid | (verb == STANDUP)) & checks[verb]


def act(home: Home, state: State, verb, a, b) -> State:
    """The state after (verb, a, b), which must be legal; pre-actions included."""
    home, state = _jnp(home, state)
    a, b = jnp.maximum(a, 0), jnp.maximum(b, 0)
    room, furniture = _kind(home, a)
    index = jnp.arange(home.cls.shape[0])
    is_a, is_b = index == a, index == b
    holder = state.holder[a]
    walk = verb == WALK
    grab, put_on, put_in = verb == GRAB, verb == PUTBACK, verb == PUTIN
    put = put_on | put_in
    # Reaching into a closed container opens it first (E2WM's pre-action); so does Open.
    opens = (grab & (index == holder) & _has(home, holder, OPENABLE)) | (put_in & is_b & _has(home, b, OPENABLE)) | ((verb == OPEN) & is_a)
    opened = (state.opened | opens) & ~((verb == CLOSE) & is_a)
    on = (state.on | ((verb == SWITCHON) & is_a)) & ~((verb == SWITCHOFF) & is_a)
    held = (state.held | (grab & is_a)) & ~(put & is_a)
    new_holder = jnp.where(grab & is_a, -1, jnp.where(put & is_a, b, state.holder))
    inside = jnp.where(put & is_a, put_in, jnp.where(grab & is_a, False, state.inside))
    at = jnp.where(walk, jnp.where(room, -1, jnp.where(furniture, a, holder)), state.at)
    # Walking stands the agent up first (the other pre-action); StandUp does so explicitly.
    stands = walk | (verb == STANDUP)
    sits, lies = verb == SIT, verb == LIE
    pose = jnp.where(stands, STANDING, jnp.where(sits, SITTING, jnp.where(lies, LYING, state.pose)))
    seat = jnp.where(stands, -1, jnp.where(sits | lies, a, state.seat))
    return State(
        holder=new_holder, inside=inside, held=held, opened=opened, on=on,
        agent_room=jnp.where(walk & room, a, state.agent_room).astype(jnp.int32),
        at=at.astype(jnp.int32), pose=pose.astype(jnp.int32), seat=seat.astype(jnp.int32),
        facing=jnp.where(walk, -1, jnp.where(verb == TURNTO, a, state.facing)).astype(jnp.int32),
    )  # fmt: skip


def pre_actions(home: Home, state: State, verb: int, a: int, b: int) -> list[tuple[int, int, int]]:
    """The automatic pre-actions (verb, a, b) that (verb, a, b) runs first in `state`, in order
    (for the plan's text: "Stand up." before walking, "Open fridge." before reaching in)."""
    if verb == WALK and int(state.pose) != STANDING:
        return [(STANDUP, -1, -1)]
    container = int(state.holder[a]) if verb == GRAB else b if verb == PUTIN else -1
    if container >= 0 and PROPERTIES[home.cls[container], OPENABLE] and not bool(state.opened[container]):
        return [(OPEN, container, -1)]
    return []


# --- goals ----------------------------------------------------------------------------------

# Goal predicates: (name, arguments, the property each argument needs; None: a room, "" any).
PREDICATES = {
    "on": (2, (GRABBABLE, SURFACE)),
    "inside": (2, (GRABBABLE, CONTAINER)),
    "holds": (1, (GRABBABLE,)),
    "open": (1, (OPENABLE,)),
    "closed": (1, (OPENABLE,)),
    "switched_on": (1, (SWITCHABLE,)),
    "switched_off": (1, (SWITCHABLE,)),
    "sitting": (1, (SITTABLE,)),
    "lying": (1, (LIEABLE,)),
    "facing": (1, ("furniture",)),
    "in_room": (1, ("room",)),
}
PREDICATE_IDS = {name: i + 1 for i, name in enumerate(PREDICATES)}  # 0: an empty (padding) slot


def goal_holds(home: Home, state: State, goal) -> jax.Array:
    """Whether one goal (predicate id, a, b) holds; an empty slot (predicate 0) always does."""
    predicate, a, b = goal[0], jnp.maximum(goal[1], 0), jnp.maximum(goal[2], 0)
    placed = (state.holder[a] == b) & ~state.held[a]
    values = jnp.stack([
        jnp.bool_(True),
        placed & ~state.inside[a],  # on
        placed & state.inside[a],  # inside
        state.held[a],  # holds
        state.opened[a],  # open
        ~state.opened[a],  # closed
        state.on[a],  # switched_on
        ~state.on[a],  # switched_off
        (state.pose == SITTING) & (state.seat == a),  # sitting
        (state.pose == LYING) & (state.seat == a),  # lying
        state.facing == a,  # facing
        state.agent_room == a,  # in_room
    ])  # fmt: skip
    return values[predicate]


def goals_hold(home: Home, state: State, goals) -> jax.Array:
    """bool [G]: which of the goals (int32 [G, 3]) hold."""
    home, state = _jnp(home, state)
    return jax.vmap(lambda g: goal_holds(home, state, g))(goals)


# --- text -----------------------------------------------------------------------------------


def action_text(home: Home, verb: int, a: int, b: int) -> str:
    """One plan sentence, as E2WM writes them: "Walk to kitchen.", "Put cup on table."."""
    name = lambda e: CLASSES[int(home.cls[e])]  # noqa: E731
    return {
        WALK: lambda: f"Walk to {name(a)}.",
        GRAB: lambda: f"Grab {name(a)}.",
        PUTBACK: lambda: f"Put {name(a)} on {name(b)}.",
        PUTIN: lambda: f"Put {name(a)} in {name(b)}.",
        OPEN: lambda: f"Open {name(a)}.",
        CLOSE: lambda: f"Close {name(a)}.",
        SWITCHON: lambda: f"Switch on {name(a)}.",
        SWITCHOFF: lambda: f"Switch off {name(a)}.",
        SIT: lambda: f"Sit on {name(a)}.",
        LIE: lambda: f"Lie on {name(a)}.",
        STANDUP: lambda: "Stand up.",
        TURNTO: lambda: f"Turn to {name(a)}.",
    }[verb]()


def describe(home: Home, state: State, entities) -> list[str]:
    """Sentences stating the conditions of `entities`: where each item is, whether each
    openable is open and each switchable on ("The cup is in the kitchen cabinet.")."""
    sentences = []
    for e in entities:
        cls = int(home.cls[e])
        name = CLASSES[cls]
        if is_item(cls):
            where = "in hand" if bool(state.held[e]) else f"{'in' if bool(state.inside[e]) else 'on'} the {CLASSES[int(home.cls[state.holder[e]])]}"
            sentences.append(f"The {name} {be(name)} {where}.")
        if PROPERTIES[cls, OPENABLE]:
            sentences.append(f"The {name} is {'open' if bool(state.opened[e]) else 'closed'}.")
        if PROPERTIES[cls, SWITCHABLE]:
            sentences.append(f"The {name} is {'on' if bool(state.on[e]) else 'off'}.")
    return sentences

# --- planning problems ------------------------------------------------------------------------

MAX_GOALS = 8
MAX_ACTIONS = 64


def check_goal(goal: tuple[str, ...]) -> None:
    """Raises ValueError naming what is wrong with a goal (predicate, class[, class])."""
    predicate, *args = goal
    arity, needs = PREDICATES[predicate]
    if len(args) != arity:
        raise ValueError(f"{predicate} takes {arity} class name(s), got {len(args)}: {goal}.")
    for name, need in zip(args, needs):
        cls = CLASS_IDS[name]
        if need == "room":
            ok, what = is_room(cls), "a room"
        elif need == "furniture":
            ok, what = not is_room(cls) and not is_item(cls), "furniture"
        else:
            ok, what = bool(PROPERTIES[cls, need]), PROPERTY_NAMES[need]
        if not ok:
            raise ValueError(f"{predicate}({', '.join(args)}) needs {name!r} to be {what}; it is not.")


def encode_goals(home: Home, goals) -> np.ndarray | list[str]:
    """int32 [MAX_GOALS, 3] (predicate id, a, b) for goals over class names in `home`, or the
    names of the classes the home lacks (the goals are then impossible in it)."""
    missing = sorted({name for _, *args in goals for name in args if find(home, name) < 0})
    if missing:
        return missing
    encoded = np.zeros((MAX_GOALS, 3), np.int32)
    encoded[:, 1:] = -1
    for i, (predicate, *args) in enumerate(goals):
        encoded[i] = [PREDICATE_IDS[predicate], *[find(home, a) for a in args], *([-1] * (2 - len(args)))]
    return encoded


def candidate_actions(home: Home, state: State, goals: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The actions the planner considers, as E2WM's code does: Walk to any room or task object,
    one-object actions on task objects, two-object actions on pairs of them, and StandUp.
    Task objects are the goals' objects and the holders their items start on or in.

    Returns (actions int32 [MAX_ACTIONS, 3] of (verb, a, b), valid bool [MAX_ACTIONS],
    relevant bool [MAX_ACTIONS]: the action touches a goal's object)."""
    cls = np.asarray(home.cls)
    goal_objects = {int(e) for g in goals if g[0] > 0 for e in g[1:] if e >= 0}
    holders = {int(state.holder[e]) for e in goal_objects if state.holder[e] >= 0}
    task = sorted(goal_objects | holders)
    rooms = [int(e) for e in np.flatnonzero((cls >= 0) & (cls < NUM_ROOM_CLASSES))]
    props = lambda e: PROPERTIES[cls[e]].astype(int)  # noqa: E731  (lists repeat 0 or 1 times)
    actions = [(WALK, r, -1) for r in rooms] + [(STANDUP, -1, -1)]
    for e in task:
        if is_room(cls[e]):
            continue
        actions.append((WALK, e, -1))
        if is_item(cls[e]):
            actions.append((GRAB, e, -1))
            for h in task:
                if not is_item(cls[h]) and not is_room(cls[h]):
                    actions += [(PUTBACK, e, h)] * props(h)[SURFACE] + [(PUTIN, e, h)] * props(h)[CONTAINER]
            continue
        actions += [(OPEN, e, -1), (CLOSE, e, -1)] * props(e)[OPENABLE]
        actions += [(SWITCHON, e, -1), (SWITCHOFF, e, -1)] * props(e)[SWITCHABLE]
        actions += [(SIT, e, -1)] * props(e)[SITTABLE] + [(LIE, e, -1)] * props(e)[LIEABLE] + [(TURNTO, e, -1)]
    if len(actions) > MAX_ACTIONS:
        raise ValueError(f"{len(actions)} candidate actions exceed MAX_ACTIONS={MAX_ACTIONS}; fewer goals per activity.")
    table = np.zeros((MAX_ACTIONS, 3), np.int32)
    table[:, 0], table[:, 1:] = STANDUP, -1
    table[: len(actions)] = actions
    valid = np.arange(MAX_ACTIONS) < len(actions)
    relevant = valid & (np.isin(table[:, 1], list(goal_objects)) | np.isin(table[:, 2], list(goal_objects)))
    return table, valid, relevant
