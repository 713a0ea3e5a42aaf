"""Conversations (flanjax.data.dialogue): token-span loss masks, the seqio task and converter,
trimming, and the errors bad data gets.

Expected masks are built by hand from each format's pieces, encoded one at a time (special
tokens split the text, so the pieces' ids concatenate to the whole's); losses are checked
against the model scoring one reply at a time.
"""

from __future__ import annotations

import json
import uuid

import gin
import numpy as np
import pytest
import seqio
from flax import nnx

from flanjax.cli import main
from flanjax.data.dialogue import (
    DialogueError, DialogueFeatureConverter, DialogueFormat, EndOfTurnTokenError, Message, add_dialogue_task,
    dialogue_stats, parse_conversation, prompt_ids, read_conversations, render,
)  # fmt: skip
from flanjax.data.pipeline import SeqioBatches
from flanjax.data.vocab import HFVocabulary, train_tokenizer
from flanjax.decode import decoder_features, score
from flanjax.models.transformer import Transformer, TransformerConfig
from flanjax.train.losses import lm_loss

SPECIAL = ["<|eot|>", "<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|begin_of_text|>"]
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA3 = (
    "<|begin_of_text|>{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
CONVERSATION = [
    Message("system", "Be brief."),
    Message("user", "Name a colour."),
    Message("assistant", "Blue."),
    Message("user", "Another one?"),
    Message("assistant", "Green, or red."),
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    corpus = ["System: Be brief. User: Name a colour. Assistant: Blue. Another one? Green, or red. user assistant system"] * 20
    tokenizer = train_tokenizer(corpus, 320)
    tokenizer.add_tokens(SPECIAL, special_tokens=True)
    path = str(tmp_path_factory.mktemp("dialogue_tokenizer"))
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture()
def tokenizer(tokenizer_dir):
    return HFVocabulary(tokenizer_dir).tokenizer


def _pieces(tokenizer, pieces: list[tuple[str, int]]) -> tuple[list[int], list[int]]:
    """Hand-built (ids, mask): each piece encoded alone, with its weight."""
    ids, mask = [], []
    for text, weight in pieces:
        piece = tokenizer.encode(text, add_special_tokens=False)
        ids += piece
        mask += [weight] * len(piece)
    return ids, mask


def test_own_format_masks_every_reply_and_its_end_of_turn_token(tokenizer):
    ids, weights = render(CONVERSATION, tokenizer)
    expected = _pieces(tokenizer, [
        ("System: ", 0), ("Be brief.", 0), ("<|eot|>", 0), ("User: ", 0), ("Name a colour.", 0), ("<|eot|>", 0),
        ("Assistant: ", 0), ("Blue.", 1), ("<|eot|>", 1), ("User: ", 0), ("Another one?", 0), ("<|eot|>", 0),
        ("Assistant: ", 0), ("Green, or red.", 1), ("<|eot|>", 1),
    ])  # fmt: skip
    assert (ids, weights) == expected
    eot = tokenizer.convert_tokens_to_ids("<|eot|>")
    trained = [i for i, w in zip(ids, weights) if w]
    assert trained.count(eot) == 2 and ids.count(eot) == 5  # after every utterance; each reply's is trained
    # Last reply only; and a reply flagged train=False is context.
    last = render(CONVERSATION, tokenizer, turns="last")[1]
    assert last == [w if i >= len(ids) - len(tokenizer.encode("Green, or red.")) - 1 else 0 for i, w in enumerate(weights)]
    flagged = [*CONVERSATION[:2], Message("assistant", "Blue.", train=False), *CONVERSATION[3:]]
    assert render(flagged, tokenizer)[1] == last
    # The prompt for the next reply is the rendered conversation and the assistant's header.
    assert prompt_ids(CONVERSATION[:4], tokenizer) == ids[: len(ids) - sum(1 for w in last if w)]


@pytest.mark.parametrize("template, eot", [(CHATML, "<|im_end|>"), (LLAMA3, "<|eot_id|>")])
def test_chat_template_masks_equal_hand_built_masks(tokenizer, template, eot):
    tokenizer.chat_template = template
    fmt = DialogueFormat(eot=eot, chat_template=True)
    ids, weights = render(CONVERSATION, tokenizer, fmt)
    if template == CHATML:
        head = lambda role: [("<|im_start|>", 0), (f"{role}\n", 0)]  # noqa: E731
        tail = lambda w: [("<|im_end|>", w), ("\n", 0)]  # noqa: E731
        start = []
    else:
        head = lambda role: [("<|start_header_id|>", 0), (role, 0), ("<|end_header_id|>", 0), ("\n\n", 0)]  # noqa: E731
        tail = lambda w: [("<|eot_id|>", w)]  # noqa: E731
        start = [("<|begin_of_text|>", 0)]
    pieces = list(start)
    for m in CONVERSATION:
        w = int(m.role == "assistant")
        pieces += head(m.role) + [(m.content, w)] + tail(w)
    assert (ids, weights) == _pieces(tokenizer, pieces)
    assert ids == tokenizer.apply_chat_template([{"role": m.role, "content": m.content} for m in CONVERSATION], tokenize=True, return_dict=False)


def test_template_that_renders_the_prompt_otherwise_still_masks_by_tokens(tokenizer):
    # The generation prompt ends "assistant\n" but a rendered reply follows "assistant" with no
    # newline: comparing strings with and without the reply cannot split it; tokens can.
    tokenizer.chat_template = CHATML.replace("{{ m['role'] }}\n{{", "{{ m['role'] }}{{")
    fmt = DialogueFormat(eot="<|im_end|>", chat_template=True)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Name a colour."}], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template([{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}], tokenize=False)
    assert not full.startswith(prompt)
    ids, weights = render(CONVERSATION[1:3], tokenizer, fmt)
    trained = [i for i, w in zip(ids, weights) if w]
    assert trained == tokenizer.encode("Blue.<|im_end|>", add_special_tokens=False)


def test_missing_end_of_turn_token_says_how_to_add_it(tmp_path):
    plain = train_tokenizer(["User: hello Assistant: hi"] * 5, 280)
    with pytest.raises(EndOfTurnTokenError, match="--add_tokens '<\\|eot\\|>'"):
        render(CONVERSATION, plain)
    plain.add_tokens(["<|im_end|>"], special_tokens=True)
    plain.chat_template = CHATML.replace("<|im_end|>", "")
    with pytest.raises(DialogueError, match="no end-of-turn token '<\\|im_end\\|>' after message 2"):
        render(CONVERSATION, plain, DialogueFormat(eot="<|im_end|>", chat_template=True))


# --- reading ----------------------------------------------------------------------------------


def test_three_shapes_read_alike():
    lima = parse_conversation({"conversations": ["Name a colour.", "Blue.", "Another one?", "Green, or red."]})
    hf = parse_conversation({"messages": [{"role": m.role, "content": m.content} for m in CONVERSATION]})
    assert hf == CONVERSATION and lima == CONVERSATION[1:]
    assert parse_conversation({"prompt": "Name a colour.", "response": "Blue.", "system": "Be brief."}) == CONVERSATION[:3]
    flagged = parse_conversation({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "train": False}]})
    assert flagged[1].train is False


