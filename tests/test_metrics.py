"""Tests of flanjax's evaluation metrics (flanjax.eval.metrics, flanjax.data.rank_classification).

Expected values come from T5's own metric functions, preprocessor and postprocessor
(`t5.evaluation.metrics`, `t5.data.preprocessors`, `t5.data.postprocessors`): the
implementations FLAN reports its numbers with. Where T5's path differs by design (BLEU with
several references per example), the expectation is sacrebleu called directly.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import sacrebleu
import t5.data.postprocessors as t5_postprocessors
import t5.data.preprocessors as t5_preprocessors
import t5.evaluation.metrics as t5_metrics
import tensorflow as tf

from flanjax.eval import metrics
from flanjax.data.rank_classification import (
    rank_classification,
    rank_classification_metric,
    rank_classification_targets,
)

TOL = 1e-9

# --- inputs ----------------------------------------------------------------------------------

# Translation-like pairs: exact, partial overlap, reordering, punctuation and case changes.
BLEU_REFERENCES = [
    "The cat sat on the mat near the window.",
    "He went to the market to buy fresh bread and milk.",
    "The committee will announce its decision on Monday morning.",
    "Rain is expected across the north of the country tomorrow.",
    "She has lived in Berlin for almost ten years.",
    "Please turn off the lights when you leave the room.",
]
BLEU_PREDICTIONS = [
    "The cat sat on the mat by the window.",
    "He went to the market and bought bread and milk.",
    "The committee announces its decision on Monday.",
    "Tomorrow rain is expected in the north of the country.",
    "She has lived in Berlin for ten years.",
    "please turn the lights off when leaving the room",
]
BLEU_SECOND_REFERENCES = [
    "A cat was sitting on the mat by the window.",
    "He went to the market and bought fresh bread and milk.",
    "On Monday morning the committee will announce its decision.",
    "Tomorrow, rain is expected in the north of the country.",
    "She has been living in Berlin for nearly ten years.",
    "Turn the lights off when you leave the room, please.",
]

ROUGE_TARGETS = [
    "the central bank raised interest rates by half a point . markets fell sharply after the announcement .",
    "a new species of frog was discovered in the rainforest of peru .",
    "the city council approved the budget for the new library .",
    "heavy snow closed several roads in the mountains overnight .",
    "the team won the championship after a dramatic penalty shootout .",
    "scientists warn that the glacier is melting faster than expected . sea levels could rise .",
]
ROUGE_PREDICTIONS = [
    "the central bank raised rates by half a point . markets dropped after the news .",
    "researchers found a new frog species in peru .",
    "council approves library budget .",
    "several mountain roads were closed by heavy snow .",
    "the team lost the final on penalties .",
    "the glacier is melting faster than scientists expected . sea levels may rise .",
]

SQUAD_TARGETS = [
    ["Eiffel Tower", "the Eiffel Tower"],
    ["Paris"],
    ["1889", "in 1889"],
    ["Gustave Eiffel", "Eiffel"],
    ["wrought iron"],
    ["330 metres", "330 m", "1,083 ft"],
    ["the Seine"],
]
SQUAD_PREDICTIONS = [
    "The Eiffel Tower.",  # differs in case, article and punctuation only
    "paris!",  # case and punctuation
    "in the year 1889",  # partial overlap
    "Alexandre Gustave Eiffel",  # partial overlap
    "steel",  # wrong
    "about 330 metres tall",  # partial overlap
    "A Seine",  # article only
]


def _assert_close(actual: dict, expected: dict, keys) -> None:
    for key in keys:
        assert actual[key] == pytest.approx(expected[key], abs=TOL), key


# --- accuracy, exact match, F1, correlations --------------------------------------------------


@pytest.mark.parametrize(
    "targets, predictions",
    [
        (["positive", "negative", "neutral", "positive", "negative"], ["positive", "positive", "neutral", "Positive", "negative"]),
        ([0, 1, 2, 1, 0, 2, 2], [0, 1, 1, 1, 2, 2, 0]),
    ],
    ids=["strings", "ints"],
)  # fmt: skip
def test_accuracy_matches_t5(targets, predictions):
    ours = metrics.accuracy(targets, predictions)
    assert ours["accuracy"] == pytest.approx(t5_metrics.accuracy(targets, predictions)["accuracy"], abs=TOL)
    assert 0 < ours["accuracy"] < 100


def test_macro_f1_matches_t5_mean_multiclass_f1():
    targets = [0, 1, 2, 2, 1, 0, 0, 2, 1, 2]
    predictions = [0, 2, 2, 1, 1, 0, 1, 2, 1, 0]
    expected = t5_metrics.mean_multiclass_f1(num_classes=3)(targets, predictions)["mean_3class_f1"]
    ours = metrics.macro_f1(targets, predictions)["f1"]
    assert ours == pytest.approx(expected, abs=TOL)
    assert 0 < ours < 100


def test_pearson_and_spearman_match_t5():
    targets = [0.0, 1.2, 2.5, 3.0, 3.8, 4.4, 5.0, 2.5]
    predictions = [0.4, 1.0, 2.9, 2.7, 4.1, 3.9, 4.8, 1.5]
    for ours_fn, t5_fn, key in [
        (metrics.pearson_corrcoef, t5_metrics.pearson_corrcoef, "pearson_corrcoef"),
        (metrics.spearman_corrcoef, t5_metrics.spearman_corrcoef, "spearman_corrcoef"),
    ]:
        ours = ours_fn(targets, predictions)[key]
        assert ours == pytest.approx(t5_fn(targets, predictions)[key], abs=TOL), key
        assert 0 < ours < 100, key


def test_exact_match_strips_surrounding_spaces_only():
    targets = [" yes", "no ", "Maybe", "not sure"]
    predictions = ["yes", " no", "maybe", "not  sure"]
    assert metrics.exact_match(targets, predictions) == {"exact_match": 50.0}
    with pytest.raises(ValueError):
        metrics.exact_match(["yes", "no"], ["yes"])


@pytest.mark.parametrize(
    "metric",
    [
        metrics.exact_match,
        metrics.accuracy,
        metrics.macro_f1,
        metrics.bleu,
        metrics.rouge,
        metrics.squad,
        metrics.pearson_corrcoef,
        metrics.spearman_corrcoef,
    ],
    ids=lambda fn: fn.__name__,
)
def test_metrics_reject_empty_inputs(metric):
    with pytest.raises(ValueError):
        metric([], [])


def test_rank_classification_metric_rejects_empty_inputs():
    with pytest.raises(ValueError):
        rank_classification_metric([], [])


# --- BLEU ------------------------------------------------------------------------------------


def test_bleu_matches_t5_single_reference():
    ours = metrics.bleu(BLEU_REFERENCES, BLEU_PREDICTIONS)["bleu"]
    assert ours == pytest.approx(t5_metrics.bleu(BLEU_REFERENCES, BLEU_PREDICTIONS)["bleu"], abs=TOL)
    assert 0 < ours < 100
    # A list of one reference per example is the same as plain strings.
    assert metrics.bleu([[r] for r in BLEU_REFERENCES], BLEU_PREDICTIONS)["bleu"] == pytest.approx(ours, abs=TOL)


def test_bleu_multiple_references_matches_sacrebleu():
    targets = [[a, b] for a, b in zip(BLEU_REFERENCES, BLEU_SECOND_REFERENCES)]
    expected = sacrebleu.corpus_bleu(
        BLEU_PREDICTIONS, [BLEU_REFERENCES, BLEU_SECOND_REFERENCES],  # one stream per reference
        smooth_method="exp", smooth_value=0.0, force=False, lowercase=False, tokenize="intl", use_effective_order=False,
    ).score  # fmt: skip
    ours = metrics.bleu(targets, BLEU_PREDICTIONS)["bleu"]
    assert ours == pytest.approx(expected, abs=TOL)
    # The second references count: the score is not the single-reference one.
    assert ours > metrics.bleu(BLEU_REFERENCES, BLEU_PREDICTIONS)["bleu"] + 1.0


# --- ROUGE -----------------------------------------------------------------------------------


def test_rouge_matches_t5():
    np.random.seed(0)  # T5's bootstrap draws from numpy's global generator
    expected = t5_metrics.rouge(ROUGE_TARGETS, ROUGE_PREDICTIONS)
    ours = metrics.rouge(ROUGE_TARGETS, ROUGE_PREDICTIONS)
    assert set(ours) == {"rouge1", "rouge2", "rougeLsum"}
    _assert_close(ours, expected, ["rouge1", "rouge2", "rougeLsum"])
    assert all(0 < value < 100 for value in ours.values())


def test_rouge_leaves_global_rng_untouched():
    np.random.seed(1234)
    before = np.random.get_state()
    metrics.rouge(ROUGE_TARGETS, ROUGE_PREDICTIONS)
    after = np.random.get_state()
    assert before[0] == after[0]
    np.testing.assert_array_equal(before[1], after[1])
    assert before[2:] == after[2:]


# --- SQuAD -----------------------------------------------------------------------------------


def test_squad_matches_t5():
    expected = t5_metrics.squad(SQUAD_TARGETS, SQUAD_PREDICTIONS)
    ours = metrics.squad(SQUAD_TARGETS, SQUAD_PREDICTIONS)
    _assert_close(ours, expected, ["em", "f1"])
    assert 0 < ours["em"] < ours["f1"] < 100


def test_squad_accepts_plain_string_targets():
    targets = [answers[0] for answers in SQUAD_TARGETS]
    ours = metrics.squad(targets, SQUAD_PREDICTIONS)
    _assert_close(ours, metrics.squad([[t] for t in targets], SQUAD_PREDICTIONS), ["em", "f1"])
    _assert_close(ours, t5_metrics.squad([[t] for t in targets], SQUAD_PREDICTIONS), ["em", "f1"])


# --- rank classification: preprocessor and postprocessor -------------------------------------

RANK_EXAMPLES = [
    {"inputs": "Is the sky blue on a clear day? OPTIONS: yes, no", "targets": "yes", "options": ["yes", "no"]},
    {
        "inputs": "Premise: A man plays a guitar. Hypothesis: A man makes music. OPTIONS: yes, it is not possible to tell, no",
        "targets": "yes",
        "options": ["no", "it is not possible to tell", "yes"],
    },
    {"inputs": "Which is larger, a mouse or an elephant?", "targets": "an elephant", "options": ["a mouse", "an elephant"]},
]


def _rank_dataset() -> tf.data.Dataset:
    def generate():
        for example in RANK_EXAMPLES:
            yield {
                "inputs": tf.constant(example["inputs"]),
                "targets": tf.constant(example["targets"]),
                "options": tf.constant(example["options"]),
            }

    signature = {
        "inputs": tf.TensorSpec([], tf.string),
        "targets": tf.TensorSpec([], tf.string),
        "options": tf.TensorSpec([None], tf.string),
    }
    return tf.data.Dataset.from_generator(generate, output_signature=signature)


def _rows(ds: tf.data.Dataset) -> list[tuple]:
    return [
        (tuple(row["idx"].tolist()), row["inputs"], row["targets"], bool(row["is_correct"]))
        for row in ds.as_numpy_iterator()
    ]


def test_rank_classification_preprocessor_matches_t5():
    ours = rank_classification(_rank_dataset())
    theirs = t5_preprocessors.rank_classification(
        _rank_dataset(),
        inputs_fn=lambda ex: tf.fill(tf.shape(ex["options"]), ex["inputs"]),
        targets_fn=lambda ex: ex["options"],
        is_correct_fn=lambda ex: tf.equal(ex["options"], ex["targets"]),
        mode="eval",
    )
    assert ours.element_spec == theirs.element_spec
    rows = _rows(ours)
    assert rows == _rows(theirs)
    assert len(rows) == 7 and sum(row[3] for row in rows) == 3
    assert [row[0] for row in rows] == [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2), (2, 0), (2, 1)]


@pytest.mark.parametrize("weight", [None, np.float32(0.25)], ids=["no_weight", "weight"])
def test_rank_classification_targets_matches_t5(weight):
    example = {
        "idx": np.array([4, 2], np.int32),
        "inputs": np.array([71, 12, 9, 1], np.int32),
        "targets": np.array([37, 5, 1], np.int32),
        "is_correct": np.bool_(True),
    }
    if weight is not None:
        example["weight"] = weight
    ours = rank_classification_targets(None, example=example, is_target=True)
    theirs = t5_postprocessors.rank_classification(None, example=example, is_target=True)
    assert ours == theirs
    assert ours == ((4, 2), True, 1.0 if weight is None else 0.25, 3)


def test_rank_classification_targets_passes_scores_through():
    score = -4.25
    assert rank_classification_targets(score, example=None, is_target=False) == score
    assert t5_postprocessors.rank_classification(score, example=None, is_target=False) == score


# --- rank classification: metric ------------------------------------------------------------


def _rank_inputs(examples, shuffle_seed: int | None = None):
    """(correct option, [(score, target length) per option], weight) per example ->
    (targets, scores) in the postprocessor's layout, optionally in shuffled order."""
    pairs = [
        (((i, j), j == correct, weight, length), score)
        for i, (correct, options, weight) in enumerate(examples)
        for j, (score, length) in enumerate(options)
    ]
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(pairs)
    targets, scores = zip(*pairs)
    return list(targets), list(scores)


