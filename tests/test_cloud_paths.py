"""A run's files on a remote file system: the same code paths on tf.io.gfile's in-memory ram://
(no network) as on local paths, compared with what the local paths give. Orbax checkpoints are
not tested here: Orbax reaches files through etils.epath, which has no ram:// (and tensorstore
none either)."""

import json
import os
import uuid

import numpy as np
import pytest
import seqio
import tensorflow as tf
from flax import nnx

from flanjax import paths
from flanjax.data import dialogue, preferences
from flanjax.data.bidirectional import Directions, read_directions, write_directions
from flanjax.data.vocab import HFVocabulary, train_tokenizer
from flanjax.eval.evaluator import TaskResult
from flanjax.eval.report import write_results
from flanjax.models.lora import LoraConfig, apply_lora, load_adapters, read_adapter_config, save_adapters
from flanjax.models.transformer import Transformer, TransformerConfig
from flanjax.rundir import files
from flanjax.rundir.checkpoint import CheckpointNotFoundError
from flanjax.rundir.metrics import MetricsLog, latest_metrics, plot_metrics, read_metrics
from flanjax.train import ewc

TINY = TransformerConfig(vocab_size=128, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=64, max_len=32)


@pytest.fixture()
def remote():
    """A fresh directory on ram:// (process-wide, so each test gets its own name), removed after."""
    root = f"ram://flanjax-test-{uuid.uuid4().hex[:8]}"
    tf.io.gfile.makedirs(root)
    yield root
    tf.io.gfile.rmtree(root)


def read(path: str) -> str:
    with paths.open(path) as f:
        return f.read()


# --- the helper --------------------------------------------------------------------------------


def test_helper_treats_remote_paths_like_local_ones(remote, tmp_path):
    for root in (str(tmp_path / "local"), remote + "/remote"):
        paths.makedirs(os.path.join(root, "a", "b"))
        assert paths.isdir(os.path.join(root, "a", "b")) and not paths.exists(os.path.join(root, "x"))
        paths.write_atomic(os.path.join(root, "a", "f.txt"), "one\ntwo\n")
        assert paths.exists(os.path.join(root, "a", "f.txt")) and not paths.isdir(os.path.join(root, "a", "f.txt"))
        assert read(os.path.join(root, "a", "f.txt")) == "one\ntwo\n"
        with pytest.raises(FileNotFoundError):  # at open, as locally (gfile alone fails at the first read)
            paths.open(os.path.join(root, "missing.txt"))
        paths.remove(os.path.join(root, "a", "f.txt"))
        assert not paths.exists(os.path.join(root, "a", "f.txt"))
    assert paths.abspath("gs://bucket/run") == "gs://bucket/run"  # os.path.abspath would give CWD/gs:/bucket/run
    assert paths.abspath("run") == os.path.abspath("run")


def test_unsupported_scheme_names_the_fix():
    with pytest.raises(paths.UnsupportedPathError) as e:
        files.read_model_config("s3://bucket/run")
    assert "s3://bucket/run" in str(e.value) and "gs://" in str(e.value) and "tensorflow-io" in str(e.value)
    with pytest.raises(paths.UnsupportedPathError):
        HFVocabulary("s3://bucket/tokenizer").tokenizer


# --- run files ---------------------------------------------------------------------------------


