"""The training step, optimizer, checkpoints and the one loop."""

import dataclasses
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from flanjax.benchmark import synthetic_lm_batch
from flanjax.models import stacking
from flanjax.models.transformer import Transformer, TransformerConfig
from flanjax.rundir.checkpoint import CheckpointConfig, CheckpointMismatchError, Checkpointer
from flanjax.rundir.metrics import MetricsLog, read_metrics
from flanjax.sharding import MeshConfig, Partitioner, make_mesh
from flanjax.train import optim
from flanjax.train.loop import LoopConfig, NonFiniteLossError, TrainLoop
from flanjax.train.losses import add_terms, chunked_token_cross_entropy, lm_loss
from flanjax.train.steps import TrainState, lm_init, make_train_step
from flanjax.train.trainer import jit_step, sharded_step

TINY = TransformerConfig(
    vocab_size=512, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=64, max_len=64,
    residual_dropout=0.1, residual_dropout_top=0.2,
)


def batch_spec(partitioner, batch):
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=partitioner.batch_sharding(v.ndim)) for k, v in batch.items()}


# Adam with its default eps (1e-8) turns a near-zero gradient (an embedding row of a token the
# batch barely holds) into a full-sized step whose sign the gradient's rounding decides, and
# that rounding differs with the sum order (another mesh, another CPU's vector width). With eps
# 1e-4 such gradients move their weights little, real ones as before: comparing steps across
# meshes then tests the sharding, not the rounding. SGD agrees to 1e-8.
ADAM = optax.adamw(1e-2, eps=1e-4)
ADAM_ATOL = 2e-5


def compiled_step(partitioner, config=TINY, num_microbatches=1, loss=lm_loss(), tx=ADAM):
    init = lm_init(config, tx)
    graphdef, abstract = partitioner.abstract_state(init)
    with partitioner.activate():
        step = jit_step(make_train_step(graphdef, loss, num_microbatches=num_microbatches, seed=3), abstract,
                        batch_spec(partitioner, BATCHES[0]))  # fmt: skip
        state = partitioner.create(init, abstract)
    return step, state


def run_steps(partitioner, batches, start=None, **kw):
    """Losses and the final state of `batches`; from `start` (a pure-dict state) if given."""
    step, state = compiled_step(partitioner, **kw)
    if start is not None:
        placed = jax.tree.map(lambda v, x: jax.device_put(v, x.sharding), start, nnx.to_pure_dict(state))
        nnx.replace_by_pure_dict(state, placed)
    losses = []
    with partitioner.activate():
        for batch in batches:
            state, m = step(state, partitioner.shard_batch(batch))
            losses.append(float(m["loss_sum"] / m["weight_sum"]))
    return losses, jax.device_get(nnx.to_pure_dict(state))


def single_device():
    return Partitioner(make_mesh(MeshConfig(data=1), devices=jax.devices()[:1]))


BATCHES = [synthetic_lm_batch(8, 32, TINY.vocab_size, seed=s) for s in range(3)]
NO_DROPOUT = dataclasses.replace(TINY, residual_dropout=0.0, residual_dropout_top=None)


@pytest.mark.parametrize(
    "mesh, tx, atol",
    [(MeshConfig(data=2, fsdp=2, tensor=2), optax.sgd(0.1), 1e-6), (MeshConfig(data=1, fsdp=8), optax.sgd(0.1), 1e-6),
     (MeshConfig(data=4, tensor=2), optax.sgd(0.1), 1e-6), (MeshConfig(data=2, fsdp=2, tensor=2), ADAM, ADAM_ATOL)],
    ids=["2x2x2-sgd", "fsdp8-sgd", "data4xtensor2-sgd", "2x2x2-adam"],
)  # fmt: skip
def test_sharded_step_equals_single_device_step(mesh, tx, atol):
    assert jax.device_count() == 8
    ref_losses, ref_state = run_steps(single_device(), BATCHES, tx=tx)
    losses, state = run_steps(Partitioner.from_config(mesh), BATCHES, tx=tx)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=atol), state, ref_state)


