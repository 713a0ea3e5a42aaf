"""Loading a ~1B-parameter LLaMA-shaped Hugging Face checkpoint onto 8 simulated devices.

    python benchmarks/hf_load.py                                  # TinyLlama-1.1B shape, bfloat16, fsdp=8
    python benchmarks/hf_load.py --shape llama3_1b                # LLaMA-3.2-1B shape (tied, llama3 RoPE)
    python benchmarks/hf_load.py --dtype float32 --mesh fsdp=4,tensor=2
    python benchmarks/hf_load.py --dir /tmp/ckpt --keep           # keep the checkpoint; later: --reuse

Writes a random checkpoint with the exact Hugging Face LLaMA tensor names and shapes
(config.json from `transformers.LlamaConfig`, safetensors shards of `--shard_gb` plus
model.safetensors.index.json, as `save_pretrained` lays them out), one shard in memory at a
time (safetensors.numpy.save_file). Then a fresh child
process (8 CPU devices via --xla_force_host_platform_device_count; XLA's memory-optimised CPU
scheduler, see NO_HOISTING) imports flanjax, calls `flanjax.models.hf.load_model` onto the
mesh, waits for the arrays and runs one tiny jitted forward pass (8 tokens for each
data-parallel shard: 8 x 8 on data=1, fsdp=8).

Prints one JSON line: shape, params, checkpoint_bytes (the .safetensors files), dtype, mesh,
devices, gen_s, gen_peak_rss_bytes (the generating parent), load_s, forward_compile_s,
forward_s, peak_rss_bytes (the child's ru_maxrss once the load is done, before the forward
pass), peak_rss_with_forward_bytes, baseline_rss_bytes (after imports, CPU client up),
param_bytes, peak_rss_over_checkpoint, passed (that ratio < 1.3), the sharding of one large
kernel and /proc/self/status marks. `--trace_rss` logs the child's RSS after every tensor
read to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

MAX_RATIO = 1.3
# XLA's default CPU scheduler (concurrency-optimised) hoists every layer's all-gather, already
# converted to float32, to the start of the forward pass: each of the 8 simulated devices would
# hold the whole model in float32 (4.8 GB of temporaries per device for TinyLlama, ~40 GB in
# all). The memory-optimised one gathers layer by layer (~0.3 GB per device). Only compiled
# programs see it (the load compiles nothing); per-compile compiler_options do not reach it.
NO_HOISTING = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
CHUNK = 1 << 23  # elements generated and written per step

SHAPES = {
    # TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T
    "tinyllama": dict(
        vocab_size=32000, hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
        intermediate_size=5632, max_position_embeddings=2048, rope_theta=10000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    ),
    # meta-llama/Llama-3.2-1B
    "llama3_1b": dict(
        vocab_size=128256, hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
        head_dim=64, intermediate_size=8192, max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
        rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192),
        tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128001,
    ),
}  # fmt: skip

ST_DTYPES = {"bfloat16": "BF16", "float32": "F32"}  # safetensors header names


def rss_status() -> dict[str, int]:
    """VmRSS and VmHWM (peak) of this process from /proc/self/status, in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(rest.split()[0]) * 1024
    return out


def maxrss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def parse_mesh(text: str) -> dict[str, int]:
    sizes = {}
    for part in filter(None, text.replace(" ", "").split(",")):
        name, _, value = part.partition("=")
        if name not in ("data", "fsdp", "tensor") or not value:
            raise SystemExit(f"--mesh {text!r}: expected comma-separated data=N, fsdp=N, tensor=N")
        sizes[name] = int(value)
    return sizes


# --- generating the checkpoint ----------------------------------------------------------------


