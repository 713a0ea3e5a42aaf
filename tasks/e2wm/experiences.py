"""E2WM's experience tasks (Xiang et al. 2023) over a directory that `flanjax world generate`
wrote (gin's E2WM_DIR, or $E2WM_DIR). Importing this module registers:

training (homes of the "train" split, seen activities only; each example carries its format's
loss weight, `data.weighted`; the "validation" split holds the same formats from held-out homes)
    e2wm_plan        Q: How to <activity>? Given items include ... <conditions>\\nA: <plan>   (1.0)
    e2wm_activity    a plan -> the name of its activity                                      (0.7)
    e2wm_counting    a story -> "There are N items on the X. They are ..."                  (1.0)
    e2wm_path        a three-agent story -> the rooms an object passed through, in order    (1.0)
    e2wm             the four, example-proportional

evaluation ("validation" split: held-out homes), mixture e2wm_eval
    e2wm_eval_plan_{seen,unseen}[_confusing]   plan generation, ROUGE-L; confusing prompts list
                                               distractor items among the given ones
    e2wm_eval_housework, e2wm_eval_negation_housework   which item relates (does not relate) to
                                               an activity; scored "un" (calibrated)
    e2wm_eval_activity_recognition             a plan -> its activity, scored "ln"
    e2wm_eval_activity_inference               a goal state -> an activity, scored "un"
    e2wm_eval_counting                         a story -> the holder's items, scored "ln"
    e2wm_eval_path                             generation, the longest common contiguous run
    e2wm_eval_location                         where was an object before a room, scored "ln"

Prompts hold solved demonstrations as E2WM's do (2 for plans and activities, 3 for counting);
`formats.demonstrations` (gin) changes that, e.g. to 0 for a small model with a short context.
Every choice (demonstrations, options, distractors) is seeded by the example, so a directory
always renders the same text.
"""

from __future__ import annotations

import functools
import json
import os
import random

import gin
import seqio
import tensorflow as tf

from flanjax import paths
from flanjax.data.rank_classification import AnswerScoring, rank_classification_targets
from flanjax.data.vocab import DEFAULT_VOCABULARY
from flanjax.data.weighted import LOSS_WEIGHT, with_loss_weight
from flanjax.errors import FlanjaxError
from flanjax.eval.metrics import object_path, rouge
from flanjax.worlds import activities as _household  # noqa: F401  (registers the world and its activities)
from flanjax.worlds.household import be
from flanjax.worlds.world import get_activity

WEIGHTS = {"plan": 1.0, "activity": 0.7, "counting": 1.0, "path": 1.0}
SPLITS = {"train": "train", "validation": "test"}  # seqio split -> the homes' split in the files
COUNTING_HEADER = (
    "Given a sequence of actions in a house and a question about what is in a place, answer the number of items "
    "there and list them."
)


class ExperienceFileError(FlanjaxError, ValueError):
    """An experience file is missing or holds a record that cannot be rendered."""


@gin.configurable
def e2wm_dir(path: str | None = None) -> str:
    """gin's E2WM_DIR (`--gin.E2WM_DIR=DIR`), else $E2WM_DIR: a `flanjax world generate` output."""
    path = path or os.environ.get("E2WM_DIR")
    if not path:
        raise ExperienceFileError("no experience directory: run `flanjax world generate --out DIR` and pass --gin.E2WM_DIR=DIR.")
    return path


@gin.configurable
def formats(demonstrations: int = 2, counting_demonstrations: int = 3, distractors: int = 3) -> tuple[int, int, int]:
    """How many solved demonstrations prompts hold, and distractor items a confusing prompt lists."""
    return demonstrations, counting_demonstrations, distractors


@functools.cache
def records(directory: str, name: str) -> tuple[dict, ...]:
    path = os.path.join(directory, f"{name}.jsonl")
    if not paths.exists(path):
        raise ExperienceFileError(f"{path} does not exist; run `flanjax world generate --out {directory}`.")
    rows = []
    with paths.open(path) as f:
        for line_number, line in enumerate(f, 1):
            row = json.loads(line)
            if "options" in row and row["answer"] not in row["options"]:
                raise ExperienceFileError(
                    f"{path}:{line_number}: the answer {row['answer']!r} is not among its options {row['options']}; "
                    "every multiple-choice record must list its answer."
                )
            rows.append(row)
    return tuple(rows)


