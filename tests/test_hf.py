"""Tests of `flanjax.models.hf` against Hugging Face transformers (PyTorch) as the reference.

For each supported family (LLaMA, Mistral, Qwen2, GPT-2, GPT-Neo, GPT-J) a tiny random
PyTorch model is saved with `save_pretrained` and loaded with `load_model`; then:

* logits on a right-padded batch (attention_mask in PyTorch, segment ids in flanjax) agree
  at every real token, with each family's peculiarity switched on and shown to matter
  (llama3 RoPE scaling + grouped-query attention, Mistral's and GPT-Neo's sliding windows
  shorter than the sequence, GPT-J's partial RoPE, Qwen2's tied embeddings and q/k/v biases),
  part of them on a data x fsdp x tensor = 2 x 2 x 2 mesh with really sharded parameters;
* `save_model` writes checkpoints that `AutoModelForCausalLM` loads with the original logits
  (imported models as their own family, a model trained from scratch as LLaMA);
* greedy `flanjax.decode.generate` with the KV cache yields exactly the tokens of
  transformers' greedy `generate`, without an EOS and stopping at one;
* sharded (index.json) and bfloat16 checkpoints load as the same weights;
* pickle-only checkpoints are refused unless allowed, and broken checkpoints (unknown
  architecture, shapes that disagree with config.json, missing files or tensors, unknown
  tensors) fail with an `HFCheckpointError` that names the problem.

Models are tiny (vocabulary 104, width 32, 2 layers, 4 heads) with all weights drawn with
std 0.2 (norm scales around 1), so logits are O(1) and argmaxes well separated.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import shutil
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flanjax.decode import SamplingConfig, generate
from flanjax.models import hf
from flanjax.models.hf import HFCheckpointError, load_model, read_config, save_model
from flanjax.models.transformer import Transformer, TransformerConfig
from flanjax.sharding import MeshConfig

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB = 104  # even: the vocabulary splits over tensor=2
FAMILIES = hf.FAMILIES
MESH = MeshConfig(data=2, fsdp=2, tensor=2)
SHARDED = ("llama", "gpt2", "gptj")  # loaded onto MESH; the others onto one device (mesh=None)

# A right-padded batch: rows of 12, 8 and 3 real tokens (random tokens in the padding).
LENGTHS = np.array([12, 8, 3])
TOKENS = np.random.default_rng(0).integers(0, VOCAB, (3, 12)).astype(np.int32)
MASK = (np.arange(12)[None] < LENGTHS[:, None]).astype(np.int32)  # 1: token, 0: padding


def hf_config(family: str):
    """A tiny transformers config of `family` with its distinctive feature switched on. No
    special tokens: nothing stops generation early."""
    tr = transformers
    common = dict(vocab_size=VOCAB, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    llama_like = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=64, max_position_embeddings=64, **common)  # fmt: skip
    if family == "llama":  # GQA, and llama3 RoPE scaling that changes 3 of the 4 frequencies
        rope = dict(rope_type="llama3", rope_theta=10_000.0, factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=16)  # fmt: skip
        return tr.LlamaConfig(**llama_like, rope_parameters=rope)
    if family == "mistral":  # a window of 5 over sequences of up to 12
        return tr.MistralConfig(**llama_like, sliding_window=5, head_dim=8)
    if family == "qwen2":  # q/k/v biases, tied embeddings
        return tr.Qwen2Config(**llama_like, tie_word_embeddings=True)
    if family == "gpt2":
        return tr.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, **common)
    if family == "gpt_neo":  # layer 0 global, layer 1 local with a window of 5
        return tr.GPTNeoConfig(hidden_size=32, num_layers=2, num_heads=4, attention_types=[[["global", "local"], 1]],
                               window_size=5, max_position_embeddings=64, **common)  # fmt: skip
    assert family == "gptj"  # RoPE on 4 of each head's 8 dims, interleaved
    return tr.GPTJConfig(n_embd=32, n_layer=2, n_head=4, n_positions=64, rotary_dim=4, **common)


def randomize(model, seed: int = 0):
    """Every parameter ~ N(0, 0.2^2), norm scales ~ N(1, 0.2^2): O(1) logits, clear argmaxes."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_scale = p.ndim == 1 and name.endswith("weight") and ("norm" in name or ".ln" in name)
            p.copy_(0.2 * torch.randn(p.shape, generator=gen) + (1.0 if is_scale else 0.0))
    return model


