"""Conversations: multi-turn SFT data with an end-of-turn token and a loss on every reply.

A conversation is a list of `Message`s: an optional system message, then user and assistant
turns alternating, ending (for training) on the assistant's. Three JSONL shapes are read:

    {"conversations": ["user says", "assistant says", ...]}                 LIMA (GAIR/lima)
    {"messages": [{"role": "system"|"user"|"assistant", "content": ...}]}   Hugging Face
    {"prompt": ..., "response": ...}                                        one exchange

and any message may carry `"train": false` (its reply is context, not learnt). Prompt files
(`flanjax select`, `compare`) may end on a user turn, or be `{"prompt": ...}` alone.

Rendering works on tokens, so masks never come from string differences:

    DialogueFormat()                   flanjax's own: per message a role header, its text and
                                       the end-of-turn token (user and assistant alike, LIMA)
    DialogueFormat(chat_template=True, the tokenizer's chat template, rendered once; each
                   eot="<|im_end|>")   reply's tokens are found by their character offsets

Each trained reply's span runs from its first token through its end-of-turn token, so the
model learns to stop. `add_dialogue_task` registers a seqio task whose examples are
`targets` (the tokens) and `loss_mask` (2 on trained tokens, 1 elsewhere: never 0, which
seqio's packer reads as padding), trimmed to the run's length; an example whose trimmed
mask is empty is dropped (`dialogue_stats` counts them). `DialogueFeatureConverter` turns
them into the decoder features every trainer reads, packed with segment ids and restarting
positions like seqio's own.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Literal

import numpy as np
import seqio
import tensorflow as tf

from flanjax import paths
from flanjax.data.jsonl import read_jsonl
from flanjax.data.vocab import HFVocabulary
from flanjax.errors import FlanjaxError

ROLES = ("system", "user", "assistant")
Turns = Literal["all", "last"]


class DialogueError(FlanjaxError, ValueError):
    pass


class EndOfTurnTokenError(FlanjaxError, ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class Message:
    role: str
    content: str
    train: bool = True  # an assistant message with train=False is context only


# --- reading ----------------------------------------------------------------------------------


def parse_conversation(record, where: str = "conversation", *, require_reply: bool = True) -> list[Message]:
    """One record in any of the three shapes -> checked messages. `where` names it in errors
    (e.g. "data/train.jsonl line 7"); `require_reply=False` allows a final user turn (a prompt)."""
    if not isinstance(record, Mapping):
        raise DialogueError(f"{where}: expected a JSON object, got {type(record).__name__}.")
    if "conversations" in record:
        turns = record["conversations"]
        if not isinstance(turns, list) or not all(isinstance(t, str) for t in turns):
            raise DialogueError(f"{where}: 'conversations' must be a list of strings (user, assistant, user, ...).")
        messages = [Message(("user", "assistant")[i % 2], text) for i, text in enumerate(turns)]
    elif "messages" in record:
        if not isinstance(record["messages"], list):
            raise DialogueError(f"{where}: 'messages' must be a list of {{\"role\", \"content\"}} objects.")
        messages = []
        for i, m in enumerate(record["messages"]):
            if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
                raise DialogueError(f"{where}: message {i} is not an object with 'role' and 'content'.")
            if m["role"] not in ROLES:
                raise DialogueError(f"{where}: message {i} has unknown role {m['role']!r}; roles are {', '.join(ROLES)}.")
            if not isinstance(m["content"], str):
                raise DialogueError(f"{where}: message {i}'s content is not a string.")
            messages.append(Message(m["role"], m["content"], bool(m.get("train", True))))
    elif "prompt" in record:  # without a response: a prompt to answer (refused for training below)
        messages = [Message("user", str(record["prompt"]))] + ([Message("assistant", str(record["response"]))] if "response" in record else [])
        if record.get("system"):
            messages.insert(0, Message("system", str(record["system"])))
    else:
        raise DialogueError(
            f"{where}: no conversation found (keys {sorted(record)}); give 'conversations' (alternating strings), "
            "'messages' (role/content objects) or 'prompt' (and 'response')."
        )
    check_turns(messages, where, require_reply=require_reply)
    return messages


def check_turns(messages: Sequence[Message], where: str, *, require_reply: bool = True) -> None:
    body = messages[1:] if messages and messages[0].role == "system" else messages
    if not body:
        raise DialogueError(f"{where}: the conversation has no user or assistant turn.")
    for i, m in enumerate(messages):
        if not m.content.strip():
            raise DialogueError(f"{where}: message {i} ({m.role}) is empty.")
        if m.role == "system" and i:
            raise DialogueError(f"{where}: message {i} is a system message; only the first message may be one.")
    offset = len(messages) - len(body)
    for i, m in enumerate(body):
        expected = ("user", "assistant")[i % 2]
        if m.role != expected:
            what = "two user turns in a row" if m.role == "user" and i else "two assistant turns in a row" if i else "it starts with the assistant"
            raise DialogueError(f"{where}: message {i + offset} is a {m.role} turn where a {expected} turn belongs ({what}); "
                                "turns must alternate, starting with the user.")  # fmt: skip
    if require_reply and body[-1].role != "assistant":
        raise DialogueError(f"{where}: the conversation ends on a user turn; a training conversation ends with the assistant's reply.")


def read_conversations(path: str, *, require_reply: bool = True) -> list[list[Message]]:
    """Every conversation of a JSONL file, checked; errors name the file and line."""
    conversations = [parse_conversation(record, where, require_reply=require_reply) for where, record in read_jsonl(path, DialogueError)]
    if not conversations:
        raise DialogueError(f"{path} holds no conversations.")
    return conversations


def to_json(messages: Sequence[Message]) -> str:
    return json.dumps([dataclasses.asdict(m) for m in messages])


def from_json(text: str | bytes) -> list[Message]:
    return [Message(**m) for m in json.loads(text)]


# --- rendering --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DialogueFormat:
    """How a conversation becomes tokens (see the module docstring)."""

    eot: str = "<|eot|>"  # the end-of-turn token: one special token of the vocabulary
    system: str = "System: "  # role headers of flanjax's own format, before each message's text
    user: str = "User: "
    assistant: str = "Assistant: "
    chat_template: bool = False  # render with the tokenizer's chat template instead

    def header(self, role: str) -> str:
        return getattr(self, role)


def eot_id(tokenizer, fmt: DialogueFormat) -> int:
    """The id of the end-of-turn token; an error says how to add it when the vocabulary lacks it."""
    found = tokenizer.get_vocab().get(fmt.eot)
    if found is None:
        raise EndOfTurnTokenError(
            f"the tokenizer ({getattr(tokenizer, 'name_or_path', '') or 'given'}) has no end-of-turn token {fmt.eot!r}. "
            f"Add it as a special token and grow the model to fit: `flanjax convert from-hf --in HF_DIR --out RUN "
            f"--add_tokens '{fmt.eot}'` (or `flanjax.models.hf.add_tokens(model, tokenizer, [{fmt.eot!r}])`); or set "
            "DialogueFormat.eot to the tokenizer's own end-of-turn token (LLaMA 3: '<|eot_id|>', ChatML: '<|im_end|>')."
        )
    return found


def trained_turns(messages: Sequence[Message], turns: Turns = "all") -> list[bool]:
    """Per message, whether its tokens carry loss: assistant replies (only the last one with
    turns="last"), less those flagged train=False."""
    replies = [i for i, m in enumerate(messages) if m.role == "assistant"]
    if turns not in ("all", "last"):
        raise DialogueError(f"turns={turns!r}: use 'all' (every reply) or 'last' (the last reply only).")
    chosen = set(replies[-1:] if turns == "last" else replies)
    return [i in chosen and m.train for i, m in enumerate(messages)]


def render(messages: Sequence[Message], tokenizer, fmt: DialogueFormat = DialogueFormat(), turns: Turns = "all") -> tuple[list[int], list[int]]:
    """(token ids, loss weights) of a conversation: weight 1 on each trained reply and its
    end-of-turn token."""
    trained = trained_turns(messages, turns)
    if fmt.chat_template:
        return _render_template(messages, tokenizer, fmt, trained)
    eot = eot_id(tokenizer, fmt)
    ids, weights = [], []
    for m, learn in zip(messages, trained):
        header = _encode(tokenizer, fmt.header(m.role))
        body = [*_encode(tokenizer, m.content), eot]
        ids += header + body
        weights += [0] * len(header) + [int(learn)] * len(body)
    return ids, weights


def prompt_ids(messages: Sequence[Message], tokenizer, fmt: DialogueFormat = DialogueFormat()) -> list[int]:
    """The tokens that ask for the assistant's next reply: the conversation so far (ending on
    a user turn) and the assistant's header."""
    if fmt.chat_template:
        _check_template(tokenizer)
        text = tokenizer.apply_chat_template([_as_dict(m) for m in messages], tokenize=False, add_generation_prompt=True)
        return _encode(tokenizer, text)
    return render(messages, tokenizer, fmt, turns="all")[0] + _encode(tokenizer, fmt.assistant)


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False) if text else []


