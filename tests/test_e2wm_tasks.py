"""E2WM's experience tasks render the formats the issue specifies, from hand-written records."""

import json

import pytest
import seqio

import tasks.e2wm.experiences as e2wm

PLANS = [
    {"split": "train", "seed": 1, "activity": "watch tv", "seen": True, "items": ["sofa", "tv"], "distractors": ["cup", "fork", "soap", "keys"],
     "conditions": ["The tv is off."], "plan": ["Walk to living room.", "Walk to tv.", "Switch on tv.", "Walk to sofa.", "Sit on sofa."]},
    {"split": "train", "seed": 1, "activity": "find the keys", "seen": True, "items": ["keys", "desk"], "distractors": ["cup", "fork", "soap"],
     "conditions": ["The keys are on the desk."], "plan": ["Walk to home office.", "Walk to keys.", "Grab keys."]},
    {"split": "train", "seed": 2, "activity": "use the toilet", "seen": True, "items": ["toilet"], "distractors": ["cup", "fork", "soap"],
     "conditions": [], "plan": ["Walk to bathroom.", "Walk to toilet.", "Sit on toilet."]},
    {"split": "train", "seed": 2, "activity": "make the bed", "seen": False, "items": ["pillow", "bed"], "distractors": ["cup", "fork", "soap"],
     "conditions": ["The pillow is on the sofa."], "plan": ["Walk to pillow.", "Grab pillow."]},
    {"split": "test", "seed": 9, "activity": "watch tv", "seen": True, "items": ["sofa", "tv"], "distractors": ["cup", "fork", "soap", "keys", "apple"],
     "conditions": ["The tv is on."], "plan": ["Walk to living room.", "Walk to sofa.", "Sit on sofa."]},
    {"split": "test", "seed": 9, "activity": "make the bed", "seen": False, "items": ["pillow", "bed", "sofa"], "distractors": ["cup", "fork", "soap", "keys"],
     "conditions": ["The pillow is on the sofa."], "plan": ["Walk to living room.", "Walk to pillow.", "Grab pillow.", "Walk to bedroom.", "Walk to bed.", "Put pillow on bed."]},
]  # fmt: skip
COUNTING = [
    {"split": s, "seed": i, "story": [f"At first, the sofa held the cup {i}.", "Mary took the cup from the sofa."],
     "question": "How many items are there on the sofa?", "answer": "There is no item on the sofa."}
    for i, s in enumerate(["train"] * 4 + ["test"])
]  # fmt: skip
PATHS = [{"split": s, "seed": 0, "story": ["John was in the kitchen.", "John took the cup.", "John went to the hallway."],
          "question": "What is the order of the rooms where the cup appeared?", "answer": "kitchen, hallway"} for s in ("train", "test")]  # fmt: skip
LOCATIONS = [{**PATHS[1], "question": "Where was the cup before the hallway?", "answer": "kitchen", "options": ["kitchen", "hallway", "bedroom"]}]


