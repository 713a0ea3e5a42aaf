"""Sampling and scoring with the model, entirely on the device.

Imports only `models` and `sharding` (no TensorFlow, no seqio), so planners and servers can
sample with it. It also owns the token layouts both calls read: a prompt as the model saw
it in training (`decoder_prompt`) and seqio's decoder features built from NumPy rows
(`decoder_features`).

`generate` continues a batch of prompts with the KV cache inside one `jax.lax.while_loop`
(no Python per token): greedy, or temperature sampling with top-k / top-p filtering, either
with Hugging Face's repetition penalty, stopping each row at EOS or any extra stop token.
`score` returns the log-likelihood of given continuations, per token and summed: rank
classification, the reward model and PPO use it. Both are jitted, so under
`Partitioner.activate()` with batch-sharded inputs they run sharded on the mesh like the
training step.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from flanjax.errors import FlanjaxError
from flanjax.models.quantize import MODES, Mode, quantize
from flanjax.models.transformer import KVCache, TransformerConfig


class SequenceTooLongError(FlanjaxError, ValueError):
    pass


# --- token layouts ----------------------------------------------------------------------------


def decoder_prompt(ids, prompt_len: int) -> list[int]:
    """A prompt laid out as the model saw it in training (seqio's decoder inputs start every
    example with 0): 0, then its last `prompt_len - 1` token ids. (`data.pipeline` has the
    same layout for tf.data.)"""
    return [0, *ids[-(prompt_len - 1) :]]


def decoder_features(tokens: np.ndarray, weights: np.ndarray) -> dict[str, np.ndarray]:
    """seqio's unpacked decoder features (see `data.pipeline`) of rows of `tokens` [n, t]
    (0 = padding), scoring the tokens where `weights` [n, t] > 0."""
    tokens = np.asarray(tokens, np.int32)
    inputs = np.zeros_like(tokens)
    inputs[:, 1:] = tokens[:, :-1]  # shifted right: 0 starts the example
    return {
        "decoder_input_tokens": inputs,
        "decoder_target_tokens": tokens,
        "decoder_loss_weights": np.asarray(weights, np.float32),
        "decoder_segment_ids": (tokens != 0).astype(np.int32),
        "decoder_positions": np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape).copy(),
    }


def token_log_likelihoods(
    logits: jax.Array,  # [b, t, v]
    targets: jax.Array,  # [b, t]
    weights: jax.Array,  # [b, t]; 0 where a token is not scored
) -> jax.Array:
    """log p(target | prefix) of each scored token (float32), 0 elsewhere: [b, t]."""
    log_p = -optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    return jnp.where(weights > 0, log_p, 0.0)


# --- sampling ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How `generate` picks each token; the defaults decode greedily."""

    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy (argmax); otherwise sample from softmax(logits / T)
    top_k: int = 0  # sample among the k most likely tokens; 0: no limit
    top_p: float = 1.0  # ... and among the fewest most likely tokens whose mass reaches p
    # Hugging Face's: every token already in the row (prompt or generated) has its logit divided
    # by this if positive, multiplied if negative, before the above. 1: off; LIMA decodes with 1.2.
    repetition_penalty: float = 1.0
    stop_tokens: tuple[int, ...] = ()  # besides EOS, e.g. an end-of-turn token
    # int8 weights ("int8"), or weights and activations ("int8_dynamic"), each with an int8 KV
    # cache: `models.quantize`.
    quantize: Mode = "none"

    def __post_init__(self):
        object.__setattr__(self, "stop_tokens", tuple(int(t) for t in self.stop_tokens))  # gin gives lists
        if self.quantize not in MODES:
            raise ValueError(f"quantize={self.quantize!r} is not one of {', '.join(MODES)}.")
        if self.max_new_tokens < 1 or self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"invalid {self}: need max_new_tokens >= 1, temperature >= 0, top_k >= 0, 0 < top_p <= 1.")
        if not self.repetition_penalty > 0:
            raise ValueError(f"invalid {self}: need repetition_penalty > 0 (1: off).")


class Generation(NamedTuple):
    tokens: jax.Array  # [b, max_new_tokens]: the new tokens, 0 after each row's stop token
    lengths: jax.Array  # [b]: how many tokens each row generated, its stop token included


