"""Whether the TFDS datasets of a task or mixture can be read, checked before compiling.

A dataset that is neither prepared nor downloadable otherwise fails at the first batch, after
the model compiled, with minutes of download retries and a long traceback. `check_datasets`
finds every such dataset at once and names the fix for each.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import logging
import os
import re
import socket

import seqio
import tensorflow_datasets as tfds

from flanjax.data.pipeline import get_task_or_mixture
from flanjax.data.sources import TfdsSource
from flanjax.errors import FlanjaxError

# TFDS downloads from many hosts; Google Cloud Storage (its own mirror) stands for "online".
NETWORK_PROBE = ("storage.googleapis.com", 443)


class DatasetNotAvailableError(FlanjaxError, FileNotFoundError):
    """TFDS datasets a task reads are neither prepared nor downloadable."""


def tfds_reads(task: seqio.Task) -> set[tuple[str, str | None]]:
    """(TFDS name, data dir or None for TFDS's default) of each dataset the task's source reads;
    none for sources that are not TFDS (functions, text files...)."""
    source = task.source
    if isinstance(source, TfdsSource):  # flanjax's FLAN sources read TFDS's default data dir
        return {(read.name, None) for reads in source.reads.values() for read in reads}
    if isinstance(source, seqio.TfdsDataSource):
        loader = source.tfds_dataset
        if loader.tfds_splits:  # a split map: one dataset per split
            return {(split.dataset, split.data_dir) for split in loader.tfds_splits.values()}
        return {(loader.name, loader.data_dir)} if loader.name else set()
    return set()


@dataclasses.dataclass(frozen=True)
class Missing:
    """A dataset that cannot be read: why, and for `tfds build` where it goes (None: no build
    fixes it) and whether it needs a manual download first."""

    reason: str
    root: str | None = None
    manual: bool = False


def check_datasets(*names: str | None) -> None:
    """Raises DatasetNotAvailableError, listing each TFDS dataset of the tasks or mixtures
    `names` (None: skipped) that is neither prepared nor downloadable, with its fix."""
    readers: dict[tuple[str, str | None], set[str]] = {}
    for name in filter(None, names):
        for task in seqio.get_subtasks(get_task_or_mixture(name)):
            for read in sorted(tfds_reads(task), key=str):
                readers.setdefault(read, set()).add(task.name)
    missing = {read: m for read in readers if (m := _missing(*read))}
    if not missing:
        return
    lines = []
    builds: dict[str, list[str]] = {}  # data dir -> what TFDS downloads itself: one `tfds build` each
    manual = []
    for (dataset, data_dir), m in missing.items():
        tasks = sorted(readers[dataset, data_dir])
        lines.append(f"- {dataset} (read by {', '.join(tasks[:3])}{', ...' if len(tasks) > 3 else ''}): {m.reason}")
        if m.manual:
            manual.append(f"  tfds build {dataset} --manual_dir=DIR --data_dir={m.root}   # DIR: its downloaded files")
        elif m.root:
            builds.setdefault(m.root, []).append(dataset)
    commands = [f"  tfds build {' '.join(ds)} --data_dir={root}" for root, ds in builds.items()] + manual
    what = " and ".join(repr(n) for n in filter(None, names))
    message = f"{what} reads {len(missing)} TFDS dataset(s) that cannot be read (a run would fail at its first batch):\n"
    message += "\n".join(lines)
    if commands:
        # $TFDS_DATA_DIR moves TFDS's default data dir only, not a task's own data_dir.
        env = ", or point $TFDS_DATA_DIR at a directory where they are" if any(d is None for _, d in missing) else ""
        message += f"\nPrepare them where a network is (then copy the directories here{env}):\n" + "\n".join(commands)
    raise DatasetNotAvailableError(message)


def _missing(name: str, data_dir: str | None) -> Missing | None:
    """Why TFDS dataset `name` cannot be read from `data_dir` (None: TFDS's default), or None
    if it can: prepared, mocked, or downloadable now."""
    if tfds.core.naming.parse_builder_name_kwargs(name)[0].namespace:
        return None  # community datasets (huggingface:...) resolve online only: not checked
    try:
        builder = tfds.builder(name, data_dir=data_dir)  # reads no data, downloads nothing
    except tfds.core.registered.DatasetNotFoundError:
        return Missing(_unregistered(name, data_dir))
    except Exception as e:  # e.g. a version or config this TFDS release does not have
        why = re.sub(r'^Failed to construct dataset .*?builder_kwargs "\{.*?\}": ', "", " ".join(str(e).split()))
        return Missing(f"TFDS cannot load it: {why}")
    if _mocked() or builder.data_path.exists():  # where tfds.load reads it without downloading
        return None
    root = os.fspath(builder.data_dir_root)
    manual_dir = builder.data_dir_root / "downloads" / "manual"  # where `tfds.load` looks by default
    if _needs_manual_download(builder) and not (manual_dir.exists() and any(manual_dir.iterdir())):
        urls = re.findall(r"https?://[^\s)\"']+", builder.MANUAL_DOWNLOAD_INSTRUCTIONS)
        source = f"from {urls[0].rstrip('.,;')}, " if urls else ""
        catalog = f"https://www.tensorflow.org/datasets/catalog/{builder.name}"
        return Missing(f"not prepared in {root}, and it needs a manual download ({source}see {catalog})", root, manual=True)
    if _network_reachable():
        logging.info("TFDS will download and prepare %s into %s at its first read", name, root)
        return None
    return Missing(f"not prepared in {root}, and no network to download it", root)


def _needs_manual_download(builder: tfds.core.DatasetBuilder) -> bool:
    if not builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
        return False
    from tensorflow_datasets.translate import wmt

    if isinstance(builder, wmt.WmtTranslate):  # WMT: only a few sub-corpora (CzEng...) are manual
        source = builder.builder_config.language_pair[0]
        return any(wmt.DATASET_MAP[s].get_manual_dl_files(source) for names in builder.subsets.values() for s in names)
    return True


def _unregistered(name: str, data_dir: str | None) -> str:
    base = str(tfds.core.naming.parse_builder_name_kwargs(name)[0])
    close = difflib.get_close_matches(base, tfds.list_builders(with_community_datasets=False), n=3, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    root = data_dir or tfds.core.constants.get_default_data_dir()
    where = root if data_dir else f"{root} ($TFDS_DATA_DIR)"
    return (
        f"TFDS has no dataset of that name, in its code or prepared in {where}.{hint} Check the name; for a dataset "
        f"of your own, import the module that defines it, or prepare it there: `tfds build path/to/its_dataset_builder.py "
        f"--data_dir={root}`."
    )


def _mocked() -> bool:
    """Whether TFDS reads are patched (`tfds.testing.mock_data`): they yield fake examples,
    so nothing needs to be prepared."""
    as_dataset = tfds.core.DatasetBuilder.as_dataset
    return getattr(as_dataset, "__module__", None) != tfds.core.DatasetBuilder.__module__


@functools.cache
def _network_reachable() -> bool:
    """One short connection attempt per process: offline, a download would retry for minutes."""
    try:
        socket.create_connection(NETWORK_PROBE, timeout=3).close()
        return True
    except OSError:
        return False