def _rng(*key) -> random.Random:
    return random.Random(json.dumps(key))


# --- rendering (pure: a record, its pool and the formats -> inputs and targets) -----------------


def plan_block(record: dict, rng: random.Random | None = None, distractors: int = 0) -> str:
    """`Q: How to <activity>? Given items include a, b, c. <conditions>` (the query: no answer)."""
    items = list(record["items"])
    if distractors and rng is not None:
        items += rng.sample(record["distractors"], min(distractors, len(record["distractors"])))
        rng.shuffle(items)
    conditions = " ".join(record["conditions"])
    return f"Q: How to {record['activity']}? Given items include {', '.join(items)}. {conditions}".rstrip()


def plan_text(record: dict) -> str:
    return " ".join(record["plan"])


def _demonstrations(pool: list[dict], record: dict, k: int, rng: random.Random) -> list[dict]:
    """`k` records of the pool for other activities, drawn by `rng`."""
    others = [r for r in pool if r["activity"] != record["activity"]]
    return rng.sample(others, min(k, len(others)))


def plan_example(record: dict, pool: list[dict], k: int, distractors: int = 0) -> dict:
    rng = _rng("plan", record["seed"], record["activity"])
    demos = [f"{plan_block(d)}\nA: {plan_text(d)}" for d in _demonstrations(pool, record, k, rng)]
    query = plan_block(record, rng, distractors)
    return {"inputs": "\n".join([*demos, f"{query}\nA:"]), "targets": " " + plan_text(record)}


def activity_block(record: dict) -> str:
    plan = "\n".join(record["plan"])
    return f"Given a household activity plan as follows:\n{plan}\nQ: What is the name of the activity?\nA:"


def activity_example(record: dict, pool: list[dict], k: int) -> dict:
    rng = _rng("activity", record["seed"], record["activity"])
    demos = [f"{activity_block(d)} {d['activity']}" for d in _demonstrations(pool, record, k, rng)]
    return {"inputs": "\n".join([*demos, activity_block(record)]), "targets": " " + record["activity"]}


def story_block(record: dict) -> str:
    return f"Q: {' '.join(record['story'])} {record['question']}\nA:"


def counting_example(record: dict, pool: list[dict], k: int) -> dict:
    rng = _rng("counting", record["seed"], record["question"], record["story"][0])
    others = [r for r in pool if r is not record]
    demos = [f"{story_block(d)} {d['answer']}" for d in rng.sample(others, min(k, len(others)))]
    return {"inputs": "\n".join([COUNTING_HEADER, *demos, story_block(record)]), "targets": " " + record["answer"]}


def path_example(record: dict) -> dict:
    return {"inputs": f"{' '.join(record['story'])}\nQuestion: {record['question']}\nAnswer:", "targets": " " + record["answer"]}


GOAL_SENTENCES = {
    "on": "The {0} {be} on the {1}.", "inside": "The {0} {be} in the {1}.", "holds": "The {0} {be} in hand.",
    "open": "The {0} is open.", "closed": "The {0} is closed.", "switched_on": "The {0} is on.",
    "switched_off": "The {0} is off.", "sitting": "Someone sits on the {0}.", "lying": "Someone lies on the {0}.",
    "facing": "Someone faces the {0}.", "in_room": "Someone is in the {0}.",
}  # fmt: skip


def goal_state(activity: str) -> str:
    """The state an activity leaves, in sentences (activity inference's prompt)."""
    return " ".join(GOAL_SENTENCES[g[0]].format(*g[1:], be=be(g[1])) for g in get_activity(activity).goals)


def related_items(activity: str) -> list[str]:
    """The objects an activity's goals name."""
    return sorted({name for g in get_activity(activity).goals for name in g[1:]})


def _options(correct: str, wrong: list[str], rng: random.Random, k: int = 4) -> list[str]:
    options = [correct, *rng.sample(sorted(set(wrong) - {correct}), min(k - 1, len(set(wrong) - {correct})))]
    rng.shuffle(options)
    return options