def check_length(config: TransformerConfig, prompt_len: int, new_tokens: int) -> None:
    if prompt_len + new_tokens > config.max_len:
        raise SequenceTooLongError(
            f"prompts of {prompt_len} tokens plus {new_tokens} new tokens exceed the model's "
            f"max_len={config.max_len}. Shorten the inputs (task_feature_lengths) or the number of "
            "new tokens, or raise the model's max_len (--gin.transformer.TransformerConfig.max_len=N; "
            "with learned positions the model then needs training at that length)."
        )


def filter_logits(logits: jax.Array, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """`logits` [..., v] with -inf on every token outside the top-k, then the top-p, set.

    Top-p keeps the most likely tokens until their probability (renormalised over the
    top-k) reaches p: a token stays if the tokens ranked above it hold less than p.
    """
    if not top_k and top_p >= 1.0:
        return logits
    # Only the ranked values are needed: the k largest, or all of them sorted.
    ranked = jax.lax.top_k(logits, top_k)[0] if top_k else jnp.flip(jnp.sort(logits, axis=-1), axis=-1)
    if top_p < 1.0:
        probs = jax.nn.softmax(ranked, axis=-1)
        mass_above = jnp.cumsum(probs, axis=-1) - probs
        ranked = jnp.where(mass_above < top_p, ranked, jnp.inf)
    smallest_kept = jnp.min(ranked, axis=-1, keepdims=True)
    return jnp.where(logits < smallest_kept, -jnp.inf, logits)


def penalize_repetition(logits: jax.Array, seen: jax.Array, penalty: float) -> jax.Array:
    """`logits` [b, v] with every `seen` [b, v] token's logit moved towards 0 by `penalty`
    (> 1) as Hugging Face's RepetitionPenaltyLogitsProcessor does: divided if positive,
    multiplied if negative."""
    return jnp.where(seen, jnp.where(logits > 0, logits / penalty, logits * penalty), logits)


def next_token(logits: jax.Array, key: jax.Array, config: SamplingConfig) -> jax.Array:
    """One token per row of `logits` [b, v]."""
    if config.temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = filter_logits(logits.astype(jnp.float32) / config.temperature, config.top_k, config.top_p)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def generate(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    prompts: jax.Array,  # [b, p] int, right-padded
    prompt_lengths: jax.Array,  # [b] int, each >= 1
    *,
    eos_id: int,
    config: SamplingConfig = SamplingConfig(),
    seed: int | jax.Array = 0,
) -> Generation:
    """Continues each prompt by up to `config.max_new_tokens` tokens (seeded)."""
    check_length(nnx.merge(graphdef, state).config, prompts.shape[1], config.max_new_tokens)
    rng = jax.random.key(seed) if isinstance(seed, int) else seed
    return _generate(graphdef, state, prompts, prompt_lengths, rng, config=config, eos_id=eos_id)


@functools.partial(jax.jit, static_argnames=("graphdef", "config", "eos_id"))
def _generate(graphdef, state, prompts, prompt_lengths, rng, *, config: SamplingConfig, eos_id: int) -> Generation:
    model = quantize(nnx.merge(graphdef, state), config.quantize)  # once, before the loop
    b, p = prompts.shape
    # Left-align the prompts so that every row writes the same cache slot at each step:
    # row r's prompt moves to the last prompt_lengths[r] slots; padding gets segment 0.
    pad = (p - prompt_lengths)[:, None]
    slots = jnp.arange(p)[None, :]
    tokens = jnp.take_along_axis(prompts, (slots - pad) % p, axis=1)
    segments = (slots >= pad).astype(jnp.int32)
    positions = jnp.maximum(slots - pad, 0)
    cache = KVCache.empty(model.config, b, p + config.max_new_tokens, quantized=config.quantize != "none")
    hidden, cache = model(tokens, positions, segments, cache=cache, return_hidden=True)
    stops = jnp.asarray((eos_id, *config.stop_tokens), jnp.int32)
    penalty = config.repetition_penalty
    # The tokens each row holds so far (padding excluded), for the repetition penalty; None
    # without one, so the default loop carries nothing extra.
    rows = jnp.arange(b)[:, None]
    seen = None if penalty == 1.0 else jnp.zeros((b, model.config.vocab_size), bool).at[rows, tokens].max(segments > 0)

    def emit(i, logits, out, lengths, done, seen):
        if seen is not None:
            logits = penalize_repetition(logits, seen, penalty)
        token = jnp.where(done, 0, next_token(logits, jax.random.fold_in(rng, i), config))
        out = jax.lax.dynamic_update_slice(out, token[:, None], (0, i))
        if seen is not None:
            seen = seen.at[rows[:, 0], token].max(~done)
        return token, out, lengths + ~done, done | jnp.isin(token, stops), seen

    def cond(carry):
        i, _, _, _, _, done, _ = carry
        return (i < config.max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, token, cache, out, lengths, done, seen = carry
        hidden, cache = model(token[:, None], prompt_lengths[:, None] + i - 1, jnp.ones((b, 1), jnp.int32), cache=cache, return_hidden=True)
        token, out, lengths, done, seen = emit(i, model.logits(hidden[:, 0]), out, lengths, done, seen)
        return i + 1, token, cache, out, lengths, done, seen

    out = jnp.zeros((b, config.max_new_tokens), jnp.int32)
    token, out, lengths, done, seen = emit(0, model.logits(hidden[:, -1]), out, jnp.zeros((b,), jnp.int32), jnp.zeros((b,), bool), seen)
    _, _, _, out, lengths, _, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), token, cache, out, lengths, done, seen))
    return Generation(out, lengths)