def test_rank_classification_metric_variable_options_matches_t5():
    examples = [
        (0, [(-3.1, 2), (-5.4, 3)], 1.0),  # right
        (2, [(-7.0, 4), (-2.2, 2), (-4.9, 3)], 1.0),  # wrong
        (1, [(-6.3, 3), (-1.7, 1)], 1.0),  # right
        (3, [(-9.1, 5), (-8.4, 4), (-3.3, 2), (-4.0, 3)], 1.0),  # wrong
        (1, [(-2.5, 2), (-2.4, 2), (-8.8, 6)], 1.0),  # right
    ]
    targets, scores = _rank_inputs(examples, shuffle_seed=0)
    assert [t[0] for t in targets] != sorted(t[0] for t in targets)  # really out of order
    ours = rank_classification_metric(targets, scores)
    theirs = t5_metrics.rank_classification(targets, scores)
    assert set(ours) == {"accuracy"}
    assert ours["accuracy"] == pytest.approx(theirs["accuracy"], abs=TOL)
    assert ours["accuracy"] == pytest.approx(60.0)


BINARY_EXAMPLES = [
    (1, [(-4.0, 2), (-1.5, 2)], 1.0),  # right (1)
    (0, [(-0.9, 2), (-3.2, 2)], 1.0),  # right (0)
    (1, [(-1.1, 2), (-2.7, 2)], 1.0),  # wrong (predicts 0)
    (0, [(-3.5, 2), (-0.4, 2)], 1.0),  # wrong (predicts 1)
    (1, [(-6.0, 2), (-2.0, 2)], 1.0),  # right (1)
    (0, [(-1.3, 2), (-1.8, 2)], 1.0),  # right (0)
    (1, [(-5.1, 2), (-0.8, 2)], 1.0),  # right (1)
]


