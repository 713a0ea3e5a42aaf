"""`flanjax` end to end: gin configs, runs, resume after SIGKILL and SIGTERM, bad input."""

import contextlib
import glob
import json
import os
import shlex
import signal
import subprocess
import sys
import time

import gin
import numpy as np
import pytest
import tensorflow_datasets as tfds
from flax import nnx

from flanjax import cli, config
from flanjax.data.vocab import HFVocabulary
from flanjax.rundir.metrics import read_metrics

TINY_RUN = ["--gin_file=tests/tiny_run.gin"]


def train_args(model_dir, steps, *extra):
    return ["train", *TINY_RUN, f"--gin.MODEL_DIR={model_dir}", f"--gin.TRAIN_STEPS={steps}", *extra]


@pytest.fixture(autouse=True)
def _quickstart_tasks():
    import tasks.quickstart  # noqa: F401  registers the tasks the tiny runs use


def run_cli(args) -> int:
    gin.clear_config(clear_constants=True)
    return cli.main(args)


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    for command in ("train", "eval", "bench", "tasks", "convert"):
        assert command in out


@pytest.mark.slow
def test_training_lowers_the_loss_and_writes_the_run_directory(tmp_path, capsys):
    model_dir = tmp_path / "run"
    assert run_cli(train_args(model_dir, 40, "--gin.loop.LoopConfig.log_every=5")) == 0
    rows = [r for r in read_metrics(model_dir / "metrics.jsonl") if "loss" in r]
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])  # the result, as the last line
    assert (summary["run"], summary["step"], summary["preempted"]) == (str(model_dir), 40, False)
    assert summary["metrics"]["loss"] == rows[-1]["loss"]
    assert rows[-1]["loss"] < 0.7 * rows[0]["loss"]
    for key in ("token_accuracy", "learning_rate", "grad_norm", "tokens_per_s", "mfu", "step_time_s"):
        assert key in rows[-1]
    assert glob.glob(str(model_dir / "tensorboard" / "events.out.tfevents.*"))
    assert (model_dir / "loss.png").stat().st_size > 1000
    operative = (model_dir / "operative_config.gin").read_text()
    assert "num_steps = %TRAIN_STEPS" in operative or "TRAIN_STEPS = 40" in operative
    assert (model_dir / "checkpoints" / "40").is_dir()


def test_unknown_gin_binding_is_named(tmp_path, capsys):
    code = run_cli(train_args(tmp_path, 2, "--gin.optim.OptimizerConfig.learning_rat=1.0"))
    assert code == 2
    assert "learning_rat" in capsys.readouterr().err


def test_missing_required_macro_is_named(tmp_path, capsys):
    args = ["train", "--gin_file=configs/runs/sft.gin", "--gin_file=configs/models/tiny.gin",
            f"--gin.MODEL_DIR={tmp_path}", "--gin.MIXTURE_OR_TASK_NAME=quickstart", "--gin.TRAIN_STEPS=2",
            "--gin.TASK_FEATURE_LENGTHS={'inputs': 48, 'targets': 16}"]  # fmt: skip
    assert run_cli(args) == 2
    assert "BATCH_SIZE" in capsys.readouterr().err


def test_unknown_task_suggests_near_names(tmp_path, capsys):
    assert run_cli(train_args(tmp_path, 2, "--gin.MIXTURE_OR_TASK_NAME=quickstart_maxx")) == 1
    assert "quickstart_max" in capsys.readouterr().err


def test_mesh_that_does_not_divide_the_devices(tmp_path, capsys):
    assert run_cli(train_args(tmp_path, 2, "--gin.sharding.MeshConfig.data=3")) == 1
    err = capsys.readouterr().err
    assert "does not divide the 8 available devices" in err


def test_vocabulary_larger_than_the_model(tmp_path, capsys):
    assert run_cli(train_args(tmp_path, 2, "--gin.transformer.TransformerConfig.vocab_size=100")) == 1
    assert "vocab_size" in capsys.readouterr().err