@pytest.mark.parametrize("chunk_size", [8, 12])  # divides the 32 positions; leaves a padded last chunk
def test_chunked_cross_entropy_and_its_gradients_equal_the_full_logits_ones(chunk_size):
    """The reference: `token_cross_entropy` of the whole [b, t, v] logits (optax's cross-entropy)."""
    b = BATCHES[0]

    def stats(model, chunk):
        hidden, _ = model(b["decoder_input_tokens"], b["decoder_positions"], b["decoder_segment_ids"], return_hidden=True)
        return chunked_token_cross_entropy(hidden, model.logits, b["decoder_target_tokens"], b["decoder_loss_weights"],
                                           z_loss=1e-3, chunk_size=chunk)  # fmt: skip

    def loss(model, chunk):
        s = stats(model, chunk)
        return (s.loss + s.z_loss) / s.weight

    model = Transformer(NO_DROPOUT, rngs=nnx.Rngs(0))
    full, chunked = stats(model, None), stats(model, chunk_size)
    for name, a, c in zip(full._fields, full, chunked):
        np.testing.assert_allclose(c, a, rtol=1e-5, err_msg=name)
    assert float(full.weight) == float(np.sum(b["decoder_loss_weights"]))  # padding added no weight
    expected, got = nnx.grad(loss)(model, None), nnx.grad(loss)(model, chunk_size)
    jax.tree.map(lambda a, c: np.testing.assert_allclose(c, a, rtol=1e-4, atol=1e-7), nnx.to_pure_dict(expected), nnx.to_pure_dict(got))


def test_chunked_loss_on_a_sharded_mesh_equals_the_full_logits_step():
    ref_losses, ref_state = run_steps(single_device(), BATCHES, loss=lm_loss(chunk_size=None))
    losses, state = run_steps(Partitioner.from_config(MeshConfig(data=2, fsdp=2, tensor=2)), BATCHES, loss=lm_loss(chunk_size=12))
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=ADAM_ATOL), state, ref_state)


@pytest.mark.parametrize("remat", ["save_dots", "full"])
def test_rematerialised_layers_give_the_same_gradients(remat):
    """Dropout included: the backward pass recomputes with the same randomness."""
    b = BATCHES[0]

    def loss(model):
        logits, _ = model(b["decoder_input_tokens"], b["decoder_positions"], b["decoder_segment_ids"], rngs=nnx.Rngs(dropout=4))
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

    config = dataclasses.replace(TINY, attention_dropout=0.1)
    expected = nnx.to_pure_dict(nnx.grad(loss)(Transformer(config, rngs=nnx.Rngs(0))))
    got = nnx.to_pure_dict(nnx.grad(loss)(Transformer(dataclasses.replace(config, remat=remat), rngs=nnx.Rngs(0))))
    jax.tree.map(lambda a, c: np.testing.assert_allclose(c, a, rtol=1e-5, atol=1e-8), expected, got)
    with pytest.raises(ValueError, match="remat='some' is not one of none, save_dots, full"):
        dataclasses.replace(TINY, remat="some")


def test_rematerialised_training_on_a_sharded_mesh_equals_the_plain_step():
    ref_losses, ref_state = run_steps(single_device(), BATCHES, config=NO_DROPOUT)
    mesh = Partitioner.from_config(MeshConfig(data=2, fsdp=2, tensor=2))
    losses, state = run_steps(mesh, BATCHES, config=dataclasses.replace(NO_DROPOUT, remat="full"))
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=ADAM_ATOL), state, ref_state)


def test_scanned_rematerialised_training_on_a_sharded_mesh_equals_the_unrolled_step():
    """Dropout included; the optimizer's moments are stacked like the weights."""
    start = jax.device_get(nnx.to_pure_dict(compiled_step(single_device())[1]))
    ref_losses, ref_state = run_steps(single_device(), BATCHES, start=start)
    scanned = dataclasses.replace(TINY, scan_layers=True, remat="full")
    mesh = Partitioner.from_config(MeshConfig(data=2, fsdp=2, tensor=2))
    losses, state = run_steps(mesh, BATCHES, start=stacking.stack(start), config=scanned)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=ADAM_ATOL), stacking.unstack(state), ref_state)


