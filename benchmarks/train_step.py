"""`make bench`: flanjax's training step against Hugging Face transformers' PyTorch LLaMA.

Runs `flanjax bench train` and `benchmarks/hf_torch_train.py` one after the other, each in
its own process on the same CPU, on the bench_27m shape (batch 8 x 256 tokens by default),
and prints one JSON object: both results and flanjax's speed-up in tokens/s.
"""

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def run_json(cmd: list[str]) -> dict:
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    shape = [f"--batch_size={args.batch_size}", f"--seq_len={args.seq_len}", f"--steps={args.steps}"]
    flanjax = run_json([sys.executable, "-m", "flanjax.cli", "bench", "train", "--model=bench_27m", *shape])
    torch = run_json([sys.executable, os.path.join(HERE, "hf_torch_train.py"), *shape])
    print(json.dumps({
        "flanjax": flanjax,
        "torch": torch,
        "speedup_vs_torch": flanjax["tokens_per_s"] / torch["tokens_per_s"],
    }))


if __name__ == "__main__":
    main()