@pytest.mark.slow
def test_checkpoint_of_another_model_shape(tmp_path, capsys):
    assert run_cli(train_args(tmp_path, 2)) == 0
    assert run_cli(train_args(tmp_path, 4, "--gin.transformer.TransformerConfig.d_ff=96")) == 1
    assert "has shape" in capsys.readouterr().err


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(config.REPO_ROOT, "configs", "models", "*.gin"))))
def test_every_model_config_builds(path):
    """Each shipped size parses and its parameters fit a mesh (abstractly: 7B is never allocated)."""
    from flax import nnx

    from flanjax.models.transformer import Transformer

    gin.clear_config(clear_constants=True)
    config = cli.model_config(path, [])
    shapes = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    n = sum(x.size for x in __import__("jax").tree.leaves(nnx.state(shapes, nnx.Param)))
    assert n == config.num_params()


RUN_CONFIGS = sorted(glob.glob(os.path.join(config.REPO_ROOT, "configs", "runs", "*.gin")))
EVAL_CONFIG = os.path.join(config.REPO_ROOT, "configs", "runs", "eval.gin")


# RLHF configs need an SFT run and preferences: test_rlhf, test_dpo and test_grpo train them end
# to end. The chat and world-model quickstarts' need the quickstart's run (their make targets make it).
RLHF_CONFIGS = ("reward.gin", "ppo.gin", "dpo.gin", "grpo.gin", "ppo_lora.gin", "quickstart_rlhf_reward.gin", "quickstart_rlhf_ppo.gin",
                "quickstart_rlhf_dpo.gin", "quickstart_rlhf_grpo.gin", "quickstart_chat.gin",
                "quickstart_e2wm.gin")  # fmt: skip


