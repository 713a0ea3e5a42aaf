"""LoRA adapters: exact forward, merging, adapter-only training, adapter files, sharding."""

import dataclasses
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import safetensors.numpy
from flax import nnx

from flanjax.models.lora import (
    AdapterNotFoundError,
    LoRA,
    LoraConfig,
    LoraError,
    adapter_state,
    apply_lora,
    load_adapters,
    lora_modules,
    merge_lora,
    read_adapter_config,
    save_adapters,
    unmerge_lora,
)
from flanjax.models import stacking
from flanjax.models.transformer import Transformer, TransformerConfig
from flanjax.sharding import LOGICAL_AXIS_RULES, MeshConfig, MeshError, Partitioner

TINY = TransformerConfig(vocab_size=128, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=64, max_len=32)
# Every projection kind: Einsum with one in-dim (q, k, v), with two (o), and Linear (mlp).
ALL = LoraConfig(rank=4, alpha=8.0, targets=(r"attn/(q|k|v|o)$", r"mlp/"))
TOKENS = jax.random.randint(jax.random.key(9), (2, 12), 0, TINY.vocab_size)


def base_model(seed=0):
    return Transformer(TINY, rngs=nnx.Rngs(params=seed))


def randomize_b(model, seed=2):
    """Non-zero B everywhere (a fresh B is zero, which would hide every mistake)."""
    for i, (_, m) in enumerate(lora_modules(model)):
        m.lora_b[...] = 0.1 * jax.random.normal(jax.random.fold_in(jax.random.key(seed), i), m.lora_b.shape)


def wrapped(config=ALL, lora_seed=1, randomize=True):
    model = base_model()
    apply_lora(model, config, rngs=nnx.Rngs(lora_seed))
    if randomize:
        randomize_b(model)
    return model


def logits(model, tokens=TOKENS):
    return np.asarray(model(tokens)[0])


def test_fresh_adapters_leave_logits_unchanged():
    model = base_model()
    before = logits(model)
    paths = apply_lora(model, LoraConfig(), rngs=nnx.Rngs(1))
    assert paths == ["layers/0/attn/q", "layers/0/attn/v", "layers/1/attn/q", "layers/1/attn/v"]
    np.testing.assert_array_equal(logits(model), before)
    q = model.layers[0].attn.q
    d, n, h = TINY.d_model, TINY.num_heads, TINY.head_size
    assert isinstance(q, LoRA) and isinstance(q.base, nnx.Einsum)
    assert q.lora_a.shape == (d, 8) and q.lora_b.shape == (8, n, h)
    assert q.lora_a.get_metadata()["out_sharding"] == ("embed", "lora_rank")
    assert q.lora_b.get_metadata()["out_sharding"] == ("lora_rank", "heads", "head_dim")
    assert type(q.base.kernel) is nnx.Param and not np.any(q.lora_b[...])


