"""The household world's registration and its built-in library of activities.

Importing this module registers the world "household" and the activities below; an activity
is a set of goal predicates over object classes that must all hold at the end, as E2WM
defines its VirtualHome tasks. Add your own with `flanjax.worlds.world.add_activity`.
"""

from __future__ import annotations

from flanjax.worlds import household
from flanjax.worlds.world import World, add_activity, add_world

HOUSEHOLD = add_world(World(
    name="household", classes=household.CLASSES, predicates=household.PREDICATES, check_goal=household.check_goal,
    generate=household.generate_home, legal=household.legal, act=household.act, goals_hold=household.goals_hold,
    encode_goals=household.encode_goals, candidate_actions=household.candidate_actions,
    action_text=household.action_text, pre_actions=household.pre_actions, describe=household.describe,
))  # fmt: skip

LIBRARY = {
    "wash the dishes": [("inside", "plate", "dishwasher"), ("inside", "bowl", "dishwasher"), ("closed", "dishwasher"), ("switched_on", "dishwasher")],
    "set the table": [("on", "plate", "dining table"), ("on", "fork", "dining table"), ("on", "knife", "dining table"), ("on", "cup", "dining table")],
    "watch tv": [("switched_on", "tv"), ("sitting", "sofa"), ("facing", "tv")],
    "go to sleep": [("switched_off", "bedside lamp"), ("lying", "bed")],
    "read a book": [("holds", "book"), ("sitting", "sofa")],
    "put away the groceries": [("inside", "milk", "fridge"), ("inside", "cheese", "fridge"), ("inside", "juice", "fridge"), ("closed", "fridge")],
    "heat up food": [("inside", "bowl", "microwave"), ("closed", "microwave"), ("switched_on", "microwave")],
    "brush teeth": [("holds", "toothbrush"), ("holds", "toothpaste"), ("in_room", "bathroom")],
    "do the laundry": [("inside", "clothes", "washing machine"), ("closed", "washing machine"), ("switched_on", "washing machine")],
    "work on the computer": [("switched_on", "computer"), ("sitting", "office chair"), ("facing", "computer")],
    "tidy up the books": [("on", "book", "bookshelf"), ("on", "magazine", "bookshelf")],
    "make the bed": [("on", "pillow", "bed"), ("on", "blanket", "bed")],
    "cook a meal": [("on", "pot", "stove"), ("switched_on", "stove")],
    "have a snack": [("holds", "apple"), ("sitting", "sofa")],
    "put the shoes away": [("on", "shoes", "shoe rack")],
    "clear the table": [("inside", "plate", "sink"), ("inside", "cup", "sink")],
    "turn off the lights": [("switched_off", "floor lamp"), ("switched_off", "bedside lamp")],
    "take a bath": [("holds", "soap"), ("lying", "bathtub")],
    "use the toilet": [("sitting", "toilet")],
    "put the towel away": [("inside", "towel", "bathroom cabinet"), ("closed", "bathroom cabinet")],
    "find the keys": [("holds", "keys")],
    "put away the cutlery": [("inside", "fork", "kitchen cabinet"), ("inside", "spoon", "kitchen cabinet"), ("closed", "kitchen cabinet")],
    "make breakfast": [("on", "bread", "kitchen table"), ("on", "milk", "kitchen table"), ("on", "bowl", "kitchen table")],
    "answer the phone": [("holds", "phone")],
    "relax on the sofa": [("lying", "sofa"), ("switched_on", "floor lamp")],
    "put the clothes away": [("inside", "clothes", "wardrobe"), ("closed", "wardrobe")],
    "change the tv channel": [("holds", "remote control"), ("facing", "tv"), ("switched_on", "tv")],
    "serve a drink": [("on", "cup", "dining table"), ("on", "juice", "dining table")],
    "wash the pan": [("inside", "pan", "sink"), ("switched_off", "stove")],
    "get ready to leave": [("holds", "keys"), ("holds", "phone"), ("in_room", "hallway")],
    "eat dinner": [("on", "plate", "dining table"), ("on", "fork", "dining table"), ("sitting", "dining chair")],
    "store the leftovers": [("inside", "bowl", "fridge"), ("closed", "fridge")],
    "read a magazine in bed": [("holds", "magazine"), ("lying", "bed")],
    "write an email": [("switched_on", "computer"), ("sitting", "office chair")],
    "put the mug in the sink": [("inside", "mug", "sink")],
    "close the cabinets": [("closed", "kitchen cabinet"), ("closed", "sideboard")],
}  # fmt: skip

for _name, _goals in LIBRARY.items():
    add_activity(_name, _goals, world="household")
