"""The bench_27m model (configs/models/bench_27m.gin) as a Hugging Face PyTorch LLaMA.

Built locally from a `LlamaConfig` (no download), float32, SDPA attention: the PyTorch
baseline that flanjax's benchmarks are compared with.
"""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

ATTN_IMPL = "sdpa"


def bench_27m(max_len: int = 2048, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=8192, hidden_size=512, intermediate_size=1408,
        num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=8,
        max_position_embeddings=max(2048, max_len), rope_theta=10000.0,
        rms_norm_eps=1e-6, tie_word_embeddings=False, attention_dropout=0.0,
        attn_implementation=ATTN_IMPL)
    return LlamaForCausalLM(config).to(torch.float32)