@pytest.mark.parametrize(
    "path, x_shape",
    [
        ("layers/0/mlp/up", (2, 3, TINY.d_model)),  # Linear
        ("layers/0/attn/q", (2, 3, TINY.d_model)),  # Einsum btd,dnh->btnh
        ("layers/1/attn/o", (2, 3, TINY.num_heads, TINY.head_size)),  # Einsum btnh,nhd->btd
    ],
)
def test_lora_projection_matches_numpy(path, x_shape):
    model = wrapped()
    module = dict(lora_modules(model))[path]
    x = np.random.default_rng(0).normal(size=x_shape).astype(np.float32)
    w, a, b = (np.asarray(v, np.float64) for v in (module.base.kernel[...], module.lora_a[...], module.lora_b[...]))
    n_in = a.ndim - 1  # A is [*in_dims, rank]
    fan_in = math.prod(w.shape[:n_in])
    xf = x.reshape(-1, fan_in).astype(np.float64)
    want = xf @ w.reshape(fan_in, -1) + ALL.alpha / ALL.rank * xf @ a.reshape(fan_in, -1) @ b.reshape(ALL.rank, -1)
    want = want.reshape(*x_shape[:2], *w.shape[n_in:])
    np.testing.assert_allclose(np.asarray(module(jnp.asarray(x))), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tied", [False, True])
def test_embedding_adapter_is_a_low_rank_update_of_the_table(tied):
    """The wrapped table reads E[ids] + s A[ids] B, and a tied model's output uses the same
    updated table: its logits equal a plain model's whose table is E + s A B (built in NumPy)."""
    config = dataclasses.replace(TINY, tie_embeddings=tied)
    model = Transformer(config, rngs=nnx.Rngs(params=0))
    plain = Transformer(config, rngs=nnx.Rngs(params=0))
    assert apply_lora(model, LoraConfig(rank=4, alpha=8.0, targets=(r"^embed$",)), rngs=nnx.Rngs(1)) == ["embed"]
    lora = model.embed
    assert lora.lora_a.shape == (TINY.vocab_size, 4) and lora.lora_b.shape == (4, TINY.d_model)
    assert lora.lora_a.get_metadata()["out_sharding"] == ("vocab", "lora_rank")
    a = np.asarray(lora.lora_a[...], np.float64)
    assert 0.9 < np.abs(a).max() <= 1.0  # an id is one-hot: fan-in 1, so U(-1, 1)
    np.testing.assert_array_equal(logits(model), logits(plain))  # B = 0
    randomize_b(model)
    e, b = np.asarray(lora.base.embedding[...], np.float64), np.asarray(lora.lora_b[...], np.float64)
    table = e + 2.0 * a @ b
    np.testing.assert_allclose(lora(TOKENS), table[np.asarray(TOKENS)], rtol=1e-5, atol=1e-6)
    plain.embed.embedding[...] = jnp.asarray(table, jnp.float32)
    np.testing.assert_allclose(logits(model), logits(plain), rtol=1e-4, atol=1e-5)
    merge_lora(model)
    np.testing.assert_allclose(model.embed.base.embedding[...], table, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(logits(model), logits(plain), rtol=1e-4, atol=1e-5)


def test_merge_and_unmerge():
    model = wrapped()
    kernels = {p: np.asarray(m.base.kernel[...]) for p, m in lora_modules(model)}
    before = logits(model)
    assert len(merge_lora(model)) == len(kernels) == 2 * 7
    assert all(m.merged for _, m in lora_modules(model))
    assert not np.allclose(model.layers[0].attn.o.base.kernel[...], kernels["layers/0/attn/o"])
    np.testing.assert_allclose(logits(model), before, atol=1e-5)
    with pytest.raises(LoraError, match="already merged"):
        merge_lora(model)
    unmerge_lora(model)
    for p, m in lora_modules(model):
        np.testing.assert_allclose(m.base.kernel[...], kernels[p], atol=1e-6, err_msg=p)
    np.testing.assert_allclose(logits(model), before, atol=1e-5)
    with pytest.raises(LoraError, match="not merged"):
        model.layers[0].attn.q.unmerge()
    with pytest.raises(LoraError, match="no LoRA adapters"):
        merge_lora(base_model())


def test_training_changes_adapters_only():
    model = wrapped(randomize=False)  # B = 0 as in real fine-tuning
    optimizer = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.LoRAParam)
    frozen = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))
    frozen_before = jax.device_get(nnx.to_pure_dict(nnx.state(model, frozen)))
    adapters_before = jax.device_get(nnx.to_pure_dict(adapter_state(model)))

    @nnx.jit
    def step(model, optimizer, tokens):
        def loss_fn(model):
            out, _ = model(tokens[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(out, tokens[:, 1:]).mean()

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer, TOKENS)) for _ in range(4)]
    assert losses[-1] < losses[0]
    frozen_after = jax.device_get(nnx.to_pure_dict(nnx.state(model, frozen)))
    jax.tree.map(np.testing.assert_array_equal, frozen_after, frozen_before)  # bit-identical
    adapters_after = jax.device_get(nnx.to_pure_dict(adapter_state(model)))
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), adapters_after, adapters_before)
    assert all(jax.tree.leaves(changed))  # every A and every B moved
    # Adam keeps two moments per adapter weight and nothing for the frozen model.
    n_adapter = sum(x.size for x in jax.tree.leaves(adapter_state(model)))
    moments = [x for x in jax.tree.leaves(nnx.state(optimizer.opt_state)) if x.ndim]
    assert sum(x.size for x in moments) == 2 * n_adapter
    assert n_adapter < 0.2 * sum(x.size for x in jax.tree.leaves(nnx.state(model, frozen)))


