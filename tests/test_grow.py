"""`flanjax.models.grow`: a trained model grown wider and deeper computes the same logits.

References: the small model's own forward pass (every exact operator, both families, both
layer layouts, on one device and on a mesh), the operators' definitions (zero-sum noise,
zeroed output projections, whole copies) and `flanjax train` continuing a grown run.

Every weight is random, norms and biases included (a model starts them at ones and zeros,
which would hide a wrong rule for them); everything is tiny so the file runs in seconds.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os

import gin
import jax
import numpy as np
import pytest
from flax import nnx

from flanjax import cli
from flanjax.data.vocab import HFVocabulary
from flanjax.models import stacking
from flanjax import convert
from flanjax.models.grow import GrowthError, depth_map, grow_params
from flanjax.models.transformer import Transformer, TransformerConfig
from flanjax.rundir.checkpoint import CheckpointConfig, Checkpointer
from flanjax.rundir.files import read_model_config, write_model_config, write_tokenizer
from flanjax.rundir.metrics import read_metrics
from flanjax.sharding import MeshConfig, Partitioner, filled, shardings_of

# LLaMA: RMSNorm, RoPE, SwiGLU, grouped-query attention, tied embeddings.
LLAMA = TransformerConfig(vocab_size=64, d_model=16, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=32, max_len=16,
                          tie_embeddings=True)  # fmt: skip
# GPT-2: LayerNorm, learned positions, GELU, biases everywhere (a GPT-J-style output bias too), untied.
GPT2 = dataclasses.replace(LLAMA, num_kv_heads=None, norm="layer", norm_eps=1e-5, position="learned", mlp="gelu",
                           qkv_bias=True, out_bias=True, mlp_bias=True, lm_head_bias=True, tie_embeddings=False)  # fmt: skip
FAMILIES = {"llama": LLAMA, "gpt2": GPT2}


def heads(config: TransformerConfig, times: int) -> dict:
    """Query heads and key/value heads grown together, each head keeping its size."""
    kv = None if config.num_kv_heads is None else config.num_kv_heads * times
    return dict(num_heads=config.num_heads * times, num_kv_heads=kv, head_dim=config.head_size)


# name -> (overrides of the trained config, grow_params keywords)
GROWTHS = {
    "width": (lambda c: dict(d_model=2 * c.d_model, head_dim=c.head_size), {}),
    "width_3x": (lambda c: dict(d_model=3 * c.d_model, head_dim=c.head_size), {}),  # divides by 3: not exact in binary
    "heads": (lambda c: heads(c, 2), {}),
    "mlp": (lambda c: dict(d_ff=2 * c.d_ff), {}),
    "depth": (lambda c: dict(num_layers=2 * c.num_layers), {}),
    "depth_uneven": (lambda c: dict(num_layers=c.num_layers + 1), {}),
    "all": (lambda c: dict(d_model=2 * c.d_model, d_ff=2 * c.d_ff, num_layers=2 * c.num_layers, **heads(c, 2)), {}),
    "all_noise": (lambda c: dict(d_model=2 * c.d_model, d_ff=2 * c.d_ff, num_layers=2 * c.num_layers, **heads(c, 2)),
                  {"noise": 0.5, "seed": 3}),
}  # fmt: skip
TOKENS = np.random.default_rng(0).integers(0, 64, (2, 12)).astype(np.int32)


def grown(config: TransformerConfig, growth: str, scan_layers: bool = False) -> tuple[TransformerConfig, dict]:
    overrides, kwargs = GROWTHS[growth]
    return dataclasses.replace(config, scan_layers=scan_layers, **overrides(config)), kwargs


def param_shapes(config: TransformerConfig) -> dict:
    model = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


@functools.cache
def _random_unrolled(config: TransformerConfig, seed: int) -> dict:
    shapes = param_shapes(dataclasses.replace(config, scan_layers=False))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: rng.normal(0.0, 0.3, x.shape).astype(np.float32), shapes)


def random_params(config: TransformerConfig, seed: int = 0) -> dict:
    """Every parameter random (the same values in either layout), in `config`'s layout."""
    return stacking.in_layout(_random_unrolled(dataclasses.replace(config, scan_layers=False), seed), config.scan_layers)


def model_of(config: TransformerConfig, params: dict) -> Transformer:
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0))))
    return nnx.merge(graphdef, filled(abstract, params))


