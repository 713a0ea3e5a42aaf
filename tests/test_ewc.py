"""EWC on LoRA updates: the Fisher against a loop of jax.grad, the penalty's gradient against
the hand-written one, Fisher files that do not fit, and `flanjax fisher` + `lm.train.ewc` end to end."""

import dataclasses
import json

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flanjax import cli
from flanjax.models.lora import LoraConfig, lora_modules
from flanjax.models.transformer import Transformer, TransformerConfig, new_model
from flanjax.rundir.checkpoint import Checkpointer
from flanjax.rundir.files import restore
from flanjax.rundir.metrics import read_metrics
from flanjax.sharding import MeshConfig, Partitioner
from flanjax.train import ewc
from flanjax.train.losses import lm_loss

TINY = TransformerConfig(vocab_size=64, d_model=16, num_layers=2, num_heads=2, num_kv_heads=1, d_ff=32, max_len=16)
# Einsum kernels with one in-dim (q, v) and two (o), a Linear (mlp up) and the embedding table.
TARGETS = (r"attn/(q|v|o)$", r"mlp/up$", r"^embed$")


def random_model(config=TINY, lora=None, seed=0):
    """A model (with LoRA adapters) holding random weights, built from its shapes: no compiled
    initialiser (these tests need some weights, not a good initialisation)."""
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: new_model(config, lora)))
    rng = np.random.default_rng(seed)
    return nnx.merge(graphdef, jax.tree.map(lambda x: (0.3 * rng.standard_normal(x.shape)).astype(x.dtype), abstract))


def _batch(rows=4, t=10, seed=0):
    """Unpacked rows: a prefix without loss, targets of varying length, the last row padding."""
    k1, k2 = jax.random.split(jax.random.key(seed))
    tokens = jax.random.randint(k1, (rows, t), 1, TINY.vocab_size)
    lengths = jnp.arange(rows) + 2
    weights = (jnp.arange(t)[None] >= t - lengths[:, None]).astype(jnp.float32).at[-1].set(0.0)
    return {
        "decoder_input_tokens": tokens,
        "decoder_target_tokens": jax.random.randint(k2, (rows, t), 1, TINY.vocab_size),
        "decoder_loss_weights": weights,
        "decoder_positions": jnp.broadcast_to(jnp.arange(t), (rows, t)),
        "decoder_segment_ids": jnp.ones((rows, t), jnp.int32),
    }


def _kernel_names(layers):
    projections = [f"{layer}.{p}.kernel" for layer in layers for p in ("attn.q", "attn.v", "attn.o", "mlp.up")]
    return sorted([*projections, "embed.embedding"])


def test_target_kernels_are_named_by_projection():
    scanned = nnx.eval_shape(lambda: Transformer(dataclasses.replace(TINY, scan_layers=True), rngs=nnx.Rngs(0)))
    assert sorted(ewc.target_kernels(scanned, TARGETS).values()) == _kernel_names(["layers"])
    # A LoRA run's model: a wrapped kernel is the base's, named by the wrapper's path.
    wrapped = nnx.eval_shape(lambda: new_model(TINY, LoraConfig(targets=(r"attn/q$",))))
    assert ewc.target_kernels(wrapped, TARGETS) == {
        **{("layers", i, "attn", "q", "base", "kernel"): f"layers.{i}.attn.q.kernel" for i in range(2)},
        **{("layers", i, *p.split("."), "kernel"): f"layers.{i}.{p}.kernel" for i in range(2) for p in ("attn.v", "attn.o", "mlp.up")},
        ("embed", "embedding"): "embed.embedding",
    }
    with pytest.raises(ewc.FisherError, match="match no projection"):
        ewc.target_kernels(wrapped, ("attn/nothing$",))


def test_fisher_equals_a_loop_of_per_example_grads():
    model = random_model()
    names = ewc.target_kernels(model, TARGETS)
    assert sorted(names.values()) == _kernel_names(["layers.0", "layers.1"])
    graphdef, kernels, rest = nnx.split(model, lambda path, _: tuple(path) in names, ...)
    batch = _batch()
    sums = jax.jit(lambda k, b: ewc.squared_gradients(graphdef, k, rest, b, lm_loss()))(kernels, batch)

    @jax.jit
    @jax.grad
    def example_grad(k, tokens, targets, w):  # one example alone, cross-entropy written out
        logits = nnx.merge(graphdef, k, rest)(tokens[None])[0][0]
        logp = jax.nn.log_softmax(logits.astype(jnp.float32))
        nll = -jnp.take_along_axis(logp, targets[:, None], axis=1)[:, 0]
        return jnp.sum(nll * w) / jnp.maximum(jnp.sum(w), 1.0)

    expected = jax.tree.map(jnp.zeros_like, kernels)
    for i in range(len(batch["decoder_loss_weights"])):
        g = example_grad(kernels, *(batch[k][i] for k in ("decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights")))
        expected = jax.tree.map(lambda e, g: e + g**2, expected, g)
    for (path, got), (_, want) in zip(nnx.to_flat_state(sums), nnx.to_flat_state(expected)):
        assert np.abs(want[...]).max() > 0, path
        np.testing.assert_allclose(got[...], want[...], rtol=2e-4, atol=1e-10, err_msg=str(path))


