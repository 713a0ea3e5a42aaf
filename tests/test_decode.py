"""Sampling filters, seeded sampling, stop tokens, sharded generation and scoring, each
against a plain NumPy computation or full forward passes without a cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flanjax.decode import (
    SamplingConfig, SequenceTooLongError, decoder_features, filter_logits, generate, next_token, penalize_repetition,
    score, score_rows,
)
from flanjax.errors import FlanjaxError
from flanjax.models.transformer import Transformer, TransformerConfig
from flanjax.sharding import MeshConfig, Partitioner, make_mesh

TINY = TransformerConfig(vocab_size=96, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=64, max_len=32)


def model_and_state(seed=0):
    graphdef, state = nnx.split(Transformer(TINY, rngs=nnx.Rngs(seed)))
    return graphdef, state


def full_logits(graphdef, state, tokens) -> np.ndarray:
    """Logits of a plain forward pass without cache, [b, t, v]."""
    logits, _ = nnx.merge(graphdef, state)(jnp.asarray(tokens, jnp.int32))
    return np.asarray(logits)


# --- top-k / top-p against NumPy ---------------------------------------------------------------


def allowed_numpy(logits: np.ndarray, top_k: int, top_p: float) -> set[int]:
    order = np.argsort(-logits)
    if top_k:
        order = order[:top_k]
    probs = np.exp(logits[order] - logits[order].max())
    probs /= probs.sum()
    before = np.cumsum(probs) - probs  # mass of the better-ranked tokens
    return {int(t) for t, m in zip(order, before) if m < top_p}


@pytest.mark.parametrize("top_k, top_p", [(1, 1.0), (5, 1.0), (0, 0.9), (0, 0.3), (10, 0.8), (0, 1e-6)])
def test_top_k_top_p_keep_exactly_the_allowed_tokens(top_k, top_p):
    logits = np.random.default_rng(top_k).normal(0, 2, (6, 50)).astype(np.float32)
    filtered = np.asarray(filter_logits(jnp.asarray(logits), top_k, top_p))
    for row, out in zip(logits, filtered):
        kept = set(np.flatnonzero(np.isfinite(out)).tolist())
        assert kept == allowed_numpy(row, top_k, top_p)
        np.testing.assert_array_equal(out[list(kept)], row[list(kept)])  # kept logits unchanged
    assert 0 < len(kept) < 50 or top_k == 0 and top_p == 1.0


def test_sampling_follows_the_tempered_distribution():
    logits = jnp.asarray([[1.0, 0.0, -1.0, 2.0]] * 20_000)
    config = SamplingConfig(temperature=0.7)
    draws = np.asarray(next_token(logits, jax.random.key(0), config))
    expected = np.exp(np.array([1.0, 0.0, -1.0, 2.0]) / 0.7)
    expected /= expected.sum()
    np.testing.assert_allclose(np.bincount(draws, minlength=4) / len(draws), expected, atol=0.01)


def test_sampling_draws_only_allowed_tokens_and_is_seeded():
    graphdef, state = model_and_state()
    prompts = jnp.asarray(np.random.default_rng(1).integers(1, TINY.vocab_size, (4, 6)), jnp.int32)
    lengths = jnp.asarray([6, 3, 5, 1], jnp.int32)
    config = SamplingConfig(max_new_tokens=8, temperature=1.5, top_k=3)
    run = lambda seed: np.asarray(generate(graphdef, state, prompts, lengths, eos_id=-1, config=config, seed=seed).tokens)  # noqa: E731
    first, again, other = run(0), run(0), run(1)
    np.testing.assert_array_equal(first, again)
    assert (first != other).any()
    # Every drawn token is among the 3 likeliest after the sequence so far (one causal pass a row).
    for row, n in enumerate(np.asarray(lengths)):
        logits = full_logits(graphdef, state, [[*np.asarray(prompts[row, :n]), *first[row]]])[0]
        for i, token in enumerate(first[row]):
            assert token in np.argsort(-logits[n - 1 + i])[:3]


# --- greedy generation: stop tokens, lengths, sharding ----------------------------------------


def greedy_reference(graphdef, state, prompt, steps):
    seq = list(prompt)
    for _ in range(steps):
        seq.append(int(np.argmax(full_logits(graphdef, state, [seq])[0, -1])))
    return seq[len(prompt) :]


def test_extra_stop_tokens_end_each_row():
    graphdef, state = model_and_state(seed=3)
    prompts = np.random.default_rng(2).integers(1, TINY.vocab_size, (3, 5)).astype(np.int32)
    lengths = np.array([5, 2, 4], np.int32)
    expected = np.array([greedy_reference(graphdef, state, p[:n], 6) for p, n in zip(prompts, lengths)])
    stop = int(expected[1, 2])  # the third token of row 1: an end-of-turn token, say
    out = generate(
        graphdef, state, jnp.asarray(prompts), jnp.asarray(lengths), eos_id=-1,
        config=SamplingConfig(max_new_tokens=6, stop_tokens=[stop]),
    )  # fmt: skip
    for row, tokens, n in zip(expected, np.asarray(out.tokens), np.asarray(out.lengths)):
        hits = np.flatnonzero(row == stop)
        keep = hits[0] + 1 if len(hits) else 6  # up to and including the first stop token
        assert n == keep
        np.testing.assert_array_equal(tokens[:keep], row[:keep])
        assert not tokens[keep:].any()


def test_prompt_longer_than_the_model_allows():
    graphdef, state = model_and_state()
    prompts = jnp.ones((2, 30), jnp.int32)
    with pytest.raises(SequenceTooLongError, match="max_len=32"):
        generate(graphdef, state, prompts, jnp.asarray([30, 30]), eos_id=1, config=SamplingConfig(max_new_tokens=8))


@pytest.mark.parametrize("mesh", [MeshConfig(data=2, fsdp=2, tensor=2), MeshConfig(data=4, tensor=2)])
def test_sharded_generation_and_scoring_equal_a_single_device(mesh):
    init = lambda: Transformer(TINY, rngs=nnx.Rngs(5))  # noqa: E731
    rng = np.random.default_rng(3)
    host = {
        "prompts": rng.integers(1, TINY.vocab_size, (8, 7)).astype(np.int32),
        "lengths": rng.integers(1, 8, 8).astype(np.int32),
    }
    rows = scoring_rows(rng, 8, 12)
    results = []
    for partitioner in (Partitioner(make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])), Partitioner.from_config(mesh)):
        graphdef, abstract = partitioner.abstract_state(init)
        with partitioner.activate():
            state = partitioner.create(init, abstract)
            batch = partitioner.shard_batch(host)
            out = generate(graphdef, state, batch["prompts"], batch["lengths"], eos_id=-1, config=SamplingConfig(max_new_tokens=5))
            scores = score(graphdef, state, partitioner.shard_batch(rows))
        results.append((np.asarray(out.tokens), np.asarray(scores.log_likelihood)))
    np.testing.assert_array_equal(results[1][0], results[0][0])
    np.testing.assert_allclose(results[1][1], results[0][1], rtol=1e-5)


# --- scoring against full forward passes -------------------------------------------------------


def scoring_rows(rng, batch, width):
    """Decoder features of unpacked rows: a prefix (weight 0), a continuation (weight 1), padding."""
    tokens = rng.integers(1, TINY.vocab_size, (batch, width + 1)).astype(np.int32)
    prefix = rng.integers(1, width // 2, batch)
    total = rng.integers(width // 2 + 1, width + 1, batch)
    cols = np.arange(width)
    weights = ((cols >= prefix[:, None]) & (cols < total[:, None])).astype(np.int32)
    segments = (cols < total[:, None]).astype(np.int32)
    return {
        "decoder_input_tokens": tokens[:, :-1] * segments,
        "decoder_target_tokens": tokens[:, 1:] * segments,
        "decoder_loss_weights": weights,
        "decoder_segment_ids": segments,
        "decoder_positions": np.broadcast_to(cols, (batch, width)).astype(np.int32),
    }


def test_score_equals_log_softmax_of_a_full_forward_pass():
    graphdef, state = model_and_state(seed=7)
    rows = scoring_rows(np.random.default_rng(4), 5, 10)
    out = score(graphdef, state, {k: jnp.asarray(v) for k, v in rows.items()})
    for i in range(5):
        n = int(rows["decoder_segment_ids"][i].sum())
        logits = full_logits(graphdef, state, rows["decoder_input_tokens"][i : i + 1, :n])[0].astype(np.float64)
        log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
        expected = log_probs[np.arange(n), rows["decoder_target_tokens"][i, :n]] * rows["decoder_loss_weights"][i, :n]
        np.testing.assert_allclose(np.asarray(out.token_log_likelihoods[i, :n]), expected, atol=1e-5)
        assert not np.asarray(out.token_log_likelihoods[i, n:]).any()
        np.testing.assert_allclose(float(out.log_likelihood[i]), expected.sum(), atol=1e-4)
        assert int(out.num_tokens[i]) == rows["decoder_loss_weights"][i].sum()


def option_rows(rng, prompts: int, options: list[int], width: int):
    """Rank-classification rows (decoder features): each prompt followed by several options of
    different lengths, one row per option, rows of one prompt not next to each other; plus a
    row with nothing scored."""
    tokens, weights = [], []
    for i in range(prompts):
        prompt = rng.integers(1, TINY.vocab_size, rng.integers(1, width // 2))
        for length in options[: 2 + i % (len(options) - 1)]:  # 2 .. len(options) options a prompt
            row = [*prompt, *rng.integers(1, TINY.vocab_size, length)]
            tokens.append(row + [0] * (width - len(row)))
            weights.append([0] * len(prompt) + [1] * length + [0] * (width - len(row)))
    tokens.append([*rng.integers(1, TINY.vocab_size, 5)] + [0] * (width - 5))
    weights.append([0] * width)
    order = rng.permutation(len(tokens))
    return decoder_features(np.asarray(tokens)[order], np.asarray(weights)[order])


@pytest.mark.parametrize("mesh", [MeshConfig(data=1), MeshConfig(data=2, fsdp=2, tensor=2)])
def test_scoring_each_prompt_once_equals_scoring_every_row(mesh):
    """The reference: `score` of every row, prompt and option together, without a cache."""
    partitioner = Partitioner(make_mesh(mesh, devices=jax.devices()[: mesh.data * mesh.fsdp * mesh.tensor]))
    init = lambda: Transformer(TINY, rngs=nnx.Rngs(2))  # noqa: E731
    rows = option_rows(np.random.default_rng(6), prompts=7, options=[1, 3, 2, 4], width=20)
    graphdef, abstract = partitioner.abstract_state(init)
    with partitioner.activate():
        state = partitioner.create(init, abstract)
    per_row = partitioner.map_batches(lambda batch, _: score(graphdef, state, batch).log_likelihood, rows, 8)
    once = score_rows(graphdef, state, rows, partitioner, batch_size=8)
    assert once.shape == (len(rows["decoder_target_tokens"]),) and (once < 0).sum() == len(once) - 1
    np.testing.assert_allclose(once, per_row, rtol=1e-5, atol=1e-5)


# --- repetition penalty against NumPy and Hugging Face transformers ----------------------------


@pytest.mark.parametrize("penalty", [1.2, 0.8])
def test_penalize_repetition_equals_numpy(penalty):
    rng = np.random.default_rng(8)
    logits = rng.normal(0, 2, (4, 30)).astype(np.float32)
    seen = rng.random((4, 30)) < 0.3
    expected = logits.copy()
    for r, t in zip(*np.nonzero(seen)):
        expected[r, t] = logits[r, t] / penalty if logits[r, t] > 0 else logits[r, t] * penalty
    np.testing.assert_allclose(np.asarray(penalize_repetition(jnp.asarray(logits), jnp.asarray(seen), penalty)), expected, rtol=1e-6)
    assert (expected != logits).sum() > 10  # positive and negative seen logits changed
    with pytest.raises(ValueError, match="repetition_penalty > 0"):
        SamplingConfig(repetition_penalty=0.0)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A tiny random LLaMA in transformers (vocab 64) and the same model in flanjax: (torch model,
    graphdef, state)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from flanjax.models.hf import load_model

    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                                      bos_token_id=None, eos_token_id=None, pad_token_id=None)  # fmt: skip
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    torch_model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # weights ~ N(0, 0.2^2), norm scales ~ 1: O(1) logits, clear argmaxes
        for name, p in torch_model.named_parameters():
            p.copy_(0.2 * torch.randn(p.shape) + (1.0 if "norm" in name else 0.0))
    path = tmp_path_factory.mktemp("llama")
    torch_model.save_pretrained(path)
    return (torch_model, *nnx.split(load_model(str(path))))


def test_repetition_penalty_greedy_equals_transformers(tiny_llama):
    """Greedy decoding of a tiny random LLaMA with transformers' repetition penalty, from
    prompts of different lengths (so flanjax pads and left-aligns them), token for token."""
    import torch

    torch_model, graphdef, state = tiny_llama
    vocab, new = 64, 20
    prompts = [np.random.default_rng(9).integers(0, vocab, n) for n in (9, 4)]

    def hf_greedy(prompt, penalty):
        with torch.no_grad():
            out = torch_model.generate(torch.tensor(prompt[None]), attention_mask=torch.ones((1, len(prompt)), dtype=torch.long),
                                       do_sample=False, repetition_penalty=penalty, max_new_tokens=new, min_new_tokens=new,
                                       pad_token_id=0, eos_token_id=None, output_scores=True, return_dict_in_generate=True)  # fmt: skip
        top2 = np.sort(torch.cat(out.scores).numpy(), axis=-1)[:, -2:]  # the penalized logits of each step
        assert (top2[:, 1] - top2[:, 0]).min() > 1e-4  # no near-ties that float differences could flip
        return out.sequences[0, len(prompt) :].numpy()

    unpenalized = np.stack([hf_greedy(prompt, 1.0) for prompt in prompts])
    for penalty in (1.0, 1.3, 2.0):
        expected = np.stack([hf_greedy(prompt, penalty) for prompt in prompts])
        # Right-padded, the short row's padding holding its expected tokens: were padding counted as
        # seen, they would be penalized from the first step.
        padded = np.stack([prompts[0], np.concatenate([prompts[1], expected[1, :5]])]).astype(np.int32)
        out = generate(graphdef, state, jnp.asarray(padded), jnp.asarray([9, 4], jnp.int32), eos_id=vocab,
                       config=SamplingConfig(max_new_tokens=new, repetition_penalty=penalty))  # fmt: skip
        np.testing.assert_array_equal(np.asarray(out.tokens), expected)
        assert penalty == 1.0 or (expected != unpenalized).any(axis=1).all()  # the penalty changes every row


# --- beam search against Hugging Face transformers ---------------------------------------------


@pytest.mark.parametrize(
    "num_beams, length_penalty, eos_id, stop_tokens, repetition_penalty",
    [
        (4, 1.0, None, (), 1.0),  # no EOS: every hypothesis runs to max_new_tokens
        (4, 1.0, 42, (), 1.0),  # EOS ends some beams early
        (2, 1.0, 42, (), 1.0),  # a prompt stops improving (early-stop heuristic) before its beams stop
        (2, 0.5, 42, (), 1.0),
        (3, 1.0, 16, (5,), 1.3),  # two stop tokens (3 * num_beams candidates a step), penalised log-probs
    ],
)
def test_beam_search_equals_transformers(tiny_llama, num_beams, length_penalty, eos_id, stop_tokens, repetition_penalty):
    """`generate` with num_beams > 1 returns transformers' best beam (`num_beams`, `do_sample=False`,
    its default `early_stopping=False`), token for token, for prompts of different lengths in one batch."""
    import torch

    torch_model, graphdef, state = tiny_llama
    new = 12
    rng = np.random.default_rng(10)
    prompts = [rng.integers(0, 64, n) for n in (9, 4, 6, 1)]

    def hf(prompt, beams):
        with torch.no_grad():
            out = torch_model.generate(torch.tensor(prompt[None]), attention_mask=torch.ones((1, len(prompt)), dtype=torch.long),
                                       do_sample=False, num_beams=beams, length_penalty=length_penalty, max_new_tokens=new,
                                       repetition_penalty=repetition_penalty, pad_token_id=0,
                                       eos_token_id=None if eos_id is None else [eos_id, *stop_tokens])  # fmt: skip
        return out[0, len(prompt) :].numpy()  # cropped to the best beam's length

    padded = np.zeros((4, 9), np.int32)
    for row, prompt in zip(padded, prompts):
        row[: len(prompt)] = prompt
    config = SamplingConfig(max_new_tokens=new, num_beams=num_beams, length_penalty=length_penalty,
                            stop_tokens=stop_tokens, repetition_penalty=repetition_penalty)  # fmt: skip
    out = generate(graphdef, state, jnp.asarray(padded), jnp.asarray([len(p) for p in prompts], jnp.int32),
                   eos_id=-1 if eos_id is None else eos_id, config=config)  # fmt: skip
    expected = [hf(prompt, num_beams) for prompt in prompts]
    for tokens, n, want in zip(np.asarray(out.tokens), np.asarray(out.lengths), expected):
        assert n == len(want)
        np.testing.assert_array_equal(tokens[:n], want)
        assert not tokens[n:].any()
    if eos_id is None:  # beams find what greedy decoding misses
        greedy = [hf(prompt, 1) for prompt in prompts]
        assert any(len(want) != len(g) or (want != g).any() for want, g in zip(expected, greedy))
    else:
        assert min(map(len, expected)) < new  # a stop token ended the best beam of some prompt


def test_one_beam_decodes_as_before():
    """num_beams=1 is the sampling path (greedy here, checked above), length_penalty unused."""
    graphdef, state = model_and_state(seed=3)
    prompts, lengths = jnp.asarray([[7, 3, 9], [4, 0, 0]], jnp.int32), jnp.asarray([3, 1], jnp.int32)
    run = lambda **beams: generate(graphdef, state, prompts, lengths, eos_id=-1, config=SamplingConfig(max_new_tokens=4, **beams))  # noqa: E731
    np.testing.assert_array_equal(np.asarray(run(num_beams=1, length_penalty=2.0).tokens), np.asarray(run().tokens))


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(num_beams=4, temperature=0.7), "temperature=0"),
        (dict(num_beams=0), "num_beams >= 1"),
        (dict(num_beams=2, length_penalty=float("nan")), "finite length_penalty"),
    ],
)
def test_bad_beam_configs_name_the_fix(fields, message):
    with pytest.raises(FlanjaxError, match=message):
        SamplingConfig(**fields)
