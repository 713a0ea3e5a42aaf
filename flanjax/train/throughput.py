"""Model FLOPs and device peak FLOP/s, for tokens/s and MFU."""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp

from flanjax.models.transformer import TransformerConfig

# Dense bf16 peak FLOP/s per device (vendor figures).
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
}


def train_flops_per_token(config: TransformerConfig, seq_len: int) -> float:
    """6N for the matmuls of forward + backward, plus attention (PaLM, appendix B)."""
    n = config.num_params(include_embeddings=False) + config.vocab_size * config.d_model
    attention = 12 * config.num_layers * config.num_heads * config.head_size * seq_len
    return 6 * n + attention


@functools.cache
def measure_matmul_flops(size: int = 2048, repeats: int = 5, dtype: str = "float32") -> float:
    """FLOP/s of one device on a square matmul: the peak used for MFU where none is known."""
    device = jax.local_devices()[0]
    a = jax.device_put(jnp.ones((size, size), dtype), device)
    mm = jax.jit(lambda x, y: x @ y)
    mm(a, a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        mm(a, a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def peak_flops() -> float:
    """Peak FLOP/s of all devices of the run together.

    CPU "devices" (simulated with --xla_force_host_platform_device_count) share the same
    cores, so the CPU peak is one measured matmul, not a sum over devices.
    """
    kind = jax.devices()[0].device_kind
    for name, flops in PEAK_FLOPS.items():
        if kind.startswith(name):
            return flops * jax.device_count()
    if jax.default_backend() == "cpu":
        return measure_matmul_flops() * jax.process_count()
    return measure_matmul_flops() * jax.device_count()
