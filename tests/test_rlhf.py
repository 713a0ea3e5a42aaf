"""Reward model and PPO: the K-wise loss against enumerated pairs, PPO on a bandit with a known
optimum, a sharded PPO step against a single-device one, and the bad-input errors."""

import functools
import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from flanjax.data.preferences import PreferenceDataError, comparison, parse
from flanjax.decode import SamplingConfig
from flanjax.models.heads import ScoreModel, ValueHead
from flanjax.models.transformer import Transformer, TransformerConfig, new_model
from flanjax.rlhf.kl import KLConfig
from flanjax.rlhf.ppo import (
    Graphs,
    LMTerm,
    PPOConfig,
    PPOConfigError,
    PPOStep,
    RLHFBatches,
    concat_responses,
    ppo_init,
    ppo_loss,
    response_logprobs,
    response_values,
    split_batch,
)
from flanjax.rlhf.reward import RewardModelError, pairwise_loss, sequence_scores
from flanjax.sharding import MeshConfig, Partitioner, make_mesh

TINY = TransformerConfig(vocab_size=16, d_model=32, num_layers=1, num_heads=2, num_kv_heads=2, d_ff=64, max_len=16)


# --- reward model -----------------------------------------------------------------------------


def test_kwise_loss_is_the_mean_over_enumerated_pairs():
    rng = np.random.default_rng(0)
    b, k = 6, 5
    rewards = rng.normal(size=(b, k)).astype(np.float32)
    ranks = np.stack([rng.permutation(k) for _ in range(b)]).astype(np.int32)
    ranks[1, 2] = ranks[1, 3]  # a tie: no pair
    valid = np.ones((b, k), bool)
    valid[2, 3:] = False  # K = 3 for this prompt
    valid[4, 1:] = False  # one response: no pair at all
    margin = rng.uniform(0, 1, size=b).astype(np.float32)

    loss_sum, prompts, correct, pairs = 0.0, 0, 0, 0
    for row in range(b):
        losses = []
        for i, j in itertools.permutations(range(k), 2):
            if valid[row, i] and valid[row, j] and ranks[row, i] < ranks[row, j]:
                gap = rewards[row, i] - rewards[row, j]
                losses.append(np.log1p(np.exp(-(gap - margin[row]))))
                correct += gap > 0
        if losses:
            loss_sum += np.mean(losses)
            prompts += 1
            pairs += len(losses)
    got = jax.device_get(pairwise_loss(jnp.asarray(rewards), jnp.asarray(ranks), jnp.asarray(valid), jnp.asarray(margin)))
    np.testing.assert_allclose(got["loss_sum"], loss_sum, rtol=1e-5)
    assert (got["weight_sum"], got["pairs_right_sum"], got["pair_sum"]) == (prompts, correct, pairs)


def test_kwise_gradient_is_k_forward_passes_of_one_prompt():
    """All C(K,2) pairs come from one score per response: the gradient of the K-wise loss for
    one prompt is the mean of the pairwise gradients."""
    rewards = jnp.asarray([[0.3, -0.2, 1.0, 0.1]])
    ranks = jnp.asarray([[0, 1, 2, 3]])
    valid, margin = jnp.ones((1, 4), bool), jnp.zeros(1)
    grad = jax.grad(lambda r: pairwise_loss(r, ranks, valid, margin)["loss_sum"])(rewards)
    expected = np.zeros(4)
    for i, j in itertools.combinations(range(4), 2):
        s = 1 / (1 + np.exp(rewards[0, i] - rewards[0, j]))  # d/dgap of -log sigmoid(gap) is -sigmoid(-gap)
        expected[i] -= s / 6
        expected[j] += s / 6
    np.testing.assert_allclose(grad[0], expected, rtol=1e-5)


