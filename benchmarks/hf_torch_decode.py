"""PyTorch baseline: greedy decoding with Hugging Face ``generate`` on CPU.

The bench_27m LLaMA (float32, SDPA, KV cache on) continues a batch of random prompts by
exactly ``--new_tokens`` tokens (``do_sample=False``, no EOS stop). Reports the median
wall time of ``generate`` over the timed repeats as one JSON object on stdout; all other
output goes to stderr. flanjax's ``flanjax bench decode`` is compared with it.

Run:
    .venv/bin/python benchmarks/hf_torch_decode.py --batch_size=8 --prompt_len=128 --new_tokens=128
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
    p.add_argument("--prompt_len", type=int, default=128)
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3, help="timed calls")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls")
    p.add_argument("--threads", type=int, default=None, help="default: torch's")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model = bench_27m(args.prompt_len + args.new_tokens, args.seed).eval()
    gen = torch.Generator().manual_seed(args.seed)
    prompts = torch.randint(1, model.config.vocab_size, (args.batch_size, args.prompt_len), generator=gen)
    kwargs = dict(
        max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
        use_cache=True, pad_token_id=0, attention_mask=torch.ones_like(prompts))

    times = []
    with torch.inference_mode():
        for i in range(args.warmup + args.repeats):
            t0 = time.perf_counter()
            out = model.generate(prompts, **kwargs)
            dt = time.perf_counter() - t0
            assert out.shape == (args.batch_size, args.prompt_len + args.new_tokens), out.shape
            if i >= args.warmup:
                times.append(dt)
            print(f"call {i} {'timed' if i >= args.warmup else 'warmup'} time={dt:.3f}s", file=sys.stderr)

    seconds = statistics.median(times)
    print(json.dumps({
        "framework": "torch",
        "model": "bench_27m",
        "batch_size": args.batch_size,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "threads": torch.get_num_threads(),
        "seconds": seconds,
        "new_tokens_per_s": args.batch_size * args.new_tokens / seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
    }))


if __name__ == "__main__":
    main()
