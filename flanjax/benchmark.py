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

from flanjax.models.transformer import TransformerConfig
from flanjax.sharding import MeshConfig, Partitioner
from flanjax.train import throughput
from flanjax.train.steps import compile_lm_train_step, lm_init


def synthetic_lm_batch(batch_size: int, seq_len: int, vocab_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, vocab_size, (batch_size, seq_len + 1), dtype=np.int32)
    return {
        "decoder_input_tokens": tokens[:, :-1],
        "decoder_target_tokens": tokens[:, 1:],
        "decoder_loss_weights": np.ones((batch_size, seq_len), np.int32),
        "decoder_segment_ids": np.ones((batch_size, seq_len), np.int32),
        "decoder_positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch_size, seq_len)).copy(),
    }


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
    step = compile_lm_train_step(partitioner, graphdef, abstract)
    batch = partitioner.shard_batch(synthetic_lm_batch(batch_size, seq_len, config.vocab_size))
    times = []
    with partitioner.activate():
        state = partitioner.create(init, abstract)
        compile_start = time.perf_counter()
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
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "devices": jax.device_count(),
        "device_kind": jax.devices()[0].device_kind,
        "jax_version": jax.__version__,
    }
