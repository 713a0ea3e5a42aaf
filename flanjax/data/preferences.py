"""Preference data: comparisons of responses to one prompt, as JSONL files and seqio tasks.

One comparison a line, the responses best first (InstructGPT's K-wise rankings, K >= 2):

    {"prompt": "...", "responses": ["best", "second", "worst"]}
    {"prompt": "...", "responses": ["a", "b", "c"], "ranks": [0, 1, 1]}   ties: equal ranks
    {"prompt": "...", "chosen": "...", "rejected": "...", "margin": 1.5}   a plain pair

`ranks` (0 = best) order the responses when given; tied responses form no pair, and a task
refuses them unless it allows ties. `margin` asks the reward model to separate the pair by
at least that much. `source` ("rubric", "judge", "human", ...) says who labelled it.

`add_preference_task(name, files)` registers a seqio task over such files; its examples have
the prompt as `inputs` and the responses as `responses` ([K] strings, tokenized to [K, n]),
plus `ranks` and `margin`. `PreferenceBatches` turns it into fixed-shape batches for the
reward model: every response appended to its prompt, K padded to `max_responses`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import seqio
import tensorflow as tf

from flanjax import paths
from flanjax.data.jsonl import read_jsonl
from flanjax.data.pipeline import SeqioBatches, decoder_prompt_tf, get_task_or_mixture
from flanjax.errors import FlanjaxError


class PreferenceDataError(FlanjaxError, ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class Comparison:
    prompt: str
    responses: tuple[str, ...]  # best first
    ranks: tuple[int, ...]  # 0 = best; non-decreasing; equal = tied
    margin: float = 0.0
    source: str = ""

    def to_json(self) -> dict:
        out = {"prompt": self.prompt, "responses": list(self.responses), "ranks": list(self.ranks)}
        if self.margin:
            out["margin"] = self.margin
        if self.source:
            out["source"] = self.source
        return out

    @property
    def num_pairs(self) -> int:
        """Ordered (better, worse) pairs: ties make none."""
        r = np.asarray(self.ranks)
        return int(np.sum(r[:, None] < r[None, :]))


def comparison(prompt: str, responses: Sequence[str], ranks: Sequence[int] | None = None, *, margin: float = 0.0,
               source: str = "", allow_ties: bool = True, where: str = "comparison") -> Comparison:  # fmt: skip
    """A validated comparison, its responses sorted best first by `ranks` (default: as given)."""
    responses = list(responses)
    if len(responses) < 2:
        raise PreferenceDataError(
            f"{where}: a comparison needs at least 2 responses to one prompt, got {len(responses)}. "
            "Drop it, or sample more responses for the prompt."
        )
    if not all(isinstance(r, str) for r in responses) or not isinstance(prompt, str):
        raise PreferenceDataError(f"{where}: the prompt and every response must be strings.")
    ranks = list(range(len(responses))) if ranks is None else [int(r) for r in ranks]
    if len(ranks) != len(responses):
        raise PreferenceDataError(f"{where}: {len(ranks)} ranks for {len(responses)} responses; give one rank per response.")
    if not allow_ties and len(set(ranks)) < len(ranks):
        raise PreferenceDataError(
            f"{where}: tied ranks {ranks}, but this task needs a strict order. Break the tie, drop "
            "one of the tied responses, or register the task with allow_ties=True (tied pairs "
            "then add nothing to the loss)."
        )
    if len(set(ranks)) == 1:
        raise PreferenceDataError(f"{where}: every response has the same rank {ranks[0]}, so there is no preference.")
    order = sorted(range(len(ranks)), key=lambda i: ranks[i])
    low = min(ranks)
    return Comparison(prompt, tuple(responses[i] for i in order), tuple(ranks[i] - low for i in order), float(margin), source)


def parse(record: Mapping, *, allow_ties: bool = True, where: str = "comparison") -> Comparison:
    if not isinstance(record, Mapping) or "prompt" not in record:
        raise PreferenceDataError(f'{where}: expected an object with "prompt" and "responses" (or "chosen" and "rejected").')
    if "chosen" in record or "rejected" in record:
        if "chosen" not in record or "rejected" not in record:
            raise PreferenceDataError(f'{where}: a pair needs both "chosen" and "rejected".')
        responses, ranks = [record["chosen"], record["rejected"]], None
    elif "responses" in record:
        responses, ranks = record["responses"], record.get("ranks")
    else:
        raise PreferenceDataError(f'{where}: no "responses" (or "chosen"/"rejected") field.')
    return comparison(record["prompt"], responses, ranks, margin=record.get("margin", 0.0),
                      source=record.get("source", ""), allow_ties=allow_ties, where=where)  # fmt: skip


def read_comparisons(path: str, *, allow_ties: bool = True) -> Iterator[Comparison]:
    """The comparisons of a JSONL file, each validated; errors name the file and line."""
    if not paths.exists(path):
        raise PreferenceDataError(f"preference file {path} does not exist; write one with `flanjax label`.")
    for where, record in read_jsonl(path, PreferenceDataError):
        yield parse(record, allow_ties=allow_ties, where=where)


def write_comparisons(path: str, comparisons: Sequence[Comparison]) -> str:
    """Writes atomically (locally a temporary file renamed; a remote object appears only whole),
    so a kill never leaves half a file."""
    paths.makedirs(os.path.dirname(paths.abspath(path)))
    paths.write_atomic(path, "".join(json.dumps(c.to_json()) + "\n" for c in comparisons))
    return path


# --- seqio -----------------------------------------------------------------------------------


def add_preference_task(
    name: str, files: Mapping[str, str], vocabulary: seqio.Vocabulary, *, allow_ties: bool = False
) -> seqio.Task:
    """Registers (or re-registers) seqio task `name` over preference JSONL `files` ({split: path})."""

    def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
        del shuffle_files, seed  # one file a split; seqio shuffles examples downstream
        rows = list(read_comparisons(files[split], allow_ties=allow_ties))
        if not rows:
            raise PreferenceDataError(f"{files[split]} holds no comparisons.")
        return tf.data.Dataset.from_generator(
            lambda: ({"inputs": c.prompt, "responses": list(c.responses), "ranks": list(c.ranks),
                      "margin": c.margin} for c in rows),  # fmt: skip
            output_signature={
                "inputs": tf.TensorSpec((), tf.string),
                "responses": tf.TensorSpec((None,), tf.string),
                "ranks": tf.TensorSpec((None,), tf.int32),
                "margin": tf.TensorSpec((), tf.float32),
            },
        ).apply(tf.data.experimental.assert_cardinality(len(rows)))

    if name in seqio.TaskRegistry.names():
        seqio.TaskRegistry.remove(name)
    return seqio.TaskRegistry.add(
        name,
        source=seqio.FunctionDataSource(dataset_fn, splits=tuple(files)),
        preprocessors=[seqio.preprocessors.tokenize],
        output_features={
            "inputs": seqio.Feature(vocabulary, add_eos=False),
            "responses": seqio.Feature(vocabulary, add_eos=True, rank=2),
        },
    )


def _to_rows(ex: Mapping[str, tf.Tensor], prompt_len: int, response_len: int, max_responses: int, eos_id: int):
    """One example -> [max_responses, prompt_len + response_len] rows of prompt + response + EOS.

    The prompt is laid out as the SFT model saw it (`decoder_prompt_tf`: 0, then its last tokens,
    those next to the response); a response keeps its first tokens; responses beyond
    `max_responses` (the worst) are dropped."""
    prompt = decoder_prompt_tf(ex["inputs"], prompt_len)
    responses = ex["responses"][:max_responses]
    k = tf.shape(responses)[0]
    ragged = tf.RaggedTensor.from_tensor(responses, padding=0)  # encode_tf pads with 0
    with_eos = tf.concat([ragged, tf.fill([k, 1], eos_id)], axis=1)[:, :response_len]
    rows = tf.concat([tf.tile(prompt[None], [k, 1]), with_eos], axis=1)
    width = prompt_len + response_len
    pad_k = max_responses - k
    features = {
        "tokens": tf.pad(rows.to_tensor(shape=[k, width]), [[0, pad_k], [0, 0]]),
        "lengths": tf.pad(tf.cast(rows.row_lengths(), tf.int32), [[0, pad_k]]),
        "ranks": tf.pad(ex["ranks"][:max_responses], [[0, pad_k]], constant_values=np.iinfo(np.int32).max),
        "margin": ex["margin"],
        "prompt_length": tf.shape(prompt)[0],
    }
    shapes = {"tokens": [max_responses, width], "lengths": [max_responses], "ranks": [max_responses], "margin": [],
              "prompt_length": []}  # fmt: skip
    return {name: tf.ensure_shape(v, shapes[name]) for name, v in features.items()}  # static: trainers compile ahead


@dataclasses.dataclass(eq=False)
class PreferenceBatches(SeqioBatches):
    """Batches of comparisons for the reward model (`rlhf.reward`), `batch_size` prompts each:

        tokens           [b, K, P + R]  0, prompt, response, EOS; 0-padded
        lengths          [b, K]         tokens in each row (0: no response in this slot)
        ranks            [b, K]         0 = best; int32 max in empty slots
        margin           [b]
        prompt_length    [b]            tokens before the responses (the 0 and the prompt)

    Pass `task_feature_lengths=None`: P is `prompt_len`, R `response_len` (EOS included), K
    `max_responses`."""

    prompt_len: int = 64
    response_len: int = 64
    max_responses: int = 4

    def feature_converter(self) -> seqio.FeatureConverter:
        return seqio.PassThroughFeatureConverter()  # rows are built in model_features

    def model_features(self, features: dict) -> dict:
        task = get_task_or_mixture(self.mixture_or_task_name)
        eos = next(iter(task.output_features.values())).vocabulary.eos_id  # a mixture: its tasks share it
        return _to_rows(features, self.prompt_len, self.response_len, self.max_responses, eos)

