"""Sampling and scoring with the model, entirely on the device.

Imports only `models` and `sharding` (no TensorFlow, no seqio), so planners and servers can
sample with it. It also owns the token layouts both calls read: a prompt as the model saw
it in training (`decoder_prompt`) and seqio's decoder features built from NumPy rows
(`decoder_features`).

`generate` continues a batch of prompts with the KV cache inside one `jax.lax.while_loop`
(no Python per token): greedy, temperature sampling with top-k / top-p filtering, or beam
search as Hugging Face's (`num_beams`, `length_penalty`), each with Hugging Face's repetition
penalty, stopping each row (or hypothesis) at EOS or any extra stop token.
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


class SamplingConfigError(FlanjaxError, ValueError):
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
    # > 1: beam search (deterministic, so temperature 0), returning the best of `num_beams`
    # hypotheses by sum of log-probabilities / length ** length_penalty (> 0 favours longer ones).
    num_beams: int = 1
    length_penalty: float = 1.0
    # int8 weights ("int8"), or weights and activations ("int8_dynamic"), each with an int8 KV
    # cache: `models.quantize`.
    quantize: Mode = "none"

    def __post_init__(self):
        object.__setattr__(self, "stop_tokens", tuple(int(t) for t in self.stop_tokens))  # gin gives lists
        if self.quantize not in MODES:
            raise SamplingConfigError(f"quantize={self.quantize!r} is not one of {', '.join(MODES)}.")
        if self.max_new_tokens < 1 or self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise SamplingConfigError(f"invalid {self}: need max_new_tokens >= 1, temperature >= 0, top_k >= 0, 0 < top_p <= 1.")
        if not self.repetition_penalty > 0:
            raise SamplingConfigError(f"invalid {self}: need repetition_penalty > 0 (1: off).")
        if self.num_beams < 1 or not np.isfinite(self.length_penalty):
            raise SamplingConfigError(f"invalid {self}: need num_beams >= 1 (1: no beam search) and a finite length_penalty.")
        if self.num_beams > 1 and self.temperature != 0:
            raise SamplingConfigError(
                f"num_beams={self.num_beams} with temperature={self.temperature}: beam search keeps the likeliest "
                "hypotheses and samples nothing. Set temperature=0 (--temperature 0), or num_beams=1 to sample."
            )


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
    """Continues each prompt by up to `config.max_new_tokens` tokens (seeded), or with
    `config.num_beams > 1` returns each prompt's best beam."""
    check_length(nnx.merge(graphdef, state).config, prompts.shape[1], config.max_new_tokens)
    if config.num_beams > 1:
        return _beam_search(graphdef, state, prompts, prompt_lengths, config=config, eos_id=eos_id)
    rng = jax.random.key(seed) if isinstance(seed, int) else seed
    return _generate(graphdef, state, prompts, prompt_lengths, rng, config=config, eos_id=eos_id)


def _prefill(model, prompts, prompt_lengths, config: SamplingConfig):
    """Writes the prompts into a fresh cache with room for the new tokens. Returns the prompts
    as written (tokens, segments [b, p]), the hidden state after each prompt [b, d] and the cache."""
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
    return tokens, segments, hidden[:, -1], cache


def _seen(tokens, segments, vocab_size: int) -> jax.Array:
    """[b, v]: which tokens each row's prompt holds (padding excluded), for the repetition penalty."""
    return jnp.zeros((tokens.shape[0], vocab_size), bool).at[jnp.arange(tokens.shape[0])[:, None], tokens].max(segments > 0)


@functools.partial(jax.jit, static_argnames=("graphdef", "config", "eos_id"))
def _generate(graphdef, state, prompts, prompt_lengths, rng, *, config: SamplingConfig, eos_id: int) -> Generation:
    model = quantize(nnx.merge(graphdef, state), config.quantize)  # once, before the loop
    b = prompts.shape[0]
    tokens, segments, hidden, cache = _prefill(model, prompts, prompt_lengths, config)
    stops = jnp.asarray((eos_id, *config.stop_tokens), jnp.int32)
    penalty = config.repetition_penalty
    # The tokens each row holds so far, for the repetition penalty; None without one, so the
    # default loop carries nothing extra.
    rows = jnp.arange(b)
    seen = None if penalty == 1.0 else _seen(tokens, segments, model.config.vocab_size)

    def emit(i, logits, out, lengths, done, seen):
        if seen is not None:
            logits = penalize_repetition(logits, seen, penalty)
        token = jnp.where(done, 0, next_token(logits, jax.random.fold_in(rng, i), config))
        out = jax.lax.dynamic_update_slice(out, token[:, None], (0, i))
        if seen is not None:
            seen = seen.at[rows, token].max(~done)
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
    token, out, lengths, done, seen = emit(0, model.logits(hidden), out, jnp.zeros((b,), jnp.int32), jnp.zeros((b,), bool), seen)
    _, _, _, out, lengths, _, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), token, cache, out, lengths, done, seen))
    return Generation(out, lengths)


