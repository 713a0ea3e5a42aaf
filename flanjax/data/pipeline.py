"""seqio task/mixture -> per-process batches of decoder-only model features.

Feature vocabulary (seqio's DecoderFeatureConverter, one row per packed sequence):

    decoder_target_tokens   the tokens to predict: inputs then targets, packed
    decoder_input_tokens    the same shifted right by one (0 starts every segment)
    decoder_loss_weights    1 on target tokens only: the inputs act as a prefix
    decoder_segment_ids     which packed example a position belongs to (0 = padding)
    decoder_positions       position within its example
    decoder_causal_attention  1 on the prefix (+1 position), for prefix-LM models

Unpacked datasets get segment ids and positions filled in, so every batch has the same keys.

Each process reads its own shard (`seqio.ShardInfo`). The stream is deterministic for a
seed, so its position (the number of batches handed out) is the whole of its state: a
resumed run rebuilds the stream and skips what was consumed.
"""

from __future__ import annotations

import atexit
import dataclasses
import difflib
import logging
import weakref
from collections.abc import Iterator, Mapping

import jax
import numpy as np
import seqio
import tensorflow as tf

from flanjax.data.dialogue import DialogueFeatureConverter, is_dialogue
from flanjax.data.weighted import WeightedFeatureConverter, is_weighted
from flanjax.errors import FlanjaxError


class TaskNotFoundError(FlanjaxError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def get_task_or_mixture(name: str) -> seqio.Task | seqio.Mixture:
    """The registered task or mixture `name`; an unknown name gets the closest matches."""
    provider = seqio.get_mixture_or_task(name) if _registered(name) else None
    if provider is None:
        known = sorted(set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names()))
        close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise TaskNotFoundError(
            f"no seqio task or mixture named {name!r}.{hint} Tasks register when their module "
            "is imported: import it in your gin file (e.g. `import tasks.quickstart`); "
            "`flanjax tasks list` shows what is registered."
        )
    return provider


def text_examples(task_name: str, split: str = "train", n: int = 5, *, whole_examples: bool = False) -> list[dict]:
    """The first `n` examples of a task as text: its preprocessing up to tokenization.

    A rank-classification task makes a row per option of each example (`idx`: example,
    option); `whole_examples` returns every row of its first `n` examples, not `n` rows.
    """
    task = get_task_or_mixture(task_name)
    if not isinstance(task, seqio.Task):
        raise TaskNotFoundError(f"{task_name!r} is a mixture; name one of its tasks: {', '.join(t.name for t in task.tasks)}.")
    if split not in task.splits:
        raise TaskNotFoundError(f"task {task_name!r} has no split {split!r}; it has {', '.join(task.splits)}.")
    ds = task.source.get_dataset(split, shuffle=False)
    for step in task.preprocessors:
        if step in _TOKENIZERS:
            break
        ds = step(ds)
    if whole_examples and "is_correct" in ds.element_spec and "idx" in ds.element_spec:
        return list(ds.take_while(lambda row: row["idx"][0] < n).as_numpy_iterator())
    return list(ds.take(n).as_numpy_iterator())


_TOKENIZERS = (seqio.preprocessors.tokenize, seqio.preprocessors.tokenize_and_append_eos)


def decoder_prompt_tf(ids: tf.Tensor, prompt_len: int) -> tf.Tensor:
    """`flanjax.decode.decoder_prompt` in a tf.data map: 0, then the last `prompt_len - 1` ids."""
    return tf.concat([[0], ids[-(prompt_len - 1) :]], axis=0)


def task_prompts(name: str, split: str, n: int) -> tuple[list[str], list[str], seqio.Vocabulary]:
    """Up to `n` (prompt, reference) texts of a task, or spread over a mixture's tasks."""
    provider = get_task_or_mixture(name)
    tasks = seqio.get_subtasks(provider)
    prompts, references = [], []
    for i, task in enumerate(tasks):
        share = n // len(tasks) + (i < n % len(tasks))
        for ex in text_examples(task.name, split, share):
            prompts.append(ex["inputs"].decode())
            references.append(ex.get("targets", b"").decode())
    return prompts, references, tasks[0].output_features["inputs"].vocabulary