def logits(config: TransformerConfig, params: dict) -> np.ndarray:
    return np.asarray(model_of(config, params)(TOKENS)[0])


@functools.cache
def trained_logits(family: str) -> np.ndarray:
    return logits(FAMILIES[family], random_params(FAMILIES[family]))


def assert_same_structure(tree: dict, config: TransformerConfig) -> None:
    shapes = lambda t: jax.tree.map(lambda x: tuple(x.shape), t)  # noqa: E731
    assert shapes(tree) == shapes(param_shapes(config))


# --- exact operators ---------------------------------------------------------------------------


# Every operator in the unrolled layout; all of them at once in every pairing of layouts.
LAYOUTS = {"unrolled": (False, False), "scanned": (True, True), "unrolled-to-scanned": (False, True),
           "scanned-to-unrolled": (True, False)}  # fmt: skip
CASES = [(family, growth, "unrolled") for family in FAMILIES for growth in GROWTHS]
CASES += [(family, "all_noise", layouts) for family in FAMILIES for layouts in LAYOUTS if layouts != "unrolled"]


@pytest.mark.parametrize("family, growth, layouts", CASES, ids=["-".join(case) for case in CASES])
def test_growth_keeps_the_logits(family, growth, layouts):
    layouts = LAYOUTS[layouts]
    old = dataclasses.replace(FAMILIES[family], scan_layers=layouts[0])
    new, kwargs = grown(old, growth, scan_layers=layouts[1])
    params = grow_params(random_params(old), old, new, **kwargs)
    assert_same_structure(params, new)
    expected = trained_logits(family)
    assert np.abs(expected).max() > 1.0  # logits of a real spread, so 1e-5 means something
    np.testing.assert_allclose(logits(new, params), expected, atol=1e-5, rtol=0)


def test_the_grown_weights_do_not_depend_on_the_layouts():
    """Noise is drawn per unrolled layer and parameter name, whatever layout goes in or comes out."""
    old, (new, kwargs) = LLAMA, grown(LLAMA, "all_noise")
    unrolled = grow_params(random_params(old), old, new, **kwargs)
    scanned_old = dataclasses.replace(old, scan_layers=True)
    from_scanned = grow_params(random_params(scanned_old), scanned_old, dataclasses.replace(new, scan_layers=True), **kwargs)
    jax.tree.map(np.testing.assert_array_equal, stacking.unstack(from_scanned), unrolled)


def test_noise_makes_the_copies_differ_but_keeps_their_sum():
    old, (new, _) = LLAMA, grown(LLAMA, "all")
    params = random_params(old)
    plain = grow_params(params, old, new)
    noisy = grow_params(params, old, new, noise=0.5, seed=1)
    d = old.d_model
    q_plain, q = (np.asarray(p["layers"][0]["attn"]["q"]["kernel"]) for p in (plain, noisy))  # [2d, 2n, h], reads d
    assert np.abs(q[:d] - q[d:]).min() > 0  # the two copies of every input unit differ everywhere
    np.testing.assert_allclose(q[:d] + q[d:], 2 * q_plain[:d], atol=1e-6)  # and sum to the trained weight
    np.testing.assert_allclose(np.std(q - q_plain) / np.std(q_plain), 0.5, rtol=0.15)  # noise std: 0.5 of the weight's
    np.testing.assert_array_equal(noisy["embed"]["embedding"], plain["embed"]["embedding"])  # writes: no noise
    other = grow_params(params, old, new, noise=0.5, seed=2)
    assert not np.allclose(other["layers"][0]["attn"]["q"]["kernel"], q)
    np.testing.assert_allclose(logits(new, noisy), trained_logits("llama"), atol=1e-5, rtol=0)


def test_width_copies_units_by_tiling_and_divides_what_reads_them():
    old, new = GPT2, dataclasses.replace(GPT2, d_model=32, d_ff=64, **heads(GPT2, 2))
    params, out = random_params(old), grow_params(random_params(old), old, new)
    layer, new_layer = params["layers"][0], out["layers"][0]
    np.testing.assert_array_equal(out["embed"]["embedding"], np.tile(params["embed"]["embedding"], (1, 2)))
    np.testing.assert_array_equal(new_layer["mlp"]["up"]["kernel"], np.tile(layer["mlp"]["up"]["kernel"], (2, 2)) / 2)
    np.testing.assert_array_equal(new_layer["attn"]["o"]["kernel"], np.tile(layer["attn"]["o"]["kernel"], (2, 1, 2)) / 2)
    np.testing.assert_array_equal(out["lm_head"]["bias"], params["lm_head"]["bias"])
    tied = grow_params(random_params(LLAMA), LLAMA, dataclasses.replace(LLAMA, d_model=32, **heads(LLAMA, 2)))
    # Tied: the logits read the table twice, so the final norm halves instead.
    np.testing.assert_array_equal(tied["final_norm"]["scale"], np.tile(random_params(LLAMA)["final_norm"]["scale"], 2) / 2)