def write(directory, **files):
    for name, rows in files.items():
        (directory / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def experiences(tmp_path, monkeypatch):
    write(tmp_path, plans=PLANS, counting=COUNTING, paths=PATHS, locations=LOCATIONS)
    monkeypatch.setenv("E2WM_DIR", str(tmp_path))
    e2wm.records.cache_clear()
    yield tmp_path
    e2wm.records.cache_clear()


def test_plan_generation_prompts(experiences):
    examples = e2wm.examples("plan", "train")
    assert len(examples) == 3  # seen activities only: "make the bed" is never trained on
    watch = next(x for x in examples if "How to watch tv?" in x["inputs"].split("\n")[-2])
    blocks = watch["inputs"].split("\nQ: ")
    assert len(blocks) == 3  # two solved demonstrations, then the query
    assert blocks[-1] == "How to watch tv? Given items include sofa, tv. The tv is off.\nA:"
    assert "How to find the keys? Given items include keys, desk. The keys are on the desk.\nA: Walk to home office. Walk to keys. Grab keys." in watch["inputs"]
    assert watch["targets"] == " Walk to living room. Walk to tv. Switch on tv. Walk to sofa. Sit on sofa."


def test_evaluation_plans_split_seen_unseen_and_confusing(experiences):
    seen, unseen = e2wm.examples("plan_seen", "validation"), e2wm.examples("plan_unseen", "validation")
    assert [x["targets"] for x in seen] == [" Walk to living room. Walk to sofa. Sit on sofa."]
    assert unseen[0]["inputs"].endswith("Q: How to make the bed? Given items include pillow, bed, sofa. The pillow is on the sofa.\nA:")
    confusing = e2wm.examples("plan_unseen_confusing", "validation")[0]["inputs"].split("\n")[-2]
    listed = confusing.split("include ")[1].split(". ")[0].split(", ")
    assert set(listed) - {"pillow", "bed", "sofa"} and set(listed) <= {"pillow", "bed", "sofa", "cup", "fork", "soap", "keys"}
    assert len(listed) == 6  # three distractors among the given items
    # Held-out homes never lend a demonstration: only training plans are shown.
    assert "Walk to sofa. Sit on sofa.\n" not in seen[0]["inputs"]


def test_activity_recognition_counting_and_path_formats(experiences):
    activity = e2wm.examples("activity", "train")[0]
    assert activity["inputs"].count("Given a household activity plan as follows:\n") == 3
    assert activity["inputs"].endswith("\nQ: What is the name of the activity?\nA:") and activity["targets"] in {" watch tv", " find the keys", " use the toilet"}
    counting = e2wm.examples("counting", "train")[0]
    lines = counting["inputs"].split("\n")
    assert lines[0] == e2wm.COUNTING_HEADER and counting["inputs"].count("\nA: There is no item on the sofa.") == 3
    assert lines[-2].startswith("Q: At first, the sofa held") and lines[-2].endswith("How many items are there on the sofa?")
    assert counting["targets"] == " There is no item on the sofa."
    path = e2wm.examples("path", "train")[0]
    assert path == {"inputs": "John was in the kitchen. John took the cup. John went to the hallway.\nQuestion: What is the order of the "
                              "rooms where the cup appeared?\nAnswer:", "targets": " kitchen, hallway"}  # fmt: skip


def test_multiple_choice_sets_hold_their_answers(experiences):
    for task in ("housework", "negation_housework", "activity_recognition", "activity_inference", "counting_choice", "location"):
        rows = e2wm.examples(task, "validation")
        assert rows, task
        for row in rows:
            assert row["targets"] in row["options"] and len(set(row["options"])) == len(row["options"]), (task, row)
    related = e2wm.examples("housework", "validation")[0]
    assert related["targets"].strip() in {"sofa", "tv"} and related["inputs"].startswith("Question: To watch tv, a possibly related item could be")
    unrelated = e2wm.examples("negation_housework", "validation")[0]
    assert unrelated["targets"].strip() not in {"sofa", "tv"} and "an unrelated item" in unrelated["inputs"]
    inference = e2wm.examples("activity_inference", "validation")
    assert inference[0]["inputs"].startswith("The tv is on. Someone sits on the sofa. Someone faces the tv.\nQuestion: Given the above state")


def test_a_choice_missing_its_answer_is_refused(experiences):
    write(experiences, locations=[{**LOCATIONS[0], "options": ["hallway", "bedroom"]}])
    e2wm.records.cache_clear()
    with pytest.raises(e2wm.ExperienceFileError, match=r"locations.jsonl:1: the answer 'kitchen' is not among its options"):
        e2wm.examples("location", "validation")


def test_training_tasks_carry_their_loss_weights(experiences):
    weights = {}
    for name in ("e2wm_plan", "e2wm_activity"):
        task = seqio.get_mixture_or_task(name)
        ds = task.source.get_dataset("train")
        for preprocessor in task.preprocessors[2:]:  # the weight (tokenizing needs a tokenizer; not under test)
            ds = preprocessor(ds)
        weights[name] = {int(x["loss_weight"]) for x in ds.as_numpy_iterator()}
    assert weights == {"e2wm_plan": {1000}, "e2wm_activity": {700}}


def test_a_missing_directory_says_how_to_make_one(tmp_path, monkeypatch):
    monkeypatch.setenv("E2WM_DIR", str(tmp_path / "nowhere"))
    e2wm.records.cache_clear()
    with pytest.raises(e2wm.ExperienceFileError, match="flanjax world generate"):
        e2wm.examples("plan", "train")