def test_adapters_round_trip_through_files(tmp_path):
    model = wrapped()
    save_adapters(model, str(tmp_path), ALL)
    assert json.loads((tmp_path / "adapter_config.json").read_text()) == {
        "rank": 4, "alpha": 8.0, "dropout": 0.0, "targets": [r"attn/(q|k|v|o)$", r"mlp/"]
    }
    tensors = safetensors.numpy.load_file(str(tmp_path / "adapter_model.safetensors"))
    assert tensors["layers.0.attn.o.lora_a"].shape == (TINY.num_heads, TINY.head_size, 4)
    assert {t.dtype for t in tensors.values()} == {np.dtype(np.float32)}

    config = read_adapter_config(str(tmp_path))
    assert config == ALL
    fresh = wrapped(config, lora_seed=5, randomize=False)  # same base, other adapters
    assert not np.allclose(logits(fresh), logits(model))
    assert load_adapters(fresh, str(tmp_path)) == ALL
    np.testing.assert_array_equal(logits(fresh), logits(model))


def test_loading_adapters_that_do_not_fit_fails_clearly(tmp_path):
    save_adapters(wrapped(), str(tmp_path), ALL)
    with pytest.raises(AdapterNotFoundError, match="adapter_config.json"):
        load_adapters(wrapped(), str(tmp_path / "elsewhere"))
    other_targets = LoraConfig(rank=4, alpha=8.0, targets=(r"attn/(q|k|v|o)$",))
    with pytest.raises(LoraError, match=r"missing \[\].*layers\.0\.mlp\.down\.lora_a"):
        load_adapters(wrapped(other_targets), str(tmp_path))
    with pytest.raises(LoraError, match="trained with rank 4, alpha 8.0"):
        load_adapters(wrapped(LoraConfig(rank=2, alpha=8.0, targets=ALL.targets)), str(tmp_path))
    path = str(tmp_path / "adapter_model.safetensors")
    tensors = safetensors.numpy.load_file(path)
    tensors["layers.1.mlp.up.lora_b"] = tensors["layers.1.mlp.up.lora_b"][:, :-1].copy()
    safetensors.numpy.save_file(tensors, path)
    with pytest.raises(LoraError, match=r"layers\.1\.mlp\.up\.lora_b has shape \(4, 63\)"):
        load_adapters(wrapped(), str(tmp_path))
    os.remove(path)
    with pytest.raises(AdapterNotFoundError, match="adapter_model.safetensors"):
        load_adapters(wrapped(), str(tmp_path))


def test_lora_model_is_created_sharded_and_computes_the_same_logits():
    def init():
        return wrapped()

    partitioner = Partitioner.from_config(MeshConfig(data=2, fsdp=2, tensor=2))
    graphdef, abstract = partitioner.abstract_state(init)  # runs check_parameters
    with partitioner.activate():
        state = partitioner.create(init, abstract)
        flat = {"/".join(map(str, k)): v[...] for k, v in nnx.to_flat_state(state)}
        assert tuple(flat["layers/0/attn/q/lora_a"].sharding.spec) == ("fsdp", None)
        assert tuple(flat["layers/0/attn/q/lora_b"].sharding.spec) == (None, "tensor", None)
        assert tuple(flat["layers/0/mlp/down/lora_a"].sharding.spec) == ("tensor", None)
        sharded = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t)[0])(state, TOKENS)
    np.testing.assert_allclose(np.asarray(sharded), logits(init()), atol=1e-5)

    without_rule = tuple(r for r in LOGICAL_AXIS_RULES if r[0] != "lora_rank")
    with pytest.raises(MeshError, match="lora_rank"):
        Partitioner(partitioner.mesh, without_rule).check_parameters(nnx.state(nnx.eval_shape(init)))