class Checkpoint(NamedTuple):
    path: str
    torch_model: object  # the transformers model it was saved from (eager attention, eval mode)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """family -> its tiny random transformers model, saved once per module."""
    root, cache = tmp_path_factory.mktemp("hf"), {}

    def get(family: str) -> Checkpoint:
        if family not in cache:
            config = hf_config(family)
            config._attn_implementation = "eager"
            model = transformers.AutoModelForCausalLM.from_config(config).eval()
            randomize(model, seed=FAMILIES.index(family))
            path = str(root / family)
            model.save_pretrained(path)
            cache[family] = Checkpoint(path, model)
        return cache[family]

    return get


@pytest.fixture(scope="module")
def flanjax_model(checkpoint):
    """family -> the flanjax model loaded from its checkpoint (sharded for SHARDED)."""
    cache = {}

    def get(family: str) -> Transformer:
        if family not in cache:
            cache[family] = load_model(checkpoint(family).path, mesh=MESH if family in SHARDED else None)
        return cache[family]

    return get


@nnx.jit
def apply(model, tokens, segment_ids):
    """The model call, compiled (one compilation per family and shape)."""
    return model(tokens, None, segment_ids)[0]


def flanjax_logits(model, tokens=TOKENS, mask=MASK) -> np.ndarray:
    return np.asarray(apply(model, jnp.asarray(tokens, jnp.int32), jnp.asarray(mask, jnp.int32)))


def torch_logits(model, tokens=TOKENS, mask=MASK) -> np.ndarray:
    with torch.no_grad():
        out = model(torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long))
    return out.logits.float().numpy()


def assert_real_tokens_close(actual, expected, atol):
    for row, n in enumerate(LENGTHS):
        np.testing.assert_allclose(actual[row, :n], expected[row, :n], atol=atol, rtol=0, err_msg=f"row {row}")


# --------------------------------------------------------------------------------------
# Loading: logits against PyTorch
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_pytorch_on_padded_batch(family, checkpoint, flanjax_model):
    ckpt, model = checkpoint(family), flanjax_model(family)
    expected = torch_logits(ckpt.torch_model)
    assert expected[MASK.astype(bool)].std() > 0.5  # O(1) logits: the tolerance means something
    assert_real_tokens_close(flanjax_logits(model), expected, atol=1e-4)

    kernel = model.layers[0].attn.q.kernel.get_value()  # [d, heads, head] = [32, 4, 8]
    assert kernel.dtype == jnp.float32
    if family in SHARDED:  # embed over fsdp, heads over tensor
        assert not kernel.sharding.is_fully_replicated
        assert kernel.sharding.shard_shape(kernel.shape) == (16, 2, 8)
        assert len(kernel.sharding.device_set) == 8
    else:
        assert len(kernel.sharding.device_set) == 1


# Each family's distinctive feature as loaded, and the same feature switched off in the flanjax
# config: the logits must then stop matching, so the test above exercises it (windows
# shorter than the rows, a llama3 scaling that moves the frequencies used, and so on).
FEATURES = {
    "llama": (lambda c: dict(c.rope_scaling)["rope_type"] == "llama3" and c.kv_heads == 2, dict(rope_scaling=None)),
    "mistral": (lambda c: c.sliding_window == 5 and c.sliding_window_layers is None, dict(sliding_window=None)),
    "gpt_neo": (lambda c: c.sliding_window == 5 and c.sliding_window_layers == (1,) and c.attention_scale == 1.0,
                dict(sliding_window=None, sliding_window_layers=None)),
    "gptj": (lambda c: c.rotary_dim == 4 and c.head_size == 8 and c.parallel_residual, dict(rotary_dim=None)),
    "qwen2": (lambda c: c.tie_embeddings and c.qkv_bias and not c.out_bias, dict(qkv_bias=False)),
}  # fmt: skip


@pytest.mark.parametrize("family", FEATURES)
def test_family_features_matter(family, checkpoint, flanjax_model):
    model = flanjax_model(family)
    has_feature, without = FEATURES[family]
    assert has_feature(model.config)
    config = dataclasses.replace(model.config, **without)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0))))
    params = {path: value for path, value in nnx.to_flat_state(nnx.state(model))}
    state = nnx.from_flat_state([(path, params[path]) for path, _ in nnx.to_flat_state(abstract)])
    variant = nnx.merge(graphdef, state)  # the same parameters (less the switched-off ones)
    expected = torch_logits(checkpoint(family).torch_model)
    error = max(np.abs(flanjax_logits(variant)[r, :n] - expected[r, :n]).max() for r, n in enumerate(LENGTHS))
    assert error > 1e-2


