"""Using a dialogue run: `flanjax chat` through a pipe, `flanjax select` against a brute-force
choice, `flanjax compare`, and the selected step read by the run's readers.

One tiny model is trained for three epochs on generated conversations (a checkpoint each);
expected values come from sampling each checkpoint directly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import gin
import numpy as np
import pytest
import seqio

from flanjax.chat import Policy
from flanjax.cli import main
from flanjax.data.dialogue import Message, add_dialogue_task, eot_id
from flanjax.data.vocab import HFVocabulary, train_tokenizer
from flanjax.decode import SamplingConfig
from flanjax import selection
from flanjax.rundir.checkpoint import Checkpointer
from flanjax.rundir.files import resolve_checkpoint
from flanjax.sharding import MeshConfig, Partitioner

WORDS = "red blue green one two three four name a colour number".split()
SAMPLING = SamplingConfig(max_new_tokens=12, temperature=0.7, top_p=0.9, repetition_penalty=1.2)


def rubric(prompt: str, response: str, reference: str) -> float:
    """The tests' judge: longer answers score higher (any deterministic function serves)."""
    return float(len(response))


def _conversation(rng) -> dict:
    turns = []
    for _ in range(rng.integers(1, 3)):
        question = " ".join(rng.choice(WORDS, 3))
        turns += [question, " ".join(sorted(question.split()))]
    return {"conversations": turns}


@pytest.fixture(scope="module")
def dialogue_run(tmp_path_factory):
    gin.clear_config(clear_constants=True)  # a fresh configuration, as the command line starts with

    root = tmp_path_factory.mktemp("chat")
    tokenizer = train_tokenizer([" ".join(WORDS)] * 10, 300)
    tokenizer.add_tokens(["<|eot|>"], special_tokens=True)
    tokenizer.save_pretrained(str(root / "tokenizer"))
    rng = np.random.default_rng(0)
    (root / "train.jsonl").write_text("".join(json.dumps(_conversation(rng)) + "\n" for _ in range(32)))
    (root / "dev.jsonl").write_text("".join(json.dumps(_conversation(rng)) + "\n" for _ in range(6)))
    name = f"test_chat_{uuid.uuid4().hex[:8]}"
    add_dialogue_task(name, {"train": str(root / "train.jsonl")}, HFVocabulary(str(root / "tokenizer")))
    run = root / "run"
    code = main(["train", "--gin_file=configs/runs/lima.gin", "--gin_file=configs/models/tiny.gin", f"--gin.MODEL_DIR={run}",
                 f"--gin.MIXTURE_OR_TASK_NAME={name!r}", "--gin.TASK_FEATURE_LENGTHS={'targets': 64}", "--gin.BATCH_SIZE=8",
                 "--gin.EPOCHS=3", "--gin.optim.OptimizerConfig.learning_rate=3e-3"])  # fmt: skip
    assert code == 0
    yield root
    seqio.TaskRegistry.remove(name)


@pytest.fixture(scope="module")
def partitioner():
    return Partitioner.from_config(MeshConfig())


