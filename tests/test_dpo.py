"""DPO, IPO and conservative DPO: the losses against NumPy versions of TRL's formulas, response
log-probabilities against the evaluator's scoring, a sharded step against a single-device one,
the three places of the reference end to end, and the bad-input errors."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from flanjax.data.vocab import HFVocabulary
from flanjax.decode import score_ids
from flanjax.models.lora import LoraConfig
from flanjax.models.transformer import TransformerConfig, new_model
from flanjax.rlhf.dpo import DPOConfig, DPOError, dpo_loss, response_logps
from flanjax.sharding import MeshConfig, Partitioner, make_mesh
from flanjax.train.steps import lm_init, make_train_step

TINY = TransformerConfig(vocab_size=32, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=64, max_len=16)


def comparisons(b: int, k: int, seed: int = 0) -> dict[str, np.ndarray]:
    """`PreferenceBatches`-shaped rows: 0, a prompt of 2-4 tokens, responses of 1-6 tokens; the
    last slot of odd prompts empty (K-wise rankings with fewer responses)."""
    rng = np.random.default_rng(seed)
    tokens, lengths = np.zeros((b, k, 12), np.int32), np.zeros((b, k), np.int32)
    prompt_length = rng.integers(3, 6, b).astype(np.int32)
    for i in range(b):
        prompt = [0, *rng.integers(1, 32, prompt_length[i] - 1)]
        for j in range(k - (i % 2 if k > 2 else 0)):
            row = prompt + list(rng.integers(1, 32, rng.integers(1, 7)))
            tokens[i, j, : len(row)], lengths[i, j] = row, len(row)
    ranks = np.where(lengths > 0, np.arange(k)[None, :], np.iinfo(np.int32).max).astype(np.int32)
    return {"tokens": tokens, "lengths": lengths, "ranks": ranks, "margin": np.zeros(b, np.float32),
            "prompt_length": prompt_length, "ref_logps": rng.normal(-12, 2, (b, k)).astype(np.float32)}  # fmt: skip


def log_sigmoid(x):
    return -np.logaddexp(0, -x)


def trl_pair_loss(config: DPOConfig, policy, ref, num_tokens, w: int, l: int) -> float:
    """TRL's DPOTrainer formulas (trl 1.16 `_compute_loss`; its documentation's equations) for one
    pair, chosen w and rejected l; conservative DPO as in the cDPO note (TRL's "robust" without
    its unbiasing denominator)."""
    beta, e = config.beta, config.label_smoothing
    chosen, rejected = policy[w] - ref[w], policy[l] - ref[l]
    if config.loss == "ipo":
        return (chosen / num_tokens[w] - rejected / num_tokens[l] - 1 / (2 * beta)) ** 2
    delta = chosen - rejected
    return -(1 - e) * log_sigmoid(beta * delta) - e * log_sigmoid(-beta * delta)


@pytest.mark.parametrize("config", [DPOConfig(beta=0.1), DPOConfig(beta=0.5), DPOConfig(loss="ipo", beta=0.3),
                                    DPOConfig(loss="conservative", beta=0.2, label_smoothing=0.1)], ids=str)  # fmt: skip
@pytest.mark.parametrize("k", [2, 3])
def test_loss_is_trls_per_pair_averaged_per_prompt(config, k):
    model = new_model(TINY, seed=1)
    batch = comparisons(4, k)
    loss, sums = dpo_loss(config)(model, {n: jnp.asarray(v) for n, v in batch.items()})
    p = np.broadcast_to(batch["prompt_length"][:, None], batch["lengths"].shape)
    policy, num_tokens = map(np.asarray, response_logps(model, batch["tokens"], batch["lengths"], p))
    per_prompt, chosen, pairs = [], [], 0
    for i in range(4):
        slots = np.flatnonzero(batch["lengths"][i] > 0)
        pair_losses = [trl_pair_loss(config, policy[i], batch["ref_logps"][i], num_tokens[i], w, l) for w in slots for l in slots if w < l]
        per_prompt.append(np.mean(pair_losses))
        chosen += [config.beta * (policy[i, w] - batch["ref_logps"][i, w]) for w in slots for l in slots if w < l]
        pairs += len(pair_losses)
    np.testing.assert_allclose(loss, np.mean(per_prompt), rtol=1e-5)
    assert sums["pair_sum"] == pairs == (4 if k == 2 else 2 * 3 + 2 * 1)
    np.testing.assert_allclose(sums["chosen_reward_sum"], np.sum(chosen), rtol=1e-5)


def test_response_logps_are_the_evaluators_scores_of_the_response_tokens():
    partitioner = Partitioner(make_mesh(MeshConfig(data=1), devices=jax.devices()[:1]))
    model = new_model(TINY, seed=2)
    batch = comparisons(3, 2, seed=3)
    p = np.broadcast_to(batch["prompt_length"][:, None], batch["lengths"].shape)
    got, num_tokens = response_logps(model, batch["tokens"], batch["lengths"], p)
    rows = []
    for i, j in np.ndindex(3, 2):
        n = batch["lengths"][i, j]
        ids = batch["tokens"][i, j, 1:n]  # the targets after the leading 0
        rows.append((list(ids), [float(t + 1 >= batch["prompt_length"][i]) for t in range(n - 1)]))
    graphdef, state = nnx.split(model)
    expected = score_ids(graphdef, state, rows, partitioner, batch_size=8, max_len=16)
    np.testing.assert_allclose(np.asarray(got).reshape(-1), expected, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(num_tokens), batch["lengths"] - batch["prompt_length"][:, None])


def test_a_lora_policys_reference_is_its_base_and_the_first_loss_is_log_2():
    model = new_model(TINY, LoraConfig(rank=4, targets=(r"attn/(q|v)$",)), seed=1)
    batch = {n: jnp.asarray(v) for n, v in comparisons(4, 2).items() if n != "ref_logps"}
    loss, sums = dpo_loss(DPOConfig())(model, batch)  # adapters start at zero: policy == reference
    np.testing.assert_allclose(loss, np.log(2), rtol=1e-6)
    assert sums["chosen_reward_sum"] == 0 and sums["rejected_reward_sum"] == 0


def test_sharded_step_equals_single_device():
    results = []
    batch = comparisons(8, 3, seed=5)
    for partitioner in (Partitioner(make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])),
                        Partitioner.from_config(MeshConfig(data=2, fsdp=2, tensor=2))):  # fmt: skip
        init = lm_init(TINY, optax.sgd(0.5), seed=3)
        graphdef, abstract = partitioner.abstract_state(init)
        state = partitioner.create(init, abstract)
        step = jax.jit(make_train_step(graphdef, dpo_loss(DPOConfig(beta=0.3))))
        with partitioner.activate():
            state, metrics = step(state, partitioner.shard_batch(batch))
        results.append((jax.device_get(nnx.to_pure_dict(state)), jax.device_get(metrics)))
    (single, m1), (sharded, m8) = results
    for key in ("loss_sum", "pairs_right_sum", "chosen_reward_sum", "rejected_reward_sum", "grad_norm"):
        np.testing.assert_allclose(m1[key], m8[key], rtol=2e-4, atol=1e-6, err_msg=key)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6), single, sharded)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"loss": "kto"}, "is not one of 'sigmoid', 'conservative', 'ipo'"),
    ({"beta": 0.0}, "beta = 0.0: it must be positive"),
    ({"loss": "conservative", "label_smoothing": 0.5}, r"must lie in \[0, 0.5\)"),
    ({"label_smoothing": 0.1}, "set DPOConfig.loss = 'conservative'"),
    ({"reference": "none"}, "is not one of 'model', 'precomputed'"),
])  # fmt: skip
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(DPOError, match=message):
        DPOConfig(**kwargs)


# --- the command line, end to end ---------------------------------------------------------------


def _preferences(directory):
    """16 comparisons of the quickstart's "largest" questions, K = 3 (the right answer first)."""
    directory.mkdir()
    rows = [{"prompt": f"What is the largest of {a} {b}?", "responses": [str(max(a, b)), str(min(a, b)), "none"]}
            for a, b in zip(range(16), range(30, 14, -1))]  # fmt: skip
    for split, part in (("train", rows), ("validation", rows[:8])):
        (directory / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    return directory


@pytest.mark.slow
def test_dpo_from_the_command_line_with_each_reference(tmp_path, capsys):
    """A tiny SFT run -> DPO (the quickstart's run file) with the reference as a frozen model,
    precomputed (resumed) and a LoRA policy's base: at step 1 the policy is its reference (loss log 2), the frozen and
    precomputed references train alike, and training separates the chosen from the rejected."""
    import gin

    from flanjax import cli
    from flanjax.rundir.metrics import read_metrics

    def main(args):
        gin.clear_config(clear_constants=True)
        return cli.main(args)

    sft = tmp_path / "sft"
    assert main(["train", "--gin_file=tests/tiny_run.gin", f"--gin.MODEL_DIR='{sft}'", "--gin.TRAIN_STEPS=10"]) == 0
    prefs = _preferences(tmp_path / "prefs")
    dpo = ["train", "--gin_file=configs/runs/quickstart_rlhf_dpo.gin", f"--gin.INIT_CHECKPOINT='{sft}'", f"--gin.PREFERENCES='{prefs}'",
           "--gin.BATCH_SIZE=8", "--gin.dpo.train_dpo.prompt_len=32", "--gin.dpo.train_dpo.response_len=8",
           "--gin.loop.LoopConfig.log_every=1", "--gin.optim.OptimizerConfig.learning_rate=1e-3",
           "--gin.optim.OptimizerConfig.warmup_steps=0", "--gin.dpo.train_dpo.shuffle=False", "--gin.dpo.train_dpo.allow_ties=False",
           "--gin.loop.LoopConfig.eval_every=None"]  # fmt: skip

    def rows(run):
        return [r for r in read_metrics(str(tmp_path / run / "metrics.jsonl")) if "loss" in r]

    assert main([*dpo, f"--gin.MODEL_DIR='{tmp_path / 'model'}'", "--gin.TRAIN_STEPS=6", "--gin.dpo.DPOConfig.reference='model'"]) == 0
    precomputed = [*dpo, f"--gin.MODEL_DIR='{tmp_path / 'table'}'", "--gin.dpo.DPOConfig.reference='precomputed'"]
    assert main([*precomputed, "--gin.TRAIN_STEPS=4"]) == 0
    assert (tmp_path / "table" / "reference_logps.npz").exists()
    assert main([*precomputed, "--gin.TRAIN_STEPS=6"]) == 0  # resumes at step 4 with the stored table
    model, table = rows("model"), rows("table")
    assert [r["step"] for r in table] == [r["step"] for r in model] == [1, 2, 3, 4, 5, 6]
    assert model[0]["loss"] == pytest.approx(np.log(2), rel=1e-5) and model[0]["reward_margin"] == pytest.approx(0, abs=1e-6)
    for a, b in zip(model, table):
        for key in ("loss", "pair_accuracy", "chosen_reward", "rejected_reward"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)
    assert model[-1]["reward_margin"] > 0 and model[-1]["loss"] < np.log(2)
    validation = [r for r in read_metrics(str(tmp_path / "model" / "metrics.jsonl")) if "validation/pair_accuracy" in r]
    assert validation and 0 <= validation[-1]["validation/pair_accuracy"] <= 1
    assert (tmp_path / "model" / "rewards.png").exists()

    assert main([*dpo, "--gin_file=configs/lora/adapters.gin", "--gin.dpo.train_dpo.lora=@lora.LoraConfig()",
                 f"--gin.MODEL_DIR='{tmp_path / 'lora'}'", "--gin.TRAIN_STEPS=2"]) == 0  # fmt: skip
    lora = rows("lora")
    assert lora[0]["loss"] == pytest.approx(np.log(2), rel=1e-5) and lora[1]["loss"] != lora[0]["loss"]
    assert json.loads((tmp_path / "lora" / "lora.json").read_text())["rank"] > 0

    # Bad input: comparisons without pairs (an SFT task, SFT records), a reference of another shape
    # or tokenizer; refused before the run directory holds a model.
    def refused(args, message):
        capsys.readouterr()
        assert main([*dpo, *args, "--gin.TRAIN_STEPS=1"]) != 0
        assert message in capsys.readouterr().err

    refused([f"--gin.MODEL_DIR='{tmp_path / 'x'}'", "--gin.PREFERENCES=None", "--gin.dpo.train_dpo.mixture_or_task_name='quickstart'"],
            "quickstart has no `responses` feature")  # fmt: skip
    other = tmp_path / "other"
    shutil.copytree(sft, other)
    config = json.loads((other / "model.json").read_text())
    (other / "model.json").write_text(json.dumps({**config, "d_ff": config["d_ff"] * 2}))
    refused([f"--gin.MODEL_DIR='{tmp_path / 'y'}'", f"--gin.dpo.train_dpo.reference_checkpoint='{other}'"], "(they differ in d_ff)")
    (other / "model.json").write_text(json.dumps(config))  # the same shape, another tokenizer
    tokenizer = HFVocabulary(str(sft / "tokenizer")).tokenizer
    tokenizer.add_tokens(["<|extra|>"])
    tokenizer.save_pretrained(str(other / "tokenizer"))
    refused([f"--gin.MODEL_DIR='{tmp_path / 'y'}'", f"--gin.dpo.train_dpo.reference_checkpoint='{other}'"],
            f"but the model of {other} reads the one in")  # fmt: skip
    unpaired = tmp_path / "unpaired"  # SFT data, not comparisons
    unpaired.mkdir()
    (unpaired / "train.jsonl").write_text('{"prompt": "Sort 3 1 2.", "response": "1 2 3"}\n')
    refused([f"--gin.MODEL_DIR='{tmp_path / 'z'}'", f"--gin.PREFERENCES='{unpaired}'"], 'no "responses" (or "chosen"/"rejected") field')
    assert not any(os.path.exists(tmp_path / run / "model.json") for run in ("x", "y", "z"))