def test_sequence_scores_read_the_last_token_of_each_row():
    model = ScoreModel(TINY, rngs=nnx.Rngs(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(1, 16, (2, 3, 8)), jnp.int32)
    lengths = jnp.asarray([[8, 5, 2], [3, 0, 7]])
    got = sequence_scores(model, tokens, lengths)
    for i, j in itertools.product(range(2), range(3)):
        n = max(int(lengths[i, j]), 1)
        full = model(tokens[i, j, None, :n], jnp.arange(n)[None], jnp.ones((1, n), jnp.int32))
        np.testing.assert_allclose(got[i, j], full[0, -1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "record, message",
    [
        ({"prompt": "p", "responses": ["only one"]}, "at least 2 responses"),
        ({"prompt": "p", "responses": ["a", "b", "c"], "ranks": [0, 1, 1]}, "tied ranks"),
        ({"prompt": "p", "chosen": "a"}, "both"),
        ({"prompt": "p", "responses": ["a", "b"], "ranks": [0]}, "one rank per response"),
    ],
)
def test_bad_comparisons_are_refused(record, message):
    with pytest.raises(PreferenceDataError, match=message):
        parse(record, allow_ties=False, where="prefs.jsonl:3")


def test_ranks_order_the_responses_and_keep_ties():
    c = comparison("p", ["worst", "best", "middle", "also middle"], [7, 5, 6, 6])
    assert c.responses == ("best", "middle", "also middle", "worst")
    assert c.ranks == (0, 1, 1, 2)
    assert c.num_pairs == 5  # C(4,2) = 6 less the tie


def test_reward_model_without_normalisation_or_with_another_tokenizer(tmp_path):
    from flanjax.data.vocab import HFVocabulary, train_tokenizer
    from flanjax.rundir.files import write_model_config
    from flanjax.rlhf.reward import REWARD_FILE, load_reward_model

    run = tmp_path / "rm"
    (run / "checkpoints" / "3").mkdir(parents=True)  # resolve_checkpoint needs a step
    write_model_config(str(run), TINY)
    partitioner = Partitioner(make_mesh(MeshConfig(data=1), devices=jax.devices()[:1]))
    with pytest.raises(RewardModelError, match="no normalisation stats"):
        load_reward_model(str(run / "checkpoints" / "3"), partitioner)
    (run / REWARD_FILE).write_text(json.dumps({"shift": 0.1, "scale": 2.0, "tokenizer": "0123", "prompt_len": 8, "response_len": 8}))
    other = tmp_path / "tok"
    train_tokenizer(["some other text entirely"] * 10, vocab_size=300).save_pretrained(str(other))
    with pytest.raises(RewardModelError, match="another tokenizer"):
        load_reward_model(str(run / "checkpoints" / "3"), partitioner, HFVocabulary(str(other)))


# --- PPO --------------------------------------------------------------------------------------


def test_concat_responses_places_each_response_after_its_prompt():
    prompts = jnp.asarray([[5, 6, 7, 0], [8, 0, 0, 0]])
    responses = jnp.asarray([[1, 2, 0], [3, 4, 9]])
    got = concat_responses(prompts, jnp.asarray([3, 1]), responses)
    np.testing.assert_array_equal(got, [[5, 6, 7, 1, 2, 0, 0], [8, 3, 4, 9, 0, 0, 0]])


BEST = 11  # the bandit's best arm


def bandit_reward(table, tokens, lengths):
    last = jnp.take_along_axis(tokens, (lengths - 1)[:, None], axis=1)[:, 0]
    return table[last]


def ppo_setup(partitioner, *, config=PPOConfig(), kl=KLConfig(init_beta=0.0), tx=optax.adam(3e-3), seed=0, lora=None, lm_terms=()):
    value = None if config.value_on_policy_trunk else TINY
    init = ppo_init(TINY, value, tx, tx, init_beta=kl.init_beta, seed=seed, lora=lora, ema=config.ema_decay is not None)
    state_def, abstract = partitioner.abstract_state(init)
    plain_def, plain = partitioner.abstract_state(lambda: Transformer(TINY, rngs=nnx.Rngs(seed)))
    reference = partitioner.create(lambda: Transformer(TINY, rngs=nnx.Rngs(seed)), plain)
    state = partitioner.create(init, abstract, reference)
    policy_def = nnx.split(nnx.eval_shape(lambda: new_model(TINY, lora)))[0]
    table = jnp.zeros(TINY.vocab_size).at[BEST].set(1.0).at[3].set(0.5)
    step = PPOStep(
        Graphs(state_def, policy_def, plain_def), abstract, partitioner, reference=reference, reward_fn=bandit_reward,
        reward_params=table, sampling=SamplingConfig(max_new_tokens=1, temperature=1.0), eos_id=1,
        config=config, kl=kl, seed=seed, lm_terms=lm_terms,
    )  # fmt: skip
    return state, step, policy_def


def bandit_batch(partitioner, b=32):
    prompts = np.zeros((b, 4), np.int32)
    prompts[:, :2] = [0, 5]
    return partitioner.shard_batch({"prompts": prompts, "prompt_lengths": np.full(b, 2, np.int32)})


@pytest.mark.parametrize("value_on_policy_trunk", [False, True], ids=["value_model", "value_head_on_policy"])
def test_ppo_solves_a_bandit(value_on_policy_trunk):
    """One-token responses, reward 1 for token 11 (0.5 for token 3, 0 otherwise): the policy
    must come to put most of its mass on token 11, from a near-uniform start."""
    partitioner = Partitioner.from_config(MeshConfig())
    config = PPOConfig(epochs=2, num_minibatches=2, no_stop_penalty=0.0, whiten_advantages=True,
                       value_on_policy_trunk=value_on_policy_trunk)  # fmt: skip
    with partitioner.activate():
        state, step, policy_def = ppo_setup(partitioner, config=config)
        batch = bandit_batch(partitioner)

        def best_probability(state):
            rows = partitioner.shard_batch({"x": np.tile([[0, 5]], (8, 1)), "p": np.tile([[0, 1]], (8, 1)), "s": np.ones((8, 2), np.int32)})
            logits = nnx.merge(policy_def, state["model"])(rows["x"], rows["p"], rows["s"])[0]
            return float(jax.nn.softmax(logits[0, -1])[BEST])

        start = best_probability(state)
        rewards = []
        for _ in range(40):
            state, metrics = step(state, batch)
            rewards.append(float(metrics["reward/score_mean"]))
    assert start < 0.2
    assert best_probability(state) > 0.9
    assert np.mean(rewards[-5:]) > 0.85 > np.mean(rewards[:5])
    assert float(state["controller"]["iteration"][...]) == 40


def test_a_value_head_on_the_policy_reads_its_hidden_states_and_trains_its_trunk():
    partitioner = Partitioner(make_mesh(MeshConfig(data=1), devices=jax.devices()[:1]))
    with partitioner.activate():
        state, step, policy_def = ppo_setup(partitioner, config=PPOConfig(value_on_policy_trunk=True), tx=optax.sgd(0.5))
        assert set(nnx.to_pure_dict(state)["value"]) == {"head"}  # no second transformer
        head = {"kernel": jax.random.normal(jax.random.key(0), (TINY.d_model, 1)), "bias": jnp.ones((1,))}
        value = ValueHead(TINY, rngs=nnx.Rngs(0))
        nnx.update(value, nnx.State({"head": head}))
        policy = nnx.merge(policy_def, state["model"])
        tokens = jnp.asarray([[0, 5, 11, 7]])
        hidden, _ = policy(tokens, return_hidden=True)
        one, two = jnp.asarray([1]), jnp.asarray([2])
        expected = hidden[:, 0:2] @ head["kernel"][:, 0] + 1.0  # the states before response tokens 1 and 2
        np.testing.assert_allclose(response_values(value, response_logprobs(policy, tokens, one, two, 2)[2], tokens, one, two, 2),
                                   expected, rtol=1e-5, atol=1e-6)  # fmt: skip
        # The value loss alone moves the policy's trunk once the head is non-zero.
        grads = nnx.grad(lambda p: jnp.sum(response_values(value, response_logprobs(p, tokens, one, two, 2)[2], tokens, one, two, 2)))(policy)
        assert float(optax.tree.norm(nnx.state(grads, nnx.Param)["layers"])) > 0


def test_sharded_ppo_step_equals_single_device():
    """(SGD: Adam's first steps turn float rounding in near-zero gradients into full-size updates.)"""
    results = []
    for partitioner in (Partitioner(make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])),
                        Partitioner.from_config(MeshConfig(data=2, fsdp=2, tensor=2))):  # fmt: skip
        with partitioner.activate():
            kl = KLConfig(init_beta=0.1, adaptive=True, target=0.01)
            state, step, _ = ppo_setup(partitioner, config=PPOConfig(num_minibatches=2), kl=kl, tx=optax.sgd(0.5))
            state, metrics = step(state, bandit_batch(partitioner, 16))
            results.append((jax.device_get(nnx.to_pure_dict(state)), jax.device_get(metrics)))
    (single, m1), (sharded, m8) = results
    for key in ("reward/score_mean", "kl", "policy_loss", "value_loss", "entropy", "approx_kl", "beta"):
        np.testing.assert_allclose(m1[key], m8[key], rtol=2e-4, atol=1e-6, err_msg=key)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6), single, sharded)
    assert m1["beta"] != 0.1  # the adaptive controller moved