def test_rank_classification_metric_binary_matches_t5():
    targets, scores = _rank_inputs(BINARY_EXAMPLES, shuffle_seed=1)
    ours = rank_classification_metric(targets, scores, num_classes=2)
    theirs = t5_metrics.rank_classification(targets, scores, num_classes=2)
    assert set(ours) == {"accuracy", "f1"}
    _assert_close(ours, theirs, ["accuracy", "f1"])
    assert 0 < ours["f1"] < 100 and ours["f1"] != pytest.approx(ours["accuracy"])


def test_rank_classification_metric_three_classes_matches_t5():
    examples = [
        (0, [(-1.0, 1), (-2.0, 1), (-3.0, 1)], 1.0),  # right
        (1, [(-2.5, 1), (-0.7, 1), (-1.9, 1)], 1.0),  # right
        (2, [(-1.2, 1), (-3.3, 1), (-2.1, 1)], 1.0),  # wrong (0)
        (2, [(-4.4, 1), (-2.9, 1), (-0.6, 1)], 1.0),  # right
        (1, [(-3.0, 1), (-2.2, 1), (-1.4, 1)], 1.0),  # wrong (2)
        (0, [(-2.8, 1), (-0.9, 1), (-3.6, 1)], 1.0),  # wrong (1)
        (1, [(-5.0, 1), (-1.1, 1), (-2.4, 1)], 1.0),  # right
    ]
    targets, scores = _rank_inputs(examples)
    ours = rank_classification_metric(targets, scores, num_classes=3)
    theirs = t5_metrics.rank_classification(targets, scores, num_classes=3)
    assert ours["accuracy"] == pytest.approx(theirs["accuracy"], abs=TOL)
    assert ours["f1"] == pytest.approx(theirs["mean_3class_f1"], abs=TOL)
    assert 0 < ours["f1"] < 100


