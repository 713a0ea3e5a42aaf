"""The templated-task API: registration checks, rendering, evaluation variants, mixtures."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import seqio
import tensorflow as tf

from flanjax.data import templated
from flanjax.data.fewshot import FewShotConfig, render_exemplar
from flanjax.data.pipeline import text_examples
from flanjax.data.templated import TaskDefinitionError, add_mixture, add_task, capped_rate
from flanjax.data.templates import Template, TemplateError
from tasks.quickstart import VOCABULARY

COLOURS = ["red", "green", "blue"]
ROWS = {
    "train": [(f"thing {i}", i % 3, f"  note {i}  ") for i in range(40)],
    "validation": [(f"valid {i}", i % 3, f"v{i}") for i in range(6)],
    "test": [(f"held {i}", i % 3, f"t{i}") for i in range(6)] + [("", 0, "empty name"), ("blank note", 1, "   ")],
}
_names = (f"api_task_{i}" for i in itertools.count())
CLUSTER = "api_tests"  # not a FLAN cluster: the collection's own counts stay exact
templated.add_cluster(CLUSTER)


def source(num_train: int = 40) -> seqio.DataSource:
    def load(split, shuffle_files, seed=None):
        names, labels, notes = zip(*ROWS[split])
        return tf.data.Dataset.from_tensor_slices({"name": list(names), "label": list(labels), "note": list(notes)})

    return seqio.FunctionDataSource(load, splits=tuple(ROWS), num_input_examples={"train": num_train})


def colour(example):
    return tf.gather(COLOURS, example["label"])


TEMPLATES = [
    Template("What colour is {name}?", "{answer}"),
    Template("{name}: {note}\nName its colour.", "{answer}"),
    Template("Describe something {answer}.", "{name}", turned_around=True),
]


def register(name=None, **overrides):
    spec = dict(
        source=source(), fields={"name": "name", "note": "note", "answer": colour}, templates=TEMPLATES,
        options=COLOURS, cluster=CLUSTER, vocabulary=VOCABULARY,
    )  # fmt: skip
    return add_task(name or next(_names), **{**spec, **overrides})


# --- registration errors ---------------------------------------------------------------------------


def test_a_template_field_the_preprocessing_does_not_produce_is_named():
    name = next(_names)
    templates = [TEMPLATES[0], Template("{name} is {colour}", "{answer}")]
    with pytest.raises(TemplateError, match=rf"task '{name}', template 1: field {{colour}} is not produced"):
        register(name, templates=templates)
    assert name not in seqio.TaskRegistry.names()


def test_duplicate_names_unknown_clusters_and_empty_options_are_refused():
    task = register()
    with pytest.raises(TaskDefinitionError, match="already registered"):
        register(task.name)
    with pytest.raises(TaskDefinitionError, match="unknown cluster 'sentimnet'.*Did you mean: sentiment"):
        register(cluster="sentimnet")
    with pytest.raises(TaskDefinitionError, match="option list is empty"):
        register(options=[])
    with pytest.raises(TemplateError, match="template 0: a classification template's target must be the answer field"):
        register(templates=[Template("{name}?", "It is {answer}.")])
    with pytest.raises(TaskDefinitionError, match="unknown cluster 'nope'"):
        add_mixture("api_bad_mixture", clusters=["nope"])
    with pytest.raises(TaskDefinitionError, match="no templated task named"):
        add_mixture("api_bad_mixture", tasks=["no_such_task"])


def test_a_users_cluster_is_declared_first():
    with pytest.raises(TaskDefinitionError, match="add_cluster"):
        register(cluster="colours")
    templated.add_cluster("colours")
    assert register(cluster="colours").cluster == "colours"


# --- rendering ------------------------------------------------------------------------------------


def expected_render(template: Template, name: str, note: str, label: int) -> tuple[str, str]:
    """Independent rendering: str.format plus FLAN's options block on forward templates."""
    inputs, targets = template.inputs.format(name=name, note=note, answer=COLOURS[label]), template.targets.format(name=name, note=note, answer=COLOURS[label])
    if not template.turned_around:
        inputs += "\n\nOPTIONS:\n" + "\n".join(f"- {c}" for c in COLOURS)
    return inputs, targets


def test_every_example_renders_with_one_template_and_the_options_block():
    task = register()
    rendered = text_examples(task.name, "train", 100)
    assert len(rendered) == len(ROWS["train"])
    for example, (name, label, note) in zip(rendered, ROWS["train"]):
        template = TEMPLATES[example["template"]]
        assert (example["inputs"].decode(), example["targets"].decode()) == expected_render(template, name, note.strip(), label)
    assert {int(e["template"]) for e in rendered} == {0, 1, 2}  # 40 examples use all three


def test_empty_fields_are_dropped_and_whitespace_stripped():
    task = register()
    names = [e["inputs"].decode() for e in text_examples(task.name, "test", 100)]
    assert len(names) == 6  # the row with an empty name and the one with a blank note are gone
    assert not any("empty name" in n or "blank note" in n for n in names)


