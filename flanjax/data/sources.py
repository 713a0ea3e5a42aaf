"""seqio data sources over TensorFlow Datasets, with FLAN's split rule.

FLAN trains on the first 30,000 examples of a dataset's train split and keeps 200 for
validation. Where the official validation split serves as the test split (its test labels
are hidden, as in GLUE), the 200 are carved from the front of train, so they never overlap
the training examples whatever the split's size:

    validation="validation"  train = train[:30000]       validation = validation[:200]
    validation="train"       train = train[200:30200]    validation = train[:200]

A small dataset gives at most a fifth of its train split to validation (CB: 50 of 250), so
that it keeps something to train on. A dataset with a train split only (ParaCrawl, Opinion
Abstracts) also gives its last examples to the test split (`test_from_train`):

    train = train[200:-N] (its first 30000)    validation = train[:200]    test = train[-N:]

A dataset may read several TFDS builders (ANLI's three rounds, ARC's two sets): each split
interleaves them round-robin before the cap, so every builder is represented.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import seqio
import tensorflow as tf
import tensorflow_datasets as tfds

TRAIN_EXAMPLES = 30_000
VALIDATION_EXAMPLES = 200


@dataclasses.dataclass(frozen=True)
class Read:
    """One TFDS read: builder `name` ("name/config:version") and a split string ("train[:100]")."""

    name: str
    split: str


class TfdsSource(seqio.FunctionDataSource):
    """A dataset whose splits each read one or more TFDS builders, round-robin, up to a cap.

    `num_train_examples` is the size of the train split as published (TFDS catalogue); it
    gives `seqio.mixing_rate_num_examples` a rate before the data is downloaded (and under
    `tfds.testing.mock_data`). Once the dataset is prepared, TFDS's own count is used.
    """

    def __init__(self, splits: Mapping[str, Sequence[Read]], limits: Mapping[str, int] | None = None, num_train_examples: int | None = None):
        self.reads = {split: tuple(reads) for split, reads in splits.items()}
        self.limits = dict(limits or {})
        self.num_train_examples = num_train_examples
        self._sizes: dict[str, int | None] = {}
        super().__init__(self._load, splits=tuple(self.reads), num_input_examples=None)

    def __str__(self) -> str:
        names = dict.fromkeys(read.name for reads in self.reads.values() for read in reads)
        return "tfds:" + ",".join(names)

    def _load(self, split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
        read_config = tfds.ReadConfig(shuffle_seed=seed)
        datasets = [
            tfds.load(read.name, split=read.split, shuffle_files=shuffle_files, read_config=read_config)
            for read in self.reads[split]
        ]
        if len(datasets) == 1:
            ds = datasets[0]
        else:
            datasets = [d.map(_common_features(datasets)) for d in datasets]
            order = tf.data.Dataset.range(len(datasets)).repeat()
            ds = tf.data.Dataset.choose_from_datasets(datasets, order, stop_on_empty_dataset=False)
        return ds.take(self.limits[split]) if split in self.limits else ds

    def num_input_examples(self, split: str) -> int | None:
        if split not in self._sizes:  # mixtures ask once per task per rate lookup
            self._sizes[split] = self._count(split)
        return self._sizes[split]

    def _count(self, split: str) -> int | None:
        try:
            total = sum(tfds.builder(read.name).info.splits[read.split].num_examples for read in self.reads[split])
        except (KeyError, ValueError, tfds.core.registered.DatasetNotFoundError):
            # Not prepared (or mocked): TFDS knows no split sizes yet.
            if split != "train" or self.num_train_examples is None:
                return None
            total = self.num_train_examples
        return min(total, self.limits.get(split, total))


def _common_features(datasets: Sequence[tf.data.Dataset]):
    """Builders of one dataset may differ in extra features; keep the ones they share."""
    shared = set.intersection(*(set(d.element_spec) for d in datasets))
    return lambda example: {k: v for k, v in example.items() if k in shared}


def flan_source(
    *names: str,
    validation: str = "validation",
    test: str | Sequence[str] | None = None,
    train: str = "train",
    test_from_train: int | None = None,
    num_train_examples: int | None = None,
) -> TfdsSource:
    """FLAN's splits over TFDS builders `names` (see the module docstring).

    `validation`: "validation" to take the 200 from the official validation split, or
    "train" to carve them from train (when the official validation split is the test split).
    `test`: the split(s) evaluated on; default the official validation split when it was not
    used for validation, else "test". `train`: the split trained on (StoryCloze trains on its
    validation split). `test_from_train`: for a dataset with a train split only, the number of
    its last examples that form the test split (validation is then carved from the front).
    `num_train_examples`: the published size of the train split, for mixing rates.
    """
    held_out = test_from_train or 0
    if validation == "train" or held_out:
        carved = VALIDATION_EXAMPLES
        if num_train_examples is not None:  # a small dataset keeps most of its examples for training
            carved = min(carved, num_train_examples // 5)
        end = f"-{held_out}" if held_out else carved + TRAIN_EXAMPLES
        train_slice, validation_split = f"{train}[{carved}:{end}]", f"{train}[:{carved}]"
        test = f"{train}[-{held_out}:]" if held_out else test or "validation"
    else:
        train_slice, validation_split = f"{train}[:{TRAIN_EXAMPLES}]", f"{validation}[:{VALIDATION_EXAMPLES}]"
        test = test or "test"
        carved = 0
    tests = (test,) if isinstance(test, str) else tuple(test)
    return TfdsSource(
        {
            "train": [Read(n, train_slice) for n in names],
            "validation": [Read(n, validation_split) for n in names],
            "test": [Read(n, t) for n in names for t in tests],
        },
        limits={"train": TRAIN_EXAMPLES, "validation": VALIDATION_EXAMPLES},
        num_train_examples=None if num_train_examples is None else num_train_examples - carved - held_out,
    )