# --------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------


def load_in_transformers(path: str):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", output_loading_info=True)
    assert not any(info.get(key) for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_export_loads_in_transformers(family, checkpoint, flanjax_model, tmp_path):
    ckpt = checkpoint(family)
    out = save_model(flanjax_model(family), str(tmp_path / "out"), read_config(ckpt.path))
    exported = load_in_transformers(out)
    assert type(exported).__name__ == hf.ARCHITECTURES[family]
    np.testing.assert_allclose(torch_logits(exported), torch_logits(ckpt.torch_model), atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_scanned_model_imports_and_exports_like_transformers(family, checkpoint, tmp_path):
    ckpt = checkpoint(family)
    model = load_model(ckpt.path, mesh=MESH, scan_layers=True)
    assert model.config.scan_layers and nnx.state(model)["layers"]["attn"]["q"]["kernel"].ndim == 4
    assert_real_tokens_close(flanjax_logits(model), torch_logits(ckpt.torch_model), atol=1e-4)
    exported = load_in_transformers(save_model(model, str(tmp_path / "out"), read_config(ckpt.path)))
    np.testing.assert_allclose(torch_logits(exported), torch_logits(ckpt.torch_model), atol=1e-5, rtol=0)


def test_model_from_scratch_exports_as_llama(tmp_path):
    config = TransformerConfig(vocab_size=VOCAB, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=64,
                               max_len=64, norm_eps=1e-5, rope_theta=500.0, init_std=0.2)  # fmt: skip
    # Random parameters drawn in NumPy (eager initialisation compiles op by op), norm scales ~ 1.
    rng = np.random.default_rng(3)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0))))
    draw = lambda path, a: jnp.asarray(rng.normal(1.0 if path[-1] == "scale" else 0.0, 0.2, a.shape), a.dtype)  # noqa: E731
    model = nnx.merge(graphdef, nnx.from_flat_state([(p, draw(p, a)) for p, a in nnx.to_flat_state(abstract)]))
    out = save_model(model, str(tmp_path / "out"), None, max_shard_bytes=20_000)  # several shards + index
    assert os.path.isfile(os.path.join(out, "model.safetensors.index.json"))
    exported = load_in_transformers(out)
    assert type(exported).__name__ == "LlamaForCausalLM"
    assert exported.config.num_key_value_heads == 2 and exported.config.rope_parameters["rope_theta"] == 500.0
    assert_real_tokens_close(torch_logits(exported), flanjax_logits(model), atol=1e-4)
    # ... and flanjax reads its own export back as the same parameters.
    reloaded = dict(nnx.to_flat_state(nnx.state(load_model(out), nnx.Param)))
    for path, param in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        np.testing.assert_array_equal(np.asarray(reloaded[path].get_value()), np.asarray(param.get_value()), err_msg=str(path))


# --------------------------------------------------------------------------------------
# Greedy decoding with the KV cache against transformers' generate
# --------------------------------------------------------------------------------------


def hf_greedy(torch_model, prompts: np.ndarray, new: int, eos: int | None):
    """transformers' greedy tokens [b, new] (0 after each row's EOS) and the top-2 margins of
    their logits. Without `eos`, min_new_tokens keeps every row going."""
    kwargs = dict(min_new_tokens=new) if eos is None else dict(eos_token_id=eos)
    with torch.no_grad():
        out = torch_model.generate(
            torch.tensor(prompts, dtype=torch.long), attention_mask=torch.ones(prompts.shape, dtype=torch.long),
            do_sample=False, max_new_tokens=new, pad_token_id=0, output_scores=True, return_dict_in_generate=True,
            **kwargs,
        )  # fmt: skip
    tokens = out.sequences[:, prompts.shape[1] :].numpy()
    top2 = np.sort(np.stack([s.float().numpy() for s in out.scores]), axis=-1)[..., -2:]
    margins = top2[..., 1] - top2[..., 0]
    return np.pad(tokens, ((0, 0), (0, new - tokens.shape[1]))), margins  # all rows may stop early


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generate_matches_transformers(family, checkpoint, flanjax_model):
    """Equal-length prompts (no padding conventions to reconcile), first with no EOS at all,
    then with an EOS that the first row generates early: both stop there."""
    new, torch_model = 8, checkpoint(family).torch_model
    prompts = np.random.default_rng(1).integers(0, VOCAB, (3, 6)).astype(np.int32)
    graphdef, state = nnx.split(flanjax_model(family))
    lengths = jnp.full((3,), prompts.shape[1], jnp.int32)

    def flanjax_greedy(eos):
        result = generate(graphdef, state, jnp.asarray(prompts), lengths, eos_id=eos, config=SamplingConfig(max_new_tokens=new))
        return np.asarray(result.tokens), np.asarray(result.lengths)

    expected, margins = hf_greedy(torch_model, prompts, new, eos=None)
    assert expected.shape == (3, new)
    assert margins.min() > 2e-4  # no near-ties: the logits agree within 1e-4 (above), so no argmax can flip
    tokens, generated = flanjax_greedy(VOCAB)  # an EOS never generated
    np.testing.assert_array_equal(tokens, expected)
    np.testing.assert_array_equal(generated, [new] * 3)

    eos = int(expected[0, 2])
    stops = [int(np.argmax(row == eos)) + 1 if (row == eos).any() else new for row in expected]
    assert stops[0] <= 3  # row 0 stops early: the comparison is not vacuous
    truncated = np.where(np.arange(new)[None] < np.array(stops)[:, None], expected, 0)  # up to each row's EOS, 0 after
    np.testing.assert_array_equal(hf_greedy(torch_model, prompts, new, eos=eos)[0], truncated)
    tokens, generated = flanjax_greedy(eos)
    np.testing.assert_array_equal(tokens, truncated)
    np.testing.assert_array_equal(generated, stops)


