"""The README's own-task example, run as written (TFDS mock data instead of the download)."""

import json
import math
import os
import re

import gin
import pytest
import tensorflow_datasets as tfds

from flanjax import cli, config
from flanjax.rundir.metrics import read_metrics

README = os.path.join(config.REPO_ROOT, "README.md")


def readme_files() -> dict[str, str]:
    """The README's code blocks that start with a `# <file name>` line, by file name."""
    blocks = re.findall(r"```[a-z]*\n# (\S+)\n(.*?)```", open(README).read(), flags=re.S)
    return {name: body for name, body in blocks if name.endswith((".py", ".gin"))}


@pytest.mark.slow
def test_the_readme_example_registers_a_task_and_a_mixture_and_trains(tmp_path, monkeypatch, capsys):
    files = readme_files()
    assert set(files) == {"my_tasks.py", "my_run.gin"}
    for name, body in files.items():
        (tmp_path / name).write_text(body)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))

    def run(*args):
        gin.clear_config(clear_constants=True)
        with tfds.testing.mock_data(num_examples=10):
            return cli.main(list(args))

    assert run("tasks", "preview", "my_news_topic", "--module", "my_tasks", "--mock", "-n", "6") == 0
    preview = capsys.readouterr().out
    assert "OPTIONS:\n- World\n- Sports\n- Business\n- Science and technology" in preview
    # (mock_data swaps in a fake file system while it builds a dataset: keep saves synchronous)
    assert run("train", "--gin_file=my_run.gin", "--gin.TRAIN_STEPS=3", "--gin.BATCH_SIZE=8",
               "--gin.checkpoint.CheckpointConfig.async_save=False") == 0
    losses = [m["loss"] for m in read_metrics(str(tmp_path / "runs" / "my_news" / "metrics.jsonl")) if "loss" in m]
    assert losses and all(math.isfinite(l) for l in losses)  # trained, finite
    assert run(
        "eval", "--gin_file=configs/runs/eval.gin", "--gin.CHECKPOINT_PATH=runs/my_news",
        "--gin.MIXTURE_OR_TASK_NAME=my_news_topic_eval", "--module", "my_tasks",
        "--gin.evaluator.EvalConfig.num_examples=8", "--gin.evaluator.EvalConfig.batch_size=8",
    ) == 0  # fmt: skip
    assert "my_news_topic_eval" in (tmp_path / "runs" / "my_news" / "eval_results.md").read_text()


def test_the_readme_shows_what_tasks_list_prints(capsys):
    """The README's `tasks list --cluster nli` table is the command's output, header row first."""
    blocks = re.findall(r"`tasks list --cluster nli` prints.*?```text\n(.*?)```", open(README).read(), flags=re.S)
    assert len(blocks) == 1
    assert cli.main(["tasks", "list", "--cluster", "nli"]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0].split()
    assert header == ["NAME", "CLUSTER", "TEMPLATES", "TURNED_AROUND", "METRICS", "SOURCE"]
    assert blocks[0] == out
    assert cli.main(["tasks", "list", "--cluster", "nli", "--json"]) == 0
    assert all({c.lower() for c in header} <= set(task) for task in json.loads(capsys.readouterr().out))