def write_e2wm_inputs(directory) -> tuple[str, str]:
    """A small experience directory (one record of each kind per split) and a Fisher of ones
    for tiny.gin's query and value kernels, as configs/runs/e2wm.gin reads them."""
    from flanjax.models.lora import LoraConfig, lora_modules
    from flanjax.models.transformer import TransformerConfig, new_model
    from flanjax.train.ewc import kernel_name, save_fisher

    world = directory / "world"
    world.mkdir()
    plan = {"seed": 0, "seen": True, "items": ["tv"], "distractors": [], "conditions": ["The tv is off."], "plan": ["Walk to tv.", "Switch on tv."]}
    story = {"seed": 0, "story": ["Mary was in the kitchen.", "Mary took the cup from the sink.", "Mary went to the hallway."]}
    records = {
        "plans": [{**plan, "split": s, "activity": a} for s in ("train", "test") for a in ("watch tv", "use the toilet")],
        "counting": [{**story, "split": s, "question": "How many items are there in the sink?", "answer": "There is no item in the sink."}
                     for s in ("train", "test")],
        "paths": [{**story, "split": s, "question": "What is the order of the rooms where the cup appeared?", "answer": "kitchen, hallway"}
                  for s in ("train", "test")],
    }  # fmt: skip
    for name, rows in records.items():
        (world / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tiny = TransformerConfig(vocab_size=512, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=128, max_len=256)
    model = nnx.eval_shape(lambda: new_model(tiny, LoraConfig(targets=(r"attn/q$", r"attn/v$"))))
    save_fisher(str(directory / "fisher"), {kernel_name(p): np.ones(m.base.kernel.shape) for p, m in lora_modules(model)}, {})
    return str(world), str(directory / "fisher")


@pytest.mark.slow
@pytest.mark.parametrize("path", [p for p in RUN_CONFIGS if p != EVAL_CONFIG and os.path.basename(p) not in RLHF_CONFIGS])
def test_every_run_config_trains(path, tmp_path):
    """Dry run: each shipped run config trains two steps (shrunk where it is large); add-ons
    (lora.gin, bidirectional.gin) on top of sft.gin."""
    add_on = os.path.basename(path) in ("lora.gin", "bidirectional.gin")
    files = ["--gin_file=configs/runs/sft.gin"] if add_on else []
    args = ["train", *files, f"--gin_file={path}", f"--gin.MODEL_DIR={tmp_path}", "--gin.TRAIN_STEPS=2", "--gin.BATCH_SIZE=8"]
    if os.path.basename(path) == "bidirectional.gin":  # a task whose tokenizer has the direction tokens
        args += ["--gin_file=configs/models/tiny.gin", "--module=tasks.batgpt", "--gin.MIXTURE_OR_TASK_NAME='batgpt_facts'",
                 "--gin.TASK_FEATURE_LENGTHS={'inputs': 20, 'targets': 8}"]  # fmt: skip
    elif os.path.basename(path) == "sft.gin" or add_on:
        args += ["--gin_file=configs/models/tiny.gin", "--gin.MIXTURE_OR_TASK_NAME='quickstart'",
                 "--gin.TASK_FEATURE_LENGTHS={'inputs': 48, 'targets': 16}"]  # fmt: skip
    if os.path.basename(path) == "lima.gin":  # GAIR/lima's shape, a tokenizer with the end-of-turn token
        tokenizer = HFVocabulary(os.environ["FLANJAX_TOKENIZER"]).tokenizer
        tokenizer.add_tokens(["<|eot|>"], special_tokens=True)
        tokenizer.save_pretrained(str(tmp_path / "tokenizer"))
        (tmp_path / "train.jsonl").write_text('{"conversations": ["Sort 3 1 2.", "1 2 3", "The largest?", "3"]}\n' * 16)
        args += ["--gin_file=configs/models/tiny.gin", "--gin.transformer.TransformerConfig.vocab_size=576",
                 f"--gin.TOKENIZER='{tmp_path / 'tokenizer'}'", f"--gin.LIMA_DIR='{tmp_path}'",
                 "--gin.TASK_FEATURE_LENGTHS={'targets': 64}", "--gin.EPOCHS=1"]  # fmt: skip
    if os.path.basename(path) == "e2wm.gin":
        world, fisher = write_e2wm_inputs(tmp_path)
        args += ["--gin_file=configs/models/tiny.gin", f"--gin.TOKENIZER='{os.environ['FLANJAX_TOKENIZER']}'",
                 f"--gin.E2WM_DIR='{world}'", f"--gin.FISHER='{fisher}'", "--gin.EPOCHS=1",
                 "--gin.TASK_FEATURE_LENGTHS={'inputs': 96, 'targets': 32}"]  # fmt: skip
    if os.path.basename(path) == "quickstart.gin":
        args += ["--gin.evaluator.EvalConfig.num_examples=8", "--gin.evaluator.EvalConfig.batch_size=8"]
    mock = contextlib.nullcontext()
    if os.path.basename(path).startswith("flan_"):  # offline: TFDS mock data, a tiny model
        args += ["--gin_file=configs/models/tiny.gin", f"--gin.TOKENIZER={os.environ['FLANJAX_TOKENIZER']}",
                 "--gin.TASK_FEATURE_LENGTHS={'inputs': 96, 'targets': 32}",
                 "--gin.lm.train.shuffle=False",  # mock examples are slow to make: no shuffle buffers
                 # mock_data swaps in a fake file system while it builds a dataset: keep saves synchronous
                 "--gin.checkpoint.CheckpointConfig.async_save=False",
                 "--gin.MIXTURE_OR_TASK_NAME='flan_sentiment_train'"]  # fmt: skip  (test_flan checks the big mixtures)
        if os.path.basename(path) == "flan_heldout.gin":
            args += ["--gin.HELD_OUT=coreference", "--gin.EVAL_EXAMPLES=8", "--gin.evaluator.EvalConfig.batch_size=8"]
        mock = tfds.testing.mock_data(num_examples=10)
    with mock:
        assert run_cli(args) == 0
    assert (tmp_path / "operative_config.gin").exists()


# --- flanjax eval ------------------------------------------------------------------------------


def eval_args(checkpoint, *extra):
    return ["eval", "--gin_file=configs/runs/eval.gin", f"--gin.CHECKPOINT_PATH={checkpoint}",
            "--gin.MIXTURE_OR_TASK_NAME=quickstart_eval", "--gin.evaluator.EvalConfig.num_examples=8",
            "--gin.evaluator.EvalConfig.batch_size=8", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    import tasks.quickstart  # noqa: F401

    model_dir = tmp_path_factory.mktemp("trained")
    assert run_cli(train_args(model_dir, 4, "--gin.checkpoint.CheckpointConfig.every_steps=2")) == 0
    return model_dir


@pytest.mark.slow
def test_eval_writes_results_json_markdown_and_tensorboard(trained_run, capsys):
    assert run_cli(eval_args(trained_run)) == 0
    results = json.loads((trained_run / "eval_results.json").read_text())
    assert results["step"] == 4 and results["checkpoint"].endswith(os.path.join("checkpoints", "4"))
    tasks = results["tasks"]
    assert set(tasks) == {"quickstart_max", "quickstart_sort", "quickstart_add", "quickstart_count",
                          "quickstart_lookup", "quickstart_larger_rank"}  # fmt: skip
    assert set(tasks["quickstart_max"]["metrics"]) == {"exact_match"} and tasks["quickstart_max"]["num_examples"] == 8
    assert set(tasks["quickstart_larger_rank"]["metrics"]) == {"accuracy"}
    assert tasks["quickstart_larger_rank"]["num_examples"] == 4  # 8 rows, two options each
    table = (trained_run / "eval_results.md").read_text()
    assert "| quickstart_larger_rank | accuracy |" in table and table in capsys.readouterr().err.replace("\r", "")
    logged = [r for r in read_metrics(trained_run / "metrics.jsonl") if "eval/quickstart_max/exact_match" in r]
    assert logged[-1]["step"] == 4
    assert glob.glob(str(trained_run / "tensorboard" / "events.out.tfevents.*"))


@pytest.mark.slow
def test_eval_of_one_step_directory(trained_run, tmp_path):
    out = tmp_path / "out"
    args = eval_args(trained_run / "checkpoints" / "2", f"--gin.EVAL_OUTPUT_DIR={out}", "--gin.MIXTURE_OR_TASK_NAME=quickstart_max")
    assert run_cli(args) == 0
    assert json.loads((out / "eval_results.json").read_text())["step"] == 2


def test_eval_of_a_missing_checkpoint(tmp_path, capsys):
    assert run_cli(eval_args(tmp_path / "nowhere")) == 1
    assert "no checkpoints in" in capsys.readouterr().err


@pytest.mark.slow
def test_eval_with_a_model_of_another_shape(trained_run, capsys):
    args = eval_args(trained_run, "--gin_file=configs/models/tiny.gin", "--gin.transformer.TransformerConfig.d_ff=96")
    assert run_cli(args) == 1
    assert "has shape" in capsys.readouterr().err


# --- kills and pre-emption (real processes) ---------------------------------------------------


def _spawn(model_dir, steps, *extra):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    args = train_args(model_dir, steps, *extra)
    return subprocess.Popen(
        [sys.executable, "-m", "flanjax.cli", *args],
        cwd=config.REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def _wait_for_step(model_dir, step, proc, timeout=900):
    path = os.path.join(model_dir, "metrics.jsonl")
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(path) and any(r.get("step", 0) >= step for r in read_metrics(path)):
            return
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.05)
    raise TimeoutError(f"no step {step} in {path}")


def _losses(model_dir):
    return {r["step"]: r["loss"] for r in read_metrics(os.path.join(model_dir, "metrics.jsonl")) if "loss" in r}


CKPT = ("--gin.checkpoint.CheckpointConfig.every_steps=20", "--gin.loop.LoopConfig.log_every=10")


@pytest.mark.slow
def test_sigkill_then_resume_reproduces_the_uninterrupted_losses(tmp_path):
    steps = 120
    straight = _spawn(tmp_path / "straight", steps, *CKPT)
    killed = _spawn(tmp_path / "killed", steps, *CKPT)  # side by side
    _wait_for_step(tmp_path / "killed", 50, killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert straight.wait() == 0, straight.stdout.read()
    done = {r["step"] for r in read_metrics(tmp_path / "killed" / "metrics.jsonl") if "loss" in r}
    assert max(done) < steps, "the run finished before it could be killed; raise `steps`"

    resumed = _spawn(tmp_path / "killed", steps, *CKPT)
    out = resumed.communicate()[0]
    assert resumed.returncode == 0, out
    assert "Resuming from checkpoint step" in out
    a, b = _losses(tmp_path / "straight"), _losses(tmp_path / "killed")
    assert set(a) == set(b)
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5), step


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_says_how_to_resume(tmp_path):
    proc = _spawn(tmp_path, 100_000, *CKPT)
    _wait_for_step(tmp_path, 30, proc)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=900)[0]  # a deadline, not a wait: it returns when the process exits
    assert proc.returncode == 143, out
    assert "Pre-empted" in out and "Resume with the same command:" in out
    command = out.split("Resume with the same command:")[1].strip().splitlines()[0]
    assert command == shlex.join([sys.executable, "-m", "flanjax.cli", *train_args(tmp_path, 100_000, *CKPT)])
    saved = sorted(int(os.path.basename(p)) for p in glob.glob(str(tmp_path / "checkpoints" / "[0-9]*")))
    assert saved and saved[-1] >= 30  # the step it stopped at, not only the periodic ones


KILL_DURING_SAVE = """
import sys, numpy as np, jax.numpy as jnp
from flanjax.rundir.checkpoint import Checkpointer, CheckpointConfig
ckpt = Checkpointer(sys.argv[1], CheckpointConfig(keep=None, async_save=False))
for step in range(1, 1000):
    ckpt.save(step, {"w": jnp.full((4_000_000,), float(step))}, {"position": step})
"""


@pytest.mark.slow
def test_kill_during_a_save_leaves_no_checkpoint_to_mistake_for_good(tmp_path):
    import jax
    import jax.numpy as jnp

    from flanjax.rundir.checkpoint import Checkpointer

    proc = subprocess.Popen([sys.executable, "-c", KILL_DURING_SAVE, str(tmp_path)])
    ckpts = tmp_path / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until a save is half-way: a temporary directory exists
        if len(os.listdir(ckpts) if ckpts.exists() else []) > 2 and any("tmp" in p for p in os.listdir(ckpts)):
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert any("tmp" in p for p in os.listdir(ckpts)), "killed outside a save; try again"
    ckpt = Checkpointer(str(tmp_path))
    step = ckpt.latest_step()
    state, data = ckpt.restore(step, {"w": jax.ShapeDtypeStruct((4_000_000,), jnp.float32)})
    assert float(state["w"][0]) == float(state["w"][-1]) == step and data == {"position": step}
    assert not any("tmp" in p for p in os.listdir(ckpts))  # leftovers cleaned up


def test_bench_train_prints_one_json_object(capsys):
    gin.clear_config(clear_constants=True)
    start = time.perf_counter()
    assert cli.main(["bench", "train", "--model=tiny", "--batch_size=8", "--seq_len=32", "--steps=2", "--warmup=1"]) == 0
    elapsed = time.perf_counter() - start
    result = json.loads(capsys.readouterr().out)
    # The median step is no slower than the whole command (3 steps of 8 x 32 tokens, compile included).
    assert 3 * result["step_time_s"] < elapsed and result["tokens_per_s"] > 3 * 8 * 32 / elapsed
    assert 0 < result["mfu"] and result["peak_rss_mb"] > 0 and result["params"] > 0


def test_bench_rank_prints_both_ways_of_scoring(capsys):
    gin.clear_config(clear_constants=True)
    assert cli.main(["bench", "rank", "--model=tiny", "--batch_size=8", "--prompt_len=16", "--option_len=4", "--num_options=4"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["batch_size"], result["num_options"]) == (8, 4)
    for way in ("per_row", "prompt_once"):
        assert result[way]["options_per_s"] == pytest.approx(8 / result[way]["seconds_per_batch"])
    assert result["speedup"] == pytest.approx(result["per_row"]["seconds_per_batch"] / result["prompt_once"]["seconds_per_batch"])


def test_bench_ppo_of_a_lora_policy_holds_no_reference_copy(capsys):
    held = {}
    for rank in (0, 2):
        gin.clear_config(clear_constants=True)
        assert cli.main(["bench", "ppo", "--model=tiny", "--batch_size=8", "--prompt_len=8", "--new_tokens=4", f"--lora_rank={rank}"]) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["lora_rank"] == (rank or None) and result["iteration_s"] > 0
        held[rank] = result["held_mib"]
    # LoRA keeps neither a reference copy nor AdamW's two moments of the policy: three models
    # fewer, less the small adapters and their moments.
    model_mib = result["params"] * 4 / 2**20
    assert held[0] - held[2] == pytest.approx(3 * model_mib, rel=0.03)


def test_tasks_list_prints_task_objects(capsys):
    assert cli.main(["tasks", "list", "--json"]) == 0
    listing = {t["name"]: t for t in json.loads(capsys.readouterr().out)}
    assert {"quickstart_add", "flan_rte", "flan_xsum"} <= set(listing)
    assert not {"flan_rte_eval", "flan_rte_fewshot"} & set(listing)  # variants are listed with their task
    rte = listing["flan_rte"]
    assert rte["cluster"] == "nli" and rte["source"] == "tfds:super_glue/rte:1.0.2" and rte["templates"] == 10
    assert 0 < rte["turned_around"] <= 3 and rte["metrics"] == ["accuracy", "f1"] and rte["eval_task"] == "flan_rte_eval"
    assert cli.main(["tasks", "list", "--json", "--cluster", "summarization"]) == 0
    summarization = json.loads(capsys.readouterr().out)
    assert len(summarization) == 11 and {t["metrics"][0] for t in summarization} == {"rouge"}
    assert cli.main(["tasks", "list", "--cluster", "sumarization"]) == 1
    assert "Did you mean: summarization" in capsys.readouterr().err


def test_tasks_preview_renders_mock_examples(capsys):
    from flanjax.data.templated import templated_tasks

    assert cli.main(["tasks", "preview", "flan_rte", "-n", "6", "--mock"]) == 0
    out = capsys.readouterr().out
    examples = out.split("--- flan_rte [train] example ")[1:]
    assert len(examples) == 6 and all("targets:" in e for e in examples)
    templates = next(t for t in templated_tasks("nli") if t.name == "flan_rte").templates
    for example in examples:  # every forward template lists the options; turned-around ones have none
        template = templates[int(example.split("template ")[1].split("\n")[0])]
        assert ("OPTIONS:\n- Yes\n- No" in example) != template.turned_around, example
    assert cli.main(["tasks", "preview", "flan_rte_eval", "-n", "4", "--mock", "--split", "test"]) == 0
    assert capsys.readouterr().out.count("OPTIONS:\n- Yes\n- No") == 4  # a row per option, two per example
    assert cli.main(["tasks", "preview", "flan_rtee", "--mock"]) == 1
    assert "Did you mean: flan_rte" in capsys.readouterr().err


def _preview_examples(out: str, name: str, split: str) -> list[str]:
    """A `tasks preview` output's examples, each without its header line."""
    return [e.split("\n", 1)[1] for e in out.split(f"--- {name} [{split}] example ")[1:]]


def test_tasks_preview_shows_different_examples(capsys):
    # ANLI reads its three rounds round-robin; TFDS's mock data alone is the same for each round.
    assert cli.main(["tasks", "preview", "flan_anli", "-n", "2", "--mock"]) == 0
    examples = _preview_examples(capsys.readouterr().out, "flan_anli", "train")
    assert len(examples) == 2 and examples[0] != examples[1], examples


def test_tasks_preview_of_an_eval_task_marks_the_correct_option(capsys, monkeypatch):
    import seqio

    from flanjax.data import pipeline
    from flanjax.data.rank_classification import rank_classification

    targets = []  # each example's target, rendered before rank classification splits it into options
    text_examples = pipeline.text_examples

    def spy(name, split, n, **kwargs):
        task = seqio.get_mixture_or_task(name)
        ds = task.source.get_dataset(split, shuffle=False)
        for step in task.preprocessors[: task.preprocessors.index(rank_classification)]:
            ds = step(ds)
        targets.extend(ex["targets"].decode() for ex in ds.take(n).as_numpy_iterator())
        return text_examples(name, split, n, **kwargs)

    monkeypatch.setattr(pipeline, "text_examples", spy)
    assert cli.main(["tasks", "preview", "flan_anli_eval", "-n", "4", "--mock", "--split", "test"]) == 0
    examples = _preview_examples(capsys.readouterr().out, "flan_anli_eval", "test")
    assert len(examples) == len(targets) == 4  # an example each, not a row per option
    for example, target in zip(examples, targets):
        options = example.split("targets (one per option, * = correct):\n")[1].splitlines()
        assert [o[2:] for o in options] == ["Yes", "It's impossible to say", "No"], example
        assert [o[2:] for o in options if o.startswith("* ")] == [target], example
        assert all(o.startswith(("* ", "  ")) for o in options)


def test_accelerator_benchmark_falls_back_on_cpu(tmp_path):
    """XLA attention, MFU against the measured matmul peak; the last line is one JSON object."""
    out = subprocess.run(
        [sys.executable, "benchmarks/accelerator.py", "--model=tiny", "--batch_size=4", "--seq_len=32", "--steps=2",
         "--prompt_len=8", "--new_tokens=4", "--decode_batch=4", "--skip=ppo"],
        capture_output=True, text=True, check=True, env={**os.environ, "XLA_FLAGS": ""},
    )  # fmt: skip
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert (result["backend"], result["attention"], result["devices"]) == ("cpu", "xla", 1)
    assert 0 < result["mfu"] == result["train"]["mfu"] and result["train"]["dtype"] == "bfloat16"
    assert result["decode"]["new_tokens_per_s"] > 0 and "ppo" not in result