def _registered(name: str) -> bool:
    return name in seqio.TaskRegistry.names() or name in seqio.MixtureRegistry.names()


class VocabularyMismatchError(FlanjaxError, ValueError):
    pass


def check_vocabulary(name: str, model_vocab_size: int) -> seqio.Vocabulary:
    """Every feature's vocabulary must fit the model's embedding table, and all of a mixture's
    tasks must tokenize alike: returns that one vocabulary."""
    provider = get_task_or_mixture(name)
    tasks = provider.tasks if isinstance(provider, seqio.Mixture) else [provider]
    found: dict = {}  # token mapping -> (task name, vocabulary)
    for task in tasks:
        for feature_name, feature in task.output_features.items():
            if feature_name not in ("inputs", "targets"):  # not tokens (a dialogue task's loss_mask)
                continue
            size = feature.vocabulary.vocab_size
            if size > model_vocab_size:
                raise VocabularyMismatchError(
                    f"task {task.name!r} feature {feature_name!r} uses a vocabulary of {size} "
                    f"tokens but the model has vocab_size={model_vocab_size}; raise the model's "
                    "vocab_size (e.g. --gin.transformer.TransformerConfig.vocab_size=...) to at "
                    "least that."
                )
            key = feature.vocabulary.fingerprint() if hasattr(feature.vocabulary, "fingerprint") else feature.vocabulary
            found.setdefault(key, (task.name, feature.vocabulary))
    if len(found) > 1:
        (a, va), (b, vb) = list(found.values())[:2]
        raise VocabularyMismatchError(
            f"{name!r} mixes tokenizers: task {a!r} uses {getattr(va, 'path', va)} and task {b!r} "
            f"{getattr(vb, 'path', vb)}. One model reads one tokenizer: register the tasks with the same vocabulary."
        )
    return next(iter(found.values()))[1]


def decoder_converter(pack: bool, name: str | None = None) -> seqio.FeatureConverter:
    """seqio's decoder converter (loss on targets), or for dialogue tasks `name` the converter
    of their per-token loss masks, or for weighted tasks (`data.weighted`) theirs."""
    if name is not None and is_dialogue(name):
        return DialogueFeatureConverter(pack=pack)
    if name is not None and is_weighted(seqio.get_subtasks(get_task_or_mixture(name))[0]):
        return WeightedFeatureConverter(pack=pack)
    return seqio.DecoderFeatureConverter(pack=pack, loss_on_targets_only=True)