def test_run_files_round_trip_as_locally(remote, tmp_path):
    lora = LoraConfig(rank=4, targets=(r"attn/q$",))
    read_back = {}
    for root in (str(tmp_path), remote):
        run, origin = os.path.join(root, "run"), os.path.join(root, "origin")
        files.write_model_config(run, TINY, lora)
        files.write_init_checkpoint(run, origin)
        dialogue.write_format(origin, dialogue.DialogueFormat(eot="<|end|>"))
        write_directions(origin, Directions(l2r_token="<a>", r2l_token="<b>"))
        read_back[root] = (files.read_model_config(run), files.read_lora_config(run), files.read_init_checkpoint(run),
                           list(files.lineage(run)), dialogue.read_format(files.lineage(run)), read_directions(files.lineage(run)),
                           files.read_lora_config(origin), read(os.path.join(run, files.MODEL_FILE)))  # fmt: skip
    local, on_ram = read_back[str(tmp_path)], read_back[remote]
    assert on_ram[0] == TINY and on_ram[1].rank == 4 and on_ram[2] == remote + "/origin"
    assert on_ram[3] == [remote + "/run", remote + "/origin"]  # the lineage follows the remote origin
    assert on_ram[4].eot == "<|end|>" and on_ram[5] == Directions(l2r_token="<a>", r2l_token="<b>") and on_ram[6] is None
    assert on_ram[:2] == local[:2] and on_ram[4:] == local[4:]  # the same files, byte for byte (model.json)


def test_resolve_checkpoint_keeps_a_remote_path_whole(remote):
    paths.makedirs(f"{remote}/run/checkpoints/7")
    assert files.resolve_checkpoint(f"{remote}/run/checkpoints/7/") == (f"{remote}/run", 7)
    with pytest.raises(CheckpointNotFoundError, match=f"no checkpoints in {remote}/other"):
        files.resolve_checkpoint(f"{remote}/other")


# --- metrics -----------------------------------------------------------------------------------


def write_metrics(model_dir: str, rows) -> None:
    log = MetricsLog(model_dir)
    for step, scalars in rows:
        log.write(step, scalars)
    log.close()


def test_metrics_log_appends_and_reads_back_as_locally(remote, tmp_path):
    first, resumed = [(1, {"loss": 2.5}), (2, {"loss": 2.0, "lr": 0.1})], [(2, {"loss": 1.9}), (3, {"loss": 1.5})]
    for root in (str(tmp_path), remote):
        write_metrics(root, first)
        write_metrics(root, resumed)  # a resumed run appends to the file of the first
    remote_rows = read_metrics(f"{remote}/metrics.jsonl")
    assert remote_rows == read_metrics(str(tmp_path / "metrics.jsonl")) and len(remote_rows) == 4
    assert latest_metrics(f"{remote}/metrics.jsonl") == {"loss": 1.5, "lr": 0.1}
    assert latest_metrics(f"{remote}/none.jsonl") == {}
    assert tf.io.gfile.listdir(f"{remote}/tensorboard")  # TensorFlow's summary writer reaches the scheme itself


def test_remote_metrics_are_flushed_on_a_clock(remote):
    # ram:// writes through at once; on GCS nothing is uploaded before a flush, so count them.
    log = MetricsLog(remote)
    flushes = []
    file = log._file
    log._file = type("Counting", (), {"write": file.write, "flush": lambda self: flushes.append(1) or file.flush(), "close": file.close})()
    log.write(1, {"loss": 1.0})
    assert flushes == []  # within REMOTE_FLUSH_S of opening
    log.REMOTE_FLUSH_S = 0.0
    log.write(2, {"loss": 0.5})
    assert flushes == [1]
    log.close()
    assert [r["step"] for r in read_metrics(f"{remote}/metrics.jsonl")] == [1, 2]


def test_plot_to_a_remote_directory_is_the_local_png(remote, tmp_path):
    write_metrics(remote, [(s, {"loss": 3.0 / s}) for s in range(1, 5)])
    png = plot_metrics(f"{remote}/metrics.jsonl", f"{remote}/loss.png", title="run")
    plot_metrics(f"{remote}/metrics.jsonl", str(tmp_path / "loss.png"), title="run")
    with paths.open(png, "rb") as f:
        assert f.read() == (tmp_path / "loss.png").read_bytes()


