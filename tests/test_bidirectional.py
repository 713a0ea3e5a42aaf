"""BatGPT's bidirectional objective (`flanjax.data.bidirectional`) and rescoring (`Policy.rescore`)."""

from __future__ import annotations

import dataclasses
import json
import os
import uuid

import gin
import numpy as np
import pytest
import seqio
import tensorflow as tf
from flax import nnx

from flanjax import cli
from flanjax.chat import Policy, PolicyError
from flanjax.data.bidirectional import (
    DIRECTIONS_FILE, BidirectionalFeatureConverter, Directions, DirectionTokenError, PrefixedFeatureConverter, bidirectional_scores,
    direction_ids,
)  # fmt: skip
from flanjax.data.dialogue import Message, add_dialogue_task
from flanjax.data.vocab import HFVocabulary, train_tokenizer
from flanjax.decode import SamplingConfig
from flanjax.models.transformer import Transformer, TransformerConfig
from flanjax.rundir.files import read_model_config
from flanjax.sharding import MeshConfig, Partitioner
from flanjax.train.losses import lm_loss

L2R, R2L, EOS = 5, 6, 1
EXAMPLES = [([10, 11, 12], [20, 21]), ([13, 14], [22]), ([15], [23, 24, 25]), ([16, 17, 18, 19], [26])]
LENGTHS = {"inputs": 5, "targets": 4}


def dataset(examples=EXAMPLES, inputs=True):
    def rows():
        for x, y in examples:
            yield {"inputs": np.array(x, np.int32), "targets": np.array(y + [EOS], np.int32)} if inputs else {"targets": np.array(x + y + [EOS], np.int32)}

    spec = {"targets": tf.TensorSpec([None], tf.int32)} | ({"inputs": tf.TensorSpec([None], tf.int32)} if inputs else {})
    return tf.data.Dataset.from_generator(rows, output_signature=spec)


def converted(directions=Directions(), pack=False, examples=EXAMPLES, inputs=True, lengths=LENGTHS):
    converter = BidirectionalFeatureConverter((L2R, R2L), EOS, directions, pack=pack)
    return [{k: v.tolist() for k, v in row.items()} for row in converter(dataset(examples, inputs), lengths).as_numpy_iterator()]


def seqio_rows(examples, lengths):
    """seqio's own decoder features (loss on targets) of hand-built (inputs, targets) examples."""
    ds = tf.data.Dataset.from_generator(
        lambda: ({"inputs": np.array(x, np.int32), "targets": np.array(y, np.int32)} for x, y in examples),
        output_signature={"inputs": tf.TensorSpec([None], tf.int32), "targets": tf.TensorSpec([None], tf.int32)},
    )
    converter = seqio.DecoderFeatureConverter(pack=False, loss_on_targets_only=True)
    return [{k: v.tolist() for k, v in row.items()} for row in converter(ds, lengths).as_numpy_iterator()]


def unpadded(row, key="decoder_target_tokens"):
    return [v for v, t in zip(row[key], row["decoder_target_tokens"]) if t]


# --- the streams ------------------------------------------------------------------------------


def test_each_example_becomes_a_forward_and_a_reversed_stream():
    rows = converted()
    assert len(rows) == 2 * len(EXAMPLES)
    for (x, y), forward, backward in zip(EXAMPLES, rows[0::2], rows[1::2]):
        assert unpadded(forward) == [L2R, *x, *y, EOS]
        assert unpadded(backward) == [R2L, *y[::-1], *x[::-1], EOS]
        # Forward: the response and its EOS are trained; backward: the prompt and EOS.
        assert unpadded(forward, "decoder_loss_weights") == [0.0] * (1 + len(x)) + [1.0] * (len(y) + 1)
        assert unpadded(backward, "decoder_loss_weights") == [0.0] * (1 + len(y)) + [1.0] * (len(x) + 1)


