"""Multi-host: 2 processes x 4 CPU devices train exactly like 1 process x 8 devices, also as two slices."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from flanjax.config import REPO_ROOT
from flanjax.rundir.metrics import read_metrics

# Unpacked, unshuffled and without dropout, each global batch holds the same examples however
# the processes split it: process i reads every other example (its seqio shard).
RUN = [
    "train",
    "--gin_file=tests/tiny_run.gin",
    "--gin.MIXTURE_OR_TASK_NAME=quickstart_sort",
    "--gin.TRAIN_STEPS=6",
    "--gin.BATCH_SIZE=16",
    "--gin.lm.train.pack=False",
    "--gin.lm.train.shuffle=False",
    "--gin.loop.LoopConfig.log_every=1",
    "--gin.checkpoint.CheckpointConfig.every_steps=3",
]


def _launch(model_dir, devices, extra=()):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    return subprocess.Popen(
        [sys.executable, "-m", "flanjax.cli", *RUN, f"--gin.MODEL_DIR={model_dir}", *extra],
        cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(model_dir):
    return [r["loss"] for r in read_metrics(os.path.join(model_dir, "metrics.jsonl")) if "loss" in r]


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    single = _launch(tmp_path / "one", 8)
    out = single.communicate(timeout=600)[0]
    assert single.returncode == 0, out

    address = f"127.0.0.1:{_free_port()}"
    procs = [
        _launch(tmp_path / "two", 4, [f"--coordinator_address={address}", "--num_processes=2", f"--process_id={i}"])
        for i in range(2)
    ]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(outs)
    assert "'data': 8" in outs[0]  # one mesh over both processes' devices

    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(one) == len(two) == 6
    assert one[-1] < one[0]
    for a, b in zip(one, two):
        assert b == pytest.approx(a, rel=1e-5)
    assert sorted(os.listdir(tmp_path / "two" / "checkpoints")) == ["3", "6"]

    # The processes as two slices (CPUs have no slice_index: each process is one), data
    # parallelism across them and FSDP inside each: a hybrid mesh, the same training.
    address = f"127.0.0.1:{_free_port()}"
    slices = ["--gin.sharding.MeshConfig.dcn_data=2", "--gin.sharding.MeshConfig.data=1", "--gin.sharding.MeshConfig.fsdp=-1"]
    procs = [
        _launch(tmp_path / "slices", 4, [f"--coordinator_address={address}", "--num_processes=2", f"--process_id={i}", *slices])
        for i in range(2)
    ]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(outs)
    assert "'data': 2, 'fsdp': 4" in outs[0]
    for a, b in zip(one, _losses(tmp_path / "slices"), strict=True):
        assert b == pytest.approx(a, rel=1e-5)

    # Evaluation (generation and rank classification) of the trained run: the same numbers.
    def evaluate(devices, extra=()):
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
        args = ["eval", "--gin_file=configs/runs/eval.gin", f"--gin.CHECKPOINT_PATH='{tmp_path / 'one'}'",
                "--gin.MIXTURE_OR_TASK_NAME='quickstart_eval'", "--gin.evaluator.EvalConfig.num_examples=16",
                "--gin.evaluator.EvalConfig.batch_size=8", *extra]  # fmt: skip
        return subprocess.Popen([sys.executable, "-m", "flanjax.cli", *args], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)  # fmt: skip

    def results():
        tasks = json.loads((tmp_path / "one" / "eval_results.json").read_text())["tasks"]
        return {name: (task["metrics"], task["num_examples"]) for name, task in tasks.items()}

    single = evaluate(8)
    assert single.wait(timeout=600) == 0, single.communicate()[0]
    expected = results()
    (tmp_path / "one" / "eval_results.json").unlink()
    address = f"127.0.0.1:{_free_port()}"
    procs = [evaluate(4, [f"--coordinator_address={address}", "--num_processes=2", f"--process_id={i}"]) for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(outs)
    assert results() == expected and {"quickstart_larger_rank", "quickstart_sort"} <= set(expected)

    # Labelling (sampling, then a rubric) and export to Hugging Face: the same files, written once.
    def command(args, out, devices, extra=()):
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
        label = ["label", "--policy", str(tmp_path / "one"), "--task", "quickstart", "--labeler", "rubric:tasks.quickstart_rlhf:rubric",
                 "--num_prompts", "16", "--num_samples", "2", "--max_new_tokens", "8", "--prompt_len", "32", "--out", str(out / "prefs.jsonl")]
        to_hf = ["convert", "to-hf", "--in", str(tmp_path / "one"), "--out", str(out / "hf")]
        return subprocess.Popen([sys.executable, "-m", "flanjax.cli", *(label if args == "label" else to_hf), *extra], cwd=REPO_ROOT,
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip

    for what in ("label", "to-hf"):
        single = command(what, tmp_path / "single", 8)
        assert single.wait(timeout=600) == 0, single.communicate()[0]
        address = f"127.0.0.1:{_free_port()}"
        procs = [command(what, tmp_path / "double", 4, [f"--coordinator_address={address}", "--num_processes=2", f"--process_id={i}"])
                 for i in range(2)]  # fmt: skip
        outs = [p.communicate(timeout=600)[0] for p in procs]
        assert [p.returncode for p in procs] == [0, 0], "\n".join(outs)
    assert (tmp_path / "double" / "prefs.jsonl").read_text() == (tmp_path / "single" / "prefs.jsonl").read_text()
    assert len((tmp_path / "single" / "prefs.jsonl").read_text().splitlines()) > 0
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "double" / "hf" / name).read_bytes() == (tmp_path / "single" / "hf" / name).read_bytes()


@pytest.mark.slow
def test_a_sigterm_to_one_process_stops_both_at_the_same_saved_step(tmp_path):
    run = tmp_path / "run"

    def two(steps, **kwargs):
        address = f"127.0.0.1:{_free_port()}"
        return [_launch(run, 4, [f"--coordinator_address={address}", "--num_processes=2", f"--process_id={i}",
                                 f"--gin.TRAIN_STEPS={steps}", "--gin.checkpoint.CheckpointConfig.every_steps=1000"]) for i in range(2)]  # fmt: skip

    procs = two(1000)
    deadline = time.time() + 300
    while not (os.path.exists(run / "metrics.jsonl") and len(_losses(run)) >= 3):  # training, not compiling
        assert time.time() < deadline and all(p.poll() is None for p in procs), "the run did not start"
        time.sleep(0.5)
    procs[1].send_signal(signal.SIGTERM)  # a scheduler pre-empting one host
    outs = [p.communicate(timeout=300)[0] for p in procs]
    stops = [re.search(r"Pre-empted \(SIGTERM\) at step (\d+)", out) for out in outs]
    assert all(stops), "\n".join(outs)
    step = int(stops[0].group(1))
    assert int(stops[1].group(1)) == step and 3 <= step < 1000
    assert sorted(os.listdir(run / "checkpoints")) == [str(step)]

    procs = two(step + 2)  # the relaunch resumes there and finishes
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(outs)
    assert f"Resuming from checkpoint step {step}" in outs[0]
    assert sorted(os.listdir(run / "checkpoints"), key=int)[-1] == str(step + 2)