@pytest.mark.parametrize("num_classes", [None, 2])
def test_rank_classification_metric_weights_match_t5(num_classes):
    """Weights are per example (the preprocessor fills one weight over all its options)."""
    examples = [(c, options, w) for (c, options, _), w in zip(BINARY_EXAMPLES, [1.0, 2.0, 0.5, 3.0, 1.0, 0.25, 1.5])]
    targets, scores = _rank_inputs(examples)
    ours = rank_classification_metric(targets, scores, num_classes=num_classes)
    theirs = t5_metrics.rank_classification(targets, scores, num_classes=num_classes)
    _assert_close(ours, theirs, ours.keys())
    unweighted = rank_classification_metric(*_rank_inputs(BINARY_EXAMPLES), num_classes=num_classes)
    assert ours["accuracy"] != pytest.approx(unweighted["accuracy"])


def test_rank_classification_metric_length_normalisation_matches_t5():
    examples = [
        (0, [(-6.0, 6), (-4.0, 2)], 1.0),  # raw: 1 (wrong); per token: 0 (right)
        (1, [(-3.0, 1), (-4.5, 3), (-7.0, 2)], 1.0),  # raw: 0 (wrong); per token: 1 (right)
        (0, [(-1.0, 1), (-9.0, 3)], 1.0),  # right either way
        (2, [(-2.0, 2), (-8.0, 4), (-3.0, 1)], 1.0),  # raw: 0 (wrong); per token: 0 (wrong)
    ]
    targets, scores = _rank_inputs(examples, shuffle_seed=2)
    normalised = rank_classification_metric(targets, scores, normalize_by_length=True)
    raw = rank_classification_metric(targets, scores)
    assert normalised["accuracy"] == pytest.approx(
        t5_metrics.rank_classification(targets, scores, normalize_by_target_length=True)["accuracy"], abs=TOL
    )
    assert raw["accuracy"] == pytest.approx(t5_metrics.rank_classification(targets, scores)["accuracy"], abs=TOL)
    assert (raw["accuracy"], normalised["accuracy"]) == (pytest.approx(25.0), pytest.approx(75.0))