def test_eval_results_are_written_as_locally(remote, tmp_path):
    results = {"qa": TaskResult(metrics={"accuracy": 75.0}, num_examples=4)}
    path = write_results(results, f"{remote}/eval", step=3, checkpoint="ckpt")
    write_results(results, str(tmp_path), step=3, checkpoint="ckpt")
    assert path == f"{remote}/eval/eval_results.json" and json.loads(read(path))["tasks"]["qa"]["metrics"] == {"accuracy": 75.0}
    for name in ("eval_results.json", "eval_results.md"):
        assert read(f"{remote}/eval/{name}") == (tmp_path / name).read_text()
    assert sorted(tf.io.gfile.listdir(f"{remote}/eval")) == ["eval_results.json", "eval_results.md"]  # no staging left


# --- tokenizers --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vocabulary(tmp_path_factory) -> HFVocabulary:
    path = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer([f"the {c} cat sat on mat {i}" for i in range(50) for c in ("red", "blue")], vocab_size=300, special_tokens=("<|eot|>",)).save_pretrained(path)
    return HFVocabulary(str(path))


def test_a_remote_run_records_and_reads_its_tokenizer_through_the_cache(remote, vocabulary):
    run = f"{remote}/run"
    files.write_tokenizer(run, vocabulary)
    assert sorted(tf.io.gfile.listdir(f"{run}/tokenizer")) == sorted(os.listdir(vocabulary.path))
    recorded = files.run_vocabulary(run)
    assert recorded.path == f"{run}/tokenizer"  # named by its remote path (messages, --gin.TOKENIZER)
    text = "the blue cat sat on mat 7"
    assert recorded.encode(text) == vocabulary.encode(text) and recorded.fingerprint() == vocabulary.fingerprint()
    files.check_tokenizer(run, vocabulary, "the data")
    copy = paths.local_copy(f"{run}/tokenizer")
    assert copy.startswith(paths.cache_dir()) and paths.local_copy(f"{run}/tokenizer/") == copy  # fetched once
    assert sorted(os.listdir(copy)) == sorted(os.listdir(vocabulary.path))
    paths.write_atomic(f"{run}/tokenizer/extra.txt", "changed")
    assert paths.local_copy(f"{run}/tokenizer") != copy  # a changed directory is fetched anew


def test_a_missing_remote_tokenizer_says_so(remote):
    with pytest.raises(FileNotFoundError, match=f"{remote}/nothing"):
        HFVocabulary(f"{remote}/nothing").tokenizer


# --- data --------------------------------------------------------------------------------------


def examples_of(task: seqio.Task) -> list[dict]:
    return [{k: np.asarray(v).tolist() for k, v in ex.items()} for ex in task.get_dataset(None, split="train", shuffle=False).as_numpy_iterator()]


def test_preference_files_on_a_remote_path_read_as_locally(remote, tmp_path, vocabulary):
    comparisons = [preferences.comparison("a cat?", ["the red cat", "the blue cat"]), preferences.comparison("mat?", ["mat 1", "mat 2", "mat 3"], [2, 0, 1])]
    examples = {}
    for name, path in (("local", str(tmp_path / "prefs" / "train.jsonl")), ("remote", f"{remote}/prefs/train.jsonl")):
        assert preferences.write_comparisons(path, comparisons) == path
        assert list(preferences.read_comparisons(path)) == comparisons
        task = preferences.add_preference_task(f"test_cloud_prefs_{name}", {"train": path}, vocabulary)
        examples[name] = examples_of(task)
        seqio.TaskRegistry.remove(f"test_cloud_prefs_{name}")
    assert examples["remote"] == examples["local"] and len(examples["remote"]) == 2
    with pytest.raises(preferences.PreferenceDataError, match=f"{remote}/none.jsonl does not exist"):
        list(preferences.read_comparisons(f"{remote}/none.jsonl"))


