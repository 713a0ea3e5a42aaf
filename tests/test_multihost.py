"""Multi-host: 2 processes x 4 CPU devices compute exactly like 1 process x 8 devices (training, also
as two slices; evaluation, labelling, export, the reward model and PPO), and process 1 writes no file."""

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _flanjax(args, devices, process=None, address=None, watch=None) -> subprocess.Popen:
    """`flanjax ARGS` on `devices` CPU devices, as process `process` of two when given; the files it
    writes under `watch` are reported (see tests/multihost_child.py)."""
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    if process is not None:
        args = [*args, f"--coordinator_address={address}", "--num_processes=2", f"--process_id={process}"]
    if watch is not None:
        env["FLANJAX_TEST_WATCH"] = str(watch)
    return subprocess.Popen([sys.executable, "-m", "tests.multihost_child", *map(str, args)], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip


def _one(args) -> str:
    """1 process x 8 devices; its output."""
    proc = _flanjax(args, 8)
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, out
    return out


def _two(args, watch) -> list[str]:
    """2 processes x 4 devices; their outputs, after checking that only process 0 wrote files under `watch`."""
    address = f"127.0.0.1:{_free_port()}"
    procs = [_flanjax(args, 4, i, address, watch) for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(outs)
    assert "wrote: " in outs[0] and "wrote: " not in outs[1], outs[1]
    return outs


def _losses(model_dir):
    return [r["loss"] for r in read_metrics(os.path.join(model_dir, "metrics.jsonl")) if "loss" in r]


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    _one([*RUN, f"--gin.MODEL_DIR={tmp_path / 'one'}"])
    outs = _two([*RUN, f"--gin.MODEL_DIR={tmp_path / 'two'}"], tmp_path)
    assert "'data': 8" in outs[0]  # one mesh over both processes' devices

    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(one) == len(two) == 6
    assert one[-1] < one[0]
    for a, b in zip(one, two):
        assert b == pytest.approx(a, rel=1e-5)
    assert sorted(os.listdir(tmp_path / "two" / "checkpoints")) == ["3", "6"]

    # The processes as two slices (CPUs have no slice_index: each process is one), data
    # parallelism across them and FSDP inside each: a hybrid mesh, the same training.
    slices = ["--gin.sharding.MeshConfig.dcn_data=2", "--gin.sharding.MeshConfig.data=1", "--gin.sharding.MeshConfig.fsdp=-1"]
    outs = _two([*RUN, f"--gin.MODEL_DIR={tmp_path / 'slices'}", *slices], tmp_path)
    assert "'data': 2, 'fsdp': 4" in outs[0]
    for a, b in zip(one, _losses(tmp_path / "slices"), strict=True):
        assert b == pytest.approx(a, rel=1e-5)

    # Evaluation (generation and rank classification) of the trained run: the same numbers.
    evaluate = ["eval", "--gin_file=configs/runs/eval.gin", f"--gin.CHECKPOINT_PATH='{tmp_path / 'one'}'",
                "--gin.MIXTURE_OR_TASK_NAME='quickstart_eval'", "--gin.evaluator.EvalConfig.num_examples=16",
                "--gin.evaluator.EvalConfig.batch_size=8"]  # fmt: skip

    def results():
        tasks = json.loads((tmp_path / "one" / "eval_results.json").read_text())["tasks"]
        return {name: (task["metrics"], task["num_examples"]) for name, task in tasks.items()}

    _one(evaluate)
    expected = results()
    (tmp_path / "one" / "eval_results.json").unlink()
    _two(evaluate, tmp_path)
    assert results() == expected and {"quickstart_larger_rank", "quickstart_sort"} <= set(expected)

    # Labelling (sampling, then a rubric) and export to Hugging Face: the same files, written once.
    def label(out):
        return ["label", "--policy", tmp_path / "one", "--task", "quickstart", "--labeler", "rubric:tasks.quickstart_rlhf:rubric",
                "--num_prompts", "16", "--num_samples", "2", "--max_new_tokens", "8", "--prompt_len", "32", "--out", out / "prefs.jsonl"]  # fmt: skip

    def to_hf(out):
        return ["convert", "to-hf", "--in", tmp_path / "one", "--out", out / "hf"]

    for command in (label, to_hf):
        _one(command(tmp_path / "single"))
        _two(command(tmp_path / "double"), tmp_path)
    assert (tmp_path / "double" / "prefs.jsonl").read_text() == (tmp_path / "single" / "prefs.jsonl").read_text()
    assert len((tmp_path / "single" / "prefs.jsonl").read_text().splitlines()) > 0
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "double" / "hf" / name).read_bytes() == (tmp_path / "single" / "hf" / name).read_bytes()


@pytest.mark.slow
def test_a_reward_model_and_a_ppo_iteration_on_two_processes_match_one_process(tmp_path):
    sft, prefs = tmp_path / "sft", tmp_path / "prefs"
    _one([*RUN, f"--gin.MODEL_DIR={sft}", "--gin.TRAIN_STEPS=4"])
    # Unshuffled and as many comparisons as a global batch: every step sees all of them, however
    # the processes split them.
    prefs.mkdir()
    rows = [{"prompt": f"What is the largest of {a} {b}?", "responses": [str(max(a, b)), str(min(a, b)), "none"]}
            for a, b in zip(range(16), range(30, 14, -1))]  # fmt: skip
    for split in ("train", "validation"):
        (prefs / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    reward = ["train", "--gin_file=configs/runs/quickstart_rlhf_reward.gin", f"--gin.INIT_CHECKPOINT='{sft}'",
              f"--gin.PREFERENCES='{prefs}'", "--gin.TRAIN_STEPS=2", "--gin.BATCH_SIZE=16", "--gin.reward.train_reward.shuffle=False",
              "--gin.loop.LoopConfig.log_every=1",
              "--gin.reward.train_reward.response_len=8", "--gin.reward.NormalisationConfig.num_prompts=16",
              "--gin.reward.NormalisationConfig.batch_size=8"]  # fmt: skip
    _one([*reward, f"--gin.MODEL_DIR='{tmp_path / 'rm1'}'"])
    _two([*reward, f"--gin.MODEL_DIR='{tmp_path / 'rm2'}'"], tmp_path)
    _same_metrics(tmp_path / "rm1", tmp_path / "rm2", ["loss", "validation/pair_accuracy"])
    stats = [json.loads((tmp_path / run / "reward.json").read_text()) for run in ("rm1", "rm2")]
    assert stats[1]["num_samples"] == stats[0]["num_samples"] > 0
    for key in ("shift", "scale"):
        assert stats[1][key] == pytest.approx(stats[0][key], rel=1e-4, abs=1e-5)

    # One PPO iteration on a task of one repeated prompt (the same rollouts on any split of the rows).
    ppo = ["train", "--gin_file=configs/runs/quickstart_rlhf_ppo.gin", f"--gin.POLICY_CHECKPOINT='{sft}'",
           f"--gin.REWARD_CHECKPOINT='{tmp_path / 'rm1'}'", "--gin.MIXTURE_OR_TASK_NAME='one_prompt'", "--gin.BATCH_SIZE=16",
           "--gin.TRAIN_STEPS=1", "--gin.loop.LoopConfig.log_every=1", "--gin.decode.SamplingConfig.max_new_tokens=8"]  # fmt: skip
    _one([*ppo, f"--gin.MODEL_DIR='{tmp_path / 'ppo1'}'"])
    _two([*ppo, f"--gin.MODEL_DIR='{tmp_path / 'ppo2'}'"], tmp_path)
    _same_metrics(tmp_path / "ppo1", tmp_path / "ppo2", ["reward/score_mean", "kl", "approx_kl", "value_loss", "entropy"])


def _same_metrics(one, two, required):
    """Every metric of run `two` (but timings) equals run `one`'s, step for step; `required` among them."""
    rows = [[{k: v for k, v in r.items() if not re.search(r"^time/|_s$|per_s", k) and isinstance(v, (int, float))}
             for r in read_metrics(os.path.join(run, "metrics.jsonl"))] for run in (one, two)]  # fmt: skip
    assert len(rows[0]) == len(rows[1]) > 0
    assert set(required) <= set().union(*rows[0])
    for a, b in zip(*rows):
        assert b.keys() == a.keys()
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), key


@pytest.mark.slow
def test_a_sigterm_to_one_process_stops_both_at_the_same_saved_step(tmp_path):
    run = tmp_path / "run"

    def two(steps, **kwargs):
        address = f"127.0.0.1:{_free_port()}"
        args = [*RUN, f"--gin.MODEL_DIR={run}", f"--gin.TRAIN_STEPS={steps}", "--gin.checkpoint.CheckpointConfig.every_steps=1000"]
        return [_flanjax(args, 4, i, address) for i in range(2)]

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