@pytest.mark.parametrize("line, message", [
    ('{"conversations": ["a", "b"', "line 2 is not JSON"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}', "line 2: message 1 .*two user turns in a row"),
    ('{"messages": [{"role": "robot", "content": "a"}]}', "line 2: message 0 has unknown role 'robot'"),
    ('{"conversations": ["a", "  "]}', "line 2: message 1 \\(assistant\\) is empty"),
    ('{"conversations": ["a", "b", "c"]}', "line 2: the conversation ends on a user turn"),
    ('{"text": "a"}', "line 2: no conversation found"),
])  # fmt: skip
def test_bad_lines_are_named_by_file_and_line(tmp_path, line, message):
    path = tmp_path / "data.jsonl"
    path.write_text('{"conversations": ["hi", "hello"]}\n' + line + "\n")
    with pytest.raises(DialogueError, match=f"{path} {message}"):
        read_conversations(str(path))


# --- the seqio task ---------------------------------------------------------------------------


def _conversations(n: int) -> list[dict]:
    rng = np.random.default_rng(0)
    words = "red blue green one two three name a colour".split()
    return [{"conversations": [" ".join(rng.choice(words, rng.integers(1, 6))) for _ in range(2 * rng.integers(1, 4))]} for _ in range(n)]


@pytest.fixture()
def dialogue_task(tmp_path, tokenizer_dir):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(c) + "\n" for c in _conversations(24)))
    name = f"test_dialogue_{uuid.uuid4().hex[:8]}"
    task = add_dialogue_task(name, {"train": str(path)}, HFVocabulary(tokenizer_dir))
    yield task
    seqio.TaskRegistry.remove(name)