def test_chat_through_a_pipe_keeps_history_resets_and_stops_at_end_of_turn(dialogue_run, partitioner, repo_root):
    run = str(dialogue_run / "run")
    lines = ["red one blue", "green two", "/reset", "green two", "/exit", "never read"]
    out = subprocess.run([sys.executable, "-m", "flanjax.cli", "chat", "--run", run, "--temperature", "0", "--max_new_tokens", "8",
                          "--system", "Sort the words."], input="\n".join(lines) + "\n", capture_output=True, text=True,
                         cwd=repo_root, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr
    replies = out.stdout.splitlines()
    policy = Policy.load(run, partitioner)
    greedy = SamplingConfig(max_new_tokens=8, repetition_penalty=1.2)
    system, u1, u2 = Message("system", "Sort the words."), Message("user", "red one blue"), Message("user", "green two")
    first = policy.replies([[system, u1]], greedy)[0]
    second = policy.replies([[system, u1, Message("assistant", first), u2]], greedy)[0]
    fresh = policy.replies([[system, u2]], greedy)[0]
    assert replies == [first, second, "(conversation reset)", fresh]
    assert eot_id(policy.vocabulary.tokenizer, policy.format) in policy.sampling(greedy).stop_tokens


def test_select_picks_the_brute_force_choice_and_readers_use_it(dialogue_run, partitioner):
    run = str(dialogue_run / "run")
    prompts = str(dialogue_run / "dev.jsonl")
    steps = Checkpointer(run, read_only=True).all_steps()
    assert len(steps) == 3
    conversations, references = selection.read_prompts(prompts)
    brute = []
    for step in steps:
        answers = Policy.load(os.path.join(run, "checkpoints", str(step)), partitioner).replies(conversations, SAMPLING)
        brute.append(np.mean([rubric(c[-1].content, a, r) for c, a, r in zip(conversations, answers, references)]))
    assert len(set(brute)) > 1  # the checkpoints answer differently: the choice means something
    result = selection.select(run, prompts, "rubric:test_chat:rubric", partitioner, sampling=SAMPLING)
    np.testing.assert_allclose([row["judge_score"] for row in result["table"]], brute)
    assert result["selected_step"] == steps[int(np.argmax(brute))]
    assert all(np.isfinite(row["dev_perplexity"]) and row["dev_perplexity"] > 1 for row in result["table"])
    assert resolve_checkpoint(run) == (os.path.abspath(run), result["selected_step"])
    # Bounds narrow the candidates.
    later = selection.select(run, prompts, "rubric:test_chat:rubric", partitioner, sampling=SAMPLING, steps=(steps[1], None))
    assert [row["step"] for row in later["table"]] == steps[1:]
    with pytest.raises(selection.SelectionError, match="no checkpoint with a step in"):
        selection.select(run, prompts, "rubric:test_chat:rubric", partitioner, steps=(steps[-1] + 1, None))


def test_compare_counts_wins_and_judges_pairs_in_both_orders(dialogue_run, partitioner):
    run = dialogue_run / "run"
    steps = Checkpointer(str(run), read_only=True).all_steps()
    a, b = str(run / "checkpoints" / str(steps[0])), str(run / "checkpoints" / str(steps[-1]))
    prompts = str(dialogue_run / "dev.jsonl")
    conversations, references = selection.read_prompts(prompts)
    answers_a = Policy.load(a, partitioner).replies(conversations, SAMPLING)
    answers_b = Policy.load(b, partitioner).replies(conversations, SAMPLING)
    margins = np.sign([len(x) - len(y) for x, y in zip(answers_a, answers_b)])
    assert np.any(margins != 0)
    by_rubric = selection.compare(a, b, prompts, "rubric:test_chat:rubric", partitioner, sampling=SAMPLING)
    assert (by_rubric["wins"], by_rubric["ties"], by_rubric["losses"]) == tuple(int(np.sum(margins == s)) for s in (1, 0, -1))
    assert by_rubric["order_agreement"] is None
    # A judge model (the run itself): each verdict both ways, a flip is a tie.
    by_judge = selection.compare(a, b, prompts, f"judge:{run}", partitioner, sampling=SAMPLING)
    judge = selection.Judge.parse(f"judge:{run}", partitioner, Policy.load(a, partitioner).vocabulary).model
    texts = [c[-1].content for c in conversations]
    first = judge.log_odds(texts, answers_a, answers_b, references)
    second = judge.log_odds(texts, answers_b, answers_a, references)
    differ = np.asarray([x != y for x, y in zip(answers_a, answers_b)])
    wins = int(np.sum(differ & (first > 0) & (second < 0)))
    losses = int(np.sum(differ & (first < 0) & (second > 0)))
    assert (by_judge["wins"], by_judge["losses"], by_judge["ties"]) == (wins, losses, len(texts) - wins - losses)
    agree = (np.sign(first) == -np.sign(second))[differ]
    assert by_judge["order_agreement"] == (pytest.approx(agree.mean()) if differ.any() else None)