# --------------------------------------------------------------------------------------
# Sharded, bfloat16 and pickled checkpoints
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neo"])
def test_sharded_checkpoint_loads_the_same(family, checkpoint, flanjax_model, tmp_path):
    ckpt = checkpoint(family)
    ckpt.torch_model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    assert not os.path.exists(tmp_path / "model.safetensors")
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) > 2
    model = load_model(str(tmp_path), mesh=MESH if family in SHARDED else None)
    np.testing.assert_array_equal(flanjax_logits(model), flanjax_logits(flanjax_model(family)))


@pytest.mark.parametrize("family", ["llama", "gptj"])
def test_bfloat16_checkpoint_loads_upcast(family, checkpoint, tmp_path):
    ckpt = checkpoint(family)
    copy.deepcopy(ckpt.torch_model).to(torch.bfloat16).save_pretrained(tmp_path)
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["dtype"] == "bfloat16"
    # The reference: the float32 model with its parameters rounded to bfloat16 (not
    # `.to(bfloat16).to(float32)`, which would round its RoPE buffers too).
    upcast = copy.deepcopy(ckpt.torch_model)
    with torch.no_grad():
        for p in upcast.parameters():
            p.copy_(p.to(torch.bfloat16).to(torch.float32))

    model = load_model(str(tmp_path), mesh=MESH if family in SHARDED else None, dtype="float32")
    embedding = model.embed.embedding.get_value()
    assert embedding.dtype == jnp.float32
    reference = upcast.get_input_embeddings().weight.detach().numpy()
    np.testing.assert_array_equal(np.asarray(embedding), reference)
    assert not np.array_equal(reference, ckpt.torch_model.get_input_embeddings().weight.detach().numpy())
    assert_real_tokens_close(flanjax_logits(model), torch_logits(upcast), atol=1e-4)


def save_pickled(ckpt: Checkpoint, directory) -> None:
    """config.json + pytorch_model.bin, as transformers < 5 wrote with safe_serialization=False
    (transformers 5 no longer writes them, but still reads them)."""
    ckpt.torch_model.config.save_pretrained(directory)
    state = {name: t.contiguous() for name, t in ckpt.torch_model.state_dict().items()}
    torch.save(state, os.path.join(directory, "pytorch_model.bin"))


@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
def test_pickled_checkpoint_needs_allow_pickle(family, checkpoint, flanjax_model, tmp_path):
    ckpt = checkpoint(family)
    save_pickled(ckpt, tmp_path)
    np.testing.assert_array_equal(torch_logits(load_in_transformers(str(tmp_path))), torch_logits(ckpt.torch_model))

    with pytest.raises(HFCheckpointError, match=r"pytorch_model\.bin.*safetensors") as error:
        load_model(str(tmp_path))
    assert "save_pretrained" in str(error.value) and "allow_pickle" in str(error.value)  # how to convert

    model = load_model(str(tmp_path), mesh=MESH if family in SHARDED else None, allow_pickle=True)
    np.testing.assert_array_equal(flanjax_logits(model), flanjax_logits(flanjax_model(family)))


# --------------------------------------------------------------------------------------
# Broken checkpoints
# --------------------------------------------------------------------------------------