def test_new_layers_are_copies_that_add_nothing_spread_evenly():
    assert depth_map(2, 4) == [(0, False), (0, True), (1, False), (1, True)]
    assert depth_map(2, 3) == [(0, False), (0, True), (1, False)]
    assert depth_map(3, 4) == [(0, False), (0, True), (1, False), (2, False)]
    assert depth_map(2, 2) == [(0, False), (1, False)]
    old = GPT2
    out = grow_params(random_params(old), old, dataclasses.replace(old, num_layers=4))
    layers, trained = out["layers"], random_params(old)["layers"]
    for j, i in ((0, 0), (2, 1)):
        jax.tree.map(np.testing.assert_array_equal, layers[j], trained[i])
    for j in (1, 3):  # a copy of the layer before, its writes to the residual stream zeroed
        for part, name in (("attn", "o"), ("mlp", "down")):
            for param in ("kernel", "bias"):
                assert not np.any(layers[j][part][name][param])
        np.testing.assert_array_equal(layers[j]["attn"]["q"]["kernel"], layers[j - 1]["attn"]["q"]["kernel"])


def test_parallel_residual_blocks_grow_exactly():
    old = dataclasses.replace(GPT2, position="rope", rotary_dim=2, parallel_residual=True)  # GPT-J
    new = dataclasses.replace(old, d_model=32, d_ff=64, num_layers=4, **heads(old, 2))
    params = random_params(old)
    np.testing.assert_allclose(logits(new, grow_params(params, old, new, noise=0.1)), logits(old, params), atol=1e-5, rtol=0)


def test_tied_layer_norm_and_grouped_biased_heads_grow_exactly():
    """GPT-2 proper ties its embeddings, so the final LayerNorm's bias is divided too; Qwen2 has
    q/k/v biases on grouped heads."""
    old = dataclasses.replace(LLAMA, norm="layer", qkv_bias=True)
    new = dataclasses.replace(old, d_model=32, d_ff=64, num_layers=3, **heads(old, 2))
    params = random_params(old)
    np.testing.assert_allclose(logits(new, grow_params(params, old, new, noise=0.3)), logits(old, params), atol=1e-5, rtol=0)


def test_sliding_windows_follow_their_layers():
    old = dataclasses.replace(LLAMA, sliding_window=3, sliding_window_layers=(1,))
    new = dataclasses.replace(old, num_layers=4, sliding_window_layers=(2, 3))
    params = random_params(old)
    np.testing.assert_allclose(logits(new, grow_params(params, old, new)), logits(old, params), atol=1e-5, rtol=0)
    with pytest.raises(GrowthError, match=r"layer 2 .* runs trained layer 1 .* set sliding_window_layers=\(2, 3\)"):
        grow_params(params, old, dataclasses.replace(old, num_layers=4))


# --- not exact: stacked depth -------------------------------------------------------------------


def test_stacked_depth_copies_whole_layers_into_a_working_model():
    old = LLAMA
    new = dataclasses.replace(old, num_layers=4, scan_layers=True)
    out = grow_params(random_params(old), old, new, depth="stack")
    assert_same_structure(out, new)
    layers = stacking.unstack(out)["layers"]
    for j, i in enumerate((0, 0, 1, 1)):
        jax.tree.map(np.testing.assert_array_equal, layers[j], random_params(old)["layers"][i])
    got = logits(new, out)
    assert np.all(np.isfinite(got)) and np.abs(got - trained_logits("llama")).max() > 1e-2  # another function


# --- sharded ------------------------------------------------------------------------------------