def test_lora_policy_trains_its_adapters_only_and_ema_follows():
    from flanjax.models.lora import LoraConfig

    partitioner = Partitioner.from_config(MeshConfig())
    config = PPOConfig(num_minibatches=2, no_stop_penalty=0.0, ema_decay=0.5)
    with partitioner.activate():
        state, step, _ = ppo_setup(partitioner, config=config, lora=LoraConfig(rank=2, alpha=4.0))
        before = jax.device_get(nnx.to_pure_dict(state))
        state, _ = step(state, bandit_batch(partitioner, 16))
        after = jax.device_get(nnx.to_pure_dict(state))
    policy_before, policy_after = before["model"], after["model"]
    changed = jax.tree_util.tree_flatten_with_path(jax.tree.map(lambda a, b: bool(np.any(a != b)), policy_before, policy_after))[0]
    moved = {"/".join(str(getattr(k, "key", k)) for k in path) for path, c in changed if c}
    assert moved and all("lora_" in name for name in moved), moved
    # The EMA moved halfway towards the new adapters.
    for name in moved:
        keys = name.split("/")
        get = lambda tree: functools.reduce(lambda t, k: t[int(k) if k.isdigit() and k not in t else k], keys, tree)  # noqa: E731
        np.testing.assert_allclose(get(after["ema"]), 0.5 * get(before["ema"]) + 0.5 * get(policy_after), rtol=1e-5, atol=1e-7)


