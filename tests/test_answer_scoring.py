"""Answer scorings of multiple-choice tasks (T5's sum, E2WM's "ln" and "un") and perplexity:
the metric against brute force on given scores, and through the evaluator against full
forward passes of a tiny random model."""

import functools
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import seqio
import tensorflow as tf
from flax import nnx

import tasks.quickstart as quickstart
from flanjax.data.rank_classification import (
    AnswerScoring,
    AnswerScoringError,
    rank_classification,
    rank_classification_metric,
    rank_classification_targets,
)
from flanjax.data.templates import templates_preprocessor
from flanjax.decode import decoder_features, score
from flanjax.eval.evaluator import EvalConfig, Evaluator
from flanjax.eval.metrics import perplexity, target_token_count
from flanjax.models.transformer import Transformer, TransformerConfig
from flanjax.sharding import MeshConfig, Partitioner

MODEL = TransformerConfig(vocab_size=512, d_model=32, num_layers=2, num_heads=4, d_ff=64, max_len=64)


# --- the preprocessor's rows ------------------------------------------------------------------


def _examples() -> tf.data.Dataset:
    return tf.data.Dataset.from_tensor_slices(
        {"inputs": ["Is ice cold?", "Pick a fruit."], "targets": [" yes", " pear"], "options": tf.ragged.constant([[" yes", " no"], [" pear", " stone", " sock"]])}
    )  # fmt: skip


def test_un_pairs_every_option_row_with_its_calibration_row():
    rows = list(AnswerScoring("un", calibration_prompt="A:").preprocessor(_examples()).as_numpy_iterator())
    assert [(tuple(r["idx"]), r["inputs"].decode(), r["targets"].decode(), bool(r["is_correct"]), bool(r["calibration"])) for r in rows] == [
        ((0, 0), "Is ice cold?", " yes", True, False), ((0, 0), "A:", " yes", True, True),
        ((0, 1), "Is ice cold?", " no", False, False), ((0, 1), "A:", " no", False, True),
        ((1, 0), "Pick a fruit.", " pear", True, False), ((1, 0), "A:", " pear", True, True),
        ((1, 1), "Pick a fruit.", " stone", False, False), ((1, 1), "A:", " stone", False, True),
        ((1, 2), "Pick a fruit.", " sock", False, False), ((1, 2), "A:", " sock", False, True),
    ]  # fmt: skip
    target = rank_classification_targets(None, example={**rows[1], "targets": np.array([5, 6, 1])}, is_target=True)
    assert target == ((0, 0), True, 1.0, 3, True)


@pytest.mark.parametrize("method", ["sum", "ln"])
def test_sum_and_ln_keep_t5s_rows(method):
    ours = AnswerScoring(method).preprocessor(_examples())
    plain = rank_classification(_examples())
    assert ours.element_spec == plain.element_spec and "calibration" not in ours.element_spec
    assert [tuple(r["idx"]) for r in ours.as_numpy_iterator()] == [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2)]


def test_the_metric_is_a_seqio_scoring_metric():
    metric = seqio.metrics.LegacyMetric.empty(AnswerScoring("un").metric, rank_classification_targets)
    assert metric.model_output_type == seqio.metrics.ModelOutputType.SCORE


# --- the metric against brute force on given scores -------------------------------------------


def _brute_force_accuracy(examples, method: str) -> float:
    """Weighted share of examples whose best option, scored `method`'s way, is the correct one."""
    hits = total = 0.0
    for correct, options, weight in examples:
        value = {
            "sum": lambda s, c, n: s,
            "ln": lambda s, c, n: s / n,
            "un": lambda s, c, n: s - c,
        }[method]
        best = max(range(len(options)), key=lambda j: value(*options[j]))
        hits += weight * (best == correct)
        total += weight
    return 100.0 * hits / total


def _random_examples(rng: random.Random, n: int = 300):
    """(correct option, [(score, calibration score, target length)], weight) per example."""
    return [
        (rng.randrange(k), [(rng.uniform(-20, -1), rng.uniform(-20, -1), rng.randint(1, 8)) for _ in range(k)], rng.choice([0.5, 1.0, 2.0]))
        for k in (rng.randint(2, 5) for _ in range(n))
    ]  # fmt: skip