def copy_checkpoint(ckpt: Checkpoint, tmp_path) -> str:
    return shutil.copytree(ckpt.path, tmp_path / "ckpt")


def edit_tensors(path: str, edit) -> None:
    from safetensors.numpy import load_file, save_file

    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def edit_config(path: str, **changes) -> None:
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    config.update(changes)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)


@pytest.mark.parametrize(
    "model_type, architecture", [("gpt_neox", "GPTNeoXForCausalLM"), ("bert", "BertForMaskedLM")]
)
def test_unsupported_architecture(model_type, architecture, tmp_path):
    with open(tmp_path / "config.json", "w") as f:
        json.dump({"model_type": model_type, "architectures": [architecture], "vocab_size": VOCAB}, f)
    with pytest.raises(HFCheckpointError, match=f"model_type '{model_type}' is not supported") as error:
        load_model(str(tmp_path))
    for supported in hf.ARCHITECTURES.values():
        assert supported in str(error.value)


def test_shape_that_disagrees_with_config(checkpoint, tmp_path):
    path = copy_checkpoint(checkpoint("llama"), tmp_path)
    edit_config(path, intermediate_size=48)  # the weights have 64
    with pytest.raises(HFCheckpointError, match=r"tensor model\.layers\.0\.mlp\.gate_proj\.weight has shape \[64, 32\]"):
        load_model(path)


def test_tensor_of_the_wrong_shape(checkpoint, tmp_path):
    path = copy_checkpoint(checkpoint("gpt2"), tmp_path)

    def truncate(tensors):  # GPT-2's fused q/k/v, no longer divisible into three
        tensors["transformer.h.1.attn.c_attn.weight"] = tensors["transformer.h.1.attn.c_attn.weight"][:, :95].copy()

    edit_tensors(path, truncate)
    with pytest.raises(HFCheckpointError, match=r"tensor transformer\.h\.1\.attn\.c_attn\.weight has shape \[32, 95\]"):
        load_model(path)


def test_missing_config(checkpoint, tmp_path):
    path = copy_checkpoint(checkpoint("llama"), tmp_path)
    os.remove(os.path.join(path, "config.json"))
    with pytest.raises(HFCheckpointError, match="config.json not found"):
        load_model(path)


def test_no_weights(checkpoint, tmp_path):
    path = copy_checkpoint(checkpoint("llama"), tmp_path)
    os.remove(os.path.join(path, "model.safetensors"))
    with pytest.raises(HFCheckpointError, match="holds no model weights"):
        load_model(path)


def test_index_lists_a_missing_shard(checkpoint, tmp_path):
    checkpoint("llama").torch_model.save_pretrained(tmp_path, max_shard_size="20KB")
    with open(tmp_path / "model.safetensors.index.json") as f:
        shard = sorted(set(json.load(f)["weight_map"].values()))[-1]
    os.remove(tmp_path / shard)
    with pytest.raises(HFCheckpointError, match=re.escape(shard) + r" is listed in .*model\.safetensors\.index\.json but missing"):
        load_model(str(tmp_path))


def test_missing_tensor(checkpoint, tmp_path):
    path = copy_checkpoint(checkpoint("mistral"), tmp_path)
    edit_tensors(path, lambda tensors: tensors.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(HFCheckpointError, match=r"tensor model\.layers\.1\.self_attn\.k_proj\.weight is missing"):
        load_model(path)


def test_unknown_extra_tensor(checkpoint, tmp_path):
    path = copy_checkpoint(checkpoint("llama"), tmp_path)
    # Qwen3-style q/k norms: a variant of the architecture flanjax does not implement.
    edit_tensors(path, lambda tensors: tensors.update({"model.layers.0.self_attn.q_norm.weight": np.ones(8, np.float32)}))
    with pytest.raises(HFCheckpointError, match=r"tensors flanjax does not know.*model\.layers\.0\.self_attn\.q_norm\.weight"):
        load_model(path)


def test_truncated_file_and_unsupported_rope(checkpoint, tmp_path):
    path = copy_checkpoint(checkpoint("llama"), tmp_path)
    file = os.path.join(path, "model.safetensors")
    with open(file, "r+b") as f:
        f.truncate(os.path.getsize(file) - 64)
    with pytest.raises(HFCheckpointError, match=r"is truncated"):
        load_model(path)
    edit_config(path, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0, "original_max_position_embeddings": 32})
    with pytest.raises(HFCheckpointError, match=r"rope_type='yarn' is not supported"):
        load_model(path)