def test_microbatches_accumulate_to_the_full_batch_gradient():
    # Unequal target counts per microbatch: the loss must be normalised over the whole batch.
    batch = dict(BATCHES[0])
    weights = np.ones_like(batch["decoder_loss_weights"])
    weights[:4, :20] = 0
    batch["decoder_loss_weights"] = weights
    # SGD: Adam's first step would turn rounding in near-zero gradients into full-size updates.
    full, full_state = run_steps(single_device(), [batch], config=NO_DROPOUT, tx=optax.sgd(1.0))
    micro, micro_state = run_steps(single_device(), [batch], config=NO_DROPOUT, num_microbatches=4, tx=optax.sgd(1.0))
    np.testing.assert_allclose(micro, full, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), micro_state, full_state)


def test_an_extra_loss_term_composes_without_touching_the_step():
    """An L2 penalty on the trained parameters through `add_terms`: one SGD step (lr 1) must
    move each parameter by the LM loss's gradient plus 2 * c * the parameter, computed here
    by hand (jax.grad of the plain mean cross-entropy, written out)."""
    c = 0.01
    penalty = lambda model, batch, rngs: c * sum(jnp.sum(p**2) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))  # noqa: E731
    partitioner = single_device()
    step, state = compiled_step(partitioner, config=NO_DROPOUT, loss=add_terms(lm_loss(), {"l2": penalty}), tx=optax.sgd(1.0))
    before = jax.device_get(nnx.to_pure_dict(state))

    def cross_entropy(params):
        model = Transformer(NO_DROPOUT, rngs=nnx.Rngs(0))
        nnx.update(model, params)
        b = BATCHES[0]
        logits, _ = model(b["decoder_input_tokens"], b["decoder_positions"], b["decoder_segment_ids"])
        log_p = jax.nn.log_softmax(logits.astype(jnp.float32))
        picked = jnp.take_along_axis(log_p, b["decoder_target_tokens"][..., None], axis=-1)[..., 0]
        w = b["decoder_loss_weights"]
        return -jnp.sum(picked * w) / jnp.sum(w)

    grads = jax.grad(cross_entropy)(nnx.State(before["model"]))
    expected = jax.tree.map(lambda p, g: p - (g + 2 * c * p), nnx.to_pure_dict(nnx.State(before["model"])), nnx.to_pure_dict(grads))
    with partitioner.activate():
        state, metrics = step(state, partitioner.shard_batch(BATCHES[0]))
    after = jax.device_get(nnx.to_pure_dict(state))["model"]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), after, expected)
    l2 = c * sum(np.sum(np.square(p)) for p in jax.tree.leaves(before["model"]))
    assert float(metrics["l2"]) == pytest.approx(l2, rel=1e-5)


def test_the_step_compiles_once_for_a_shape():
    """Steps after the first reuse its executable: the state comes back in the layout it went
    in with, so nothing about the second call differs."""
    partitioner = Partitioner.from_config(MeshConfig(data=2, fsdp=2, tensor=2))
    init = lm_init(TINY, ADAM)
    graphdef, abstract = partitioner.abstract_state(init)
    compiles = []

    def listener(event, *_, **__):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    with partitioner.activate():
        step = sharded_step(make_train_step(graphdef, lm_loss()), abstract, batch_spec(partitioner, BATCHES[0]))
        state = partitioner.create(init, abstract)
        batches = [partitioner.shard_batch(batch) for batch in BATCHES]
        compiles.clear()
        for batch in batches:
            state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
    jax.monitoring.unregister_event_duration_listener(listener)
    assert len(compiles) == 1