# --- run plots (flanjax.rundir.metrics.plot_metrics) -----------------------------------------


def _loss_rows(n=100):
    """A training loss falling from 6 to 0.4 over `n` steps, validated at two steps."""
    rows = [{"step": s, "loss": float(6 * (0.4 / 6) ** (s / (n - 1)))} for s in range(n)]
    rows[49]["validation/loss"], rows[99]["validation/loss"] = 2.0, 0.9
    return rows


def _figure(rows, keys=("loss", "validation/loss"), log_scale=True, ylabel="", hlines=None):
    from flanjax.rundir.metrics import _figure

    fig = _figure(rows, keys, "run", log_scale, ylabel, hlines or {})
    fig.draw_without_rendering()  # lays out ticks and their labels
    return fig, fig.axes[0]


def test_plot_labels_the_y_axis():
    rows = _loss_rows()
    assert _figure(rows)[1].get_ylabel() == "loss"  # "loss" and "validation/loss" measure the same
    assert _figure(rows, keys=("loss",))[1].get_ylabel() == "loss"
    assert _figure([{"step": 0, "kl": 1.0}], keys=("kl",), log_scale=False)[1].get_ylabel() == "kl"
    assert _figure(rows, ylabel="cross-entropy (nats)")[1].get_ylabel() == "cross-entropy (nats)"


def test_plot_draws_sparse_series_as_markers_only():
    lines = {line.get_label(): line for line in _figure(_loss_rows())[1].get_lines()}
    assert (lines["loss"].get_linestyle(), lines["loss"].get_marker()) == ("-", "None")
    assert (lines["validation/loss"].get_linestyle(), lines["validation/loss"].get_marker()) == ("None", "o")
    assert list(lines["validation/loss"].get_ydata()) == [2.0, 0.9]


