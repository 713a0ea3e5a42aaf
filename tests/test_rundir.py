"""The tokenizer a run records, and the refusal of data tokenized otherwise."""

import json
import subprocess
import sys

import gin
import pytest
import seqio
import tensorflow as tf

from flanjax import cli
from flanjax.config import REPO_ROOT
from flanjax.data.vocab import HFVocabulary, train_tokenizer
from flanjax.rundir import files


def other_tokenizer(path, size=512) -> HFVocabulary:
    """A tokenizer of the quickstart's size trained on other text: every shape check passes."""
    corpus = [f"colour {i} of the {w} sky" for i in range(300) for w in ("grey", "blue", "red")]
    train_tokenizer(corpus, vocab_size=size).save_pretrained(path)
    return HFVocabulary(str(path))


def test_a_run_refuses_data_of_another_tokenizer_and_follows_its_origin(tmp_path):
    import tasks.quickstart

    mine = tasks.quickstart.VOCABULARY
    other = other_tokenizer(tmp_path / "other")
    run = tmp_path / "run"
    files.write_tokenizer(str(run), mine)
    assert files.run_vocabulary(str(run)).fingerprint() == mine.fingerprint()  # the saved files map alike
    files.check_tokenizer(str(run), mine, "the data")  # same mapping: accepted
    with pytest.raises(files.TokenizerMismatchError) as e:
        files.check_tokenizer(str(run), other, "task 'colours'")
    message = str(e.value)
    assert "task 'colours'" in message and other.path in message and str(run / "tokenizer") in message
    assert other.fingerprint() in message and mine.fingerprint() in message

    child = tmp_path / "child"  # a run without tokenizer/ (an older run) started from `run`
    files.write_init_checkpoint(str(child), str(run))
    assert files.run_vocabulary(str(child)).path == str(run / "tokenizer")
    with pytest.raises(files.TokenizerMismatchError):
        files.check_tokenizer(str(child), other, "the data")
    assert files.run_vocabulary(str(tmp_path / "unrelated")) is None  # nothing recorded: nothing to check
    files.check_tokenizer(str(tmp_path / "unrelated"), other, "the data")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    import tasks.quickstart  # noqa: F401

    run = tmp_path_factory.mktemp("run")
    gin.clear_config(clear_constants=True)
    assert cli.main(["train", "--gin_file=tests/tiny_run.gin", f"--gin.MODEL_DIR={run}", "--gin.TRAIN_STEPS=2"]) == 0
    return run


@pytest.mark.slow
def test_training_records_the_tokenizer_and_eval_refuses_another(trained_run, tmp_path, capsys):
    import tasks.quickstart

    assert files.run_vocabulary(str(trained_run)).fingerprint() == tasks.quickstart.VOCABULARY.fingerprint()
    other = other_tokenizer(tmp_path / "other")
    features = {k: seqio.Feature(other, add_eos=k == "targets") for k in ("inputs", "targets")}
    source = seqio.FunctionDataSource(
        lambda split, shuffle_files: tf.data.Dataset.from_tensors({"inputs": "blue sky", "targets": "grey"}), splits=["validation"])
    seqio.TaskRegistry.add("colours_other_tokenizer", source, output_features=features,
                           preprocessors=[seqio.preprocessors.tokenize], metric_fns=[])  # fmt: skip
    try:
        gin.clear_config(clear_constants=True)
        code = cli.main(["eval", "--gin_file=configs/runs/eval.gin", f"--gin.CHECKPOINT_PATH={trained_run}",
                         "--gin.MIXTURE_OR_TASK_NAME=colours_other_tokenizer"])  # fmt: skip
    finally:
        seqio.TaskRegistry.remove("colours_other_tokenizer")
    assert code == 1
    err = capsys.readouterr().err
    assert "task 'colours_other_tokenizer' is tokenized with the tokenizer in" in err and other.path in err


@pytest.mark.slow
def test_sample_reads_the_tokenizer_the_run_recorded(trained_run):
    out = subprocess.run(
        [sys.executable, "-m", "flanjax.cli", "sample", "--policy", str(trained_run), "--prompt", "Sort the digits 3 1 2.",
         "--max_new_tokens", "4", "--temperature", "0"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    row = json.loads(out.stdout.strip().splitlines()[-1])
    assert row["prompt"] == "Sort the digits 3 1 2." and isinstance(row["response"], str)