@pytest.mark.parametrize("scan", [False, True])
def test_ewc_gradient_equals_the_hand_written_one(scan):
    """d/dA of lam * sum(F * (s A B)^2) = 2 lam s (F * dW) B^T and d/dB = 2 lam s A^T (F * dW),
    with A, B, F flattened to matrices [in, r], [r, out], [in, out] (per layer when stacked)."""
    model = random_model(dataclasses.replace(TINY, scan_layers=scan), LoraConfig(rank=3, alpha=6.0, targets=TARGETS))
    modules = lora_modules(model)
    rng = np.random.default_rng(1)
    fisher = [rng.uniform(size=m.weight.shape).astype(np.float32) for _, m in modules]
    ewc.attach_fisher(model, fisher)
    lam = 7.0
    graphdef, adapters, rest = nnx.split(model, nnx.LoRAParam, ...)
    penalty = lambda a: ewc.ewc_term(lam)(nnx.merge(graphdef, a, rest), None, None)  # noqa: E731
    value, grads = jax.jit(jax.value_and_grad(penalty))(adapters)

    expected_value = 0.0
    for (path, m), f in zip(modules, fisher):
        a, b, s = np.asarray(m.lora_a[...], np.float64), np.asarray(m.lora_b[...], np.float64), m.scale
        f = np.asarray(f, np.float64)
        lead = a.shape[:1] if scan and path.startswith("layers") else ()  # the stacked layers' axis
        a2 = a.reshape(*lead, -1, m.rank)
        b2 = b.reshape(*lead, m.rank, -1)
        f2 = f.reshape(*lead, a2.shape[-2], b2.shape[-1])
        dw = s * a2 @ b2
        expected_value += lam * np.sum(f2 * dw**2)
        da = 2 * lam * s * (f2 * dw) @ np.swapaxes(b2, -1, -2)
        db = 2 * lam * s * np.swapaxes(a2, -1, -2) @ (f2 * dw)
        node = grads
        for part in path.split("/"):
            node = node[int(part) if part.isdigit() else part]
        np.testing.assert_allclose(node["lora_a"][...], da.reshape(a.shape), rtol=1e-4, atol=1e-7, err_msg=path)
        np.testing.assert_allclose(node["lora_b"][...], db.reshape(b.shape), rtol=1e-4, atol=1e-7, err_msg=path)
    np.testing.assert_allclose(value, expected_value, rtol=1e-5)


def test_fisher_files_that_do_not_fit_are_named(tmp_path):
    model = nnx.eval_shape(lambda: new_model(TINY, LoraConfig()))  # q and v
    info = {"targets": ["attn/q$", "attn/v$"]}
    good = {ewc.kernel_name(p): np.ones(m.base.kernel.shape, np.float32) for p, m in lora_modules(model)}
    assert len(ewc.check_fisher(good, info, model, "F")) == 4

    missing = dict(good)
    del missing["layers.1.attn.v.kernel"]
    with pytest.raises(ewc.FisherError, match=r"no tensor for kernel layers\.1\.attn\.v\.kernel.*flanjax fisher"):
        ewc.check_fisher(missing, info, model, "F")
    with pytest.raises(ewc.FisherError, match=r"shape \(16, 2, 4\) for kernel layers\.0\.attn\.q\.kernel.*\(16, 2, 8\)"):
        ewc.check_fisher({**good, "layers.0.attn.q.kernel": np.ones((16, 2, 4))}, info, model, "F")
    with pytest.raises(ewc.FisherError, match=r"covers kernel layers\.0\.attn\.k\.kernel, which LoRA does not adapt"):
        ewc.check_fisher({**good, "layers.0.attn.k.kernel": np.ones((16, 1, 8))}, info, model, "F")
    with pytest.raises(ewc.FisherError, match="no LoRA adapters: set lm.train.lora"):
        ewc.check_fisher(good, info, nnx.eval_shape(lambda: new_model(TINY)), "F")
    with pytest.raises(ewc.FisherNotFoundError, match="flanjax fisher --run RUN"):
        ewc.read_checked_fisher(str(tmp_path), model)

    ewc.save_fisher(str(tmp_path / "fisher"), good, info)  # found from the run directory too
    assert len(ewc.read_checked_fisher(str(tmp_path), model)) == 4


# --- end to end: flanjax fisher, then LoRA + EWC training --------------------------------------


def run_cli(args) -> int:
    gin.clear_config(clear_constants=True)
    return cli.main(args)


def _train(model_dir, steps, *extra):
    return run_cli(["train", "--gin_file=tests/tiny_run.gin", f"--gin.MODEL_DIR={model_dir}", f"--gin.TRAIN_STEPS={steps}",
                    "--gin.loop.LoopConfig.log_every=2", *extra])  # fmt: skip


