"""Throughput benchmarks (`flanjax bench ...`): each returns one JSON-ready dict.

Timings are medians over steps after warm-up (compilation excluded). MFU is measured
against the matmul peak measured in the same process (`throughput.measure_matmul_flops`)
on CPU, and against the vendor peak on TPU/GPU.
"""

from __future__ import annotations

import resource
import statistics
import time

import jax
import numpy as np
import optax
from flax import nnx

from flanjax.decode import SamplingConfig, decoder_features, generate, score, score_rows
from flanjax.models.heads import ScoreModel
from flanjax.models.lora import LoraConfig
from flanjax.models.transformer import Transformer, TransformerConfig, new_model
from flanjax.rlhf.kl import KLConfig
from flanjax.rlhf.ppo import Graphs, PPOConfig, PPOStep, ppo_init
from flanjax.rlhf.reward import sequence_scores
from flanjax.sharding import MeshConfig, Partitioner
from flanjax.train import throughput
from flanjax.train.losses import lm_loss
from flanjax.train.steps import lm_init, make_train_step
from flanjax.train.trainer import jit_step


def synthetic_lm_batch(batch_size: int, seq_len: int, vocab_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    tokens = np.random.default_rng(seed).integers(1, vocab_size, (batch_size, seq_len), dtype=np.int32)
    return decoder_features(tokens, np.ones((batch_size, seq_len), np.float32))


def bench_train(
    config: TransformerConfig,
    *,
    model_name: str = "",
    batch_size: int = 8,
    seq_len: int = 256,
    steps: int = 10,
    warmup: int = 3,
    mesh: MeshConfig = MeshConfig(),
) -> dict:
    """Times the full training step (forward, backward, AdamW update) on synthetic tokens."""
    partitioner = Partitioner.from_config(mesh)
    init = lm_init(config, optax.adamw(1e-4, b1=0.9, b2=0.95, weight_decay=0.1))
    graphdef, abstract = partitioner.abstract_state(init)
    batch = partitioner.shard_batch(synthetic_lm_batch(batch_size, seq_len, config.vocab_size))
    times = []
    with partitioner.activate():
        state = partitioner.create(init, abstract)
        compile_start = time.perf_counter()
        spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding) for k, v in batch.items()}
        step = jit_step(make_train_step(graphdef, lm_loss()), abstract, spec)
        for i in range(warmup + steps):
            start = time.perf_counter()
            state, metrics = step(state, batch)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - start)
            if i == 0:
                compile_s = time.perf_counter() - compile_start
    step_time = statistics.median(times[warmup:])
    flops_per_step = batch_size * seq_len * throughput.train_flops_per_token(config, seq_len)
    peak = throughput.peak_flops()
    return {
        "framework": "flanjax",
        "model": model_name,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "params": config.num_params(),
        "dtype": config.dtype,
        "step_time_s": step_time,
        "tokens_per_s": batch_size * seq_len / step_time,
        "mfu": flops_per_step / step_time / peak,
        "peak_flops": peak,
        "first_step_s": compile_s,
        "final_loss": float(metrics["loss_sum"] / metrics["weight_sum"]),
        **_environment(),
    }


def _describe(config: TransformerConfig, model_name: str, **shape) -> dict:
    return {"framework": "flanjax", "model": model_name, **shape, "params": config.num_params(), "dtype": config.dtype}


def _environment() -> dict:
    return {
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "devices": jax.device_count(),
        "device_kind": jax.devices()[0].device_kind,
        "jax_version": jax.__version__,
    }


def _median_seconds(fn, repeats: int, warmup: int) -> float:
    times = []
    for _ in range(warmup + repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times[warmup:])


def _model_state(config: TransformerConfig, partitioner: Partitioner):
    init = lambda: Transformer(config, rngs=nnx.Rngs(0))  # noqa: E731
    graphdef, abstract = partitioner.abstract_state(init)
    return graphdef, partitioner.create(init, abstract)


def bench_decode(
    config: TransformerConfig,
    *,
    model_name: str = "",
    batch_size: int = 8,
    prompt_len: int = 128,
    new_tokens: int = 128,
    repeats: int = 3,
    warmup: int = 1,
    quantize: str = "none",
    mesh: MeshConfig = MeshConfig(),
) -> dict:
    """Times greedy generation of exactly `new_tokens` tokens (no EOS) after random prompts,
    optionally with int8 weights (`quantize`)."""
    partitioner = Partitioner.from_config(mesh)
    rng = np.random.default_rng(0)
    prompts = rng.integers(1, config.vocab_size, (batch_size, prompt_len), dtype=np.int32)
    with partitioner.activate():
        graphdef, state = _model_state(config, partitioner)
        batch = partitioner.shard_batch({"prompts": prompts, "lengths": np.full(batch_size, prompt_len, np.int32)})

        def run(n: int):
            return generate(graphdef, state, batch["prompts"], batch["lengths"], eos_id=-1,
                            config=SamplingConfig(max_new_tokens=n, quantize=quantize))  # fmt: skip

        seconds = _median_seconds(lambda: run(new_tokens), repeats, warmup)
        prefill = _median_seconds(lambda: run(1), repeats, warmup)  # the prompt pass and one token
    return {
        **_describe(config, model_name, batch_size=batch_size, prompt_len=prompt_len, new_tokens=new_tokens),
        "quantize": quantize,
        "seconds": seconds,
        "new_tokens_per_s": batch_size * new_tokens / seconds,
        "prefill_s": prefill,
        "ms_per_token_step": 1e3 * (seconds - prefill) / max(new_tokens - 1, 1),
        **_environment(),
    }