def test_a_scanned_models_adapters_are_stacked_and_compute_what_unrolled_ones_do(tmp_path):
    """Every projection kind, one adapter per layer; merging folds each layer's own update."""
    unrolled = wrapped()
    scanned = Transformer(dataclasses.replace(TINY, scan_layers=True), rngs=nnx.Rngs(0))
    apply_lora(scanned, ALL, rngs=nnx.Rngs(1))
    a = nnx.state(scanned, nnx.LoRAParam)["layers"]["attn"]["q"]["lora_a"]
    assert a.shape == (2, 32, 4) and a.get_metadata()["out_sharding"] == ("layers", "embed", "lora_rank")
    assert not np.allclose(a[...][0], a[...][1])  # each layer drew its own A
    state = nnx.state(scanned)
    nnx.replace_by_pure_dict(state, stacking.stack(nnx.to_pure_dict(nnx.state(unrolled))))
    nnx.update(scanned, state)
    np.testing.assert_allclose(logits(scanned), logits(unrolled), atol=1e-5)

    save_adapters(scanned, str(tmp_path), ALL)  # stacked tensors, read back into a scanned model
    fresh = Transformer(dataclasses.replace(TINY, scan_layers=True), rngs=nnx.Rngs(0))
    apply_lora(fresh, ALL, rngs=nnx.Rngs(5))
    nnx.update(fresh, nnx.state(scanned, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))))  # the same base
    load_adapters(fresh, str(tmp_path))
    np.testing.assert_allclose(logits(fresh), logits(unrolled), atol=1e-5)

    merge_lora(scanned)
    np.testing.assert_allclose(logits(scanned), logits(unrolled), atol=1e-5)


def test_bad_targets_and_configs_fail_clearly():
    with pytest.raises(LoraError, match=r"match no projection or embedding.*: embed, layers/0/attn/k, .*lm_head") as err:
        apply_lora(base_model(), LoraConfig(targets=(r"attn/query$",)), rngs=nnx.Rngs(0))
    assert "layers/1/" not in str(err.value)  # one layer is enough to show the naming
    with pytest.raises(LoraError, match="already has LoRA"):
        apply_lora(wrapped(), ALL, rngs=nnx.Rngs(0))
    for bad in (dict(rank=0), dict(dropout=1.0), dict(dropout=-0.1), dict(targets=["("]), dict(targets=[])):
        with pytest.raises(LoraError):
            LoraConfig(**bad)
    assert LoraConfig(targets=["mlp/up$"]).targets == ("mlp/up$",)  # gin passes lists


def test_wrapper_dropout_needs_rngs():
    lora = LoRA(nnx.Linear(16, 8, rngs=nnx.Rngs(0)), 4, 8.0, dropout=0.5, rngs=nnx.Rngs(1))
    lora.lora_b[...] = jnp.ones(lora.lora_b.shape)
    x = jnp.ones((3, 16))
    np.testing.assert_array_equal(lora(x), lora(x))  # no rngs: deterministic
    assert not np.allclose(lora(x, rngs=nnx.Rngs(dropout=0)), lora(x))


def test_model_passes_dropout_rngs_to_adapters():
    """The model's own dropout is off (TINY), so any randomness comes from the adapters."""
    model = wrapped(dataclasses.replace(ALL, dropout=0.5))
    tokens = jnp.asarray(TOKENS)
    plain = model(tokens)[0]
    np.testing.assert_array_equal(plain, model(tokens)[0])
    assert not np.allclose(model(tokens, rngs=nnx.Rngs(dropout=0))[0], plain)


def test_num_adapter_params_counts_rank_times_in_plus_out():
    from flanjax.models.lora import num_adapter_params
    from flanjax.models.transformer import new_model

    d, f, h, r = TINY.d_model, TINY.d_ff, TINY.head_size, ALL.rank
    q, kv = TINY.num_heads * h, TINY.num_kv_heads * h
    # (in, out) of every targeted projection: q, k, v, o, then the SwiGLU MLP's gate, up, down.
    projections = [(d, q), (d, kv), (d, kv), (q, d), (d, f), (d, f), (f, d)]
    expected = TINY.num_layers * sum(r * (n_in + n_out) for n_in, n_out in projections)
    assert num_adapter_params(wrapped(randomize=False)) == expected
    assert num_adapter_params(nnx.eval_shape(lambda: new_model(TINY, ALL))) == expected  # no weights needed
    assert num_adapter_params(base_model()) == 0