class Scores(NamedTuple):
    token_log_likelihoods: jax.Array  # [b, t]: log p(target token | everything before), 0 where unscored
    log_likelihood: jax.Array  # [b]: their sum
    num_tokens: jax.Array  # [b]: how many tokens were scored


@functools.partial(jax.jit, static_argnames="graphdef")
def score(graphdef: nnx.GraphDef, state: nnx.State, batch: Mapping[str, jax.Array]) -> Scores:
    """Log-likelihood of the weighted target tokens of decoder features (see data.pipeline)."""
    model = nnx.merge(graphdef, state)
    logits, _ = model(batch["decoder_input_tokens"], batch["decoder_positions"], batch["decoder_segment_ids"])
    weights = batch["decoder_loss_weights"]
    per_token = token_log_likelihoods(logits, batch["decoder_target_tokens"], weights)
    return Scores(per_token, per_token.sum(axis=-1), (weights > 0).sum(axis=-1))


@functools.partial(jax.jit, static_argnames="graphdef")
def score_options(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    prompts: jax.Array,  # [b, p] left-padded decoder inputs (0 first), each prompt once
    prompt_lengths: jax.Array,  # [b]
    options: jax.Array,  # [b, k, o] continuations of each prompt, right-padded
    weights: jax.Array,  # [b, k, o]; 0 on padding (and on tokens not scored)
) -> jax.Array:
    """Log-likelihood [b, k] of each prompt's `k` options: the prompt is prefilled into the KV
    cache once, then every option reads a copy of that cache. The same numbers as `score` of
    the rows prompt + option, for a fraction of the prompt's computation."""
    model = nnx.merge(graphdef, state)
    b, p = prompts.shape
    k, o = options.shape[1:]
    padding = p - prompt_lengths[:, None]
    slots = jnp.arange(p)[None]
    hidden, cache = model(prompts, jnp.maximum(slots - padding, 0), (slots >= padding).astype(jnp.int32),
                          cache=KVCache.empty(model.config, b, p + o), return_hidden=True)  # fmt: skip
    first = model.logits(hidden[:, -1:])  # [b, 1, v]: predicts each option's first token
    copies = lambda x: jnp.repeat(x, k, axis=0)  # noqa: E731  row i -> rows i*k .. i*k + k - 1
    cache = cache.rows(copies(jnp.arange(b)))
    options, weights = options.reshape(b * k, o), weights.reshape(b * k, o)
    positions = copies(prompt_lengths)[:, None] + jnp.arange(o)[None]
    hidden, _ = model(options[:, :-1], positions[:, :-1], jnp.ones((b * k, o - 1), jnp.int32), cache=cache, return_hidden=True)
    logits = jnp.concatenate([copies(first), model.logits(hidden)], axis=1)  # [b*k, o, v]
    return token_log_likelihoods(logits, options, weights).sum(axis=-1).reshape(b, k)