@pytest.mark.parametrize("method", ["sum", "ln", "un"])
def test_scorings_agree_with_brute_force_on_given_scores(method):
    rng = random.Random(method)
    examples = _random_examples(rng)
    pairs = []
    for i, (correct, options, weight) in enumerate(examples):
        for j, (s, c, n) in enumerate(options):
            pairs.append((((i, j), j == correct, weight, n, False), s))
            pairs.append((((i, j), j == correct, weight, n, True), c))
    if method != "un":  # the other scorings see T5's four-field rows only
        pairs = [((idx, ok, w, n), s) for (idx, ok, w, n, cal), s in pairs if not cal]
    rng.shuffle(pairs)
    targets, scores = zip(*pairs)
    result = AnswerScoring(method).metric(list(targets), list(scores))
    assert result["accuracy"] == pytest.approx(_brute_force_accuracy(examples, method), abs=1e-9)
    # The three scorings pick differently here, so agreeing with one's brute force is a real check.
    others = {m: _brute_force_accuracy(examples, m) for m in ("sum", "ln", "un") if m != method}
    assert all(v != pytest.approx(result["accuracy"]) for v in others.values())


def test_un_with_fixed_classes_reports_f1():
    targets = [((i, j), j == i, 1.0, 2, cal) for i in (0, 1) for j in (0, 1) for cal in (False, True)]
    # Raw scores favour option 1 both times; calibrated, example 0 picks option 0 (option 1 is
    # likely after any prompt).
    scores = [-3.0, -4.0, -2.0, -0.5, -3.0, -3.0, -1.0, -2.0]
    assert AnswerScoring("un", num_classes=2).metric(targets, scores) == {"accuracy": 100.0, "f1": 100.0}
    assert AnswerScoring("sum", num_classes=2).metric([t[:4] for t in targets[::2]], scores[::2])["accuracy"] == 50.0


def test_unknown_scoring():
    with pytest.raises(AnswerScoringError, match="unknown answer scoring 'mean'.*'ln'.*'un'"):
        AnswerScoring("mean")


def test_option_rows_without_calibration_rows():
    targets = [((0, 0), True, 1.0, 2, False), ((0, 0), True, 1.0, 2, True), ((0, 1), False, 1.0, 2, False)]
    with pytest.raises(AnswerScoringError, match=r"1 option rows lack.*\(0, 1\).*num_examples, make it even"):
        rank_classification_metric(targets, [-1.0, -2.0, -3.0])


# --- through the evaluator, against full forward passes of a tiny model -------------------------

CAPTURED: dict[str, list] = {}


def _capture(name):
    def metric(targets, scores):
        CAPTURED[name] = list(zip(targets, scores))
        return {}

    return metric


def _texts(split: str, shuffle_files: bool, seed=None) -> tf.data.Dataset:
    del shuffle_files, seed
    rng = random.Random(split)
    texts = [" ".join(rng.choices(quickstart.WORDS, k=rng.randint(2, 9))) for _ in range(12)]
    return tf.data.Dataset.from_tensor_slices({"inputs": [""] * len(texts), "targets": texts})


def _register():
    if "test_answer_scoring_un" in seqio.TaskRegistry.names():
        return
    _, templates = quickstart.TASKS["quickstart_larger"]
    source = seqio.FunctionDataSource(functools.partial(quickstart._dataset_fn, "quickstart_larger"), splits=("validation",))
    features = {"inputs": seqio.Feature(quickstart.VOCABULARY, add_eos=False), "targets": seqio.Feature(quickstart.VOCABULARY)}
    tokenize = [seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim]
    for method in ("ln", "un"):
        name, scoring = f"test_answer_scoring_{method}", AnswerScoring(method, calibration_prompt="Answer:")
        seqio.TaskRegistry.add(
            name, source=source, output_features=features,
            preprocessors=[templates_preprocessor(templates, passthrough=("options",)), scoring.preprocessor, *tokenize],
            postprocess_fn=rank_classification_targets, metric_fns=[_capture(name), scoring.metric],
        )  # fmt: skip
    seqio.TaskRegistry.add(
        "test_perplexity_text", source=seqio.FunctionDataSource(_texts, splits=("validation",)),
        output_features=features, preprocessors=tokenize,  # empty inputs: mixes with prompted tasks
        postprocess_fn=target_token_count, metric_fns=[_capture("test_perplexity_text"), perplexity],
    )  # fmt: skip
    names = ["test_answer_scoring_ln", "test_answer_scoring_un", "test_perplexity_text"]
    seqio.MixtureRegistry.add("test_answer_scoring", names, default_rate=1.0)