def _as_dict(m: Message) -> dict[str, str]:
    return {"role": m.role, "content": m.content}


def _check_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise DialogueError(
            "DialogueFormat(chat_template=True) but the tokenizer has no chat template: set tokenizer.chat_template "
            "(a Jinja string) and save it with the tokenizer, or use flanjax's own format (chat_template=False)."
        )


def _render_template(messages, tokenizer, fmt: DialogueFormat, trained: list[bool]) -> tuple[list[int], list[int]]:
    """The chat template renders the whole conversation once; each trained reply's characters
    (from its text through the next end-of-turn token) mark the tokens that overlap them.
    Templates that render a turn differently once later turns follow cannot shift a mask."""
    _check_template(tokenizer)
    eot_id(tokenizer, fmt)
    text = tokenizer.apply_chat_template([_as_dict(m) for m in messages], tokenize=False)
    spans, cursor = [], 0
    for i, (m, learn) in enumerate(zip(messages, trained)):
        start = text.find(m.content.strip(), cursor)
        if start < 0:
            raise DialogueError(f"message {i} ({m.role}) does not appear in the chat template's rendering; the template "
                                "rewrites message text, so its replies cannot be located. Use flanjax's own format.")  # fmt: skip
        cursor = start + len(m.content.strip())
        if learn:
            end = text.find(fmt.eot, cursor)
            if end < 0:
                raise DialogueError(f"the chat template puts no end-of-turn token {fmt.eot!r} after message {i}; set "
                                    "DialogueFormat.eot to the token that closes the template's turns.")  # fmt: skip
            spans.append((start, end + len(fmt.eot)))
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    weights = [int(any(a < e and b > s for s, e in spans)) for a, b in encoded["offset_mapping"]]
    return list(encoded["input_ids"]), weights