def hf_tensors(shape: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of a Hugging Face LlamaForCausalLM, in state-dict order."""
    d, v, ff = shape["hidden_size"], shape["vocab_size"], shape["intermediate_size"]
    n, k = shape["num_attention_heads"], shape["num_key_value_heads"]
    h = shape.get("head_dim") or d // n
    out = [("model.embed_tokens.weight", (v, d))]
    for i in range(shape["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [
            (p + "self_attn.q_proj.weight", (n * h, d)), (p + "self_attn.k_proj.weight", (k * h, d)),
            (p + "self_attn.v_proj.weight", (k * h, d)), (p + "self_attn.o_proj.weight", (d, n * h)),
            (p + "mlp.gate_proj.weight", (ff, d)), (p + "mlp.up_proj.weight", (ff, d)), (p + "mlp.down_proj.weight", (d, ff)),
            (p + "input_layernorm.weight", (d,)), (p + "post_attention_layernorm.weight", (d,)),
        ]  # fmt: skip
    out.append(("model.norm.weight", (d,)))
    if not shape["tie_word_embeddings"]:
        out.append(("lm_head.weight", (v, d)))
    return out


def write_config(directory: str, shape: dict, dtype: str) -> None:
    from transformers import LlamaConfig

    config = LlamaConfig(**shape, architectures=["LlamaForCausalLM"], hidden_act="silu", dtype=dtype)
    config.to_json_file(os.path.join(directory, "config.json"))
    back = LlamaConfig.from_pretrained(directory).to_dict()  # transformers reads it back as written
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size", "tie_word_embeddings"):
        assert back[key] == shape[key], (key, back[key], shape[key])


def write_shard(file: str, tensors: list[tuple[str, tuple[int, ...]]], dtype: str, rng: np.random.Generator) -> int:
    """One safetensors file (safetensors.numpy.save_file: this process holds one shard, never the
    loading process): norms are ones, everything else normal * 0.02 as Hugging Face initialises LLaMA."""
    import ml_dtypes
    from safetensors.numpy import save_file

    np_dtype = np.dtype(ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32)
    arrays = {}
    for name, shp in tensors:
        if name.endswith("norm.weight"):
            arrays[name] = np.ones(shp, np_dtype)
            continue
        values = np.empty(int(np.prod(shp)), np_dtype)
        for start in range(0, values.size, CHUNK):  # float32 draws in chunks, not the whole tensor
            values[start : start + CHUNK] = rng.standard_normal(min(CHUNK, values.size - start), dtype=np.float32) * 0.02
        arrays[name] = values.reshape(shp)
    save_file(arrays, file, metadata={"format": "pt"})
    return sum(a.nbytes for a in arrays.values())


def generate(directory: str, shape: dict, dtype: str, shard_bytes: int, seed: int = 0) -> None:
    os.makedirs(directory, exist_ok=True)
    write_config(directory, shape, dtype)
    itemsize = 2 if dtype == "bfloat16" else 4
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    filled = 0
    for name, shp in hf_tensors(shape):  # as save_pretrained: a new shard when the next tensor would overflow
        size = int(np.prod(shp)) * itemsize
        if groups[-1] and filled + size > shard_bytes:
            groups.append([])
            filled = 0
        groups[-1].append((name, shp))
        filled += size
    rng = np.random.default_rng(seed)
    if len(groups) == 1:
        write_shard(os.path.join(directory, "model.safetensors"), groups[0], dtype, rng)
        return
    names = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    total = sum(write_shard(os.path.join(directory, f), g, dtype, rng) for f, g in zip(names, groups))
    weight_map = {t: f for f, g in zip(names, groups) for t, _ in g}
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def check_files(directory: str, shape: dict, dtype: str) -> None:
    """safetensors itself reads back every name, shape and dtype (headers only, no data)."""
    from safetensors import safe_open

    found = {}
    for file in sorted(os.listdir(directory)):
        if file.endswith(".safetensors"):
            with safe_open(os.path.join(directory, file), framework="numpy") as f:
                for name in f.keys():
                    s = f.get_slice(name)
                    found[name] = (tuple(s.get_shape()), s.get_dtype())
    expected = {n: (s, ST_DTYPES[dtype]) for n, s in hf_tensors(shape)}
    assert found == expected, sorted(set(found.items()) ^ set(expected.items()))[:4]


def checkpoint_bytes(directory: str) -> int:
    return sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory) if f.endswith(".safetensors"))


# --- loading (the child process) ----------------------------------------------------------------


def child(args: argparse.Namespace) -> None:
    import jax

    import flanjax.models.hf as hf
    import transformers  # noqa: F401  (read_config imports it: part of what a load needs)
    from flax import nnx
    from flanjax.sharding import MeshConfig, Partitioner

    devices = jax.devices()  # starts the CPU client with its 8 devices
    baseline = rss_status()["VmRSS"]
    marks = {"after_imports": rss_status()}

    if args.trace_rss:
        read = hf.SafetensorsReader.read

        def traced(self, name):
            value = read(self, name)
            s = rss_status()
            print(f"[rss] {name} {value.nbytes / 2**20:.0f}MiB rss={s['VmRSS'] / 2**30:.3f}G "
                  f"hwm={s['VmHWM'] / 2**30:.3f}G", file=sys.stderr, flush=True)  # fmt: skip
            return value

        hf.SafetensorsReader.read = traced

    partitioner = Partitioner.from_config(MeshConfig(**parse_mesh(args.mesh)))
    start = time.perf_counter()
    model = hf.load_model(args.dir, mesh=partitioner, dtype=args.dtype)
    params = nnx.state(model, nnx.Param)
    jax.block_until_ready(params)
    load_s = time.perf_counter() - start
    peak_load = maxrss_bytes()
    marks["after_load"] = rss_status()

    flat = {"/".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(params)}
    count = sum(int(np.prod(x.shape)) for x in flat.values())
    param_bytes = sum(x.nbytes for x in flat.values())
    kernel = flat["layers/0/mlp/gate/kernel"]
    shards = {tuple(s.data.shape) for s in kernel.addressable_shards}

    # The batch is split over data x fsdp, so it needs one row per data-parallel shard.
    batch = partitioner.data_parallel_size
    tokens = jax.numpy.asarray(np.random.default_rng(0).integers(0, model.config.vocab_size, (batch, 8)), jax.numpy.int32)
    graphdef, state = nnx.split(model)
    with partitioner.activate():
        start = time.perf_counter()
        forward = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t)[0]).lower(state, tokens).compile()
        compile_s = time.perf_counter() - start
        start = time.perf_counter()
        logits = jax.block_until_ready(forward(state, tokens))
        forward_s = time.perf_counter() - start
    assert logits.shape == (batch, 8, model.config.vocab_size), logits.shape
    assert bool(jax.numpy.isfinite(logits.astype(jax.numpy.float32)).all()), "non-finite logits"
    marks["after_forward"] = rss_status()

    print(json.dumps({
        "params": count, "param_bytes": param_bytes, "devices": len(devices), "mesh": dict(partitioner.mesh.shape),
        "load_s": load_s, "forward_compile_s": compile_s, "forward_s": forward_s, "forward_tokens": [batch, 8],
        "peak_rss_bytes": peak_load, "peak_rss_with_forward_bytes": maxrss_bytes(), "baseline_rss_bytes": baseline,
        "rss_marks": marks, "kernel": "layers/0/mlp/gate/kernel", "kernel_shape": list(kernel.shape),
        "kernel_spec": str(kernel.sharding.spec), "kernel_shard_shapes": sorted(map(list, shards)),
    }))  # fmt: skip


# --- the parent -------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tinyllama")
    parser.add_argument("--dtype", choices=sorted(ST_DTYPES), default="bfloat16", help="stored and loaded")
    parser.add_argument("--dir", default=None, help="where to write the checkpoint (default: a temp dir under /tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint afterwards")
    parser.add_argument("--reuse", action="store_true", help="load the checkpoint already in --dir (no generation)")
    parser.add_argument("--mesh", default="data=1,fsdp=8", help="e.g. fsdp=8, data=2,fsdp=4, fsdp=4,tensor=2")
    parser.add_argument("--devices", type=int, default=8, help="simulated CPU devices")
    parser.add_argument("--shard_gb", type=float, default=2.0, help="safetensors shard size (10^9 bytes)")
    parser.add_argument("--concurrent_scheduler", action="store_true",
                        help=f"child: XLA's default CPU scheduler (without {NO_HOISTING}): ~40 GB for TinyLlama")
    parser.add_argument("--trace_rss", action="store_true", help="child: RSS after every tensor read, on stderr")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    shape = SHAPES[args.shape]
    if args.reuse and not args.dir:
        raise SystemExit("--reuse needs --dir")
    directory = args.dir or tempfile.mkdtemp(prefix=f"hf_load_{args.shape}_", dir="/tmp")
    remove = not (args.keep or args.reuse)
    try:
        gen_s = gen_peak_rss = None
        if not args.reuse:
            start = time.perf_counter()
            generate(directory, shape, args.dtype, int(args.shard_gb * 1e9))
            gen_s = time.perf_counter() - start
            gen_peak_rss = maxrss_bytes()  # generating holds one shard at a time
        check_files(directory, shape, args.dtype)
        size = checkpoint_bytes(directory)
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        env["XLA_FLAGS"] = " ".join([env.get("XLA_FLAGS", ""), f"--xla_force_host_platform_device_count={args.devices}",
                                     *([] if args.concurrent_scheduler else [NO_HOISTING])]).strip()  # fmt: skip
        cmd = [sys.executable, os.path.abspath(__file__), "--child", f"--dir={directory}", f"--dtype={args.dtype}",
               f"--mesh={args.mesh}", *(["--trace_rss"] if args.trace_rss else [])]  # fmt: skip
        out = subprocess.run(cmd, env=env, check=True, stdout=subprocess.PIPE, text=True).stdout
        result = json.loads(out.strip().splitlines()[-1])
    finally:
        if remove:
            shutil.rmtree(directory, ignore_errors=True)
    expected = sum(int(np.prod(s)) for _, s in hf_tensors(shape))
    assert result["params"] == expected, (result["params"], expected)
    ratio = result["peak_rss_bytes"] / size
    print(json.dumps({
        "shape": args.shape, "params": result["params"], "checkpoint_bytes": size, "dtype": args.dtype,
        "mesh": result["mesh"], "devices": result["devices"], "gen_s": gen_s, "gen_peak_rss_bytes": gen_peak_rss, "load_s": result["load_s"],
        "forward_compile_s": result["forward_compile_s"], "forward_s": result["forward_s"], "forward_tokens": result["forward_tokens"],
        "peak_rss_bytes": result["peak_rss_bytes"], "peak_rss_with_forward_bytes": result["peak_rss_with_forward_bytes"],
        "baseline_rss_bytes": result["baseline_rss_bytes"], "param_bytes": result["param_bytes"],
        "peak_rss_over_checkpoint": ratio, "passed": ratio < MAX_RATIO,
        "kernel": result["kernel"], "kernel_shape": result["kernel_shape"], "kernel_spec": result["kernel_spec"],
        "kernel_shard_shapes": result["kernel_shard_shapes"], "rss_marks": result["rss_marks"],
    }))  # fmt: skip


if __name__ == "__main__":
    main()