def test_the_reversed_stream_is_seqios_decoder_example_of_the_reversed_tokens():
    """The right-to-left stream of (x, y) is exactly what seqio makes of the example whose
    prompt is <r2l> + reversed y and whose target is reversed x + EOS, so their losses agree."""
    ours = converted()[1::2]
    theirs = seqio_rows([([R2L, *y[::-1]], [*x[::-1], EOS]) for x, y in EXAMPLES], {"inputs": 4, "targets": 5})
    width = LENGTHS["inputs"] + LENGTHS["targets"]
    for a, b in zip(ours, theirs, strict=True):
        for key in ("decoder_target_tokens", "decoder_input_tokens", "decoder_loss_weights"):
            assert a[key] == b[key][:width] and not any(b[key][width:]), key

    config = TransformerConfig(vocab_size=32, d_model=16, num_layers=2, num_heads=2, num_kv_heads=1, d_ff=32, max_len=16)
    model = Transformer(config, rngs=nnx.Rngs(0))
    loss = lm_loss(chunk_size=None)

    def batch(rows):  # unpacked rows, completed with the positions and segments training adds
        out = {k: np.asarray([r[k][:width] for r in rows]) for k in ("decoder_target_tokens", "decoder_input_tokens", "decoder_loss_weights")}
        segments = (out["decoder_target_tokens"] != 0).astype(np.int32)
        return {**out, "decoder_segment_ids": segments, "decoder_positions": np.tile(np.arange(width), (len(rows), 1)) * segments}

    ours_batch, theirs_batch = batch(ours), batch(theirs)
    np.testing.assert_allclose(float(loss(model, ours_batch, None)[0]), float(loss(model, theirs_batch, None)[0]), rtol=1e-6)


def test_packing_keeps_each_direction_in_its_own_segment():
    packed = converted(pack=True)
    unpacked = converted()
    segments = []
    for row in packed:
        ids, tokens, positions = row["decoder_segment_ids"], row["decoder_target_tokens"], row["decoder_positions"]
        for s in sorted(set(ids) - {0}):
            where = [i for i, v in enumerate(ids) if v == s]
            assert [positions[i] for i in where] == list(range(len(where)))  # each segment restarts its positions
            segments.append([tokens[i] for i in where])
    assert all(seg[0] in (L2R, R2L) for seg in segments)  # every segment starts with its direction token
    assert sorted(segments) == sorted(unpadded(r) for r in unpacked)


def test_weights_scale_each_direction_and_zero_drops_it():
    rows = converted(Directions(l2r_weight=1.0, r2l_weight=0.25))
    assert {max(r["decoder_loss_weights"]) for r in rows[0::2]} == {1.0}
    assert {max(r["decoder_loss_weights"]) for r in rows[1::2]} == {0.25}
    forward_only = converted(Directions(r2l_weight=0.0))
    assert [unpadded(r) for r in forward_only] == [unpadded(r) for r in rows[0::2]]


def test_sampling_keeps_one_direction_per_example_in_proportion():
    examples = EXAMPLES * 100
    rows = converted(Directions(l2r_weight=3.0, r2l_weight=1.0, sample=True), examples=examples)
    assert len(rows) == len(examples)
    backward = sum(unpadded(r)[0] == R2L for r in rows)
    assert 0.15 < backward / len(rows) < 0.35  # P(r2l) = 1 / (3 + 1)
    assert all(max(r["decoder_loss_weights"]) == 1.0 for r in rows)


def test_plain_text_trains_every_token_both_ways():
    x, y = EXAMPLES[0]
    forward, backward = converted(examples=[(x, y)], inputs=False, lengths={"targets": 8})
    assert unpadded(forward) == [L2R, *x, *y, EOS] and unpadded(backward) == [R2L, *(x + y)[::-1], EOS]
    assert unpadded(forward, "decoder_loss_weights")[1:] == [1.0] * (len(x) + len(y) + 1)
    assert unpadded(backward, "decoder_loss_weights")[1:] == [1.0] * (len(x) + len(y) + 1)


def test_evaluation_prompts_start_with_the_forward_token():
    rows = [{k: v.tolist() for k, v in r.items()} for r in PrefixedFeatureConverter((L2R,), pack=False)(dataset(), LENGTHS).as_numpy_iterator()]
    for (x, y), row in zip(EXAMPLES, rows, strict=True):
        assert unpadded(row) == [L2R, *x, *y, EOS]


# --- the direction tokens --------------------------------------------------------------------


@pytest.fixture(scope="module")
def vocabularies(tmp_path_factory):
    corpus = ["The pet of Alice Moreno is a heron. The pet of Bruno Silva is an otter. Who owns a heron?"] * 20
    paths = {}
    for name, special in (("plain", ()), ("bidirectional", ("<l2r>", "<r2l>"))):
        paths[name] = str(tmp_path_factory.mktemp(name))
        train_tokenizer(corpus, 300, special_tokens=special).save_pretrained(paths[name])
    return {name: HFVocabulary(path) for name, path in paths.items()}