def test_a_lora_policys_reference_is_itself_with_adapters_off():
    """Scoring against the policy's own base (no reference copy) equals scoring against the
    SFT model it started from, once the adapters have moved."""
    from flanjax.models.lora import LoraConfig

    partitioner = Partitioner.from_config(MeshConfig())
    with partitioner.activate():
        state, step, _ = ppo_setup(partitioner, config=PPOConfig(num_minibatches=2, no_stop_penalty=0.0), lora=LoraConfig(rank=2, alpha=4.0),
                                   kl=KLConfig(init_beta=0.1))  # fmt: skip
        batch = bandit_batch(partitioner, 16)
        state, _ = step(state, batch)  # the adapters move: policy and reference now differ
        generation = step._generate(state, batch, jax.random.key(1))
        with_copy = step.scoring(state, step.reference, step.reward_params, batch, generation)
        without = step.scoring(state, None, step.reward_params, batch, generation)
    assert float(with_copy[1]["kl"]) != 0.0
    jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7), jax.device_get(with_copy), jax.device_get(without))


# --- PPO's auxiliary LM terms (PPO-ptx, BatGPT's SFT term) -------------------------------------


def lm_features(seed: int, b: int = 4, n: int = 8, prompt: int = 3) -> dict[str, np.ndarray]:
    """Decoder features of `b` unpacked rows, loss on the targets only (after `prompt` tokens)."""
    targets = np.random.default_rng(seed).integers(2, TINY.vocab_size, (b, n)).astype(np.int32)
    return {
        "decoder_target_tokens": targets,
        "decoder_input_tokens": np.pad(targets[:, :-1], ((0, 0), (1, 0))),
        "decoder_loss_weights": (np.arange(n)[None, :].repeat(b, 0) >= prompt).astype(np.float32),
        "decoder_positions": np.arange(n, dtype=np.int32)[None, :].repeat(b, 0),
        "decoder_segment_ids": np.ones((b, n), np.int32),
    }