# --- seqio ------------------------------------------------------------------------------------


def jsonl_source(files: Mapping[str, str | Callable[[], str]]) -> seqio.DataSource:
    """A seqio source over JSONL files, one per split (a path, or a function giving it when the
    split is read, e.g. from gin): each example is `conversation`, the checked messages as JSON.
    Every line is checked when the split is read, so a bad line fails with its file and line
    before anything trains."""

    def load(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
        del shuffle_files, seed  # one file per split; seqio shuffles examples downstream
        path = files[split]() if callable(files[split]) else files[split]
        texts = [to_json(c) for c in read_conversations(path)]
        return tf.data.Dataset.from_tensor_slices({"conversation": texts})

    return seqio.FunctionDataSource(load, splits=tuple(files))


def record_to_conversation(key: str = "messages") -> Callable[[tf.data.Dataset], tf.data.Dataset]:
    """A preprocessor for other sources (TFDS, any seqio source): the string feature `key`
    holds a JSON record in one of the three shapes (or its list of messages) -> `conversation`."""

    def check(encoded: bytes) -> bytes:
        record = json.loads(encoded)
        return to_json(parse_conversation(record if isinstance(record, dict) else {"messages": record}, f"feature {key!r}")).encode()

    @seqio.map_over_dataset
    def preprocess(example):
        text = tf.numpy_function(check, [example[key]], tf.string, stateful=False)
        text.set_shape([])
        return {"conversation": text}

    return preprocess


def tokenize_dialogue(vocabulary: HFVocabulary, fmt: DialogueFormat, turns: Turns):
    """The seqio preprocessor: `conversation` -> `targets` and `loss_mask`, trimmed to the
    run's length (LIMA trims at 2,048 tokens); examples left with no trained token are dropped."""

    def render_one(encoded: bytes) -> tuple[np.ndarray, np.ndarray]:
        ids, weights = render(from_json(encoded), vocabulary.tokenizer, fmt, turns)
        return np.asarray(ids, np.int32), np.asarray(weights, np.int32) + 1

    def preprocess(ds: tf.data.Dataset, sequence_length: Mapping[str, int] | None = None) -> tf.data.Dataset:
        length = (sequence_length or {}).get("targets")

        def tokenize(example):
            ids, mask = tf.numpy_function(render_one, [example["conversation"]], (tf.int32, tf.int32), stateful=False)
            if length:
                ids, mask = ids[:length], mask[:length]
            return {"targets": tf.ensure_shape(ids, [None]), "loss_mask": tf.ensure_shape(mask, [None])}

        return ds.map(tokenize, num_parallel_calls=tf.data.AUTOTUNE).filter(lambda ex: tf.reduce_any(ex["loss_mask"] == 2))

    preprocess.dialogue = (vocabulary, fmt, turns)  # read by `dialogue_stats` and the trainer
    return preprocess


def add_dialogue_task(
    name: str,
    source: seqio.DataSource | Mapping[str, str],
    vocabulary: HFVocabulary,
    *,
    format: DialogueFormat = DialogueFormat(),  # noqa: A002  (the public name users write)
    turns: Turns = "all",
    preprocessors: Sequence[Callable] = (),
) -> seqio.Task:
    """Registers a dialogue task. `source`: {split: JSONL path} or any seqio source whose
    `preprocessors` end with a `conversation` feature (e.g. `record_to_conversation("messages")`).
    `turns`: train every reply ("all") or the last one only ("last"); per-message
    `"train": false` always holds."""
    if turns not in ("all", "last"):
        raise DialogueError(f"task {name!r}: turns={turns!r}; use 'all' or 'last'.")
    if isinstance(source, Mapping):
        source = jsonl_source(source)
    return seqio.TaskRegistry.add(
        name,
        source=source,
        preprocessors=[*preprocessors, tokenize_dialogue(vocabulary, format, turns)],
        output_features={
            "targets": seqio.Feature(vocabulary, add_eos=False),
            "loss_mask": seqio.Feature(seqio.PassThroughVocabulary(3), add_eos=False),
        },
    )


def dialogue_of(task: seqio.Task) -> tuple[HFVocabulary, DialogueFormat, Turns] | None:
    """(vocabulary, format, turns) of a dialogue task; None for other tasks."""
    return next((getattr(p, "dialogue") for p in task.preprocessors if hasattr(p, "dialogue")), None)


@dataclasses.dataclass(frozen=True)
class DialogueStats:
    conversations: int
    trimmed: int  # longer than the length: cut
    dropped: int  # no trained token left after the cut
    trained_tokens: int

    def metrics(self, prefix: str = "data/") -> dict[str, float]:
        return {prefix + k: float(v) for k, v in dataclasses.asdict(self).items()}


def dialogue_stats(task: seqio.Task, split: str, length: int) -> DialogueStats:
    """Counts a split's conversations, how many the length trims and how many it empties."""
    vocabulary, fmt, turns = dialogue_of(task)
    counts: collections.Counter = collections.Counter()
    for example in _conversations(task, split):
        ids, weights = render(from_json(example["conversation"]), vocabulary.tokenizer, fmt, turns)
        kept = sum(weights[:length])
        counts.update(conversations=1, trimmed=len(ids) > length, dropped=kept == 0, trained_tokens=kept)
    return DialogueStats(**{f.name: int(counts[f.name]) for f in dataclasses.fields(DialogueStats)})


def _conversations(task: seqio.Task, split: str) -> Iterable[dict]:
    ds = task.source.get_dataset(split, shuffle=False)
    for step in task.preprocessors:
        if hasattr(step, "dialogue"):
            break
        ds = step(ds)
    return ds.as_numpy_iterator()


def check_conversations(name: str, task_feature_lengths: Mapping[str, int]) -> tuple[DialogueFormat, dict[str, float]]:
    """The dialogue tasks' rendering, and their training split counted (conversations trimmed
    to the `targets` length, dropped for want of a trained token): a task that keeps none is an error."""
    formats, totals, length = set(), {}, task_feature_lengths["targets"]
    for task in seqio.get_subtasks(seqio.get_mixture_or_task(name)):
        formats.add(dialogue_of(task)[1])
        stats = dialogue_stats(task, "train", length)
        if stats.dropped == stats.conversations:
            raise DialogueError(
                f"task {task.name!r}: none of its {stats.conversations} conversations has a trained token within "
                f"{length} tokens (prompts longer than the length, or no assistant reply to learn). Raise "
                "TASK_FEATURE_LENGTHS['targets'], or train on more replies (turns='all', no train=false)."
            )
        if stats.dropped or stats.trimmed:
            logging.warning("%s: %d of %d conversations trimmed to %d tokens, %d dropped (no reply left to train)",
                            task.name, stats.trimmed, stats.conversations, length, stats.dropped)  # fmt: skip
        totals = {k: totals.get(k, 0.0) + v for k, v in stats.metrics().items()}
    if len(formats) > 1:
        raise DialogueError(f"{name!r} mixes dialogue formats ({formats}); a model chats in one.")
    return formats.pop(), totals


class DialogueFeatureConverter(seqio.FeatureConverter):
    """`targets` + `loss_mask` -> seqio's decoder features (see `data.pipeline`): the loss
    weights are the mask's trained tokens; packing keeps conversations apart (segment ids,
    positions that restart). Task feature lengths name `targets` only; the mask follows it."""

    TASK_FEATURES = {
        "targets": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
        "loss_mask": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
    }
    MODEL_FEATURES = {
        "decoder_target_tokens": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
        "decoder_input_tokens": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
        "decoder_loss_weights": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
    }
    PACKING_FEATURE_DTYPES = {"decoder_segment_ids": tf.int32, "decoder_positions": tf.int32}

    def __call__(self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]) -> tf.data.Dataset:
        length = task_feature_lengths["targets"]
        return super().__call__(ds, {"targets": length, "loss_mask": length})

    def _convert_features(self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]) -> tf.data.Dataset:
        ds = self._pack_or_pad(ds, task_feature_lengths)

        def convert(features):
            segments = features.get("targets_segment_ids")
            out = {
                "decoder_target_tokens": features["targets"],
                "decoder_input_tokens": seqio.utils.make_autoregressive_inputs(features["targets"], sequence_id=segments),
                "decoder_loss_weights": self._loss_weights(features["loss_mask"]),
            }
            if self.pack:
                out["decoder_segment_ids"] = segments
                out["decoder_positions"] = features["targets_positions"]
            return out

        return ds.map(convert, num_parallel_calls=tf.data.AUTOTUNE)

    @staticmethod
    def _loss_weights(mask: tf.Tensor) -> tf.Tensor:
        return tf.cast(mask == 2, tf.int32)

    def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]) -> dict[str, int]:
        length = task_feature_lengths["targets"]
        lengths = {k: length for k in self.MODEL_FEATURES}
        if self.pack:
            lengths.update({k: length for k in self.PACKING_FEATURE_DTYPES})
        return lengths


def is_dialogue(name: str) -> bool:
    """Whether a registered task or mixture is made of dialogue tasks (seqio refuses a mixture
    of tasks with different features, so its first task tells)."""
    return dialogue_of(seqio.get_subtasks(seqio.get_mixture_or_task(name))[0]) is not None


# Where a run records how its conversations were rendered, for `flanjax chat` and sampling.
FORMAT_FILE = "dialogue.json"


def write_format(run_dir: str, fmt: DialogueFormat) -> None:
    paths.makedirs(run_dir)
    with paths.open(os.path.join(run_dir, FORMAT_FILE), "w") as f:
        json.dump(dataclasses.asdict(fmt), f, indent=2)


def read_format(run_dirs: Iterable[str]) -> DialogueFormat | None:
    """The dialogue format of the first of `run_dirs` (a run and its ancestors) that recorded one."""
    record = paths.first_json(run_dirs, FORMAT_FILE)
    return None if record is None else DialogueFormat(**record)
