"""check_datasets: every TFDS dataset of a task or mixture is there before anything compiles."""

from __future__ import annotations

import uuid

import pytest
import seqio
import tensorflow_datasets as tfds

from flanjax.data import availability
from flanjax.data.availability import DatasetNotAvailableError, check_datasets
from flanjax.data.sources import flan_source
from flanjax.errors import FlanjaxError

FEATURES = {"targets": seqio.Feature(seqio.PassThroughVocabulary(size=64), add_eos=False)}
ABSENT = "no_such_dataset_xyz:1.0.0"


@pytest.fixture
def register():
    """Registers tasks (a name -> source) and a mixture of them under unique names; removes them after."""
    added = []

    def add(**sources) -> str:
        suffix = uuid.uuid4().hex[:8]
        names = [f"{name}_{suffix}" for name in sources]
        for name, source in zip(names, sources.values()):
            seqio.TaskRegistry.add(name, source=source, preprocessors=[], output_features=FEATURES)
            added.append((seqio.TaskRegistry, name))
        seqio.MixtureRegistry.add(f"mix_{suffix}", names, default_rate=1.0)
        added.append((seqio.MixtureRegistry, f"mix_{suffix}"))
        return suffix

    yield add
    for registry, name in reversed(added):
        registry.remove(name)


def test_an_absent_dataset_is_named_with_its_task_and_fix_under_mock_data(register):
    suffix = register(
        mocked=seqio.TfdsDataSource("glue/rte:2.0.0"),
        absent=seqio.TfdsDataSource(ABSENT),
        typo=seqio.TfdsDataSource("imdb_review/plain_text:1.0.0"),
    )
    with tfds.testing.mock_data(num_examples=2), pytest.raises(DatasetNotAvailableError) as error:
        check_datasets(f"mix_{suffix}")
    message = str(error.value)
    assert isinstance(error.value, FlanjaxError)  # the CLI prints it without a traceback
    assert f"'mix_{suffix}' reads 2 TFDS dataset(s) that cannot be read" in message
    assert f"- {ABSENT} (read by absent_{suffix}): TFDS has no dataset of that name" in message
    assert "`tfds build path/to/its_dataset_builder.py" in message
    assert f"- imdb_review/plain_text:1.0.0 (read by typo_{suffix})" in message
    assert "Did you mean: imdb_reviews" in message
    assert "glue/rte" not in message  # mocked: nothing to prepare


def test_an_unprepared_dataset_offline_gets_tfds_build_and_its_data_dir(register, tmp_path, monkeypatch):
    monkeypatch.setattr(availability, "_network_reachable", lambda: False)
    suffix = register(
        rte=seqio.TfdsDataSource("glue/rte:2.0.0", tfds_data_dir=str(tmp_path)),
        cloze=seqio.TfdsDataSource("story_cloze/2016:1.0.0", tfds_data_dir=str(tmp_path)),
    )
    with pytest.raises(DatasetNotAvailableError) as error:
        check_datasets(f"mix_{suffix}")
    message = str(error.value)
    assert f"- glue/rte:2.0.0 (read by rte_{suffix}): not prepared in {tmp_path}, and no network" in message
    assert f"tfds build glue/rte:2.0.0 --data_dir={tmp_path}" in message
    # A manual download: where from, and where TFDS takes the files.
    assert "rochester.edu" in message
    assert f"tfds build story_cloze/2016:1.0.0 --manual_dir=DIR --data_dir={tmp_path}" in message
    assert "$TFDS_DATA_DIR" not in message  # the tasks name their own data dir

    monkeypatch.setattr(availability, "_network_reachable", lambda: True)
    with pytest.raises(DatasetNotAvailableError) as error:  # online, TFDS downloads RTE itself
        check_datasets(f"mix_{suffix}")
    assert "glue/rte" not in str(error.value) and "story_cloze" in str(error.value)


def test_nothing_is_raised_when_every_dataset_is_there(register, monkeypatch):
    monkeypatch.setattr(availability, "_network_reachable", lambda: False)
    suffix = register(
        tfds_source=seqio.TfdsDataSource("glue/rte:2.0.0"),
        flan=flan_source("imdb_reviews/plain_text:1.0.0", validation="train", test="test"),
        function=seqio.FunctionDataSource(lambda split, shuffle_files: None, splits=("train",)),  # not TFDS: skipped
    )
    assert availability.tfds_reads(seqio.get_mixture_or_task(f"flan_{suffix}")) == {("imdb_reviews/plain_text:1.0.0", None)}
    with tfds.testing.mock_data(num_examples=2):
        check_datasets(f"mix_{suffix}", None)