def test_lm_terms_add_coef_times_their_lm_gradient_to_ppos():
    """The gradient of PPO's loss with two LM terms is PPO's own gradient plus each coef times
    the gradient of that term's LM loss alone; the value model's gradient is PPO's."""
    from flanjax.train.losses import lm_loss

    policy, value = Transformer(TINY, rngs=nnx.Rngs(0)), ScoreModel(TINY, rngs=nnx.Rngs(1))
    rng = np.random.default_rng(0)
    b, n = 4, 3
    prompt_lengths, lengths = jnp.asarray([2, 3, 1, 4]), jnp.asarray([3, 1, 2, 3])
    tokens = concat_responses(jnp.asarray(rng.integers(2, 16, (b, 4))), prompt_lengths, jnp.asarray(rng.integers(2, 16, (b, n))))
    mask = (jnp.arange(n)[None, :] < lengths[:, None]).astype(jnp.float32)
    normal = lambda: jnp.asarray(rng.normal(size=(b, n)), jnp.float32)  # noqa: E731
    rollout = dict(tokens=tokens, prompt_lengths=prompt_lengths, lengths=lengths, mask=mask, logp=-2.8 + 0.1 * normal(),
                   values=normal(), advantages=normal(), returns=normal())  # fmt: skip
    terms = {"ptx": lm_features(1), "sft": lm_features(2, b=2, prompt=5)}
    coefs = {"ptx": 0.7, "sft": 2.5}
    config = PPOConfig(entropy_coef=0.01)
    lm = lm_loss()

    @nnx.jit
    def gradients(policy, value):
        both, metrics = nnx.grad(lambda p, v: ppo_loss(config, n, coefs)(p, v, (rollout, terms)), argnums=(0, 1), has_aux=True)(policy, value)
        alone = nnx.grad(lambda p, v: ppo_loss(config, n)(p, v, (rollout, {}))[0], argnums=(0, 1))(policy, value)
        each = {name: nnx.value_and_grad(lambda p: lm(p, terms[name], None)[0])(policy) for name in coefs}  # noqa: B023
        return both, alone, each, metrics

    pure = jax.tree.map(lambda x: nnx.to_pure_dict(x) if isinstance(x, nnx.State) else x, gradients(policy, value),
                        is_leaf=lambda x: isinstance(x, nnx.State))  # fmt: skip
    (both_p, both_v), (alone_p, alone_v), each, metrics = jax.device_get(pure)
    expected = jax.tree.map(lambda a, ptx, sft: a + coefs["ptx"] * ptx + coefs["sft"] * sft, alone_p, each["ptx"][1], each["sft"][1])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), both_p, expected)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), both_v, alone_v)
    for name, (loss, grads) in each.items():
        assert float(optax.tree.norm(grads)) > 0  # the term does move the policy
        np.testing.assert_allclose(metrics[f"{name}_loss"], loss, rtol=1e-6)


def test_a_ppo_iteration_with_two_lm_terms_logs_each():
    partitioner = Partitioner(make_mesh(MeshConfig(data=1), devices=jax.devices()[:1]))
    terms = (LMTerm("ptx", "unused", {}, batch_size=4, coef=0.5), LMTerm("sft", "unused", {}, batch_size=2, coef=1.0))
    with partitioner.activate():
        state, step, _ = ppo_setup(partitioner, config=PPOConfig(epochs=1, num_minibatches=2), lm_terms=terms)
        features = {f"ptx/{k}": v for k, v in lm_features(1).items()} | {f"sft/{k}": v for k, v in lm_features(2, b=2).items()}
        batch = {**bandit_batch(partitioner, 8), **partitioner.shard_batch(features)}
        state, metrics = step(state, batch)
        assert float(metrics["ptx_loss"]) > 0 and float(metrics["sft_loss"]) > 0
        assert np.isfinite(float(metrics["policy_loss"]))
        with pytest.raises(PPOConfigError, match=r"LM batches \['ptx'\] but the step was built for LM terms \['ptx', 'sft'\]"):
            step(state, {k: v for k, v in batch.items() if not k.startswith("sft/")})


class ListBatches:
    """Endless batches of fixed rows (plus the number of batches read), for `RLHFBatches`."""

    def __init__(self, rows: dict[str, np.ndarray]):
        self.rows, self.position = rows, 0

    def __next__(self):
        self.position += 1
        return {k: v + self.position for k, v in self.rows.items()}

    def element_spec(self):
        return {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in self.rows.items()}

    def get_state(self):
        return {"position": self.position}

    def set_state(self, state):
        self.position = state.get("position", 0)

    def close(self):
        pass