_register()


@pytest.fixture(scope="module")
def tiny():
    """A tiny random model and its results on all three tasks, from one evaluator call."""
    partitioner = Partitioner.from_config(MeshConfig(data=8))
    init = lambda: Transformer(MODEL, rngs=nnx.Rngs(3))  # noqa: E731
    graphdef, abstract = partitioner.abstract_state(init)
    with partitioner.activate():
        state = partitioner.create(init, abstract)
    config = EvalConfig("test_answer_scoring", batch_size=8, num_examples=24)  # 24 rows: all 12 texts
    results = Evaluator(config, model=MODEL, graphdef=graphdef, partitioner=partitioner)(0, state)
    return nnx.merge(graphdef, jax.device_get(state)), graphdef, state, results


def _log_likelihoods(model, rows) -> list[float]:
    """Brute force: full forward passes over [0, inputs, targets] (right-padded, so causal
    attention never sees the padding), summed over each row's targets."""
    sequences = [np.concatenate([[0], r["inputs"], r["targets"][:-1]]) for r in rows]
    width = max(map(len, sequences))
    tokens = np.array([np.pad(seq, (0, width - len(seq))) for seq in sequences], np.int32)
    log_probs = np.asarray(jax.nn.log_softmax(model(jnp.asarray(tokens))[0]))
    return [float(sum(log_probs[i, len(r["inputs"]) + j, t] for j, t in enumerate(r["targets"]))) for i, r in enumerate(rows)]


@pytest.mark.parametrize("method", ["ln", "un"])
def test_evaluator_scorings_agree_with_brute_force(tiny, method):
    name = f"test_answer_scoring_{method}"
    model, _, _, results = tiny
    result = results[name]
    rows = list(seqio.get_mixture_or_task(name).get_dataset(None, split="validation", shuffle=False).take(24).as_numpy_iterator())
    expected = _log_likelihoods(model, rows)
    captured = CAPTURED[name]
    np.testing.assert_allclose([s for _, s in captured], expected, rtol=1e-4, atol=1e-4)

    options: dict[int, dict[int, dict]] = {}  # example -> option -> what brute force knows
    for r, s in zip(rows, expected):
        slot = options.setdefault(int(r["idx"][0]), {}).setdefault(int(r["idx"][1]), {"correct": bool(r["is_correct"])})
        if method == "un":
            assert (r["inputs_pretokenized"] == b"Answer:") == r["calibration"]
            slot["calibration" if r["calibration"] else "prompt"] = s
        else:
            slot["prompt"] = s / len(r["targets"])
    value = (lambda o: o["prompt"] - o["calibration"]) if method == "un" else (lambda o: o["prompt"])
    picks = [max(example.values(), key=value)["correct"] for example in options.values()]
    assert result.metrics["accuracy"] == pytest.approx(100.0 * np.mean(picks))
    assert result.num_examples == (6 if method == "un" else 12)


def test_perplexity_agrees_with_decode_score(tiny):
    _, graphdef, state, results = tiny
    result = results["test_perplexity_text"]
    rows = list(seqio.get_mixture_or_task("test_perplexity_text").get_dataset(None, split="validation", shuffle=False).as_numpy_iterator())
    width = max(len(r["targets"]) for r in rows)
    tokens = np.array([np.pad(r["targets"], (0, width - len(r["targets"]))) for r in rows])
    scores = score(graphdef, jax.device_get(state), decoder_features(tokens, tokens != 0))
    expected = np.exp(-float(np.sum(scores.log_likelihood)) / float(np.sum(scores.num_tokens)))
    assert result.metrics["perplexity"] == pytest.approx(expected, rel=1e-4)
    assert len(rows) == 12 and [t for t, _ in CAPTURED["test_perplexity_text"]] == [len(r["targets"]) for r in rows]
    assert 100 < expected < 2 * MODEL.vocab_size  # a random model: about uniform over the vocabulary
