"""`flanjax convert` end to end: a Hugging Face checkpoint becomes a run directory, `flanjax train`
fine-tunes it with LoRA, and the result goes back to Hugging Face with the same logits.

References: the source checkpoint's own tensors (converted weights, frozen base weights), the
tokenizer's own ids and NumPy means (added tokens), and transformers' forward pass (export).
"""

from __future__ import annotations

import json
import os
import uuid

import gin
import numpy as np
import pytest
import seqio
import tensorflow as tf
from flax import nnx

from flanjax import cli, convert
from flanjax.data.vocab import HFVocabulary
from flanjax.models import hf
from flanjax.models.transformer import new_model
from flanjax.rundir.checkpoint import Checkpointer
from flanjax.rundir.files import read_lora_config, read_model_config
from flanjax.sharding import MeshConfig, Partitioner

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def run_cli(args) -> int:
    gin.clear_config(clear_constants=True)
    return cli.main(args)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny LLaMA with the quickstart's tokenizer, whose vocabulary fills the table exactly
    (so adding a token must grow it)."""
    import tasks.quickstart

    tokenizer = transformers.AutoTokenizer.from_pretrained(tasks.quickstart.tokenizer_dir())
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128,
    )  # fmt: skip
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("hf") / "tiny_llama")
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def restore(run_dir: str, step: int):
    config, lora = read_model_config(run_dir), read_lora_config(run_dir)
    partitioner = Partitioner.from_config(MeshConfig(data=1, fsdp=-1))
    graphdef, abstract = partitioner.abstract_state(lambda: new_model(config, lora))
    with partitioner.activate():
        return nnx.merge(graphdef, Checkpointer(run_dir, read_only=True).restore_model(step, abstract))


def params(model) -> dict[str, np.ndarray]:
    return {"/".join(map(str, p)): np.asarray(v.value) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.mark.slow
def test_from_hf_train_with_lora_and_back(hf_dir, tmp_path, repo_root, monkeypatch, capsys):
    monkeypatch.chdir(repo_root)
    source = {k: v.numpy() for k, v in transformers.AutoModelForCausalLM.from_pretrained(hf_dir).state_dict().items()}
    old_len = len(transformers.AutoTokenizer.from_pretrained(hf_dir))
    converted = str(tmp_path / "converted")
    assert run_cli(["convert", "from-hf", "--in", hf_dir, "--out", converted, "--add_tokens", "<|eot|>"]) == 0

    # The tokenizer gained the token at the next id; the table grew to a multiple of 128 rows,
    # every new row is the mean of the old ones, every old row is the checkpoint's.
    tokenizer = transformers.AutoTokenizer.from_pretrained(os.path.join(converted, "tokenizer"))
    assert tokenizer.convert_tokens_to_ids("<|eot|>") == old_len and len(tokenizer) == old_len + 1
    model = restore(converted, 0)
    assert model.config.vocab_size == -(-(old_len + 1) // 128) * 128
    embed, head = np.asarray(model.embed.embedding.value), np.asarray(model.lm_head.kernel.value)
    np.testing.assert_array_equal(embed[:old_len], source["model.embed_tokens.weight"])
    np.testing.assert_array_equal(head[:, :old_len], source["lm_head.weight"].T)
    np.testing.assert_allclose(embed[old_len:], np.broadcast_to(source["model.embed_tokens.weight"].mean(0), embed[old_len:].shape), atol=1e-7)
    np.testing.assert_allclose(head[:, old_len:].T, np.broadcast_to(source["lm_head.weight"].mean(0), head[:, old_len:].T.shape), atol=1e-7)
    gin_text = open(os.path.join(converted, "model.gin")).read()
    assert "lm.train.init_checkpoint" in gin_text and "vocab.default_tokenizer.path" in gin_text

    # The quickstart's tasks (its tokenizer: one token fewer) are refused: ids would shift meaning.
    tuned = str(tmp_path / "tuned")
    args = ["train", "--gin_file=tests/tiny_run.gin", f"--gin_file={converted}/model.gin", "--gin_file=configs/runs/lora.gin",
            f"--gin.MODEL_DIR={tuned}", "--gin.TRAIN_STEPS=3", "--gin.lora.LoraConfig.dropout=0.0"]  # fmt: skip
    assert run_cli(args) == 1
    assert f"the model of {converted} reads the one in {converted}/tokenizer" in capsys.readouterr().err

    # LoRA training from the converted weights on data in its own tokenizer: the base stays
    # bit-identical, adapters move.
    vocabulary = HFVocabulary(os.path.join(converted, "tokenizer"))
    texts = {"inputs": [f"Sort the digits {i} {i + 3} {i + 1}." for i in range(6)], "targets": [f"{i} {i + 1} {i + 3}" for i in range(6)]}
    source = seqio.FunctionDataSource(lambda split, shuffle_files, seed=None: tf.data.Dataset.from_tensor_slices(texts), splits=["train"])
    seqio.TaskRegistry.add("converted_sort", source, preprocessors=[seqio.preprocessors.tokenize],
                           output_features={k: seqio.Feature(vocabulary, add_eos=k == "targets") for k in texts})  # fmt: skip
    try:
        assert run_cli([*args, "--gin.MIXTURE_OR_TASK_NAME=converted_sort"]) == 0
    finally:
        seqio.TaskRegistry.remove("converted_sort")
    trained, base = params(restore(tuned, 3)), params(model)
    adapters = {k for k in trained if "lora_" in k}
    assert adapters and {k.replace("/base", "") for k in trained.keys() - adapters} == base.keys()
    for name, value in trained.items():
        if name not in adapters:
            np.testing.assert_array_equal(value, base[name.replace("/base", "")], err_msg=name)
    assert any(np.abs(v).max() > 0 for k, v in trained.items() if k.endswith("lora_b"))

    # Back to Hugging Face, adapters merged: transformers gives the LoRA model's logits.
    exported = str(tmp_path / "exported")
    assert run_cli(["convert", "to-hf", "--in", tuned, "--out", exported]) == 0
    assert json.load(open(os.path.join(exported, "config.json")))["vocab_size"] == model.config.vocab_size
    assert transformers.AutoTokenizer.from_pretrained(exported).convert_tokens_to_ids("<|eot|>") == old_len
    tokens = np.random.default_rng(0).integers(0, old_len + 1, (2, 9))
    with torch.no_grad():
        expected = transformers.AutoModelForCausalLM.from_pretrained(exported)(torch.from_numpy(tokens)).logits.numpy()
    ours = np.asarray(restore(tuned, 3)(tokens)[0])
    np.testing.assert_allclose(ours, expected, atol=1e-5)


def test_conversion_errors(hf_dir, tmp_path, capsys):
    target = str(tmp_path / "run")
    assert run_cli(["convert", "from-hf", "--in", hf_dir, "--out", target]) == 0
    assert run_cli(["convert", "from-hf", "--in", hf_dir, "--out", target]) == 1
    assert "already holds checkpoints; convert into a new directory" in capsys.readouterr().err
    # A tokenizer with more tokens than the model has rows.
    small = str(tmp_path / "small")
    config = json.load(open(os.path.join(hf_dir, "config.json")))
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**config, "vocab_size": 64})).save_pretrained(small)
    transformers.AutoTokenizer.from_pretrained(hf_dir).save_pretrained(small)
    with pytest.raises(hf.HFCheckpointError, match=r"tokens but the model's vocabulary has 64 rows"):
        convert.from_hf(small, str(tmp_path / "small_run"))


def test_hugging_face_directories_on_a_remote_file_system(hf_dir, tmp_path):
    """from-hf reads a remote HF directory (through the cache) and to-hf writes one: the same
    weights and files as with local directories (ram://, tf.io.gfile's in-memory file system)."""
    from flanjax import paths

    remote = f"ram://{uuid.uuid4().hex}"
    paths.copytree(hf_dir, f"{remote}/hf")
    local_run, remote_run = str(tmp_path / "local"), str(tmp_path / "remote")
    convert.from_hf(hf_dir, local_run)
    convert.from_hf(f"{remote}/hf", remote_run)
    a, b = params(restore(local_run, 0)), params(restore(remote_run, 0))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert f"# {remote}/hf converted by" in open(os.path.join(remote_run, "model.gin")).read()
    assert sorted(os.listdir(os.path.join(remote_run, "tokenizer"))) == sorted(os.listdir(os.path.join(local_run, "tokenizer")))

    convert.to_hf(local_run, str(tmp_path / "out"))
    convert.to_hf(local_run, f"{remote}/out")
    for name in os.listdir(tmp_path / "out"):
        assert paths.read_bytes(f"{remote}/out/{name}") == (tmp_path / "out" / name).read_bytes(), name
