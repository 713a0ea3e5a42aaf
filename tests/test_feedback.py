"""Labelers: ranking by scores, rubrics, human labels and mixing, and the model judge checked
against the model's own logits computed directly."""

import os
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flanjax.data.preferences import read_comparisons, write_comparisons
from flanjax.errors import FlanjaxError
from flanjax.models.transformer import Transformer, TransformerConfig
from flanjax.rlhf.feedback import (
    DEFAULT_TEMPLATE,
    HumanLabels,
    JudgeInputTooLongError,
    JudgeLabeler,
    LabelError,
    MixedLabeler,
    RubricLabeler,
    RubricNotFoundError,
    label_all,
    load_rubric,
    scores_to_comparison,
)
from flanjax.sharding import MeshConfig, Partitioner

# --- scores -> comparison ---------------------------------------------------------------------


def test_scores_rank_best_first_with_dense_ties():
    c = scores_to_comparison("p", ["a", "b", "c", "d"], [0.1, 3.0, 0.1, -2.0], source="s")
    assert c.responses == ("b", "a", "c", "d")
    assert c.ranks == (0, 1, 1, 2)  # a and c tie; dense: d is next, not 3
    assert c.source == "s" and c.prompt == "p"
    assert c.num_pairs == 5  # 6 pairs less the tied one


def test_duplicates_keep_the_first_score():
    c = scores_to_comparison("p", ["x", "y", "x"], [0.0, 1.0, 5.0], source="s")
    assert c.responses == ("y", "x") and c.ranks == (0, 1)


def test_min_gap_ties_near_scores():
    c = scores_to_comparison("p", ["a", "b", "c"], [1.0, 0.95, 0.0], source="s", min_gap=0.1)
    assert c.ranks == (0, 0, 1) and c.responses[2] == "c"


@pytest.mark.parametrize(
    "responses, scores",
    [(["a"], [1.0]), (["a", "a", "a"], [1.0, 2.0, 3.0]), (["a", "b", "c"], [2.0, 2.0, 2.0]), ([], [])],
)
def test_no_comparison_without_a_preference(responses, scores):
    assert scores_to_comparison("p", responses, scores, source="s") is None


def test_bad_scores_are_refused():
    with pytest.raises(LabelError, match="NaN"):
        scores_to_comparison("p", ["a", "b"], [1.0, float("nan")], source="s")
    with pytest.raises(LabelError, match="one score per response"):
        scores_to_comparison("p", ["a", "b"], [1.0], source="s")


# --- rubrics ------------------------------------------------------------------------------------


def matches_reference(prompt: str, response: str, reference: str) -> float:
    """Exact match, then closeness in length: a small graded rubric."""
    return float(response.strip() == reference.strip()) - 0.01 * abs(len(response) - len(reference))


def test_rubric_labeler_ranks_by_its_function():
    calls = []

    def fn(prompt, response, reference):
        calls.append(response)
        return matches_reference(prompt, response, reference)

    c = RubricLabeler(fn, name="exact")("2 + 2?", [" 5", " 4", " 44", " 4"], " 4")
    assert c.responses == (" 4", " 5", " 44") and c.ranks == (0, 1, 2) and c.source == "exact"
    assert calls == [" 5", " 4", " 44"]  # each distinct response scored once
    assert RubricLabeler(fn)("q", [" 1", " 2"], " 4") is None  # same score: tied
    with pytest.raises(LabelError, match="must return a number"):
        RubricLabeler(lambda p, r, ref: "good")("q", ["a", "b"], "")


