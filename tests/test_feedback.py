"""Labelers: ranking by scores, rubrics, human labels and mixing, and the model judge checked
against the model's own logits computed directly."""

import itertools
import json
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
    agreement,
    judge_report,
    label_all,
    load_rubric,
    position_bias,
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


# --- how far to trust a judge: position bias, agreement with humans -------------------------------


def test_position_bias_and_agreement_by_hand():
    # P(the first-shown answer is better), each pair shown as (a, b) then as (b, a).
    p_ab = [0.9, 0.6, 0.3, 0.2, 0.7]
    p_ba = [0.2, 0.8, 0.4, 0.9, 0.55]
    # Verdicts: a then a (kept); a then b (flip); b then a (flip: "the second" both times);
    # b then b (kept); a then b (flip).
    got = position_bias(p_ab, p_ba)
    assert got["position_flip_rate"] == pytest.approx(3 / 5)
    assert got["first_position_preference"] == pytest.approx(5.55 / 10)
    assert got["judged_pairs"] == 5
    assert position_bias([], []) == {"position_flip_rate": None, "first_position_preference": None, "judged_pairs": 0}

    got = agreement([0.8, 0.4, 0.6, 0.1], [True, True, False, False])  # agrees on the first and the last
    assert got == {"human_agreement": pytest.approx(0.5), "human_pairs": 4}
    assert agreement([], []) == {"human_agreement": None, "human_pairs": 0}
    with pytest.raises(LabelError, match="one probability per pair in each order"):
        position_bias([0.5, 0.2], [0.1])
    with pytest.raises(LabelError, match="one judge probability per human label"):
        agreement([0.5], [True, False])


def test_judge_report_is_what_scoring_the_swapped_pairs_directly_gives(judge_model):
    from flanjax.data.preferences import comparison

    graphdef, state, vocabulary = judge_model
    judge = JudgeLabeler(graphdef, state, vocabulary, Partitioner.from_config(MeshConfig()), batch_size=8, width_multiple=32)
    sampled = {"Which digit is the largest: 3, 9, 1?": [" 9", " 3", " the largest is 1"], "Name a colour.": [" red", " blue", " 7"]}
    for prompt, responses in sampled.items():
        judge(prompt, responses, "")
    human = [
        comparison("Which digit is the largest: 3, 9, 1?", [" 3", " 9"]),  # a sampled pair, in the other order
        comparison("Say hi.", [" hi", " bye"]),  # not sampled: the report judges it
        comparison("Name a colour.", [" red", " blue", " 7"], [0, 1, 1]),  # blue and 7 tie: no pair
    ]
    report = judge_report(judge, human)

    # Every pair the judge saw, scored again in each order with the other one swapped in.
    pairs = [(p, a, b) for p, rs in {**sampled, "Say hi.": [" hi", " bye"]}.items() for a, b in itertools.combinations(rs, 2)]
    prompts, first, second = ([pair[k] for pair in pairs] for k in range(3))
    ab, ba = (1 / (1 + np.exp(-judge.log_odds(prompts, x, y, [""] * len(pairs)))) for x, y in ((first, second), (second, first)))
    assert report["judged_pairs"] == len(pairs) == 7
    assert report["position_flip_rate"] == pytest.approx(np.mean((ab > 0.5) == (ba > 0.5)))
    assert report["first_position_preference"] == pytest.approx(np.mean([*ab, *ba]), abs=1e-6)

    better_first = {(p, a, b): 0.5 * (x + 1 - y) for (p, a, b), x, y in zip(pairs, ab, ba)}  # P(a beats b)
    human_pairs = [("Which digit is the largest: 3, 9, 1?", " 3", " 9"), ("Say hi.", " hi", " bye"),
                   ("Name a colour.", " red", " blue"), ("Name a colour.", " red", " 7")]  # (prompt, better, worse)  # fmt: skip
    agrees = [better_first[p, w, l] > 0.5 if (p, w, l) in better_first else better_first[p, l, w] < 0.5 for p, w, l in human_pairs]
    assert report["human_pairs"] == 4
    assert report["human_agreement"] == pytest.approx(np.mean(agrees))


def test_flanjax_label_prints_and_writes_the_judges_report(judge_model, tmp_path, monkeypatch, capsys):
    """`flanjax label` with a judge, human labels to mix in and more to compare with only
    (sampling stubbed out: the judge's report is what is under test)."""
    from flanjax import cli
    from flanjax.data.preferences import comparison
    from flanjax.rlhf import sampling

    graphdef, state, vocabulary = judge_model
    judges = []

    def from_run(cls, path, vocab, partitioner, **kwargs):
        judges.append(cls(graphdef, state, vocab, partitioner, batch_size=8, width_multiple=32))
        return judges[-1]

    def label(policy, task, labeler, out, partitioner, **kwargs):
        prompts = ["Name a colour.", "Say hi."]
        comparisons, _, _ = label_all(labeler, prompts, [[" red", " blue", " 7"], [" hi", " bye"]])
        write_comparisons(out, comparisons)
        return comparisons

    monkeypatch.setattr(JudgeLabeler, "from_run", classmethod(from_run))
    monkeypatch.setattr(sampling, "label", label)
    mixed = write_comparisons(str(tmp_path / "human.jsonl"), [comparison("Say hi.", [" hi", " bye"])])
    compared = write_comparisons(str(tmp_path / "held_out.jsonl"), [comparison("Name a colour.", [" blue", " red"])])
    out = tmp_path / "prefs" / "train.jsonl"
    capsys.readouterr()
    assert cli.main(["label", "--policy", "unused", "--task", "quickstart", "--labeler", f"human:{mixed}", "--labeler", "judge:unused",
                     "--compare_human", compared, "--out", str(out)]) == 0  # fmt: skip
    printed = capsys.readouterr().out.splitlines()
    summary = json.loads(printed[-1])
    assert summary == json.loads((tmp_path / "prefs" / "train.summary.json").read_text())
    assert summary["comparisons"] == 2 and summary["by_source"] == {"human": 1, "judge": 1}
    expected = judge_report(judges[0], [*read_comparisons(mixed), *read_comparisons(compared)])  # judges nothing new now
    assert {k: summary[k] for k in expected} == expected
    assert summary["human_pairs"] == 2 and summary["judged_pairs"] == 4  # 3 sampled pairs + the human pair it had not seen
    assert any("verdict flips when A and B swap" in line for line in printed)

    assert cli.main(["label", "--policy", "unused", "--task", "quickstart", "--labeler", f"human:{mixed}",
                     "--compare_human", compared, "--out", str(out)]) == 2  # fmt: skip
    assert "add --labeler judge:RUN_DIR" in capsys.readouterr().err