def test_a_grown_model_on_a_mesh_gives_the_same_logits():
    assert jax.device_count() == 8
    old, (new, kwargs) = LLAMA, grown(LLAMA, "all_noise", scan_layers=True)
    partitioner = Partitioner.from_config(MeshConfig(data=2, fsdp=2, tensor=2))
    graphdef, abstract = partitioner.abstract_state(lambda: Transformer(new, rngs=nnx.Rngs(0)))
    with partitioner.activate():  # grown on the mesh, straight into the new model's shardings
        grow = jax.jit(lambda p: grow_params(p, old, new, **kwargs), out_shardings=shardings_of(nnx.to_pure_dict(abstract)))
        params = grow(random_params(old))
        model = nnx.merge(graphdef, filled(abstract, params))
        assert params["embed"]["embedding"].sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
        got = nnx.jit(lambda m, t: m(t)[0])(model, TOKENS)
    np.testing.assert_allclose(np.asarray(got), trained_logits("llama"), atol=1e-5, rtol=0)


# --- run directories ----------------------------------------------------------------------------

# The tests' training run (tests/tiny_run.gin) reads the quickstart tasks, whose tokenizer has 512 tokens.
RUN = TransformerConfig(vocab_size=512, d_model=16, num_layers=1, num_heads=2, num_kv_heads=1, d_ff=32, max_len=64)


def write_run(run_dir: str, config: TransformerConfig = RUN, lora: bool = False) -> dict:
    """A run directory as training leaves one: model.json, tokenizer/ and a checkpoint (step 5)."""
    import tasks.quickstart

    params = random_params(config)
    checkpointer = Checkpointer(run_dir, CheckpointConfig(async_save=False))
    checkpointer.save(5, {"model": params})
    checkpointer.close()
    write_model_config(run_dir, config)
    write_tokenizer(run_dir, HFVocabulary(tasks.quickstart.tokenizer_dir()))
    if lora:
        with open(os.path.join(run_dir, "lora.json"), "w") as f:
            json.dump({"rank": 4}, f)
    return params


def run_cli(args) -> int:
    gin.clear_config(clear_constants=True)
    return cli.main(args)


@pytest.mark.slow
def test_a_grown_run_keeps_the_logits_and_trains_on(tmp_path, repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)
    small, big, tuned = (str(tmp_path / name) for name in ("small", "big", "tuned"))
    params = write_run(small)
    growth = dict(d_model=32, d_ff=64, num_layers=2, num_heads=4, num_kv_heads=2, scan_layers=True)
    path = convert.grow(small, big, growth, noise=0.01)
    assert path == os.path.join(big, "checkpoints", "0")
    new = read_model_config(big)
    assert new == dataclasses.replace(RUN, **growth)
    assert os.path.isfile(os.path.join(big, "tokenizer", "tokenizer.json"))
    gin_text = open(os.path.join(big, "model.gin")).read()
    assert gin_text.startswith(f"# {small} step 5 grown by") and f"lm.train.init_checkpoint = {big!r}" in gin_text

    # What `flanjax train` starts from: the grown weights, the small model's logits.
    _, abstract = Partitioner.from_config(MeshConfig(data=1, fsdp=-1)).abstract_state(lambda: Transformer(new, rngs=nnx.Rngs(0)))
    restored = Checkpointer(big, read_only=True).restore_model(0, abstract)
    tokens = TOKENS * 8  # ids over the whole 512-token vocabulary
    expected = np.asarray(model_of(RUN, params)(tokens)[0])
    np.testing.assert_allclose(np.asarray(model_of(new, nnx.to_pure_dict(restored))(tokens)[0]), expected, atol=1e-5, rtol=0)

    args = ["train", "--gin_file=tests/tiny_run.gin", f"--gin_file={big}/model.gin", f"--gin.MODEL_DIR={tuned}",
            "--gin.TRAIN_STEPS=2", "--gin.loop.LoopConfig.log_every=1"]  # fmt: skip
    assert run_cli(args) == 0
    losses = [row["loss"] for row in read_metrics(os.path.join(tuned, "metrics.jsonl")) if "loss" in row]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    assert read_model_config(tuned) == new