def housework_example(record: dict, negated: bool) -> dict | None:
    """Which item relates (or, negated, does not relate) to the activity, among four."""
    rng = _rng("housework", negated, record["seed"], record["activity"])
    related = [i for i in related_items(record["activity"]) if i in record["items"]]
    unrelated = record["distractors"]
    if not related or len(unrelated) < 3:
        return None
    kind = "an unrelated" if negated else "a possibly related"
    correct, wrong = (rng.choice(unrelated), related) if negated else (rng.choice(related), unrelated)
    return {"inputs": f"Question: To {record['activity']}, {kind} item could be\nAnswer:", "targets": " " + correct,
            "options": [" " + o for o in _options(correct, wrong, rng)]}  # fmt: skip


def activity_choice_example(record: dict, names: list[str]) -> dict:
    rng = _rng("recognition", record["seed"], record["activity"])
    return {"inputs": activity_block(record), "targets": " " + record["activity"],
            "options": [" " + o for o in _options(record["activity"], names, rng)]}  # fmt: skip


def inference_example(record: dict, names: list[str]) -> dict:
    rng = _rng("inference", record["seed"], record["activity"])
    prompt = f"{goal_state(record['activity'])}\nQuestion: Given the above state, a possible activity could be\nAnswer:"
    return {"inputs": prompt, "targets": " " + record["activity"], "options": [" " + o for o in _options(record["activity"], names, rng)]}


def counting_options(answer: str, rng: random.Random) -> list[str]:
    """The true answer and three wrong ones: other counts of the same place."""
    place = answer.split(" the ", 1)[1].split(".")[0] if " the " in answer else "place"
    relation = " in the " if f" in the {place}" in answer else " on the "
    wrong = [f"There is no item{relation}{place}.", f"There is one item{relation}{place}.",
             *(f"There are {n} items{relation}{place}." for n in range(2, 6))]  # fmt: skip
    true_head = answer.split(" They are")[0].split(" It is")[0]
    return _options(answer, [w for w in wrong if w != true_head], rng)


def counting_choice_example(record: dict) -> dict:
    rng = _rng("counting choice", record["seed"], record["question"], record["story"][0])
    return {"inputs": f"{COUNTING_HEADER}\n{story_block(record)}", "targets": " " + record["answer"],
            "options": [" " + o for o in counting_options(record["answer"], rng)]}  # fmt: skip


def location_example(record: dict) -> dict:
    return {**path_example(record), "options": [" " + o for o in record["options"]]}


# --- the examples of each task -----------------------------------------------------------------


def _split_records(name: str, split: str) -> list[dict]:
    return [r for r in records(e2wm_dir(), name) if r["split"] == SPLITS[split]]


def _seen_plans(split: str) -> list[dict]:
    return [r for r in _split_records("plans", split) if r["seen"]]


def examples(task: str, split: str) -> list[dict]:
    """The rendered examples of one task and split (the training formats' pools of
    demonstrations are the split's seen plans, or its stories)."""
    k, k_counting, distractors = formats()
    if task == "plan":
        pool = _seen_plans(split)
        return [plan_example(r, pool, k) for r in pool]
    if task == "activity":
        pool = _seen_plans(split)
        return [activity_example(r, pool, k) for r in pool]
    if task == "counting":
        pool = _split_records("counting", split)
        return [counting_example(r, pool, k_counting) for r in pool]
    if task == "path":
        return [path_example(r) for r in _split_records("paths", split)]
    plans = _split_records("plans", "validation")
    names = sorted({r["activity"] for r in records(e2wm_dir(), "plans")})
    demos = _seen_plans("train")  # evaluation prompts show training plans, never the held-out homes'
    if task.startswith("plan_"):
        seen, confusing = not task.startswith("plan_unseen"), task.endswith("_confusing")
        chosen = [r for r in plans if r["seen"] == seen]
        return [plan_example(r, demos, k, distractors if confusing else 0) for r in chosen]
    if task in ("housework", "negation_housework"):
        made = [housework_example(r, task == "negation_housework") for r in plans]
        return [m for m in made if m is not None]
    if task == "activity_recognition":
        return [activity_choice_example(r, names) for r in plans]
    if task == "activity_inference":
        unique = {r["activity"]: r for r in plans}  # one question per activity: the state says it all
        return [inference_example(r, names) for r in unique.values()]
    if task == "counting_choice":
        return [counting_choice_example(r) for r in _split_records("counting", "validation")]
    if task == "path_eval":
        return [path_example(r) for r in _split_records("paths", "validation")]
    if task == "location":
        return [location_example(r) for r in _split_records("locations", "validation")]
    raise KeyError(task)