def test_parameters_and_optimizer_state_are_born_sharded():
    partitioner = Partitioner.from_config(MeshConfig(data=2, fsdp=2, tensor=2))
    _, state = compiled_step(partitioner)
    flat = {"/".join(map(str, k)): v for k, v in nnx.to_flat_state(state)}
    expected = {
        "model/embed/embedding": ("tensor", "fsdp"),
        "model/layers/0/attn/q/kernel": ("fsdp", "tensor", None),
        "model/layers/0/attn/k/kernel": ("fsdp", "tensor", None),
        "model/layers/0/attn/o/kernel": ("tensor", None, "fsdp"),
        "model/layers/0/mlp/down/kernel": ("tensor", "fsdp"),
        "model/lm_head/kernel": ("fsdp", "tensor"),
        "model/final_norm/scale": (None,),
    }
    for name, spec in expected.items():
        assert tuple(flat[name][...].sharding.spec) == spec, name
    # Adam's moments follow their parameter: no replicated copy of the optimizer state.
    mu = [v for k, v in flat.items() if "mu" in k and k.endswith("layers/0/attn/q/kernel")]
    assert mu and tuple(mu[0][...].sharding.spec) == ("fsdp", "tensor", None)
    shard = flat["model/layers/0/mlp/up/kernel"][...].addressable_shards[0].data
    assert shard.shape == (TINY.d_model // 2, TINY.d_ff // 2)


# --- optimizer ------------------------------------------------------------------------------


def test_schedules_follow_their_formulas():
    cfg = optim.OptimizerConfig(learning_rate=1.0, warmup_steps=10, end_lr_fraction=0.1)
    for kind in ("constant", "linear", "cosine"):
        sched = optim.make_schedule(dataclasses.replace(cfg, schedule=kind), 110)
        assert float(sched(5)) == pytest.approx(0.5)  # linear warmup
        assert float(sched(10)) == pytest.approx(1.0)
        progress = 50 / 100
        expected = {
            "constant": 1.0,
            "linear": 1.0 - 0.9 * progress,
            "cosine": 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)),
        }[kind]
        assert float(sched(60)) == pytest.approx(expected, rel=1e-5)
        if kind != "constant":
            assert float(sched(110)) == pytest.approx(0.1, rel=1e-5)


def test_weight_decay_spares_norms_and_biases():
    config = optim.OptimizerConfig(learning_rate=0.1, schedule="constant", weight_decay=0.5, clip_grad_norm=None)
    tx = optim.make_optimizer(config, 10)
    params = {"kernel": jnp.full((2, 2), 2.0), "scale": jnp.full((2,), 2.0)}
    # Zero gradients: Adam moves nothing, so the update is the decoupled decay alone, -lr * wd * p.
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    np.testing.assert_allclose(updates["kernel"], -0.1 * 0.5 * 2.0, rtol=1e-6)
    np.testing.assert_array_equal(updates["scale"], 0.0)


# --- checkpoints ----------------------------------------------------------------------------


def _state(config=TINY):
    return nnx.state(TrainState.create(Transformer(config, rngs=nnx.Rngs(0)), optax.adam(1e-3)))


def test_checkpoint_round_trip_restores_values_and_data_position(tmp_path):
    state = _state()
    ckpt = Checkpointer(str(tmp_path), CheckpointConfig(async_save=True))
    ckpt.save(7, state, {"position": 7, "source": "x"})
    ckpt.wait()
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    restored, data = Checkpointer(str(tmp_path)).restore(7, abstract)
    assert data == {"position": 7, "source": "x"}
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(restored), nnx.to_pure_dict(state))


def test_checkpoint_of_another_shape_names_the_parameter(tmp_path):
    ckpt = Checkpointer(str(tmp_path))
    ckpt.save(1, _state())
    ckpt.wait()
    wider = _state(dataclasses.replace(TINY, d_ff=96))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), wider)
    with pytest.raises(CheckpointMismatchError, match=r"mlp/(up|gate|down)/kernel has shape"):
        ckpt.restore(1, abstract)


def test_checkpoint_of_the_positional_format_is_refused_for_resuming_but_its_model_reads(tmp_path):
    """Format 1 saved the state as a tuple ("0" the model, "1" its optimizer)."""
    state = _state()
    old = Checkpointer(str(tmp_path), CheckpointConfig(async_save=False))
    old.manager.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave(
        {0: nnx.to_pure_dict(state["model"]), 1: nnx.to_pure_dict(state["optimizer"])}), data=ocp.args.JsonSave({})))
    old.wait()
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    ckpt = Checkpointer(str(tmp_path), read_only=True)
    with pytest.raises(CheckpointMismatchError, match="format version 1.*only version 2"):
        ckpt.restore(3, abstract)
    model = ckpt.restore_model(3, abstract["model"])
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(model), nnx.to_pure_dict(state["model"]))
    assert Checkpointer(str(tmp_path), read_only=True).format_version(3) == 1