def bench_rank(
    config: TransformerConfig,
    *,
    model_name: str = "",
    batch_size: int = 32,
    prompt_len: int = 128,
    option_len: int = 8,
    num_options: int = 4,
    repeats: int = 5,
    warmup: int = 1,
    mesh: MeshConfig = MeshConfig(),
) -> dict:
    """Times scoring `batch_size` rank-classification rows (a prompt and one of its
    `num_options` options each) two ways, host work included: every row whole (`score`), and
    each prompt computed once (`score_rows`, what evaluation does). Options per second of each."""
    partitioner = Partitioner.from_config(mesh)
    rng = np.random.default_rng(0)
    prompts = rng.integers(1, config.vocab_size, (max(1, batch_size // num_options), prompt_len))
    options = rng.integers(1, config.vocab_size, (len(prompts) * num_options, option_len))
    weights = np.zeros((len(options), prompt_len + option_len), np.float32)
    weights[:, prompt_len:] = 1  # only the options' tokens are scored
    rows = decoder_features(np.concatenate([np.repeat(prompts, num_options, axis=0), options], axis=1), weights)
    n = len(options)
    with partitioner.activate():
        graphdef, state = _model_state(config, partitioner)
    per_row = _median_seconds(lambda: partitioner.map_batches(lambda b, _: score(graphdef, state, b).log_likelihood, rows, n),
                              repeats, warmup)  # fmt: skip
    once = _median_seconds(lambda: score_rows(graphdef, state, rows, partitioner, n), repeats, warmup)
    return {
        **_describe(config, model_name, batch_size=n, prompt_len=prompt_len, option_len=option_len, num_options=num_options),
        "per_row": {"seconds_per_batch": per_row, "options_per_s": n / per_row},
        "prompt_once": {"seconds_per_batch": once, "options_per_s": n / once},
        "options_per_s": n / once,
        "speedup": per_row / once,
        **_environment(),
    }


def bench_pipeline(
    mixture: str = "flan_all_train",
    *,
    batch_size: int = 8,
    task_feature_lengths: dict[str, int] | None = None,
    batches: int = 50,
    warmup: int = 5,
    vocab_size: int = 8192,
    mock_examples: int = 500,
) -> dict:
    """The training input pipeline of a templated mixture on one CPU core, under TFDS mock
    data: reading, templating, tokenizing and packing into batches. Reports tokens/s
    (non-padding tokens of the packed rows), to compare with `bench_train`'s tokens/s.

    The tokenizer is a byte-level BPE of `vocab_size` (the bench model's) trained on the
    mixture's own rendered text. Mock examples are short random strings: per-example costs
    weigh more than with real data, so this errs low.
    """
    import os
    import tempfile

    import tensorflow as tf
    import tensorflow_datasets as tfds

    from flanjax.data.pipeline import SeqioBatches, get_task_or_mixture, text_examples
    from flanjax.data.vocab import train_tokenizer

    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    tf.config.threading.set_inter_op_parallelism_threads(1)
    tf.config.threading.set_intra_op_parallelism_threads(1)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    lengths = task_feature_lengths or {"inputs": 1024, "targets": 256}  # FLAN's
    with tfds.testing.mock_data(num_examples=mock_examples):
        tasks = get_task_or_mixture(mixture).tasks
        corpus = [(ex["inputs"] + ex["targets"]).decode() for t in tasks for ex in text_examples(t.name, "train", 20)]
        tokenizer_dir = tempfile.mkdtemp(prefix="flanjax-bench-tokenizer-")
        train_tokenizer(corpus, vocab_size).save_pretrained(tokenizer_dir)
        os.environ["FLANJAX_TOKENIZER"] = tokenizer_dir
        stream = SeqioBatches(mixture, lengths, batch_size, seed=0)
        times, tokens = [], []
        for i in range(warmup + batches):
            start = time.perf_counter()
            batch = next(stream)
            times.append(time.perf_counter() - start)
            tokens.append(int((batch["decoder_segment_ids"] != 0).sum()))
        stream.close()
    seconds, counted = sum(times[warmup:]), sum(tokens[warmup:])
    return {
        "framework": "flanjax",
        "benchmark": "pipeline",
        "mixture": mixture,
        "tasks": len(tasks),
        "batch_size": batch_size,
        "task_feature_lengths": lengths,
        "row_len": sum(lengths.values()),
        "batches": batches,
        "tokens_per_s": counted / seconds,
        "rows_per_s": batch_size * batches / seconds,
        "fill": counted / (batch_size * batches * sum(lengths.values())),
        "cpu_cores": 1,
        "vocab_size": vocab_size,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def bench_ppo(
    config: TransformerConfig,
    *,
    model_name: str = "",
    batch_size: int = 32,
    prompt_len: int = 64,
    new_tokens: int = 64,
    iterations: int = 2,
    lora: LoraConfig | None = None,
    value_on_policy_trunk: bool = False,
    mesh: MeshConfig = MeshConfig(),
) -> dict:
    """Times PPO iterations (after one that compiles) with policy, reference, value and reward
    models all of `config`'s size, sampling exactly `new_tokens` per prompt, split into rollout,
    scoring and training; then greedy decoding of the same shape, for the rollout's overhead.
    With `lora`, the policy trains adapters and the reference is itself with them off; with
    `value_on_policy_trunk`, the value function is a head on the policy (three models).
    `held_mib`: the arrays PPO keeps on the devices (states, reference, reward model)."""
    partitioner = Partitioner.from_config(mesh)
    tx = optax.adamw(1e-6)
    init = ppo_init(config, None if value_on_policy_trunk else config, tx, tx, lora=lora)
    state_def, abstract = partitioner.abstract_state(init)
    rng = np.random.default_rng(0)
    prompts = rng.integers(1, config.vocab_size, (batch_size, prompt_len), dtype=np.int32)
    with partitioner.activate():
        plain_def, reference = (None, None) if lora else _model_state(config, partitioner)
        reward_def, reward_abstract = partitioner.abstract_state(lambda: ScoreModel(config, rngs=nnx.Rngs(1)))
        reward = partitioner.create(lambda: ScoreModel(config, rngs=nnx.Rngs(1)), reward_abstract)
        state = partitioner.create(init, abstract)
        held = sum(x.nbytes for x in jax.tree.leaves((state, reference, reward))) / 2**20
        policy_def = nnx.split(nnx.eval_shape(lambda: new_model(config, lora)))[0]
        step = PPOStep(
            Graphs(state_def, policy_def, plain_def), abstract, partitioner, reference=reference,
            reward_fn=lambda params, tokens, lengths: sequence_scores(nnx.merge(reward_def, params), tokens, lengths),
            reward_params=reward, sampling=SamplingConfig(max_new_tokens=new_tokens, temperature=1.0),
            eos_id=-1, config=PPOConfig(value_on_policy_trunk=value_on_policy_trunk), kl=KLConfig(),
        )  # fmt: skip
        batch = partitioner.shard_batch({"prompts": prompts, "prompt_lengths": np.full(batch_size, prompt_len, np.int32)})
        runs = []
        for _ in range(1 + iterations):
            start = time.perf_counter()
            state, metrics = step(state, batch)
            runs.append({"iteration_s": time.perf_counter() - start, **jax.device_get(metrics)})
    split = {k: statistics.median(float(r[k]) for r in runs[1:]) for k in ("iteration_s", "time/rollout_s", "time/scoring_s", "time/training_s")}
    decode = bench_decode(config, model_name=model_name, batch_size=batch_size, prompt_len=prompt_len, new_tokens=new_tokens, mesh=mesh)
    rollout_tokens_per_s = batch_size * new_tokens / split["time/rollout_s"]
    return {
        **_describe(config, model_name, batch_size=batch_size, prompt_len=prompt_len, new_tokens=new_tokens),
        "models": 3 if value_on_policy_trunk else 4,
        "lora_rank": lora and lora.rank,
        "value_on_policy_trunk": value_on_policy_trunk,
        "held_mib": held,
        "iteration_s": split["iteration_s"],
        "rollout_s": split["time/rollout_s"],
        "scoring_s": split["time/scoring_s"],
        "training_s": split["time/training_s"],
        "first_iteration_s": runs[0]["iteration_s"],
        "rollout_tokens_per_s": rollout_tokens_per_s,
        "decode_new_tokens_per_s": decode["new_tokens_per_s"],
        "rollout_vs_decode": rollout_tokens_per_s / decode["new_tokens_per_s"],
        **_environment(),
    }


def bench_plan(num_goals: int = 64, num_simulations: int = 2000, seed: int = 0) -> dict:
    """MCTS planning of `num_goals` household goals (the library's activities in generated
    homes, in order) in one batch: simulations per second and goals solved (`mcts.measure`)."""
    from flanjax.worlds import activities as _registered  # noqa: F401  the household world and its activities
    from flanjax.worlds.mcts import SearchConfig, measure
    from flanjax.worlds.planning import goals_in_homes, world_problem
    from flanjax.worlds.world import activities, get_world

    world = get_world("household")
    goals, homes = [], 0
    while len(goals) < num_goals:
        found, _ = goals_in_homes(world, [seed + homes], activities("household"))
        goals += found
        homes += 1
    goals = goals[:num_goals]
    stack = lambda trees: jax.tree.map(lambda *x: np.stack([np.asarray(v) for v in x]), *trees)  # noqa: E731
    result = measure(world_problem(world), stack([g.params for g in goals]), stack([g.state for g in goals]),
                     jax.random.key(seed), SearchConfig(num_simulations=num_simulations))  # fmt: skip
    return {"benchmark": "plan", "homes": homes, **result}
