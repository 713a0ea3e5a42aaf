"""`flanjax` as one process of the multi-host tests (`python -m tests.multihost_child ARGS`).

Besides the command line's own tasks it registers `one_prompt`, a prompt task whose every
example is the same quickstart question, so that a global batch is the same whichever process
reads which rows (PPO's rollouts can then be compared across process counts). With
FLANJAX_TEST_WATCH=DIR set, every file this process creates, changes, renames or removes under
DIR is reported on stderr as `wrote: PATH`, except under checkpoints/ (where each process
writes its own shards).
"""

import os
import sys

import seqio
import tensorflow as tf

import tasks.quickstart
from flanjax import cli

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_WRITTEN_ARG = {"os.rename": 1, "os.remove": 0, "os.truncate": 0, "shutil.copyfile": 1}  # event -> the path it changes


def watch_writes(root: str) -> None:
    root = os.path.abspath(root) + os.sep

    def hook(event, args):
        if event == "open":
            path, written = args[0], bool(args[2] & _WRITE_FLAGS)
        elif event in _WRITTEN_ARG:
            path, written = args[_WRITTEN_ARG[event]], True
        else:
            return
        if written and isinstance(path, (str, os.PathLike)):
            path = os.path.abspath(os.fspath(path))
            if path.startswith(root) and f"{os.sep}checkpoints{os.sep}" not in path:
                sys.stderr.write(f"wrote: {path} ({event})\n")

    sys.addaudithook(hook)


def register_one_prompt() -> None:
    question = "What is the largest of 3 8 5?"
    source = seqio.FunctionDataSource(
        lambda split, shuffle_files, seed=None: tf.data.Dataset.from_tensors({"inputs": question, "targets": "8"}).repeat(64),
        splits=("train", "validation"),
    )
    features = {"inputs": seqio.Feature(tasks.quickstart.VOCABULARY, add_eos=False),
                "targets": seqio.Feature(tasks.quickstart.VOCABULARY, add_eos=True)}  # fmt: skip
    seqio.TaskRegistry.add("one_prompt", source=source, output_features=features, preprocessors=[seqio.preprocessors.tokenize])


if __name__ == "__main__":
    if os.environ.get("FLANJAX_TEST_WATCH"):
        watch_writes(os.environ["FLANJAX_TEST_WATCH"])
    register_one_prompt()
    sys.exit(cli.main(sys.argv[1:]))
