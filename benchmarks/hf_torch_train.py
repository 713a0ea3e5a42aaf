"""PyTorch baseline: training throughput of Hugging Face ``LlamaForCausalLM`` on CPU.

Builds the "bench_27m" LLaMA-style model locally from a ``LlamaConfig`` (no
download, float32, SDPA attention) and times full training steps -- forward,
``loss.backward()``, ``torch.optim.AdamW.step()``, ``zero_grad`` -- on random
token ids with ``labels=input_ids``. Reports the median step time over the
timed steps (after untimed warmup) as a single JSON object on stdout; all other
output goes to stderr. This is the baseline flanjax's JAX training benchmark is
compared with.

Run:
    .venv/bin/python benchmarks/hf_torch_train.py --batch_size=8 --seq_len=256
"""
import argparse
import json
import resource
import statistics
import sys
import time

import torch
import transformers
from hf_bench_27m import bench_27m


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=4, help="untimed steps (torch settles after ~4)")
    p.add_argument("--threads", type=int, default=None, help="default: torch's")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model = bench_27m(args.seq_len, args.seed)
    config = model.config
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1,
                            betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(args.seed)

    times = []
    for i in range(args.warmup + args.steps):
        ids = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len),
                            generator=gen)
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        timed = i >= args.warmup
        if timed:
            times.append(dt)
        print(f"step {i} {'timed' if timed else 'warmup'} loss={loss.item():.4f} "
              f"time={dt:.3f}s", file=sys.stderr)

    step = statistics.median(times)
    print(json.dumps({
        "framework": "torch",
        "model": "bench_27m",
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "threads": torch.get_num_threads(),
        "step_time_s": step,
        "tokens_per_s": args.batch_size * args.seq_len / step,
        "params": n_params,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "attn_implementation": model.config._attn_implementation,
    }))


if __name__ == "__main__":
    main()
