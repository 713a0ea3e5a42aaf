"""What a run prints: whole lines in logs, no library chatter, an ETA, a message on SIGTERM."""

import os
import shlex
import signal
import subprocess
import sys

import pytest

from flanjax.train.loop import format_eta

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PRINT_WIDE = """
from rich.table import Table
from flanjax.rundir.metrics import console
console.print("x" * 299 + "|")
table = Table(title="Held-out evaluation")
table.add_column("task / metric")
table.add_column("step 0 (untrained)", justify="right")
table.add_row("a_task_with_a_rather_long_name_that_goes_on/exact_match_over_many_words_" + "y" * 60, "12.5")
console.print(table)
"""


def _python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO_ROOT,
                          env={**os.environ, **env}, check=True)  # fmt: skip


def test_console_lines_and_tables_stay_whole_when_piped():
    err = _python(PRINT_WIDE, COLUMNS="80").stderr.splitlines()  # COLUMNS as a terminal of 80 would set it
    assert "x" * 299 + "|" in err
    cell = "a_task_with_a_rather_long_name_that_goes_on/exact_match_over_many_words_" + "y" * 60
    row = [line for line in err if cell in line]  # the cell whole, on one line, with its neighbour
    assert len(row) == 1 and "12.5" in row[0], "\n".join(err)


QUIET = r"""
import logging, os
from flanjax.quiet import NATIVE_NOISE, filtered_stderr, quiet_libraries
quiet_libraries()
import seqio, tensorflow as tf
from absl import logging as absl_logging
tf.constant(1) + 1  # the first op: TensorFlow probes for GPUs
source = seqio.FunctionDataSource(lambda split, shuffle_files: tf.data.Dataset.range(3), splits=["train"],
                                  num_input_examples={"train": 3})
seqio.utils.mixing_rate_num_examples(seqio.Task("quiet_task", source, output_features={}))
absl_logging.warning("a real warning from absl")
logging.getLogger("tensorflow").warning("a real warning from tensorflow")
with filtered_stderr(NATIVE_NOISE):
    os.write(2, b"I0000 port.cc:153] oneDNN custom operations are on.\nE0000 a real native error\n")
"""


def test_library_chatter_is_dropped_and_real_warnings_kept():
    err = _python(QUIET).stderr
    for noise in ("absl::InitializeLog", "oneDNN", "cuda drivers", "cuInit", "not cached"):
        assert noise not in err, err
    for real in ("a real warning from absl", "a real warning from tensorflow", "a real native error"):
        assert real in err, err


@pytest.mark.parametrize(
    "seconds, text",
    [(0, "0s"), (44.6, "45s"), (60, "1m00s"), (192, "3m12s"), (3599.4, "59m59s"), (7500, "2h05m"), (float("nan"), "?")],
)
def test_format_eta(seconds, text):
    assert format_eta(seconds) == text


@pytest.mark.slow
def test_sigterm_during_start_up_exits_143_with_a_message(tmp_path):
    args = ["train", "--gin_file=tests/tiny_run.gin", f"--gin.MODEL_DIR={tmp_path}", "--gin.TRAIN_STEPS=100"]
    proc = subprocess.Popen([sys.executable, "-m", "flanjax.cli", *args], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"})  # fmt: skip
    seen = []
    for line in proc.stdout:  # until it says it compiles: start-up, before any step
        seen.append(line)
        if line.startswith("Compiling the train step"):
            proc.send_signal(signal.SIGTERM)
            break
    out = "".join(seen) + proc.communicate(timeout=300)[0]
    assert proc.returncode == 143, out
    assert "Interrupted (SIGTERM) during start-up" in out and "step 1/" not in out, out
    command = out.split("Resume with the same command:")[1].strip().splitlines()[0]
    assert command == shlex.join([sys.executable, "-m", "flanjax.cli", *args])
    assert not os.path.exists(tmp_path / "metrics.jsonl")