def test_a_missing_direction_token_is_a_clear_error(vocabularies):
    assert direction_ids(vocabularies["bidirectional"], Directions()) == (3, 4)  # after <pad>, </s>, <unk>
    with pytest.raises(DirectionTokenError, match=r"no direction token\(s\) <l2r>, <r2l>.*--add_tokens '<l2r>' '<r2l>'"):
        direction_ids(vocabularies["plain"], Directions())
    with pytest.raises(ValueError, match="must be >= 0 and not both 0"):
        Directions(l2r_weight=0.0, r2l_weight=0.0)


# --- rescoring --------------------------------------------------------------------------------


def brute_force_log_likelihood(model: Transformer, tokens: list[int], trained: list[bool]) -> float:
    """Sum of log p(token) over the trained tokens, from one full forward pass in NumPy."""
    inputs = np.asarray([[0, *tokens[:-1]]], np.int32)  # the decoder starts from id 0
    logits = np.asarray(model(inputs)[0][0], np.float64)
    log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    return float(sum(log_probs[i, t] for i, (t, keep) in enumerate(zip(tokens, trained)) if keep))


def test_rescoring_picks_the_brute_force_best_candidate(vocabularies):
    vocab = vocabularies["bidirectional"]
    config = TransformerConfig(vocab_size=320, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=64, max_len=128)
    model = Transformer(config, rngs=nnx.Rngs(7))
    graphdef, state = nnx.split(model)
    partitioner = Partitioner.from_config(MeshConfig())
    ids = direction_ids(vocab, Directions())
    policy = Policy(graphdef, state, vocab, None, partitioner, config.max_len, directions=ids)
    prompts = ["The pet of Alice Moreno is", "Who owns a heron?"]
    candidates = [[" a heron.", " an otter.", " Bruno"], [" Alice Moreno.", " Bruno Silva.", " a heron"]]
    lam = 0.7
    best, scores = policy.rescore(prompts, candidates, lam)

    expected = np.zeros((2, 3))
    for i, (x_text, ys) in enumerate(zip(prompts, candidates)):
        x = vocab.encode(x_text)
        for j, y_text in enumerate(ys):
            y = vocab.encode(y_text)
            forward = brute_force_log_likelihood(model, [ids[0], *x, *y, EOS], [False] * (1 + len(x)) + [True] * (len(y) + 1))
            backward = brute_force_log_likelihood(model, [ids[1], *y[::-1], *x[::-1], EOS], [False] * (1 + len(y)) + [True] * (len(x) + 1))
            expected[i, j] = forward + lam * backward
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-4)
    assert best == [int(k) for k in expected.argmax(1)]

    with pytest.raises(PolicyError, match="not trained bidirectionally"):
        Policy(graphdef, state, vocab, None, partitioner, config.max_len).log_likelihoods(prompts, ["a", "b"], "r2l")


# --- training ---------------------------------------------------------------------------------


def run_cli(args) -> int:
    gin.clear_config(clear_constants=True)
    return cli.main(args)


TRAIN = ["train", "--gin_file=tests/tiny_run.gin", "--gin_file=configs/runs/bidirectional.gin", "--gin.TRAIN_STEPS=3"]