def _source(task: str, splits=("train", "validation")) -> seqio.FunctionDataSource:
    def dataset_fn(split: str, shuffle_files: bool = False, seed: int | None = None) -> tf.data.Dataset:
        del shuffle_files, seed  # in memory; seqio shuffles examples downstream
        rows = examples(task, split)
        if not rows:
            raise ExperienceFileError(f"E2WM task {task!r} has no {split!r} examples in {e2wm_dir()}; generate more homes.")
        columns = {key: [row[key] for row in rows] for key in rows[0]}
        if "options" in columns:
            return tf.data.Dataset.from_tensor_slices({**{k: v for k, v in columns.items() if k != "options"},
                                                       "options": tf.ragged.constant(columns["options"])})  # fmt: skip
        return tf.data.Dataset.from_tensor_slices(columns)

    return seqio.FunctionDataSource(dataset_fn, splits=list(splits))


def first_line(output: str, example=None, is_target: bool = False) -> str:
    """E2WM cuts generations at the first newline."""
    return output.split("\n", 1)[0].strip()


def _features(weighted: bool = False) -> dict:
    text = {"inputs": seqio.Feature(DEFAULT_VOCABULARY, add_eos=False), "targets": seqio.Feature(DEFAULT_VOCABULARY)}
    return {**text, "loss_weight": LOSS_WEIGHT} if weighted else text


TOKENIZE = (seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim)
TRAINING = ("plan", "activity", "counting", "path")
GENERATION = {f"plan_{s}{c}": rouge for s in ("seen", "unseen") for c in ("", "_confusing")} | {"path_eval": object_path}
CHOICE = {"housework": "un", "negation_housework": "un", "activity_recognition": "ln", "activity_inference": "un",
          "counting_choice": "ln", "location": "ln"}  # fmt: skip
EVAL_NAMES = {"path_eval": "e2wm_eval_path", "counting_choice": "e2wm_eval_counting"}


def eval_task_name(task: str) -> str:
    return EVAL_NAMES.get(task, f"e2wm_eval_{task}")


def _register() -> None:
    for task in TRAINING:
        seqio.TaskRegistry.add(f"e2wm_{task}", source=_source(task), output_features=_features(weighted=True),
                               preprocessors=[*TOKENIZE, with_loss_weight(WEIGHTS[task])])  # fmt: skip
    # Example-proportional, counted when the mixture is first read (the files are read lazily).
    rate = lambda task: float(len(examples(task.name.removeprefix("e2wm_"), "train")))  # noqa: E731
    seqio.MixtureRegistry.add("e2wm", [f"e2wm_{t}" for t in TRAINING], default_rate=rate)
    for task, metric in GENERATION.items():
        seqio.TaskRegistry.add(eval_task_name(task), source=_source(task, ("validation",)), output_features=_features(),
                               preprocessors=list(TOKENIZE), postprocess_fn=first_line, metric_fns=[metric])  # fmt: skip
    for task, method in CHOICE.items():
        scoring = AnswerScoring(method)
        seqio.TaskRegistry.add(eval_task_name(task), source=_source(task, ("validation",)), output_features=_features(),
                               preprocessors=[scoring.preprocessor, *TOKENIZE], postprocess_fn=rank_classification_targets,
                               metric_fns=[scoring.metric])  # fmt: skip
    seqio.MixtureRegistry.add("e2wm_eval", [eval_task_name(t) for t in [*GENERATION, *CHOICE]], default_rate=1.0)


if "e2wm" not in seqio.MixtureRegistry.names():
    _register()