def test_task_examples_are_the_rendered_conversations(dialogue_task, tokenizer):
    examples = list(dialogue_task.get_dataset(None, split="train", shuffle=False).as_numpy_iterator())
    expected = [render(parse_conversation(c), tokenizer) for c in _conversations(24)]
    assert [(e["targets"].tolist(), (e["loss_mask"] - 1).tolist()) for e in examples] == expected


def _model(vocab_size: int) -> tuple[nnx.GraphDef, nnx.State]:
    config = TransformerConfig(vocab_size=vocab_size, d_model=32, num_layers=2, num_heads=2, num_kv_heads=2, d_ff=64, max_len=256)
    return nnx.split(Transformer(config, rngs=nnx.Rngs(0)))


def test_packed_and_unpacked_batches_score_alike_and_equal_one_reply_at_a_time(dialogue_task, tokenizer):
    graphdef, state = _model(len(tokenizer) + 8)
    loss = lm_loss(chunk_size=None)

    def total(pack: bool) -> tuple[float, float]:
        # A row per batch: no remainder is dropped.
        batches = SeqioBatches(dialogue_task.name, {"targets": 128}, 1, shuffle=False, pack=pack, num_epochs=1)
        sums = [loss(nnx.merge(graphdef, state), batch, None)[1] for batch in batches]
        return sum(float(m["loss_sum"]) for m in sums), sum(float(m["weight_sum"]) for m in sums)

    packed, unpacked = total(True), total(False)
    # One reply at a time: each reply's prefix (the conversation up to and with it), that reply alone trained.
    reference, tokens = 0.0, 0
    for record in _conversations(24):
        messages = parse_conversation(record)
        for i, m in enumerate(messages):
            if m.role == "assistant":
                ids, weights = render(messages[: i + 1], tokenizer, turns="last")
                scores = score(graphdef, state, decoder_features(np.asarray([ids]), np.asarray([weights])))
                reference -= float(scores.log_likelihood[0])
                tokens += int(scores.num_tokens[0])
    assert unpacked[1] == packed[1] == tokens
    np.testing.assert_allclose([packed[0], unpacked[0]], [reference, reference], rtol=2e-5)


def test_packing_keeps_conversations_apart(dialogue_task):
    batch = next(iter(SeqioBatches(dialogue_task.name, {"targets": 128}, 4, shuffle=False, pack=True, num_epochs=1)))
    segments, positions = batch["decoder_segment_ids"], batch["decoder_positions"]
    assert segments.max() > 1  # several conversations share a row
    starts = (positions == 0) & (segments > 0)
    inputs = batch["decoder_input_tokens"]
    assert np.all(inputs[starts] == 0)  # every conversation starts afresh
    changes = np.diff(segments, axis=1) != 0
    assert np.all(positions[:, 1:][changes & (segments[:, 1:] > 0)] == 0)  # positions restart at each new one