def test_rlhf_batches_prefix_each_terms_keys_and_keep_its_state_by_name():
    prompts = ListBatches({"prompts": np.zeros((2, 3), np.int32), "prompt_lengths": np.ones(2, np.int32)})
    batches = RLHFBatches(prompts, {"ptx": ListBatches({"decoder_target_tokens": np.zeros((4, 5), np.int32)}),
                                    "sft": ListBatches({"decoder_target_tokens": np.zeros((2, 6), np.int32)})})  # fmt: skip
    assert set(batches.element_spec()) == {"prompts", "prompt_lengths", "ptx/decoder_target_tokens", "sft/decoder_target_tokens"}
    prompt_features, lm_batches = split_batch(next(batches))
    assert set(prompt_features) == {"prompts", "prompt_lengths"}
    assert {k: v["decoder_target_tokens"].shape for k, v in lm_batches.items()} == {"ptx": (4, 5), "sft": (2, 6)}
    next(batches)
    # A PPO-ptx run's iterator state ({"prompts", "ptx"}) reads back into the term "ptx".
    assert batches.get_state() == {"prompts": {"position": 2}, "ptx": {"position": 2}, "sft": {"position": 2}}
    batches.set_state({"prompts": {"position": 5}, "ptx": {"position": 7}})
    assert (prompts.position, batches.terms["ptx"].position, batches.terms["sft"].position) == (5, 7, 0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"lm_terms": [LMTerm("sft", "quickstart", {}, 8), LMTerm("sft", "quickstart", {}, 8)]}, r"named \['sft'\] more than once"),
        ({"ptx": "PTX", "lm_terms": [LMTerm("ptx", "quickstart", {}, 8)]}, r"\['ptx'\] more than once \(ppo.train_ppo.ptx is"),
        ({"lm_terms": [LMTerm("sft", "quickstart", {}, 10)]}, "batch_size 10 of LM term 'sft' does not split into 4 minibatches"),
        ({"ptx": "PTX"}, "batch_size 8 of LM term 'ptx': minibatches of 2 rows do not split over the 8 data-parallel"),
        ({"lm_terms": [LMTerm("my-sft", "quickstart", {}, 32)]}, "LM term name 'my-sft': use a Python identifier"),
        ({"lm_terms": [LMTerm("prompts", "quickstart", {}, 32)]}, "other than 'prompts'"),
    ],
)
def test_bad_lm_terms_are_refused_before_anything_loads(tmp_path, kwargs, message):
    from flanjax.rlhf.ppo import PtxConfig, train_ppo
    from flanjax.train.loop import LoopConfig

    if kwargs.get("ptx") == "PTX":
        kwargs = {**kwargs, "ptx": PtxConfig("quickstart", {}, batch_size=8)}
    with pytest.raises(PPOConfigError, match=message):
        train_ppo(model_dir=str(tmp_path), policy_checkpoint="sft", reward_checkpoint="rm", mixture_or_task_name="quickstart",
                  batch_size=32, loop=LoopConfig(num_steps=1), **kwargs)  # fmt: skip


# --- the command line, end to end ---------------------------------------------------------------


