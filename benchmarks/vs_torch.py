"""`make bench`: flanjax against Hugging Face transformers' PyTorch LLaMA, same shape, same CPU.

    python benchmarks/vs_torch.py train   # training step, bench_27m, batch 8 x 256 tokens
    python benchmarks/vs_torch.py decode  # greedy generation, batch 8, 128-token prompts, 128 new

Runs `flanjax bench WHAT` and the matching PyTorch script (hf_torch_train.py /
hf_torch_decode.py) one after the other, each in its own process, and prints one JSON
object: both results and flanjax's speed-up. Decoding runs flanjax once per `--quantize`
mode (float32, int8 weights, int8 weights and activations).
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
    parser.add_argument("what", choices=["train", "decode"])
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=256, help="train")
    parser.add_argument("--steps", type=int, default=10, help="train")
    parser.add_argument("--prompt_len", type=int, default=128, help="decode")
    parser.add_argument("--new_tokens", type=int, default=128, help="decode")
    parser.add_argument("--quantize", default="none,int8,int8_dynamic", help="decode: flanjax's modes to run")
    args = parser.parse_args()
    flanjax_bench = [sys.executable, "-m", "flanjax.cli", "bench", args.what, "--model=bench_27m"]
    if args.what == "train":
        shape = [f"--batch_size={args.batch_size}", f"--seq_len={args.seq_len}", f"--steps={args.steps}"]
        flanjax = run_json(flanjax_bench + shape)
        torch = run_json([sys.executable, os.path.join(HERE, "hf_torch_train.py"), *shape])
        print(json.dumps({"flanjax": flanjax, "torch": torch, "speedup_vs_torch": flanjax["tokens_per_s"] / torch["tokens_per_s"]}))
        return
    shape = [f"--batch_size={args.batch_size}", f"--prompt_len={args.prompt_len}", f"--new_tokens={args.new_tokens}"]
    flanjax = {mode: run_json(flanjax_bench + shape + [f"--quantize={mode}"]) for mode in args.quantize.split(",")}
    torch = run_json([sys.executable, os.path.join(HERE, "hf_torch_decode.py"), *shape])
    speedup = {mode: r["new_tokens_per_s"] / torch["new_tokens_per_s"] for mode, r in flanjax.items()}
    print(json.dumps({"flanjax": flanjax, "torch": torch, "speedup_vs_torch": speedup}))


if __name__ == "__main__":
    main()