@pytest.mark.slow
def test_a_bidirectional_run_records_its_tokens_and_is_asked_both_ways(tmp_path, repo_root, monkeypatch, capsys):
    import tasks.batgpt  # registers batgpt_facts, whose tokenizer has the direction tokens

    monkeypatch.chdir(repo_root)
    run = str(tmp_path / "bidi")
    args = [*TRAIN, f"--gin.MODEL_DIR='{run}'", "--gin.MIXTURE_OR_TASK_NAME='batgpt_facts'",
            "--gin.TASK_FEATURE_LENGTHS={'inputs': 20, 'targets': 8}"]  # fmt: skip
    assert run_cli(args) == 0
    assert json.load(open(os.path.join(run, DIRECTIONS_FILE))) == {"l2r_token": "<l2r>", "r2l_token": "<r2l>"}
    policy = Policy.load(run, Partitioner.from_config(MeshConfig()))
    assert policy.directions == direction_ids(policy.vocabulary, Directions())
    assert policy.prompt([Message("user", "The pet of Alice Moreno is")])[0] == policy.directions[0]  # sampling starts with <l2r>
    both = [policy.log_likelihoods(["The pet of Alice Moreno is"], [" a heron."], d)[0] for d in ("l2r", "r2l")]
    assert all(np.isfinite(both)) and both[0] != both[1]

    # `flanjax sample --rescore bidirectional`: the kept response is the best-scored candidate.
    capsys.readouterr()
    assert run_cli(["sample", "--policy", run, "--prompt", "The pet of Alice Moreno is", "--best_of", "3", "--rescore", "bidirectional",
                    "--temperature", "1.0", "--max_new_tokens", "4"]) == 0  # fmt: skip
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(row["candidates"]) == 3 and row["score"] == max(row["scores"])
    assert row["response"] == row["candidates"][row["scores"].index(row["score"])]
    expected = policy.rescore([row["prompt"]], [row["candidates"]])[1][0]
    np.testing.assert_allclose(row["scores"], expected, rtol=1e-5)

    # The evaluator option: each prompt's candidates are rescored with the prompt itself as x.
    from flanjax.eval import evaluator as ev
    from flanjax.eval.metrics import exact_match

    seen = []

    def spy(graphdef, state, partitioner, xs, ys, *args):
        seen.extend(policy.vocabulary.decode([int(t) for t in x]) for x in xs)
        return bidirectional_scores(graphdef, state, partitioner, xs, ys, *args)

    monkeypatch.setattr(ev, "bidirectional_scores", spy)
    name = f"test_bidi_facts_{uuid.uuid4().hex[:8]}"
    seqio.TaskRegistry.add(name, source=seqio.FunctionDataSource(tasks.batgpt._dataset_fn, splits=("validation",)),
                           preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim],
                           output_features=seqio.get_mixture_or_task("batgpt_facts").output_features, metric_fns=[exact_match])  # fmt: skip
    try:
        config = ev.EvalConfig(name, num_examples=8, batch_size=8, sampling=SamplingConfig(max_new_tokens=6, temperature=1.0),
                               rescore=ev.Rescore(num_candidates=3, lam=0.5))  # fmt: skip
        model = read_model_config(run)
        evaluator = ev.Evaluator(config, model=model, graphdef=policy.graphdef, partitioner=policy.partitioner,
                                 task_feature_lengths={"inputs": 20, "targets": 8}, directions=policy.directions)  # fmt: skip
        result = evaluator(3, policy.state)[name]
        assert 0 <= result.metrics["exact_match"] <= 100 and result.num_examples == 8
        people = [p for p, _ in tasks.batgpt.facts()[:8]]
        assert seen == [tasks.batgpt.prompt(p) for p in people for _ in range(3)]
        with pytest.raises(ev.EvalError, match="asks the model backwards: evaluate a bidirectionally trained run"):
            ev.Evaluator(config, model=model, graphdef=policy.graphdef, partitioner=policy.partitioner)
        with pytest.raises(ev.EvalError, match="num_candidates >= 2 and a sampling temperature > 0"):
            ev.Evaluator(dataclasses.replace(config, sampling=None), model=model, graphdef=policy.graphdef,
                         partitioner=policy.partitioner, directions=policy.directions)  # fmt: skip
    finally:
        seqio.TaskRegistry.remove(name)


def test_training_refuses_a_tokenizer_without_direction_tokens_and_dialogue_tasks(tmp_path, repo_root, monkeypatch, capsys):
    monkeypatch.chdir(repo_root)
    assert run_cli([*TRAIN, f"--gin.MODEL_DIR='{tmp_path / 'a'}'"]) == 1  # the quickstart's tokenizer has none
    assert "no direction token(s) <l2r>, <r2l>" in capsys.readouterr().err

    tokenizer = train_tokenizer(["User: hi. Assistant: hello."] * 10, 300, special_tokens=("<|eot|>",))
    tokenizer.save_pretrained(str(tmp_path / "tok"))
    (tmp_path / "chat.jsonl").write_text(json.dumps({"conversations": ["hi", "hello"]}) + "\n")
    name = f"test_bidi_dialogue_{uuid.uuid4().hex[:8]}"
    add_dialogue_task(name, {"train": str(tmp_path / "chat.jsonl")}, HFVocabulary(str(tmp_path / "tok")))
    try:
        assert run_cli([*TRAIN, f"--gin.MODEL_DIR='{tmp_path / 'b'}'", f"--gin.MIXTURE_OR_TASK_NAME='{name}'"]) == 1
        assert "is a dialogue task: bidirectional training reads prompt/response or plain-text tasks" in capsys.readouterr().err
    finally:
        seqio.TaskRegistry.remove(name)
    assert not os.path.exists(tmp_path / "a" / "checkpoints") and not os.path.exists(tmp_path / "b" / "checkpoints")
