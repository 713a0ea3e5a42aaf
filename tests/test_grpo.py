"""GRPO: advantages and losses against TRL (its `nanstd`, its loss code's formulas in torch), a
sharded step against a single-device one, the command line end to end with resume, and the
bad-input errors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx
from trl.trainer.utils import nanstd

from flanjax.data.vocab import DEFAULT_VOCABULARY
from flanjax.decode import SamplingConfig
from flanjax.models.transformer import TransformerConfig
from flanjax.rlhf.grpo import GRPOConfig, GRPOError, GRPOStep, group_advantages, grpo_losses
from flanjax.sharding import MeshConfig, Partitioner, make_mesh
from flanjax.train.steps import lm_init


@pytest.mark.parametrize("scale", [True, False])
def test_group_advantages_are_trls(scale):
    rewards = np.random.default_rng(0).normal(size=24).astype(np.float32)
    rewards[8:12] = 0.5  # a group without spread: advantages 0, not NaN
    got, std = group_advantages(jnp.asarray(rewards), 4, scale)
    r = torch.tensor(rewards)  # TRL's GRPOTrainer: group mean and nanstd, repeated over the group
    mean = r.view(-1, 4).mean(dim=1).repeat_interleave(4)
    trl_std = nanstd(r.view(-1, 4), dim=1).repeat_interleave(4)
    expected = (r - mean) / (trl_std + 1e-4) if scale else r - mean
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(std, trl_std.numpy()[::4], rtol=1e-5)
    assert np.all(np.asarray(got)[8:12] == 0)


def trl_loss(logp, old_logp, ref_logp, advantages, mask, beta, eps, loss_type):
    """TRL 1.16 GRPOTrainer._compute_loss for token-level importance sampling, in torch: loss type
    "bnpo" (the token mean) or "grpo" (each sequence's mean, then the mean)."""
    logp, old_logp, ref_logp, advantages, mask = map(torch.tensor, (logp, old_logp, ref_logp, advantages, mask))
    coef_1 = torch.exp(logp - old_logp)
    coef_2 = torch.clamp(coef_1, 1 - eps, 1 + eps)
    per_token_loss = -torch.min(coef_1 * advantages.unsqueeze(1), coef_2 * advantages.unsqueeze(1))
    if beta != 0.0:
        per_token_loss = per_token_loss + beta * (torch.exp(ref_logp - logp) - (ref_logp - logp) - 1)
    if loss_type == "grpo":
        return ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    return (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)


@pytest.mark.parametrize(("loss_mean", "beta"), [("token", 0.04), ("sequence", 0.04), ("token", 0.0)])
def test_losses_are_trls(loss_mean, beta):
    rng = np.random.default_rng(1)
    old_logp = rng.normal(-2, 0.5, (6, 5)).astype(np.float32)
    logp = old_logp + rng.normal(0, 0.3, (6, 5)).astype(np.float32)  # ratios beyond the clip range too
    ref_logp = old_logp + rng.normal(0, 0.2, (6, 5)).astype(np.float32)
    advantages = rng.normal(size=6).astype(np.float32)
    mask = (np.arange(5)[None, :] < np.array([5, 3, 1, 4, 2, 5])[:, None]).astype(np.float32)
    config = GRPOConfig(beta=beta, clip_ratio=0.2, loss_mean=loss_mean)
    got = grpo_losses(jnp.asarray(logp), jnp.asarray(old_logp), jnp.asarray(ref_logp) if beta else None, jnp.asarray(advantages),
                      jnp.asarray(mask), config)  # fmt: skip
    expected = trl_loss(logp, old_logp, ref_logp, advantages, mask, beta, 0.2, "bnpo" if loss_mean == "token" else "grpo")
    np.testing.assert_allclose(got["loss"], expected.item(), rtol=1e-5)
    assert 0 < got["clip_fraction"] < 1


def rubric(prompt, response, reference):
    """The share of a response's characters that its prompt has: graded, so groups have a spread."""
    return len(set(response) & set(prompt)) / (1 + len(set(response)))


def test_sharded_step_equals_single_device():
    """One GRPO iteration (sampling, rewards, two minibatches) on 1 device and on a 2x2x2 mesh."""
    vocabulary = DEFAULT_VOCABULARY  # the quickstart's tokenizer (conftest)
    config = TransformerConfig(vocab_size=512, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=64, max_len=32)
    prompts = np.zeros((4, 8), np.int32)
    for i, text in enumerate(["Sort 3 1 2.", "Add 4 and 5.", "Max of 7 2?", "Count a b c."]):
        ids = [0, *vocabulary.encode(text)][:8]
        prompts[i, : len(ids)] = ids
    batch = {"prompts": prompts, "prompt_lengths": (prompts != 0).sum(1).astype(np.int32) + 1,
             "references": np.zeros((4, 4), np.int32)}  # fmt: skip
    results = []
    for partitioner in (Partitioner(make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])),
                        Partitioner.from_config(MeshConfig(data=2, fsdp=2, tensor=2))):  # fmt: skip
        init = lm_init(config, optax.sgd(0.5), seed=4)
        graphdef, abstract = partitioner.abstract_state(init)
        state = partitioner.create(init, abstract)
        reference = partitioner.create(lambda: nnx.state(init().model), partitioner.abstract_state(lambda: init().model)[1])
        policy_def = nnx.split(nnx.eval_shape(lambda: init().model))[0]
        step = GRPOStep(graphdef, policy_def, policy_def, reference, abstract, partitioner,
                        rewards=lambda p, r, ref: np.asarray([rubric(*x) for x in zip(p, r, ref)], np.float32),
                        vocabulary=vocabulary, sampling=SamplingConfig(max_new_tokens=6, temperature=1.0),
                        config=GRPOConfig(group_size=4, num_minibatches=2, num_iterations=2), seed=0)  # fmt: skip
        with partitioner.activate():
            state, metrics = step(state, partitioner.shard_batch(batch))
        results.append((jax.device_get(nnx.to_pure_dict(state)), {k: float(v) for k, v in jax.device_get(metrics).items() if "time" not in k}))
    (single, m1), (sharded, m8) = results
    assert 0 < m1["reward/mean"] < 1  # some groups have a spread to learn from
    for key in ("loss_sum", "kl", "clip_fraction", "reward/mean", "entropy", "grad_norm"):
        assert m8[key] == pytest.approx(m1[key], rel=2e-4, abs=1e-6), key
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6), single, sharded)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"group_size": 1}, "a group of one response has no spread"),
    ({"beta": 0.0, "log_kl": True}, "beta 0 loads no reference policy"),
    ({"loss_mean": "batch"}, "is not one of 'token', 'sequence'"),
    ({"beta": -0.1}, "cannot be negative"),
])  # fmt: skip
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(GRPOError, match=message):
        GRPOConfig(**kwargs)


