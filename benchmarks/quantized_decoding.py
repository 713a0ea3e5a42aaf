"""int8 decoding against float32 decoding of a trained run: greedy agreement and log-likelihood drift.

For held-out prompts of a task, the float32 model decodes greedily; then, with the same
prefixes (teacher forcing on the float32 tokens, through the int8 KV cache as in decoding),
each quantised model's argmax is compared
with the float32 one at every generated position, and the log-likelihood it gives the
float32 tokens with float32's. Also: how many whole greedy answers come out identical when
each model decodes on its own. Prints one JSON object.

    .venv/bin/python benchmarks/quantized_decoding.py --run runs/quickstart --task quickstart
"""

import argparse
import functools
import importlib
import json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default="runs/quickstart", help="a trained run directory")
    parser.add_argument("--task", default="quickstart", help="seqio task or mixture of the prompts")
    parser.add_argument("--module", default="tasks.quickstart", help="module registering the task")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--num_prompts", type=int, default=256)
    parser.add_argument("--prompt_len", type=int, default=32)
    parser.add_argument("--new_tokens", type=int, default=16)
    args = parser.parse_args()
    importlib.import_module(args.module)

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from flanjax.data.pipeline import task_prompts
    from flanjax.decode import SamplingConfig, decoder_prompt, generate
    from flanjax.models.quantize import quantize
    from flanjax.models.transformer import KVCache
    from flanjax.rundir.files import restore
    from flanjax.sharding import MeshConfig, Partitioner, make_mesh

    partitioner = Partitioner(make_mesh(MeshConfig(data=1), devices=jax.devices()[:1]))
    graphdef, state, config = restore(args.run, partitioner)
    prompts, _, vocabulary = task_prompts(args.task, args.split, args.num_prompts)
    ids = [decoder_prompt(vocabulary.encode(p), args.prompt_len) for p in prompts]
    tokens = np.zeros((len(ids), args.prompt_len), np.int32)
    for i, row in enumerate(ids):
        tokens[i, : len(row)] = row
    lengths = np.array([len(r) for r in ids], np.int32)

    def decode(mode):
        out = generate(graphdef, state, jnp.asarray(tokens), jnp.asarray(lengths), eos_id=vocabulary.eos_id,
                       config=SamplingConfig(max_new_tokens=args.new_tokens, quantize=mode))  # fmt: skip
        return np.asarray(out.tokens), np.asarray(out.lengths)

    reference, counts = decode("none")
    # Rows: prompt, then float32's answer; column j predicts the token at j + 1.
    rows = np.zeros((len(ids), args.prompt_len + args.new_tokens), np.int32)
    scored = np.zeros_like(rows, bool)
    for i, (n, m) in enumerate(zip(lengths, counts)):
        rows[i, :n], rows[i, n : n + m] = tokens[i, :n], reference[i, :m]
        scored[i, n - 1 : n + m - 1] = True
    segments = (np.arange(rows.shape[1])[None] < (lengths + counts)[:, None]).astype(np.int32)

    @functools.partial(jax.jit, static_argnames="mode")
    def log_probs(state, mode):  # a fresh model per trace: `quantize` swaps its modules in place
        # Through the KV cache, int8 for the quantised modes, as the decoder reads it.
        cache = KVCache.empty(config, rows.shape[0], rows.shape[1], quantized=mode != "none")
        logits, _ = quantize(nnx.merge(graphdef, state), mode)(jnp.asarray(rows), None, jnp.asarray(segments), cache=cache)
        return jax.nn.log_softmax(logits.astype(jnp.float32))

    base = np.asarray(log_probs(state, "none"))
    targets = np.concatenate([rows[:, 1:], rows[:, :1]], axis=1)[..., None]
    result = {"benchmark": "quantized_decoding", "run": args.run, "task": args.task, "prompts": len(ids),
              "params": config.num_params(), "generated_tokens": int(scored.sum())}  # fmt: skip
    for mode in ("int8", "int8_dynamic"):
        lp = np.asarray(log_probs(state, mode))
        agree = (lp.argmax(-1) == base.argmax(-1))[scored].mean()
        drift = np.abs(np.take_along_axis(lp, targets, -1) - np.take_along_axis(base, targets, -1))[..., 0][scored]
        own, own_counts = decode(mode)
        same = [(a[:m] == b[:m]).all() and m == k for a, b, m, k in zip(own, reference, own_counts, counts)]
        result[mode] = {"greedy_agreement": float(agree), "mean_abs_logprob_drift": float(drift.mean()),
                        "max_abs_logprob_drift": float(drift.max()), "identical_answers": float(np.mean(same))}  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
