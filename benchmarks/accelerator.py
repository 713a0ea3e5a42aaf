"""The accelerator benchmark: a model's bfloat16 training step with the backend's best attention
kernel, greedy decoding and a PPO iteration, with MFU against the chip's peak. One JSON object
on the last line.

    make bench-accelerator                     # on a GPU or TPU host: llama_1b, 2,048 tokens
    .venv/bin/python benchmarks/accelerator.py --model=tiny --seq_len=64 --batch_size=4

Attention: cuDNN's fused flash attention on NVIDIA GPUs (`TransformerConfig.attention =
"cudnn"`), XLA's elsewhere (TPU splash attention is not wired in yet). On a CPU the same
script runs with XLA attention and MFU against a measured matmul peak, and without a
`--model` it falls back to bench_27m at short sequences, so that it finishes in minutes.
"""

import argparse
import dataclasses
import json
import sys


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="a config in configs/models (default: llama_1b; bench_27m on CPU)")
    parser.add_argument("--batch_size", type=int, default=None, help="training sequences per step (default: 8 per device)")
    parser.add_argument("--seq_len", type=int, default=None, help="training tokens per sequence (default: 2048; 256 on CPU)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--prompt_len", type=int, default=128, help="decoding and PPO")
    parser.add_argument("--new_tokens", type=int, default=128, help="decoding and PPO")
    parser.add_argument("--decode_batch", type=int, default=32)
    parser.add_argument("--ppo_batch", type=int, default=16)
    parser.add_argument("--skip", default="", help="comma-separated parts to leave out: train, decode, ppo")
    args = parser.parse_args()

    import jax

    from flanjax import benchmark
    from flanjax.cli import model_config
    from flanjax.sharding import MeshConfig

    on_cpu = jax.default_backend() == "cpu"
    name = args.model or ("bench_27m" if on_cpu else "llama_1b")
    if on_cpu and args.model is None:
        print("No accelerator: bench_27m at 256 tokens on CPU (XLA attention, MFU against a measured matmul).", file=sys.stderr)
    attention = "cudnn" if jax.default_backend() == "gpu" else "xla"
    config = dataclasses.replace(model_config(name, []), dtype="bfloat16", attention=attention)
    mesh = MeshConfig(data=1, fsdp=-1)  # every device on the fsdp axis; one device: no difference
    skip = set(filter(None, args.skip.split(",")))
    result = {"benchmark": "accelerator", "model": name, "backend": jax.default_backend(), "attention": attention,
              "device_kind": jax.devices()[0].device_kind, "devices": jax.device_count()}  # fmt: skip
    if "train" not in skip:
        batch = args.batch_size or 8 * jax.device_count()
        seq_len = args.seq_len or (256 if on_cpu else 2048)
        result["train"] = benchmark.bench_train(config, model_name=name, batch_size=batch, seq_len=seq_len, steps=args.steps, warmup=2, mesh=mesh)
        result["mfu"] = result["train"]["mfu"]
        print(f"train: {json.dumps(result['train'])}", file=sys.stderr, flush=True)
    shape = dict(prompt_len=args.prompt_len, new_tokens=args.new_tokens)
    if "decode" not in skip:
        result["decode"] = benchmark.bench_decode(config, model_name=name, batch_size=args.decode_batch, mesh=mesh, **shape)
        print(f"decode: {json.dumps(result['decode'])}", file=sys.stderr, flush=True)
    if "ppo" not in skip:
        result["ppo"] = benchmark.bench_ppo(config, model_name=name, batch_size=args.ppo_batch, iterations=1, mesh=mesh, **shape)
        print(f"ppo: {json.dumps(result['ppo'])}", file=sys.stderr, flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