def test_weights_read_across_layer_layouts_but_a_resume_names_the_setting(tmp_path):
    """A scanned model starts from an unrolled run's weights and the other way round."""
    for saved, read in ((TINY, dataclasses.replace(TINY, scan_layers=True)), (dataclasses.replace(TINY, scan_layers=True), TINY)):
        state = _state(saved)
        ckpt = Checkpointer(str(tmp_path / f"scan_{saved.scan_layers}"), CheckpointConfig(async_save=False))
        ckpt.save(1, state)
        partitioner = Partitioner.from_config(MeshConfig(data=2, fsdp=2, tensor=2))
        _, abstract = partitioner.abstract_state(lambda: Transformer(read, rngs=nnx.Rngs(0)))
        model = nnx.to_pure_dict(ckpt.restore_model(1, abstract))
        expected = stacking.in_layout(nnx.to_pure_dict(state["model"]), read.scan_layers)
        jax.tree.map(np.testing.assert_array_equal, model, expected)
        with pytest.raises(CheckpointMismatchError, match=f"scan_layers={saved.scan_layers}"):
            ckpt.restore(1, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _state(read)))


# --- the loop -------------------------------------------------------------------------------


class CountingBatches:
    def __init__(self):
        self.position = 0

    def __next__(self):
        self.position += 1
        return {"x": np.full((8, 1), self.position, np.float32)}

    def get_state(self):
        return {"position": self.position}

    def set_state(self, state):
        self.position = state["position"]


def _toy_loop(tmp_path, nan_at: int, num_steps: int = 10):
    """A loop over a scalar 'model' whose loss turns NaN at step `nan_at`."""
    partitioner = single_device()

    def step_fn(state, batch):
        w = state["w"] + 1.0
        x = batch["x"][0, 0]
        loss = jnp.where(x == nan_at, jnp.nan, w)
        return {"w": w}, {"loss_sum": loss, "correct_sum": 0.0, "weight_sum": 1.0}

    loop = TrainLoop(
        step_fn=jax.jit(step_fn),
        batches=CountingBatches(),
        partitioner=partitioner,
        checkpointer=Checkpointer(str(tmp_path), CheckpointConfig(every_steps=2)),
        metrics=MetricsLog(str(tmp_path)),
        config=LoopConfig(num_steps=num_steps, log_every=1),
    )
    abstract = {"w": jax.ShapeDtypeStruct((), jnp.float32)}
    return loop, (lambda: {"w": jnp.zeros(())}), abstract


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    loop, init, abstract = _toy_loop(tmp_path, nan_at=7)
    with pytest.raises(NonFiniteLossError, match="at step 7") as err:
        loop.run(init, abstract)
    assert "Last good checkpoint: step 6" in str(err.value)
    assert loop.checkpointer.all_steps() == [2, 4, 6]
    restored, data = loop.checkpointer.restore(6, abstract)
    assert float(restored["w"]) == 6.0 and data == {"position": 6}


def test_loop_resumes_from_the_latest_checkpoint(tmp_path):
    loop, init, abstract = _toy_loop(tmp_path, nan_at=-1, num_steps=5)
    assert loop.run(init, abstract).step == 5
    loop, init, abstract = _toy_loop(tmp_path, nan_at=-1, num_steps=9)
    result = loop.run(init, abstract)
    assert result.step == 9 and float(result.state["w"]) == 9.0
    assert loop.batches.position == 9  # the data stream continued, not restarted
    steps = [r["step"] for r in read_metrics(os.path.join(tmp_path, "metrics.jsonl")) if "loss" in r]
    assert steps == list(range(1, 10))


def test_a_finished_run_rerun_trains_and_evaluates_nothing(tmp_path, capsys):
    """Rerunning a finished run (a demo that resumes its prerequisite) restores it and stops."""
    loop, init, abstract = _toy_loop(tmp_path, nan_at=-1, num_steps=4)
    evaluated = []
    loop.eval_hooks = {"eval": lambda step, state: evaluated.append(step) or {}}
    assert loop.run(init, abstract).step == 4 and evaluated == [4]
    loop, init, abstract = _toy_loop(tmp_path, nan_at=-1, num_steps=4)
    loop.eval_hooks = {"eval": lambda step, state: evaluated.append(step) or {}}
    result = loop.run(init, abstract)
    assert (result.step, result.start_step, float(result.state["w"])) == (4, 4, 4.0)
    assert evaluated == [4] and loop.batches.position == 4  # no evaluation; no batch read past the restored position
    assert "already complete at step 4 of 4" in capsys.readouterr().err