def test_trimming_drops_and_counts_conversations_left_without_a_reply(tmp_path, tokenizer_dir, tokenizer):
    long_prompt = " ".join(["colour"] * 40)
    path = tmp_path / "train.jsonl"
    records = [{"conversations": [long_prompt, "Blue."]}, {"conversations": ["Name a colour.", "Blue. " * 30]}, {"conversations": ["a", "b"]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    name = f"test_dialogue_trim_{uuid.uuid4().hex[:8]}"
    task = add_dialogue_task(name, {"train": str(path)}, HFVocabulary(tokenizer_dir))
    try:
        length = 20
        examples = list(task.get_dataset({"targets": length}, split="train", shuffle=False).as_numpy_iterator())
        assert len(examples) == 2 and all(len(e["targets"]) <= length and np.any(e["loss_mask"] == 2) for e in examples)
        full = render(parse_conversation(records[1]), tokenizer)
        assert examples[0]["targets"].tolist() == full[0][:length] and (examples[0]["loss_mask"] - 1).tolist() == full[1][:length]
        stats = dialogue_stats(task, "train", length)
        assert (stats.conversations, stats.trimmed, stats.dropped) == (3, 2, 1)
        assert stats.trained_tokens == sum(int(np.sum(e["loss_mask"] == 2)) for e in examples)
    finally:
        seqio.TaskRegistry.remove(name)


def test_dialogue_tasks_get_their_converter(dialogue_task):
    import tasks.quickstart  # noqa: F401  (registers quickstart_max, whichever tests ran before)

    assert isinstance(SeqioBatches(dialogue_task.name, {"targets": 64}, 2).feature_converter(), DialogueFeatureConverter)
    assert not isinstance(SeqioBatches("quickstart_max", {"inputs": 8, "targets": 8}, 2).feature_converter(), DialogueFeatureConverter)


# --- the LIMA recipe --------------------------------------------------------------------------


def test_lima_recipe_trains_in_epochs_on_its_schedule_and_checkpoints_every_epoch(tmp_path, dialogue_task):
    gin.clear_config(clear_constants=True)  # a fresh configuration, as the command line starts with
    from flanjax.rundir.checkpoint import Checkpointer
    from flanjax.rundir.metrics import read_metrics

    run = tmp_path / "lima"
    code = main(["train", "--gin_file=configs/runs/lima.gin", "--gin_file=configs/models/tiny.gin", f"--gin.MODEL_DIR={run}",
                 f"--gin.MIXTURE_OR_TASK_NAME={dialogue_task.name!r}", "--gin.TASK_FEATURE_LENGTHS={'targets': 64}",
                 "--gin.BATCH_SIZE=8", "--gin.EPOCHS=2", "--gin.loop.LoopConfig.log_every=1"])  # fmt: skip
    assert code == 0
    per_epoch = 24 // 8  # unpacked: a row per conversation
    assert Checkpointer(str(run), read_only=True).all_steps() == [per_epoch, 2 * per_epoch]
    rows = read_metrics(str(run / "metrics.jsonl"))
    assert rows[0]["step"] == 0 and rows[0]["data/conversations"] == 24 and rows[0]["data/dropped"] == 0
    total = 2 * per_epoch
    for row in rows[1:]:  # linear from 1e-5 to 1e-6 over the whole run, no warm-up
        np.testing.assert_allclose(row["learning_rate"], 1e-5 + (1e-6 - 1e-5) * row["step"] / total, rtol=1e-6)
    assert json.loads((run / "dialogue.json").read_text())["eot"] == "<|eot|>"
    model = json.loads((run / "model.json").read_text())
    assert (model["residual_dropout"], model["residual_dropout_top"]) == (0.0, 0.3)


def test_other_seqio_sources_read_through_record_to_conversation(tokenizer_dir, tokenizer):
    import tensorflow as tf

    from flanjax.data.dialogue import record_to_conversation

    records = [{"messages": [{"role": m.role, "content": m.content} for m in CONVERSATION]}, {"prompt": "a", "response": "b"}]
    source = seqio.FunctionDataSource(
        lambda split, shuffle_files: tf.data.Dataset.from_tensor_slices({"record": [json.dumps(r) for r in records]}), splits=["train"]
    )
    name = f"test_dialogue_source_{uuid.uuid4().hex[:8]}"
    task = add_dialogue_task(name, source, HFVocabulary(tokenizer_dir), preprocessors=[record_to_conversation("record")])
    try:
        examples = list(task.get_dataset(None, split="train", shuffle=False).as_numpy_iterator())
        assert [(e["targets"].tolist(), (e["loss_mask"] - 1).tolist()) for e in examples] == [
            render(parse_conversation(r), tokenizer) for r in records
        ]
    finally:
        seqio.TaskRegistry.remove(name)


def test_a_task_with_nothing_left_to_train_is_refused_before_training(tmp_path, tokenizer_dir, capsys):
    gin.clear_config(clear_constants=True)  # a fresh configuration, as the command line starts with

    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"conversations": [" ".join(["colour"] * 80), "Blue."]}) + "\n" for _ in range(4)))
    name = f"test_dialogue_empty_{uuid.uuid4().hex[:8]}"
    add_dialogue_task(name, {"train": str(path)}, HFVocabulary(tokenizer_dir))
    try:
        code = main(["train", "--gin_file=configs/runs/lima.gin", "--gin_file=configs/models/tiny.gin", f"--gin.MODEL_DIR={tmp_path / 'run'}",
                     f"--gin.MIXTURE_OR_TASK_NAME={name!r}", "--gin.TASK_FEATURE_LENGTHS={'targets': 32}", "--gin.BATCH_SIZE=8"])  # fmt: skip
        assert code == 1
        assert "none of its 4 conversations has a trained token within 32 tokens" in capsys.readouterr().err
        assert not (tmp_path / "run" / "checkpoints").exists()
    finally:
        seqio.TaskRegistry.remove(name)
