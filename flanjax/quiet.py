"""Keeps the libraries' routine chatter off the console, so that what remains is the run's.

`quiet_libraries()` runs first thing in `flanjax.cli.main` (and the tests' conftest), before
TensorFlow, seqio or Orbax are imported. It drops only known messages, matched one by one;
anything else the same loggers or native code print still shows.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import logging
import os
import re
import sys
import tempfile

# Native (C++) lines TensorFlow prints while it loads and first probes for GPUs. TensorFlow is
# only the input pipeline here; JAX owns the accelerators and reports on them itself.
# TF_CPP_MIN_LOG_LEVEL cannot hide the first three (written before absl logging is set up)
# and would hide every real error with the fourth; so they are filtered by text instead.
NATIVE_NOISE = re.compile(
    rb"All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    rb"|\] oneDNN custom operations are on"
    rb"|\] Could not find cuda drivers on your machine"
    rb"|\] failed call to cuInit"
    rb"|\] Unable to register cu(DNN|FFT|BLAS) factory"  # TF and XLA both register (GPU hosts)
    rb"|\] computation placer already registered"
)

# Python log records by logger: messages about choices flanjax makes on purpose.
LOG_NOISE = {
    "absl": re.compile(
        # seqio: flanjax's batch sources record and restore the data position themselves.
        r"Using an uncached FunctionDataset for training"
        r"|Task '[^']*' not cached so using number of input examples"
        r"|'logger_cls' is empty so seqio\.Evaluator will not log"  # flanjax writes the results
        # Orbax: evaluation and conversion open checkpoints read-only on purpose.
        r"|CheckpointManagerOptions\.read_only=True, setting"
        r"|Given directory is read only="
        # TFDS's mock data (`flanjax tasks preview --mock`) and its own deprecations.
        r"|Variant folder \S*tensorflow_datasets/testing/metadata/\S* has no dataset_info\.json"
        r"|`TensorInfo\.dtype` is deprecated"
    ),
    # TensorFlow deprecations raised by TFDS's mocking code, not by any task's.
    "tensorflow": re.compile(r"^From \S*tensorflow_datasets/testing/mocking\.py:\d+: .* is deprecated"),
}


def quiet_libraries() -> None:
    """Sets up the filters; call before TensorFlow is imported. Calling again is harmless."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TF's native INFO and WARNING lines
    from absl import logging as absl_logging

    absl_logging.get_absl_logger()  # made with absl's own logger class before getLogger below

    for name, pattern in LOG_NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMatching) for f in logger.filters):
            logger.addFilter(_DropMatching(pattern))
    if "tensorflow" not in sys.modules and not any(isinstance(f, _QuietTensorFlowImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietTensorFlowImport())


class _DropMatching(logging.Filter):
    def __init__(self, pattern: re.Pattern):
        super().__init__()
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


class _QuietTensorFlowImport(importlib.abc.MetaPathFinder):
    """Runs TensorFlow's first import, and its GPU probe, with `NATIVE_NOISE` filtered out of
    stderr (file descriptor 2, where native code writes)."""

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)  # the first import is the one that prints
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_quietly(module):
            with filtered_stderr(NATIVE_NOISE):
                exec_module(module)
                # The GPU probe (cuInit) would otherwise happen at the first tf.data op, unfiltered.
                with contextlib.suppress(Exception):
                    module.config.list_physical_devices()

        spec.loader.exec_module = exec_quietly  # this spec's own loader object
        return spec


@contextlib.contextmanager
def filtered_stderr(noise: re.Pattern):
    """Captures file descriptor 2 meanwhile and writes back the lines `noise` does not match."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no stderr to filter
        yield
        return
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = b"".join(line for line in captured.read().splitlines(keepends=True) if not noise.search(line))
            while kept:  # os.write may take part of it
                kept = kept[os.write(2, kept):]
