"""int8 weights for decoding: every projection's kernel rounded to int8 with one float32
scale per output channel (absmax / 127 over the kernel's input dims).

Two modes, chosen by `SamplingConfig.quantize` (`flanjax sample --quantize`):

    int8          weight-only: x @ dequantised kernel; activations stay in the compute dtype.
    int8_dynamic  weights and activations: each row of x is rounded to int8 with its own
                  absmax scale, the matmul runs in int8 with int32 sums (fast on CPUs with
                  int8 dot instructions), and both scales are applied to the result.

`quantize` swaps the projections of a model in place (inside the decoder's jit, so PPO's
rollouts quantise the current policy each iteration); biases, norms, embeddings and LoRA
adapters stay in floating point. Stacked (scanned) layers get one scale per layer.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from flanjax.models.lora import projection_letters, replace_module

Mode = Literal["none", "int8", "int8_dynamic"]
MODES = ("none", "int8", "int8_dynamic")


def absmax_int8(x: jax.Array, axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """int8 values and the float32 scales (kept dims) with x ~ values * scales, per slice
    over `axes`; an all-zero slice gets scale 1."""
    scale = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=axes, keepdims=True) / 127.0
    scale = jnp.where(scale == 0, 1.0, scale)
    return jnp.clip(jnp.round(x / scale), -127, 127).astype(jnp.int8), scale


class QuantizedProjection(nnx.Module):
    """A Linear or Einsum projection holding an int8 kernel and per-output-channel scales."""

    def __init__(self, base: nnx.Linear | nnx.Einsum, mode: Mode):
        x_letters, kernel_letters, y_letters = projection_letters(base)
        self.spec = f"{x_letters},{kernel_letters}->{y_letters}"
        self.num_in = sum(c in x_letters for c in kernel_letters)
        self.mode = mode
        self.dtype, self.precision = base.dtype, base.precision  # what a LoRA wrapper reads
        kernel = base.kernel[...]
        lead = kernel.ndim - len(kernel_letters)  # a scanned model's leading layers axis
        values, scale = absmax_int8(kernel, tuple(range(lead, lead + self.num_in)))
        self.kernel = nnx.Variable(values)
        self.scale = nnx.Variable(scale.reshape(kernel.shape[:lead] + kernel.shape[lead + self.num_in :]))
        self.bias = base.bias

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = self.dtype or x.dtype
        kernel, scale = self.kernel[...], self.scale[...]
        if self.mode == "int8":
            y = jnp.einsum(self.spec, x.astype(dtype), kernel.astype(dtype)) * scale.astype(dtype)
        else:
            rows, row_scale = absmax_int8(x, tuple(range(x.ndim - self.num_in, x.ndim)))
            sums = jnp.einsum(self.spec, rows, kernel, preferred_element_type=jnp.int32)
            num_out = kernel.ndim - self.num_in
            row_scale = row_scale.reshape(row_scale.shape[: x.ndim - self.num_in] + (1,) * num_out)
            y = (sums.astype(jnp.float32) * row_scale * scale).astype(dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(dtype)
        return y


def quantize(model: nnx.Module, mode: Mode) -> nnx.Module:
    """Replaces every Linear and Einsum of `model` (LoRA's base projections included) by its
    int8 `QuantizedProjection`; returns the model. "none" leaves it as it is."""
    if mode not in MODES:
        raise ValueError(f"quantize={mode!r} is not one of {', '.join(MODES)}.")
    if mode != "none":
        for path, module in list(nnx.iter_modules(model)):
            if isinstance(module, (nnx.Linear, nnx.Einsum)):
                replace_module(model, path, QuantizedProjection(module, mode))
    return model