def steps_per_epoch(name: str, task_feature_lengths: Mapping[str, int], pack: bool, batch_size: int, split: str = "train") -> tuple[int, int]:
    """(rows, steps of `batch_size` rows) in one pass over a split (rows: examples, or packed
    rows), counted by reading the data once."""
    once = SeqioBatches(name, task_feature_lengths, 1, split=split, shuffle=False, pack=pack, num_epochs=1, shard_index=0, num_shards=1)
    rows = sum(1 for _ in once)
    return rows, max(rows // batch_size, 1)


def model_feature_lengths(task_feature_lengths: Mapping[str, int], pack: bool) -> dict[str, int]:
    """Length of every feature a batch holds (the keys `SeqioBatches` yields)."""
    lengths = dict(decoder_converter(pack).get_model_feature_lengths(task_feature_lengths))
    width = lengths["decoder_target_tokens"]
    return {**lengths, "decoder_segment_ids": width, "decoder_positions": width}


def _fill_unpacked(features: dict) -> dict:
    if "decoder_segment_ids" not in features:
        length = tf.shape(features["decoder_target_tokens"])[-1]
        features["decoder_segment_ids"] = tf.cast(features["decoder_target_tokens"] != 0, tf.int32)
        features["decoder_positions"] = tf.broadcast_to(
            tf.range(length, dtype=tf.int32), tf.shape(features["decoder_target_tokens"])
        )
    return features


@dataclasses.dataclass(eq=False)
class SeqioBatches:
    """An endless (or `num_epochs`) iterator of this process's share of each global batch."""

    mixture_or_task_name: str
    task_feature_lengths: Mapping[str, int] | None  # None: untrimmed (the subclass shapes rows)
    batch_size: int  # rows per process
    split: str = "train"
    seed: int = 0
    shuffle: bool = True
    pack: bool = True
    num_epochs: int | None = None  # None: repeat forever
    shard_index: int | None = None  # default: this JAX process
    num_shards: int | None = None
    converter: seqio.FeatureConverter | None = None  # None: `decoder_converter`'s for the task

    def __post_init__(self):
        get_task_or_mixture(self.mixture_or_task_name)  # fail early with suggestions
        self.position = 0
        self._iterator: Iterator | None = None
        _OPEN.add(self)

    def dataset(self) -> tf.data.Dataset:
        shard = seqio.ShardInfo(
            index=jax.process_index() if self.shard_index is None else self.shard_index,
            num_shards=jax.process_count() if self.num_shards is None else self.num_shards,
        )
        ds = seqio.get_dataset(
            self.mixture_or_task_name,
            task_feature_lengths=dict(self.task_feature_lengths) if self.task_feature_lengths else None,
            feature_converter=self.feature_converter(),
            dataset_split=self.split,
            shuffle=self.shuffle,
            num_epochs=self.num_epochs,
            shard_info=shard,
            seed=self.seed,
            verbose=False,
        )
        ds = ds.map(self.model_features, num_parallel_calls=tf.data.AUTOTUNE)
        ds = ds.batch(self.batch_size, drop_remainder=True)
        return ds.skip(self.position).prefetch(tf.data.AUTOTUNE)

    def element_spec(self) -> dict[str, jax.ShapeDtypeStruct]:
        """Shapes and dtypes of this process's batches. Builds the pipeline, so a missing
        dataset fails here, before a trainer compiles anything."""
        spec = self.dataset().element_spec
        return {k: jax.ShapeDtypeStruct(tuple(s.shape), s.dtype.as_numpy_dtype) for k, s in spec.items()}

    # Subclasses for other models (e.g. the reward model's comparisons) override these two.
    def feature_converter(self) -> seqio.FeatureConverter:
        return self.converter or decoder_converter(self.pack, self.mixture_or_task_name)

    def model_features(self, features: dict) -> dict:
        return _fill_unpacked(features)

    def __iter__(self) -> SeqioBatches:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._iterator is None:
            self._iterator = self.dataset().as_numpy_iterator()
        batch = next(self._iterator)
        self.position += 1
        return batch

    # Checkpointed beside the model (see flanjax.rundir.checkpoint).
    def get_state(self) -> dict:
        return {"source": self.mixture_or_task_name, "split": self.split, "seed": self.seed, "position": self.position}

    def set_state(self, state: Mapping) -> None:
        saved = {k: state[k] for k in ("source", "split", "seed") if k in state}
        ours = {k: v for k, v in self.get_state().items() if k in saved}
        if saved != ours:  # another stream: a saved position means nothing in it
            logging.warning("data stream changed since the checkpoint (%s -> %s): starting it from the beginning", saved, ours)
            self.position = 0
        else:
            self.position = int(state["position"])
        self._iterator = None

    def close(self) -> None:
        self._iterator = None


# A tf.data prefetch thread that is still calling into Python (the tokenizer runs in a
# tf.numpy_function) when the interpreter finalizes deadlocks the exit: stop them first.
_OPEN: weakref.WeakSet[SeqioBatches] = weakref.WeakSet()
atexit.register(lambda: [b.close() for b in list(_OPEN)])