def test_grow_run_refusals(tmp_path):
    small, lora_run = str(tmp_path / "small"), str(tmp_path / "lora")
    write_run(small)
    write_run(lora_run, lora=True)
    with pytest.raises(GrowthError, match="trains LoRA adapters .* Merge the adapters first: `flanjax convert to-hf"):
        convert.grow(lora_run, str(tmp_path / "out"), {"d_model": 32})
    with pytest.raises(GrowthError, match="already holds checkpoints; grow into a new directory"):
        convert.grow(small, small, {"num_layers": 2})
    with pytest.raises(GrowthError, match="d_modle is not a TransformerConfig field"):
        convert.grow(small, str(tmp_path / "out"), {"d_modle": 32})
    with pytest.raises(GrowthError, match="the grown model's config is invalid: d_model=16 is not divisible by num_heads=3"):
        convert.grow(small, str(tmp_path / "out"), {"num_heads": 3})
    with pytest.raises(GrowthError, match="invalid: num_heads=4 must be a multiple of num_kv_heads=3"):
        convert.grow(small, str(tmp_path / "out"), {"num_heads": 4, "num_kv_heads": 3})
    with pytest.raises(GrowthError, match="d_model=24 is not a multiple of the trained 16"):
        convert.grow(small, str(tmp_path / "out"), {"d_model": 24, "num_heads": 3})
    assert not os.path.exists(str(tmp_path / "out"))  # refused before anything is written


# --- bad growth ---------------------------------------------------------------------------------

BAD = {
    "vocab": (dict(vocab_size=128), "vocab_size differs: 64 in the trained model, 128 in the grown one. Growth keeps the architecture family"),
    "norm": (dict(norm="layer"), "norm differs: 'rms' .* set norm='rms'"),
    "position": (dict(position="learned"), "position differs"),
    "mlp_family": (dict(mlp="gelu"), "mlp differs"),
    "bias": (dict(qkv_bias=True), "qkv_bias differs"),
    "tied": (dict(tie_embeddings=False), "tie_embeddings differs: True"),
    "shrink_width": (dict(d_model=8, head_dim=4), "d_model shrinks from 16 to 8: growth only adds .* set d_model >= 16"),
    "shrink_depth": (dict(num_layers=1), "num_layers shrinks from 2 to 1"),
    "not_multiple": (dict(d_ff=48), r"d_ff=48 is not a multiple of the trained 32: .* set d_ff=64"),
    "heads_not_multiple": (dict(num_heads=6, num_kv_heads=3, head_dim=4), "num_heads=6 is not a multiple of the trained 4"),
    "head_size": (dict(d_model=32), r"head size changes from 4 to 8 .* set num_heads=8, or head_dim=4"),
    "kv_heads": (dict(num_heads=8, head_dim=4), r"num_kv_heads grows 1x \(2 -> 2\) but num_heads 2x: .* set num_kv_heads=4"),
    "kv_heads_alone": (dict(num_kv_heads=4), r"num_kv_heads grows 2x .* but num_heads 1x"),
    "windows": (dict(sliding_window=4), "sliding_window differs"),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD)
def test_bad_growth_is_refused_with_the_fix(case):
    overrides, message = BAD[case]
    with pytest.raises(GrowthError, match=message):
        grow_params(random_params(LLAMA), LLAMA, dataclasses.replace(LLAMA, **overrides))


def test_bad_arguments_and_weights_are_refused():
    params, new = random_params(LLAMA), dataclasses.replace(LLAMA, d_ff=64)
    with pytest.raises(GrowthError, match="depth='copy' is not one of zero .* or stack"):
        grow_params(params, LLAMA, new, depth="copy")
    with pytest.raises(GrowthError, match="noise=-0.1: give a finite scale >= 0"):
        grow_params(params, LLAMA, new, noise=-0.1)
    learned = dataclasses.replace(GPT2, max_len=32)
    with pytest.raises(GrowthError, match="max_len differs .* set max_len=16"):
        grow_params(random_params(GPT2), GPT2, learned)
    with pytest.raises(GrowthError, match="parameter embed/embedding has shape \\(64, 16\\) but .* gives \\(64, 32\\)"):
        grow_params(params, dataclasses.replace(LLAMA, d_model=32, head_dim=4), dataclasses.replace(LLAMA, d_model=64, head_dim=4))
    with pytest.raises(GrowthError, match="lacks parameter lm_head/kernel"):
        grow_params(params, dataclasses.replace(LLAMA, tie_embeddings=False), dataclasses.replace(LLAMA, tie_embeddings=False))
    adapted = jax.tree.map(lambda x: x, params)
    adapted["layers"][0]["attn"]["q"] = {"base": {"kernel": params["layers"][0]["attn"]["q"]["kernel"]}, "lora_a": np.zeros((16, 2))}
    with pytest.raises(GrowthError, match="hold LoRA adapters .* Merge the adapters first"):
        grow_params(adapted, LLAMA, new)