def _ewc_gin(path, fisher, weight, lora="lm.train.lora = @lora.LoraConfig()"):
    """A gin file adding LoRA (the `lora` bindings) and EWC with `fisher`, lambda `weight`."""
    path.write_text(f"""from __gin__ import dynamic_registration
from flanjax.models import lora
from flanjax.train import ewc
from flanjax.train import lm
{lora}
lm.train.ewc = @ewc.EwcConfig()
ewc.EwcConfig.fisher = {str(fisher)!r}
ewc.EwcConfig.weight = {weight}
""")
    return f"--gin_file={path}"


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    import tasks.quickstart  # noqa: F401

    run = tmp_path_factory.mktemp("base")
    assert _train(run, 10, "--gin.optim.OptimizerConfig.warmup_steps=2") == 0
    return run


@pytest.mark.slow
def test_fisher_command_then_ewc_training_keeps_the_update_small(base_run, tmp_path, capsys):
    capsys.readouterr()
    assert run_cli(["fisher", "--run", str(base_run), "--task", "quickstart_max", "--num_examples", "12",
                    "--inputs_length", "48", "--targets_length", "16", "--module", "tasks.quickstart"]) == 0  # fmt: skip
    captured = capsys.readouterr()
    result = json.loads(captured.out.strip().splitlines()[-1])
    assert result["examples"] == 12 and result["examples_per_s"] > 0 and result["path"] == str(base_run / "fisher")
    assert "12/12 examples" in captured.err
    tensors, info = ewc.read_fisher(str(base_run))
    assert (info["task"], info["split"], info["num_examples"], info["targets"]) == ("quickstart_max", "train", 12, list(LoraConfig().targets))
    assert set(tensors) == {f"layers.{i}.attn.{p}.kernel" for i in range(2) for p in "qv"}
    assert info["shapes"]["layers.0.attn.q.kernel"] == [64, 4, 16]
    assert all(np.all(t >= 0) and t.max() > 0 for t in tensors.values())

    # The same weights and data; lambda 0 (plain LoRA) against a large lambda, which must keep
    # the Fisher-weighted update smaller. The EWC run stops at step 6 and resumes.
    plain, anchored = tmp_path / "plain", tmp_path / "anchored"
    common = (f"--gin.lm.train.init_checkpoint={base_run}", "--gin.checkpoint.CheckpointConfig.every_steps=6")
    assert _train(plain, 12, _ewc_gin(tmp_path / "plain.gin", base_run, 0.0), *common) == 0
    assert _train(anchored, 6, _ewc_gin(tmp_path / "anchored.gin", base_run / "fisher", 1e5), *common) == 0
    assert _train(anchored, 12, _ewc_gin(tmp_path / "anchored.gin", base_run / "fisher", 1e5), *common) == 0
    rows = [r for r in read_metrics(anchored / "metrics.jsonl") if "ewc" in r]
    assert [r["step"] for r in rows] == [2, 4, 6, 8, 10, 12] and all(r["ewc"] > 0 for r in rows[1:])
    assert all(r["ewc"] == 0 for r in read_metrics(plain / "metrics.jsonl") if "ewc" in r)

    def weighted_update(run):  # sum F * dW^2, the adapters read back as eval reads them
        graphdef, state, _ = restore(str(run), Partitioner.from_config(MeshConfig()))
        modules = lora_modules(nnx.merge(graphdef, state))
        return sum(float(np.sum(tensors[ewc.kernel_name(p)] * np.asarray(m.delta()) ** 2)) for p, m in modules)

    assert weighted_update(anchored) < 0.2 * weighted_update(plain)

    # The checkpoint keeps the Fisher under ewc/, none of it under model/.
    saved = Checkpointer(str(anchored), read_only=True)._saved(12)
    assert sum(name.startswith("ewc/") for name in saved) == 4 and not any("fisher" in name for name in saved)


def test_ewc_training_refuses_what_does_not_fit(tmp_path, capsys):
    import tasks.quickstart  # noqa: F401

    def error(*extra):
        capsys.readouterr()
        assert _train(tmp_path / "run", 2, *extra) == 1
        return capsys.readouterr().err

    assert "no Fisher in" in error(_ewc_gin(tmp_path / "a.gin", tmp_path / "nowhere", 1.0))
    ewc.save_fisher(str(tmp_path / "f"), {"layers.0.attn.q.kernel": np.ones((64, 4, 16))}, {"targets": ["attn/q$"]})
    # LoRA on q and k, a Fisher of one q.
    message = error(_ewc_gin(tmp_path / "b.gin", tmp_path / "f", 1.0, "lm.train.lora = @lora.LoraConfig()\nlora.LoraConfig.targets = ['attn/(q|k)$']"))
    assert "has no tensor for kernel layers.0.attn.k.kernel" in message and "['attn/q$']" in message
    assert "trains no adapters: set lm.train.lora" in error(_ewc_gin(tmp_path / "c.gin", tmp_path / "f", 1.0, lora=""))