def test_a_dialogue_task_reads_a_remote_jsonl_file_as_a_local_one(remote, tmp_path, vocabulary):
    lines = "".join(json.dumps({"conversations": [f"the {c} cat?", f"sat on mat {i}"]}) + "\n" for i, c in enumerate(("red", "blue", "red")))
    (tmp_path / "train.jsonl").write_text(lines)
    paths.write_atomic(f"{remote}/train.jsonl", lines)
    examples = {}
    for name, path in (("local", str(tmp_path / "train.jsonl")), ("remote", f"{remote}/train.jsonl")):
        task = dialogue.add_dialogue_task(f"test_cloud_dialogue_{name}", {"train": path}, vocabulary)
        examples[name] = examples_of(task)
        seqio.TaskRegistry.remove(f"test_cloud_dialogue_{name}")
    assert examples["remote"] == examples["local"] and len(examples["remote"]) == 3
    paths.write_atomic(f"{remote}/bad.jsonl", lines + "{not json\n")
    with pytest.raises(dialogue.DialogueError, match=f"{remote}/bad.jsonl line 4 is not JSON"):
        dialogue.read_conversations(f"{remote}/bad.jsonl")


# --- adapters and Fishers ----------------------------------------------------------------------


def test_adapters_and_fishers_round_trip_on_a_remote_path(remote):
    config = LoraConfig(rank=4, alpha=8.0)

    def wrapped(seed: int) -> Transformer:
        model = Transformer(TINY, rngs=nnx.Rngs(0))
        apply_lora(model, config, rngs=nnx.Rngs(seed))
        return model

    saved, loaded = wrapped(1), wrapped(2)
    for _, v in nnx.to_flat_state(nnx.state(saved, nnx.LoRAParam)):
        v[...] = v[...] + 0.5  # lora_b starts at zero: make every tensor tell
    save_adapters(saved, f"{remote}/adapters", config)
    assert read_adapter_config(f"{remote}/adapters").rank == 4
    load_adapters(loaded, f"{remote}/adapters")
    for (_, a), (_, b) in zip(nnx.to_flat_state(nnx.state(saved, nnx.LoRAParam)), nnx.to_flat_state(nnx.state(loaded, nnx.LoRAParam))):
        np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]))

    tensors = {"layers.0.attn.q.kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}
    ewc.save_fisher(f"{remote}/run/fisher", tensors, {"run": f"{remote}/run", "step": 5})
    ewc.save_fisher(f"{remote}/run/fisher", {k: v * 2 for k, v in tensors.items()}, {"run": f"{remote}/run", "step": 6})  # replaces
    read_tensors, info = ewc.read_fisher(f"{remote}/run")  # found from the run directory
    np.testing.assert_array_equal(read_tensors["layers.0.attn.q.kernel"], tensors["layers.0.attn.q.kernel"] * 2)
    assert info == {"run": f"{remote}/run", "step": 6}


def test_a_remote_gin_file_and_its_remote_include_are_read(remote):
    import gin

    from flanjax.config import parse_gin

    with tf.io.gfile.GFile(f"{remote}/base.gin", "w") as f:
        f.write("STEPS = 3\nNAME = 'base'\n")
    with tf.io.gfile.GFile(f"{remote}/run.gin", "w") as f:
        f.write(f"include '{remote}/base.gin'\nNAME = 'run'\n")
    gin.clear_config(clear_constants=True)
    try:
        parse_gin([f"{remote}/run.gin"], ["STEPS = 4"])
        assert (gin.query_parameter("%NAME"), gin.query_parameter("%STEPS")) == ("run", 4)
    finally:
        gin.clear_config(clear_constants=True)


def test_world_experiences_written_to_a_remote_directory_read_back_as_locally(remote, tmp_path):
    from flanjax.worlds.experiences import ExperienceConfig, generate
    from flanjax.worlds.mcts import SearchConfig
    from tasks.e2wm.experiences import records

    config = ExperienceConfig(homes=2, stories_per_home=1, search=SearchConfig(num_simulations=8))
    generate(str(tmp_path), config)
    generate(f"{remote}/world", config)
    for name in ("plans", "counting"):
        assert records(f"{remote}/world", name) == records(str(tmp_path), name)
    assert len(records(str(tmp_path), "counting")) > 0