def test_template_choice_is_seeded_and_independent_of_order():
    def choices(task):
        rows = text_examples(task.name, "train", 100)
        return {e["targets"].decode() + e["inputs"].decode()[:12]: int(e["template"]) for e in rows}

    a, b, c = register(seed=1), register(seed=1), register(seed=2)
    first, again, other = choices(a), choices(b), choices(c)
    assert first == again
    assert list(first.values()) != list(other.values())
    # The choice is a function of the example alone: shuffled input, same assignment.
    task = seqio.get_mixture_or_task(a.name)
    ds = task.source.get_dataset("train", shuffle=False).shuffle(64, seed=3)
    for step in task.preprocessors[:2]:
        ds = step(ds)
    for e in ds.as_numpy_iterator():
        assert first[e["targets"].decode() + e["inputs"].decode()[:12]] == int(e["template"])


# --- evaluation variants ------------------------------------------------------------------------------


def test_classification_is_evaluated_by_rank_classification_over_forward_templates():
    task = register()
    assert task.eval_task == f"{task.name}_eval" and task.metrics == ("accuracy", "f1")
    rows = text_examples(task.eval_task, "validation", 100)
    assert len(rows) == 3 * len(ROWS["validation"])  # a row per option
    for example, group in itertools.groupby(rows, key=lambda r: int(r["idx"][0])):
        group = list(group)
        label = ROWS["validation"][example][1]
        assert [r["targets"].decode() for r in group] == COLOURS
        assert [bool(r["is_correct"]) for r in group] == [i == label for i in range(3)]
        assert all(r["inputs"].decode().endswith("OPTIONS:\n- red\n- green\n- blue") for r in group)
    metric = seqio.get_mixture_or_task(task.eval_task).metric_fns[0]
    targets = [((e, i), i == label, 1.0, 1) for e, label in enumerate([2, 0, 1]) for i in range(3)]
    scores = [0.1, 0.2, 0.9, 0.8, 0.1, 0.2, 0.3, 0.4, 0.35]
    assert metric(targets, scores) == {"accuracy": 100.0, "f1": 100.0}
    assert metric(targets, scores[:6] + [0.5, 0.4, 0.1])["accuracy"] == pytest.approx(200 / 3)


def test_generation_keeps_all_references_for_its_metrics():
    from flanjax.eval.metrics import squad

    task = register(
        options=None, templates=[Template("Name the colour of {name}.", "{answer}")], metrics=[squad],
        references=lambda ex: tf.stack([colour(ex), tf.strings.upper(colour(ex))]),
    )  # fmt: skip
    assert task.metrics == ("squad",) and not task.classification
    eval_task = seqio.get_mixture_or_task(task.eval_task)
    example = text_examples(task.eval_task, "validation", 1)[0]
    assert eval_task.postprocess_fn("red", example=example, is_target=True) == ["red", "RED"]
    assert eval_task.postprocess_fn("  red ") == "red"


def test_turned_around_templates_are_trained_on_but_not_evaluated():
    task = register()
    assert len(task.forward_templates) == 2
    rendered = {e["inputs"].decode() for e in text_examples(task.eval_task, "validation", 100)}
    assert not any(r.startswith("Describe something") for r in rendered)


def test_fewshot_prompts_put_training_exemplars_first_within_the_budget():
    forward = [Template("What colour is {name}?", "{answer}")]
    task = register(templates=forward, options=None, metrics=[lambda t, p: {}], fewshot_config=FewShotConfig(num_shots=4, max_input_tokens=10_000))
    shots = [{"name": n, "note": note.strip(), "answer": COLOURS[label]} for n, label, note in ROWS["train"][:4]]
    prefix = "".join(render_exemplar(forward[0], s) + "\n\n" for s in shots)
    queries = text_examples(task.eval_task, "test", 100)
    prompts = text_examples(task.fewshot_task, "test", 100)
    assert [p["inputs"].decode() for p in prompts] == [prefix + q["inputs"].decode() for q in queries]
    assert prefix.startswith("What colour is thing 0?\nred\n\nWhat colour is thing 1?\ngreen\n\n")

    # A tight budget keeps only the exemplars that fit before each prompt.
    budget = len(VOCABULARY.encode(prefix)) // 2
    tight = register(templates=forward, options=None, metrics=[lambda t, p: {}], fewshot_config=FewShotConfig(num_shots=4, max_input_tokens=budget))
    for p in text_examples(tight.fewshot_task, "test", 100):
        text = p["inputs"].decode()
        assert len(VOCABULARY.encode(text)) <= budget + 2  # parts tokenized apart: a token or two of slack
        assert 0 < text.count("What colour is") < 5


# --- mixtures -----------------------------------------------------------------------------------


def test_mixtures_combine_tasks_and_clusters_with_capped_rates():
    templated.add_cluster("api_mix")
    small, large = register(cluster="api_mix", source=source(120)), register(cluster="api_mix", source=source(50_000))
    other = register()
    mixture = add_mixture("api_mixture", tasks=[other.name], clusters=["api_mix"])
    assert {t.name for t in mixture.tasks} == {small.name, large.name, other.name}
    rates = {t.name: mixture.get_rate(t) for t in mixture.tasks}
    assert rates[small.name] == 120 and rates[large.name] == 3000 and rates[other.name] == 40
    assert capped_rate(seqio.get_mixture_or_task(large.name)) == 3000
    evaluation = add_mixture("api_mixture_eval", clusters=["api_mix"], variant="eval")
    assert {t.name for t in evaluation.tasks} == {small.eval_task, large.eval_task}
    assert {evaluation.get_rate(t) for t in evaluation.tasks} == {1.0}
    np.testing.assert_equal(len(templated.templated_tasks("api_mix")), 2)