def score_rows(graphdef: nnx.GraphDef, state: nnx.State, rows: Mapping[str, np.ndarray], partitioner, batch_size: int) -> np.ndarray:
    """`score(...).log_likelihood` of decoder-feature rows (NumPy, see `decoder_features`), with
    rows that share their prompt (every input token up to the first scored one) scored by
    `score_options`, the prompt computed once: the options of rank classification. About
    `batch_size` rows go to the device at a time. Returns [n] log-likelihoods."""
    inputs, targets, weights = rows["decoder_input_tokens"], rows["decoder_target_tokens"], rows["decoder_loss_weights"]
    n, t = targets.shape
    scored = weights > 0
    start = np.where(scored.any(1), scored.argmax(1), t)  # the first scored token (t: none)
    end = t - scored[:, ::-1].argmax(1)
    groups: dict[bytes, list[int]] = {}
    for i in np.flatnonzero(start < t):
        groups.setdefault(inputs[i, : start[i] + 1].tobytes(), []).append(i)
    result = np.zeros(n, np.float32)
    if not groups:
        return result
    members = list(groups.values())
    p, o, k = int(start.max(initial=0, where=start < t)) + 1, int((end - start)[start < t].max()), max(map(len, members))
    o += o == 1  # at least two option slots: the first token comes from the prompt's last position
    prompts = np.zeros((len(members), p), np.int32)
    lengths = np.zeros(len(members), np.int32)
    options = np.zeros((len(members), k, o), np.int32)
    option_weights = np.zeros((len(members), k, o), np.float32)
    for g, group in enumerate(members):
        lengths[g] = start[group[0]] + 1
        prompts[g, p - lengths[g] :] = inputs[group[0], : lengths[g]]
        for j, i in enumerate(group):
            options[g, j, : end[i] - start[i]] = targets[i, start[i] : end[i]]
            option_weights[g, j, : end[i] - start[i]] = weights[i, start[i] : end[i]]
    shards = partitioner.data_parallel_size
    prompts_per_batch = max(1, batch_size // k // shards) * shards
    scores = partitioner.map_batches(
        lambda batch, _: score_options(graphdef, state, batch["prompts"], jnp.maximum(batch["lengths"], 1),
                                       batch["options"], batch["weights"]),
        {"prompts": prompts, "lengths": lengths, "options": options, "weights": option_weights}, prompts_per_batch,
    )  # fmt: skip
    for g, group in enumerate(members):
        result[group] = scores[g, : len(group)]
    return result


def generate_ids(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    prompts: Sequence[Sequence[int]],  # token ids, as the model saw them in training (see `decoder_prompt`)
    *,
    eos_id: int,
    config: SamplingConfig,
    partitioner,  # a flanjax.sharding.Partitioner
    prompt_len: int,
    batch_size: int = 64,
    seed: int = 0,
) -> list[list[int]]:
    """The new token ids of one continuation per prompt, stop tokens dropped; each prompt keeps
    its last `prompt_len` ids. Batches are padded to `batch_size`, a multiple of the data shards."""
    if not prompts:
        return []
    tokens = np.zeros((len(prompts), prompt_len), np.int32)
    lengths = np.zeros(len(prompts), np.int32)
    for i, ids in enumerate(prompts):
        ids = ids[-prompt_len:]
        tokens[i, : len(ids)], lengths[i] = ids, len(ids)

    def sample(batch, start):
        key = jax.random.fold_in(jax.random.key(seed), start)
        gen = generate(graphdef, state, batch["tokens"], jnp.maximum(batch["lengths"], 1), eos_id=eos_id,
                       config=config, seed=key)  # fmt: skip
        return gen.tokens, gen.lengths

    new, counts = partitioner.map_batches(sample, {"tokens": tokens, "lengths": lengths}, batch_size)
    stops = {eos_id, *config.stop_tokens}
    return [[int(t) for t in row[:n] if int(t) not in stops] for row, n in zip(new, counts)]


def generate_texts(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    vocabulary,  # a seqio.Vocabulary
    prompts: list[str],
    *,
    config: SamplingConfig,
    partitioner,  # a flanjax.sharding.Partitioner
    prompt_len: int,
    batch_size: int = 64,
    seed: int = 0,
) -> list[str]:
    """One continuation per prompt, as text (stop tokens dropped), each prompt laid out as in
    training (`decoder_prompt`)."""
    ids = [decoder_prompt(vocabulary.encode(prompt), prompt_len) for prompt in prompts]
    new = generate_ids(graphdef, state, ids, eos_id=vocabulary.eos_id, config=config, partitioner=partitioner,
                       prompt_len=prompt_len, batch_size=batch_size, seed=seed)  # fmt: skip
    return [vocabulary.decode(row) for row in new]
