"""The evaluator: rank classification against brute-force full forward passes, generation
against greedy decoding without a cache, and the errors bad input gets."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import seqio
from flax import nnx

import tasks.quickstart as quickstart
from flanjax.data.pipeline import TaskNotFoundError
from flanjax.data.templates import templates_preprocessor
from flanjax.decode import SequenceTooLongError
from flanjax.eval.evaluator import EvalConfig, EvalError, Evaluator
from flanjax.eval.metrics import exact_match
from flanjax.data.rank_classification import rank_classification, rank_classification_metric, rank_classification_targets
from flanjax.models.transformer import Transformer, TransformerConfig
from flanjax.sharding import MeshConfig, Partitioner

MODEL = TransformerConfig(vocab_size=512, d_model=32, num_layers=2, num_heads=4, d_ff=64, max_len=64)
CAPTURED: dict[str, list] = {}


def capture(name):
    """A metric that records what seqio hands it: the scores or the predictions."""

    def scores(targets, scores):
        CAPTURED[name] = list(zip(targets, scores))
        return {"rows": float(len(scores))}

    def predictions(targets, predictions):
        CAPTURED[name] = list(zip(targets, predictions))
        return {"rows": float(len(predictions))}

    return scores if name.endswith("rank") else predictions


def _register_test_tasks():
    make, templates = quickstart.TASKS["quickstart_larger"]
    source = seqio.FunctionDataSource(functools.partial(quickstart._dataset_fn, "quickstart_larger"), splits=("validation",))
    features = {"inputs": seqio.Feature(quickstart.VOCABULARY, add_eos=False), "targets": seqio.Feature(quickstart.VOCABULARY)}
    tokenize = [seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim]
    if "test_capture_rank" not in seqio.TaskRegistry.names():
        seqio.TaskRegistry.add(
            "test_capture_rank", source=source, output_features=features,
            preprocessors=[templates_preprocessor(templates, passthrough=("options",)), rank_classification, *tokenize],
            postprocess_fn=rank_classification_targets, metric_fns=[capture("test_capture_rank"), rank_classification_metric],
        )  # fmt: skip
        seqio.TaskRegistry.add(
            "test_capture_generate", source=source, output_features=features,
            preprocessors=[templates_preprocessor(templates), *tokenize],
            metric_fns=[capture("test_capture_generate"), exact_match],
        )  # fmt: skip


_register_test_tasks()


def model_state(partitioner, seed=0):
    init = lambda: Transformer(MODEL, rngs=nnx.Rngs(seed))  # noqa: E731
    graphdef, abstract = partitioner.abstract_state(init)
    with partitioner.activate():
        return graphdef, partitioner.create(init, abstract)


def evaluator(name, partitioner, graphdef, **config):
    return Evaluator(EvalConfig(name, **{"batch_size": 8, **config}), model=MODEL, graphdef=graphdef, partitioner=partitioner)


def log_likelihood(graphdef, state, inputs, targets) -> float:
    """Brute force: one plain forward pass over [0, inputs, targets]; sum over the targets."""
    tokens = np.concatenate([[0], inputs, targets[:-1]])[None]
    logits, _ = nnx.merge(graphdef, jax.device_get(state))(jnp.asarray(tokens, jnp.int32))
    log_probs = np.asarray(jax.nn.log_softmax(logits[0].astype(jnp.float64) if jax.config.jax_enable_x64 else logits[0]))
    start = len(inputs)
    return float(sum(log_probs[start + i, t] for i, t in enumerate(targets)))


def test_rank_classification_matches_brute_force_scores():
    partitioner = Partitioner.from_config(MeshConfig(data=4, tensor=2))
    graphdef, state = model_state(partitioner, seed=1)
    results = evaluator("test_capture_rank", partitioner, graphdef, num_examples=24)(0, state)

    rows = list(seqio.get_mixture_or_task("test_capture_rank").get_dataset(None, split="validation", shuffle=False).take(24).as_numpy_iterator())
    expected = [log_likelihood(graphdef, state, r["inputs"], r["targets"]) for r in rows]
    captured = CAPTURED["test_capture_rank"]
    np.testing.assert_allclose([s for _, s in captured], expected, rtol=1e-4, atol=1e-4)
    assert [t[0] for t, _ in captured] == [tuple(r["idx"]) for r in rows]

    # The metric's pick per example is the brute-force argmax.
    picks = {}
    for r, s in zip(rows, expected):
        best = picks.get(r["idx"][0])
        if best is None or s > best[0]:
            picks[r["idx"][0]] = (s, bool(r["is_correct"]))
    accuracy = 100 * np.mean([correct for _, correct in picks.values()])
    result = results["test_capture_rank"]
    assert result.metrics["accuracy"] == pytest.approx(accuracy)
    assert result.num_examples == 12 and result.metrics["rows"] == 24


def test_generation_matches_greedy_full_forward_decoding():
    partitioner = Partitioner.from_config(MeshConfig(data=8))
    graphdef, state = model_state(partitioner, seed=2)
    ev = evaluator("test_capture_generate", partitioner, graphdef, num_examples=8)
    results = ev(0, state)
    model = nnx.merge(graphdef, jax.device_get(state))
    rows = list(seqio.get_mixture_or_task("test_capture_generate").get_dataset(None, split="validation", shuffle=False).take(8).as_numpy_iterator())
    eos = quickstart.VOCABULARY.eos_id
    for row, (target, prediction) in zip(rows, CAPTURED["test_capture_generate"]):
        seq, new = [0, *row["inputs"]], []
        for _ in range(len(row["targets"])):  # the evaluator decodes up to the longest target
            token = int(jnp.argmax(model(jnp.asarray([seq]))[0][0, -1]))
            new.append(token)
            seq.append(token)
            if token == eos:
                break
        assert prediction == quickstart.VOCABULARY.decode(new)
        assert target == row["targets_pretokenized"].decode()
    assert "exact_match" in results["test_capture_generate"].metrics


# --- bad input ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    partitioner = Partitioner.from_config(MeshConfig(data=8))
    graphdef, _ = partitioner.abstract_state(lambda: Transformer(MODEL, rngs=nnx.Rngs(0)))
    return partitioner, graphdef


def test_unknown_task(tiny):
    with pytest.raises(TaskNotFoundError, match="quickstart_eval"):
        evaluator("quickstart_evall", *tiny)


def test_task_without_metrics(tiny):
    with pytest.raises(EvalError, match="Tasks without metric_fns: quickstart_larger"):
        evaluator("quickstart_larger", *tiny)


def test_split_no_task_has(tiny):
    with pytest.raises(EvalError, match="split 'test'"):
        evaluator("quickstart_eval", *tiny, split="test")


def test_sequences_longer_than_the_model(tiny):
    partitioner, _ = tiny
    short = TransformerConfig(**{**MODEL.__dict__, "max_len": 16})
    graphdef, _ = partitioner.abstract_state(lambda: Transformer(short, rngs=nnx.Rngs(0)))
    with pytest.raises(SequenceTooLongError, match="max_len=16"):
        Evaluator(EvalConfig("quickstart_max", num_examples=8, batch_size=8), model=short, graphdef=graphdef, partitioner=partitioner)


def test_batch_that_does_not_split_over_the_mesh(tiny):
    with pytest.raises(EvalError, match="not divisible by the 8 data-parallel shards"):
        evaluator("quickstart_max", *tiny, batch_size=12)