def test_load_rubric_by_name(tmp_path, monkeypatch):
    (tmp_path / "my_rubrics.py").write_text("def length(prompt, response, reference):\n    return len(response)\nNOT_A_FUNCTION = 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    fn = load_rubric("my_rubrics:length")
    assert fn("p", "abc", "") == 3
    assert load_rubric("os.path:join") is os.path.join
    for name, match in [
        ("my_rubrics.length", "package.module:function"),
        ("no_such_module_xyz:f", "cannot import module"),
        ("my_rubrics:lenght", "no attribute 'lenght'"),
        ("my_rubrics:NOT_A_FUNCTION", "not a function"),
    ]:
        with pytest.raises(RubricNotFoundError, match=match) as e:
            load_rubric(name)
        assert isinstance(e.value, FlanjaxError) and isinstance(e.value, ImportError)
    sys.modules.pop("my_rubrics", None)


# --- human labels and mixing ------------------------------------------------------------------


def test_human_labels_win_where_present_and_sources_are_kept(tmp_path):
    from flanjax.data.preferences import comparison

    path = write_comparisons(str(tmp_path / "human.jsonl"), [
        comparison("q1", ["human best", "human worst"]),  # no source in the file: "human"
        comparison("q2", ["x", "y", "z"], [0, 1, 1], source="expert"),
        comparison("q1", ["later", "ignored"]),  # the first label of a prompt is used
    ])  # fmt: skip
    human = HumanLabels(path)
    assert len(human) == 2
    rubric = RubricLabeler(matches_reference)
    mixed = MixedLabeler([human, rubric])

    prompts = ["q1", "q2", "q3", "q4"]
    responses = [[" a", " b"], [" a", " b"], [" 7", " 8", " 7"], [" 1", " 2"]]
    references = ["", "", " 8", " 9"]  # q4: both responses score the same, so none
    comparisons, counts, skipped = label_all(mixed, prompts, responses, references)

    assert [c.prompt for c in comparisons] == ["q1", "q2", "q3"]
    assert comparisons[0].responses == ("human best", "human worst") and comparisons[0].source == "human"
    assert comparisons[1].ranks == (0, 1, 1) and comparisons[1].source == "expert"
    assert comparisons[2].responses == (" 8", " 7") and comparisons[2].source == "rubric"
    assert counts == {"human": 1, "expert": 1, "rubric": 1} and skipped == 1

    # The labelled comparisons survive a write and read back.
    out = write_comparisons(str(tmp_path / "labelled.jsonl"), comparisons)
    assert list(read_comparisons(out)) == comparisons

    with pytest.raises(LabelError, match="one of each per prompt"):
        label_all(mixed, prompts, responses[:2])
    with pytest.raises(LabelError, match="at least one labeler"):
        MixedLabeler([])


# --- the model judge ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def judge_model():
    import tasks.quickstart

    vocabulary = tasks.quickstart.VOCABULARY
    # A large init spreads the random model's letter probabilities well away from 1/2.
    config = TransformerConfig(vocab_size=512, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=64,
                               max_len=128, init_std=0.5)  # fmt: skip
    graphdef, state = nnx.split(Transformer(config, rngs=nnx.Rngs(3)))
    return graphdef, state, vocabulary


def letter_log_prob(graphdef, state, context: list[int], letter: list[int]) -> float:
    """log p(letter | context) from one unsharded, unpadded forward pass and NumPy; as in
    training (data.pipeline), the inputs are the tokens shifted right behind a 0."""
    tokens = np.asarray([[0] + context + letter[:-1]], np.int32)
    n = tokens.shape[1]
    logits, _ = nnx.merge(graphdef, state)(jnp.asarray(tokens), jnp.arange(n)[None], jnp.ones((1, n), jnp.int32))
    logits = np.asarray(logits[0], np.float64)
    log_probs = logits - logits.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    return sum(log_probs[len(context) + k, t] for k, t in enumerate(letter))


def test_judge_probabilities_match_the_model_and_both_orders(judge_model):
    graphdef, state, vocabulary = judge_model
    partitioner = Partitioner.from_config(MeshConfig())  # 8 data shards: rows split over them
    # batch_size 5 rounds up to 8; 3 responses make 6 ordered pairs, 12 rows: two batches.
    judge = JudgeLabeler(graphdef, state, vocabulary, partitioner, batch_size=5, width_multiple=16)
    assert judge.batch_size == 8
    prompt = "Which digit is the largest: 3, 9, 1?"
    responses = [" 9", " 3", " the largest is 1"]
    probs = judge.pairwise_probabilities(prompt, responses)

    a, b = (vocabulary.encode(letter) for letter in (" A", " B"))
    sigmoid = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    expected = np.full((3, 3), 0.5)
    for i in range(3):
        for j in range(3):
            if i == j:
                continue
            first = vocabulary.encode(DEFAULT_TEMPLATE.format(prompt=prompt, a=responses[i], b=responses[j]))
            second = vocabulary.encode(DEFAULT_TEMPLATE.format(prompt=prompt, a=responses[j], b=responses[i]))
            as_a = letter_log_prob(graphdef, state, first, a) - letter_log_prob(graphdef, state, first, b)
            as_b = letter_log_prob(graphdef, state, second, b) - letter_log_prob(graphdef, state, second, a)
            expected[i, j] = 0.5 * (sigmoid(as_a) + sigmoid(as_b))
    np.testing.assert_allclose(probs, expected, atol=2e-5)
    np.testing.assert_allclose(probs + probs.T, np.ones((3, 3)), atol=1e-9)  # order-consistent
    assert np.ptp(probs[~np.eye(3, dtype=bool)]) > 0.02  # the check above is not all 1/2

    c = judge(prompt, responses + [" 9"], "")  # the duplicate is judged once
    wins = probs.sum(axis=1)
    assert c.source == "judge" and c.ranks == (0, 1, 2)
    assert c.responses == tuple(responses[i] for i in np.argsort(-wins))
    assert judge(prompt, [" 9", " 9"], "") is None


def test_judge_errors(judge_model):
    graphdef, state, vocabulary = judge_model
    partitioner = Partitioner.from_config(MeshConfig())
    with pytest.raises(LabelError, match=r"\{b\}"):
        JudgeLabeler(graphdef, state, vocabulary, partitioner, template="{prompt} {a}")
    with pytest.raises(LabelError, match="unknown"):
        JudgeLabeler(graphdef, state, vocabulary, partitioner, template="{prompt} {a} {b} {score}")
    judge = JudgeLabeler(graphdef, state, vocabulary, partitioner)
    with pytest.raises(JudgeInputTooLongError, match="max_len=128"):
        judge("q", ["word " * 100, "short"], "")