@pytest.mark.slow
def test_grpo_from_the_command_line_resumes_and_runs_without_a_reference(tmp_path, capsys):
    import gin

    from flanjax import cli
    from flanjax.rundir.metrics import read_metrics

    def main(args):
        gin.clear_config(clear_constants=True)
        return cli.main(args)

    sft = tmp_path / "sft"
    assert main(["train", "--gin_file=tests/tiny_run.gin", f"--gin.MODEL_DIR='{sft}'", "--gin.TRAIN_STEPS=10"]) == 0
    # The quickstart's run file (a rubric reward, its prompts), smaller.
    grpo = ["train", "--gin_file=configs/runs/quickstart_rlhf_grpo.gin", f"--gin.POLICY_CHECKPOINT='{sft}'",
            "--gin.grpo.GRPOConfig.group_size=4", "--gin.grpo.GRPOConfig.num_iterations=1", "--gin.decode.SamplingConfig.max_new_tokens=8",
            "--gin.loop.LoopConfig.log_every=1", "--gin.checkpoint.CheckpointConfig.every_steps=2",
            "--gin.optim.OptimizerConfig.learning_rate=1e-3"]  # fmt: skip
    assert main([*grpo, f"--gin.MODEL_DIR='{tmp_path / 'run'}'", "--gin.TRAIN_STEPS=2"]) == 0
    capsys.readouterr()
    assert main([*grpo, f"--gin.MODEL_DIR='{tmp_path / 'run'}'", "--gin.TRAIN_STEPS=3"]) == 0
    assert "Resuming from checkpoint step 2" in capsys.readouterr().err
    rows = [r for r in read_metrics(str(tmp_path / "run" / "metrics.jsonl")) if "reward/mean" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in ("loss", "kl", "clip_fraction", "entropy", "response_length", "zero_std_fraction", "time/reward_s"):
        assert np.isfinite(rows[-1][key]), key
    assert all(r["kl"] >= 0 for r in rows) and rows[-1]["kl"] > 0  # k3 is never negative; the policy moved
    assert (tmp_path / "run" / "reward.png").exists()

    # beta 0: no reference at all (a LoRA policy here), so no KL logged.
    assert main([*grpo, "--gin_file=configs/lora/adapters.gin", "--gin.grpo.train_grpo.lora=@lora.LoraConfig()",
                 "--gin.grpo.GRPOConfig.beta=0.0", f"--gin.MODEL_DIR='{tmp_path / 'lora'}'", "--gin.TRAIN_STEPS=1"]) == 0  # fmt: skip
    last = read_metrics(str(tmp_path / "lora" / "metrics.jsonl"))[-1]
    assert "kl" not in last and np.isfinite(last["loss"])
    assert json.loads((tmp_path / "lora" / "lora.json").read_text())["rank"] > 0

    # A model as the judge (the SFT run itself, asked which of two responses is better).
    assert main([*grpo, f"--gin.MODEL_DIR='{tmp_path / 'judged'}'", f"--gin.REWARD='judge:{sft}'", "--gin.TRAIN_STEPS=1"]) == 0
    judged = read_metrics(str(tmp_path / "judged" / "metrics.jsonl"))[-1]
    # Mean win probabilities average 1/2 in every group (P(i beats j) + P(j beats i) = 1); they differ within it.
    assert judged["reward/mean"] == pytest.approx(0.5, abs=1e-6) and judged["reward/std"] > 0 and np.isfinite(judged["loss"])

    capsys.readouterr()
    assert main([*grpo, f"--gin.MODEL_DIR='{tmp_path / 'x'}'", "--gin.REWARD='rubric:tasks.quickstart_rlhf:no_such'", "--gin.TRAIN_STEPS=1"]) != 0
    assert "no_such" in capsys.readouterr().err