def test_plot_draws_reference_lines():
    rows = [{"step": s, "kl": 0.1 * s} for s in range(50)]
    fig, ax = _figure(rows, keys=("kl",), log_scale=False, hlines={"KL target": 6.0})
    target = [line for line in ax.get_lines() if line.get_label() == "KL target"]
    assert len(target) == 1 and list(target[0].get_ydata()) == [6.0, 6.0]
    assert "KL target" in [t.get_text() for t in ax.get_legend().get_texts()]
    assert len(_figure(rows, keys=("kl",), log_scale=False)[1].get_lines()) == 1  # none unless asked


def test_plot_log_axis_ticks_read_as_decimals():
    ax = _figure(_loss_rows())[1]
    assert ax.get_yscale() == "log"
    labels = [t.get_text() for t in ax.get_yticklabels(which="both") if t.get_text()]
    assert {"0.4", "1", "2", "6"} <= set(labels), labels
    assert all(float(label) > 0 for label in labels), labels  # plain numbers: no "$6\times10^{0}$"


def test_plot_metrics_writes_a_png(tmp_path):
    import json

    from flanjax.rundir.metrics import plot_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _loss_rows()))
    png = plot_metrics(str(path), str(tmp_path / "loss.png"), hlines={"target": 1.0})
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


# --- E2WM object path tracking and perplexity -------------------------------------------------


def _brute_force_run(a: list, b: list) -> int:
    """The longest sublist a[i:j] found anywhere in b as a contiguous run."""
    sublists = (a[i:j] for i in range(len(a)) for j in range(i + 1, len(a) + 1))
    return max((len(s) for s in sublists if any(b[k : k + len(s)] == s for k in range(len(b)))), default=0)


def test_longest_common_run_matches_brute_force():
    rng = random.Random(0)
    for _ in range(2000):
        a, b = ([rng.choice("abc") for _ in range(rng.randint(0, 7))] for _ in range(2))
        assert metrics.longest_common_run(a, b) == _brute_force_run(a, b), (a, b)


def test_object_path_matches_brute_force():
    rng = random.Random(1)
    rooms = ["kitchen", "bedroom", "home office", "hallway"]
    targets, predictions, expected = [], [], []
    for _ in range(300):
        a, b = rng.sample(rooms * 2, rng.randint(1, 5)), rng.sample(rooms * 2, rng.randint(0, 5))
        targets.append(", ".join(a))
        predictions.append(" ,".join(r.upper() if rng.random() < 0.3 else r for r in b) + rng.choice(["", ".", " \n"]))
        expected.append(_brute_force_run(a, b) / max(len(a), len(b)))
    assert metrics.object_path(targets, predictions)["object_path"] == pytest.approx(100 * np.mean(expected), abs=TOL)


def test_object_path_parsing_and_examples():
    assert metrics.parse_rooms(" Kitchen,  Home   Office , hallway. ") == ["kitchen", "home office", "hallway"]
    assert metrics.parse_rooms("") == [] and metrics.parse_rooms(" , .") == []
    # A run of 2 (bedroom, hallway) over the longer list's 4 rooms; an exact path; nothing in common.
    score = metrics.object_path(
        ["kitchen, bedroom, hallway", "bathroom, dining room", "kitchen"], ["bedroom, hallway, bathroom, kitchen", "Bathroom, dining  room", ""]
    )  # fmt: skip
    assert score == {"object_path": pytest.approx(100 * (0.5 + 1.0 + 0.0) / 3)}


def test_perplexity_is_exp_of_the_mean_token_loss():
    counts, scores = [3, 1, 4], [-6.0, -1.5, -4.5]
    assert metrics.perplexity(counts, scores) == {"perplexity": pytest.approx(np.exp(12 / 8)), "token_loss": pytest.approx(1.5)}
    assert metrics.target_token_count(-2.5, example=None, is_target=False) == -2.5
    assert metrics.target_token_count("a b", example={"targets": np.array([5, 6, 1])}, is_target=True) == 3
    with pytest.raises(ValueError, match="no tokens"):
        metrics.perplexity([0], [0.0])
