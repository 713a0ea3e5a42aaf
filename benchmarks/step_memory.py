"""Compile time and per-device memory of a model's training step, per layer layout and rematerialisation policy.

Layouts: "scanned" (the layers stacked and run by one scan) and "unrolled" (each layer its own
code). Compiles (never runs: nothing is allocated) the training step -- forward, backward, AdamW --
ahead of time on simulated CPU devices sharded `fsdp`-ways, at per-device batches of 1 and 2
sequences, and reads XLA's memory report. Memory grows linearly with the batch, so the two
points give the largest per-device batch that fits `--device_gib` (95 GiB: a TPU v5p chip),
an estimate. Prints one JSON object.

    .venv/bin/python benchmarks/step_memory.py --model=llama_7b --seq_len=2048 --fsdp=8
"""

import argparse
import os
import sys


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama_7b", help="a config in configs/models")
    parser.add_argument("--seq_len", type=int, default=2048)
    parser.add_argument("--fsdp", type=int, default=8, help="simulated devices, all on the fsdp axis")
    parser.add_argument("--remat", default="none,save_dots,full", help="policies to compare")
    parser.add_argument("--layouts", default="scanned,unrolled", help="layer layouts to compare")
    parser.add_argument("--dtype", default="bfloat16", help="compute dtype (parameters stay float32)")
    parser.add_argument("--device_gib", type=float, default=95.0)
    args = parser.parse_args()
    # Before JAX starts: the simulated devices.
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={args.fsdp}"

    import dataclasses
    import json
    import time

    import jax
    import optax

    from flanjax.benchmark import synthetic_lm_batch
    from flanjax.cli import model_config
    from flanjax.sharding import MeshConfig, Partitioner
    from flanjax.train.losses import lm_loss
    from flanjax.train.steps import lm_init, make_train_step
    from flanjax.train.trainer import sharded_step

    partitioner = Partitioner.from_config(MeshConfig(data=1, fsdp=args.fsdp))
    base = dataclasses.replace(model_config(args.model, []), dtype=args.dtype)

    def compile_step(layout: str, remat: str, per_device: int) -> dict:
        config = dataclasses.replace(base, remat=remat, scan_layers=layout == "scanned")
        graphdef, abstract = partitioner.abstract_state(lm_init(config, optax.adamw(1e-4)))
        batch = synthetic_lm_batch(per_device * args.fsdp, args.seq_len, 8)  # shapes only
        spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=partitioner.batch_sharding(v.ndim)) for k, v in batch.items()}
        start = time.perf_counter()
        with partitioner.activate():
            memory = sharded_step(make_train_step(graphdef, lm_loss()), abstract, spec).lower(abstract, spec).compile().memory_analysis()
        total = memory.argument_size_in_bytes + memory.temp_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
        return {"compile_s": time.perf_counter() - start, "temp_gib": memory.temp_size_in_bytes / 2**30,
                "argument_gib": memory.argument_size_in_bytes / 2**30, "total_gib": total / 2**30}  # fmt: skip

    results: dict = {}
    for layout in args.layouts.split(","):
        for remat in args.remat.split(","):
            one, two = compile_step(layout, remat, 1), compile_step(layout, remat, 2)
            per_sequence = two["total_gib"] - one["total_gib"]
            fits = int((args.device_gib - (one["total_gib"] - per_sequence)) // per_sequence) if per_sequence > 0 else None
            results.setdefault(layout, {})[remat] = {"batch_1": one, "batch_2": two, "gib_per_sequence": per_sequence, "max_batch_per_device": fits}
            print(f"{layout} {remat}: {json.dumps(results[layout][remat])}", file=sys.stderr, flush=True)
    print(json.dumps({
        "benchmark": "step_memory", "model": args.model, "params": base.num_params(), "seq_len": args.seq_len,
        "dtype": args.dtype, "mesh": {"fsdp": args.fsdp}, "device_gib": args.device_gib, "layouts": results,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