@pytest.mark.slow
def test_label_reward_ppo_sample_from_the_command_line(tmp_path, capsys):
    """A tiny SFT run -> rubric labels -> reward model -> PPO (with PPO-ptx and EMA; resumed; LoRA
    with an SFT term too) -> best-of-n, through `flanjax` and the demo's run configs."""
    import gin

    from flanjax import cli
    from flanjax.rundir.metrics import read_metrics

    def main(args):
        gin.clear_config(clear_constants=True)
        return cli.main(args)

    sft, prefs, rm, policy = (str(tmp_path / d) for d in ("sft", "prefs", "rm", "ppo"))
    assert main(["train", "--gin_file=tests/tiny_run.gin", f"--gin.MODEL_DIR='{sft}'", "--gin.TRAIN_STEPS=20"]) == 0
    label = ["label", "--policy", sft, "--task", "quickstart", "--labeler", "rubric:tasks.quickstart_rlhf:rubric",
             "--max_new_tokens", "8", "--prompt_len", "32"]  # fmt: skip
    assert main([*label, "--num_prompts", "64", "--out", f"{prefs}/train.jsonl"]) == 0
    assert main([*label, "--num_prompts", "32", "--split", "validation", "--out", f"{prefs}/validation.jsonl"]) == 0
    assert sum(1 for _ in open(f"{prefs}/train.jsonl")) > 4

    assert main(["train", "--gin_file=configs/runs/quickstart_rlhf_reward.gin", f"--gin.MODEL_DIR='{rm}'",
                 f"--gin.INIT_CHECKPOINT='{sft}'", f"--gin.PREFERENCES='{prefs}'", "--gin.TRAIN_STEPS=3",
                 "--gin.BATCH_SIZE=8", "--gin.reward.train_reward.response_len=8",
                 "--gin.reward.NormalisationConfig.num_prompts=16", "--gin.reward.NormalisationConfig.batch_size=8"]) == 0  # fmt: skip
    stats = json.load(open(f"{rm}/reward.json"))
    assert stats["scale"] > 0 and stats["num_samples"] > 0
    assert any("validation/pair_accuracy" in r for r in read_metrics(f"{rm}/metrics.jsonl"))

    ppo = ["train", "--gin_file=configs/runs/quickstart_rlhf_ppo.gin", f"--gin.MODEL_DIR='{policy}'",
           f"--gin.POLICY_CHECKPOINT='{sft}'", f"--gin.REWARD_CHECKPOINT='{rm}'", "--gin.BATCH_SIZE=16",
           "--gin.decode.SamplingConfig.max_new_tokens=8", "--gin.ppo.PPOConfig.ptx_coef=0.5",
           "--gin.ppo.PPOConfig.ema_decay=0.9", "--gin.ppo.train_ppo.ptx=@ppo.PtxConfig()",
           "--gin.ppo.PtxConfig.mixture_or_task_name='quickstart'", "--gin.ppo.PtxConfig.batch_size=16",
           "--gin.ppo.PtxConfig.task_feature_lengths={'inputs': 48, 'targets': 16}",
           "--gin.checkpoint.CheckpointConfig.every_steps=2"]  # fmt: skip
    assert main([*ppo, "--gin.TRAIN_STEPS=2"]) == 0
    assert main([*ppo, "--gin.TRAIN_STEPS=3"]) == 0  # resumes at iteration 2
    rows = read_metrics(f"{policy}/metrics.jsonl")
    assert [r["step"] for r in rows if "kl" in r] == [2, 3]
    for key in ("reward/score_mean", "kl", "beta", "entropy", "clip_fraction", "approx_kl", "value_loss",
                "explained_variance", "response_length", "ptx_loss", "time/rollout_s", "time/scoring_s", "time/training_s"):  # fmt: skip
        assert np.isfinite(rows[-1][key]), key
    assert rows[-1]["ptx_loss"] > 0
    assert (tmp_path / "ppo" / "kl.png").exists() and (tmp_path / "ppo" / "reward.png").exists()
    # A LoRA policy (configs/runs/ppo_lora.gin): adapters trained, the reference its own base;
    # an SFT term (BatGPT) beside PPO-ptx's first spelling.
    sft_term = ["--gin.ppo.train_ppo.lm_terms=[@sft/ppo.LMTerm()]", "--gin.sft/ppo.LMTerm.name='sft'",
                "--gin.sft/ppo.LMTerm.mixture_or_task_name='quickstart'", "--gin.sft/ppo.LMTerm.batch_size=16",
                "--gin.sft/ppo.LMTerm.task_feature_lengths={'inputs': 48, 'targets': 16}", "--gin.sft/ppo.LMTerm.coef=0.5"]  # fmt: skip
    assert main([*ppo[:2], "--gin_file=configs/runs/ppo_lora.gin", f"--gin.MODEL_DIR='{tmp_path / 'ppo_lora'}'", *ppo[3:],
                 *sft_term, "--gin.TRAIN_STEPS=1"]) == 0  # fmt: skip
    assert json.load(open(tmp_path / "ppo_lora" / "lora.json"))["rank"] == 8
    last = read_metrics(str(tmp_path / "ppo_lora" / "metrics.jsonl"))[-1]
    assert np.isfinite(last["kl"]) and last["ptx_loss"] > 0 and last["sft_loss"] > 0

    capsys.readouterr()
    assert main(["sample", "--policy", policy, "--reward", rm, "--best_of", "3", "--task", "quickstart_max",
                 "--num_prompts", "2", "--max_new_tokens", "8", "--prompt_len", "32"]) == 0  # fmt: skip
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(out) == 2
    for row in out:
        assert len(row["candidates"]) == 3 and row["reward"] == max(row["rewards"])
        assert row["response"] == row["candidates"][int(np.argmax(row["rewards"]))]


def test_a_ptx_coefficient_without_pretraining_data_is_refused(tmp_path):
    from flanjax.rlhf.ppo import PPOConfigError, train_ppo
    from flanjax.train.loop import LoopConfig

    with pytest.raises(PPOConfigError, match="ptx_coef=1.0 but no pre-training data"):
        train_ppo(model_dir=str(tmp_path), policy_checkpoint="sft", reward_checkpoint="rm", mixture_or_task_name="quickstart",
                  batch_size=8, loop=LoopConfig(num_steps=1), ppo=PPOConfig(ptx_coef=1.0))  # fmt: skip