class _Beams(NamedTuple):
    """Beam search's state, per prompt: the `n` running hypotheses (best first) and the `n`
    best finished ones. Cache and `seen` rows are [b * n], prompt r's beams at r*n .. r*n + n - 1."""

    scores: jax.Array  # [b, n] sum of log-probabilities of the running hypotheses
    tokens: jax.Array  # [b, n, max_new_tokens] their tokens, 0 after the last
    cache: KVCache
    seen: jax.Array | None  # [b * n, v] for the repetition penalty, else None
    done_scores: jax.Array  # [b, n] finished: length-penalised score; -1e9 in an empty slot
    done_tokens: jax.Array  # [b, n, max_new_tokens]
    done_lengths: jax.Array  # [b, n]
    done: jax.Array  # [b, n] whether a slot holds a finished hypothesis
    open: jax.Array  # [b] whether the prompt may still improve (Hugging Face's early-stop heuristic)


@functools.partial(jax.jit, static_argnames=("graphdef", "config", "eos_id"))
def _beam_search(graphdef, state, prompts, prompt_lengths, *, config: SamplingConfig, eos_id: int) -> Generation:
    """Hugging Face transformers' beam search (5.x, `early_stopping=False`, its default), step
    for step: each step keeps the best `k` continuations of all beams by summed log-probability
    (after the repetition penalty); those among the first `n` that end in a stop token, and at
    the last step all of the first `n`, become finished hypotheses scored by sum / length **
    length_penalty; the best `n` that do not stop run on. A prompt stops improving once all `n`
    finished slots are full and its best running beam, penalised at its current length, is no
    better than the worst of them; the loop ends when all have. Returns the best finished one."""
    model = quantize(nnx.merge(graphdef, state), config.quantize)
    b, n, new = prompts.shape[0], config.num_beams, config.max_new_tokens
    v = model.config.vocab_size
    stops = {eos_id, *config.stop_tokens}
    k = max(2, 1 + len(stops)) * n  # as Hugging Face (per EOS id): enough that `n` do not stop
    stops = jnp.asarray(tuple(stops), jnp.int32)
    never = -1e9  # Hugging Face's "impossible" score, added the same way so float32 sums agree
    # length ** length_penalty for lengths 1..new, computed in float64 then rounded, as torch
    # divides a float32 tensor by a Python float.
    norm = jnp.asarray(np.arange(1, new + 1, dtype=np.float64) ** config.length_penalty, jnp.float32)
    first_n = jnp.arange(k) < n
    block = jnp.arange(b)[:, None] * n  # each prompt's first beam row
    penalty = config.repetition_penalty
    take = lambda x, index: jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)  # noqa: E731

    def step(i, logits, beams: _Beams) -> _Beams:
        log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [b * n, v]
        if beams.seen is not None:  # Hugging Face penalises log-probabilities in beam search
            log_p = penalize_repetition(log_p, beams.seen, penalty)
        log_p = (log_p.reshape(b, n, v) + beams.scores[:, :, None]).reshape(b, n * v)
        top, index = jax.lax.top_k(log_p, k)  # [b, k], best first
        parent, token = index // v, (index % v).astype(jnp.int32)
        tokens = take(beams.tokens, parent).at[:, :, i].set(token)  # [b, k, new]
        stopped = jnp.isin(token, stops) | (i == new - 1)  # Hugging Face's stopping criteria: stop token, max length
        # The best `n` that did not stop run on.
        running = top + stopped * never
        keep = jax.lax.top_k(running, n)[1]
        scores, parent, tokens_kept = take(running, keep), take(parent, keep), take(tokens, keep)
        rows = (block + parent).reshape(-1)
        seen = beams.seen
        if seen is not None:
            seen = seen[rows].at[jnp.arange(b * n), tokens_kept[:, :, i].reshape(-1)].set(True)
        # Those among the first `n` that stopped compete with the finished ones, while the prompt is open.
        finished = stopped & first_n
        candidates = top / norm[i] + ~beams.open[:, None] * never + ~finished * never
        merged = jnp.concatenate([beams.done_scores, candidates], axis=1)
        best = jax.lax.top_k(merged, n)[1]
        merge = lambda old, fresh: take(jnp.concatenate([old, fresh], axis=1), best)  # noqa: E731
        done_scores = take(merged, best)
        done = merge(beams.done, finished)
        worst = jnp.where(done, done_scores.min(axis=1, keepdims=True), never)
        open_ = beams.open & (scores[:, :1] / norm[i] > worst).any(axis=1)
        return _Beams(scores, tokens_kept, beams.cache.rows(rows), seen, done_scores, merge(beams.done_tokens, tokens),
                      merge(beams.done_lengths, jnp.full((b, k), i + 1)), done, open_)  # fmt: skip

    tokens, segments, hidden, cache = _prefill(model, prompts, prompt_lengths, config)
    copies = lambda x: jnp.repeat(x, n, axis=0)  # noqa: E731  row r -> rows r*n .. r*n + n - 1
    seen = None if penalty == 1.0 else copies(_seen(tokens, segments, v))
    # Every beam starts as the prompt; only the first counts (score 0, the others -1e9), so the
    # first step does not pick the same continuation n times.
    scores = jnp.where(jnp.arange(n) == 0, 0.0, never) * jnp.ones((b, 1))
    empty = jnp.zeros((b, n, new), jnp.int32)
    beams = _Beams(scores, empty, cache.rows(copies(jnp.arange(b))), seen, jnp.full((b, n), never), empty,
                   jnp.zeros((b, n), jnp.int32), jnp.zeros((b, n), bool), jnp.ones((b,), bool))  # fmt: skip
    positions = copies(prompt_lengths)[:, None]

    def body(carry):
        i, beams = carry
        last = beams.tokens[:, :, i - 1].reshape(-1, 1)
        hidden, cache = model(last, positions + i - 1, jnp.ones_like(last), cache=beams.cache, return_hidden=True)
        return i + 1, step(i, model.logits(hidden[:, 0]), beams._replace(cache=cache))

    beams = step(0, copies(model.logits(hidden)), beams)
    _, beams = jax.lax.while_loop(lambda c: (c[0] < new) & c[1].open.any(), body, (jnp.int32(1), beams))
    return Generation(beams.done_tokens[:, 0], beams.done_lengths[:, 0])


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
    shards = partitioner.data_parallel_size
    # A group far past the usual size (one prompt shared by every row: calibration rows, plain
    # text) is cut into chunks, so that it does not pad every other group to its size.
    cap = max(1, min(int(np.median([len(g) for g in groups.values()])), batch_size // shards))
    members = [g[i : i + cap] for g in groups.values() for i in range(0, len(g), cap)]
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
    prompts_per_batch = max(1, batch_size // k // shards) * shards
    scores = partitioner.map_batches(
        lambda batch, _: score_options(graphdef, state, batch["prompts"], jnp.maximum(batch["lengths"], 1),
                                       batch["options"], batch["weights"]),
        {"prompts": prompts, "lengths": lengths, "options": options, "weights": option_weights}, prompts_per_batch,
    )  # fmt: skip
    for g, group in enumerate(members):
        result[group] = scores[g, : len(group)]
    return result


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def score_ids(graphdef: nnx.GraphDef, state: nnx.State, rows: Sequence[tuple[Sequence[int], Sequence[float]]], partitioner,
              batch_size: int, max_len: int) -> np.ndarray:  # fmt: skip
    """`score_rows` of token-id rows: each (ids, weights) row's summed log-likelihood of its
    weighted tokens, the row cut to its last `max_len` ids (widths rounded to 64: few compiles)."""
    width = min(max_len, round_up(max(len(ids) for ids, _ in rows), 64))
    tokens, weights = np.zeros((len(rows), width), np.int32), np.zeros((len(rows), width), np.float32)
    for r, (ids, w) in enumerate(rows):
        ids, w = ids[-width:], w[-width:]
        tokens[r, : len(ids)], weights[r, : len(w)] = ids, w
    batch = round_up(min(batch_size, len(rows)), partitioner.data_parallel_size)
    return score_rows(graphdef, state, decoder_features(tokens, weights), partitioner, batch)


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
