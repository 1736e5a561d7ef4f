"""Scoring MFU on a fixed batch, per teacher shape: what miniplm's scorer reaches and what the shapes allow.

    python bench/mfu.py --shapes smollm2-135m,smollm2-1.7b,qwen1.5-1.8b --rows 64 --width 1024

For each teacher shape (built from its config with random weights: throughput depends on shapes, not on
weight values) and a fixed batch of `rows` x `width` random tokens, prints tokens/s and MFU of
  - LogProbScorer eager,
  - LogProbScorer as `miniplm score` runs it (the output layer's log-softmax and each decoder layer
    compiled, dynamic shapes; compile time printed),
and the ceiling: the time of the model's matmuls alone (every linear layer at its shape, attention's
scores and values through SDPA) with nothing else, the MFU the scorer would reach if all else were free.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from flops import forward_flops_per_token, linear_shapes, mfu_line
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from miniplm.scoring.scorer import LogProbScorer, default_head_chunk

SHAPES = {
    # SmolLM2-135M(-Instruct): the default teacher
    "smollm2-135m": lambda: LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                        num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                                        tie_word_embeddings=True, max_position_embeddings=8192),
    "smollm2-1.7b": lambda: LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                                        num_attention_heads=32, num_key_value_heads=32, vocab_size=49152,
                                        tie_word_embeddings=True, max_position_embeddings=8192),
    # the paper's teacher class (Qwen1.5-1.8B: Qwen2 architecture, 152k vocabulary)
    "qwen1.5-1.8b": lambda: Qwen2Config(hidden_size=2048, intermediate_size=5504, num_hidden_layers=24,
                                        num_attention_heads=16, num_key_value_heads=16, vocab_size=151936,
                                        tie_word_embeddings=False, max_position_embeddings=8192),
    # tiny, to try the script on a CPU
    "tiny": lambda: LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, vocab_size=1000, max_position_embeddings=1024),
}


def seconds_per_call(fn, device, repeats: int) -> float:
    fn()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


@torch.inference_mode()
def ceiling_seconds(model, dtype, device, rows: int, width: int, repeats: int) -> float:
    """Matmuls only: every linear layer at its shape for rows*width tokens, plus causal SDPA per layer."""
    tokens = rows * width
    total = 0.0
    for (i, o), n in linear_shapes(model).items():
        a = torch.randn(tokens, i, dtype=dtype, device=device)
        b = torch.randn(i, o, dtype=dtype, device=device)
        total += n * seconds_per_call(lambda a=a, b=b: a @ b, device, repeats)
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    q = torch.randn(rows, config.num_attention_heads, width, head_dim, dtype=dtype, device=device)
    total += config.num_hidden_layers * seconds_per_call(
        lambda: F.scaled_dot_product_attention(q, q, q, is_causal=True), device, repeats)
    return total


def bench_shape(name: str, args, device, dtype, head_chunk: int) -> None:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(SHAPES[name]()).to(device).eval()
    params = f"{sum(p.numel() for p in model.parameters()) / 1e6:,.0f}M"
    rng = np.random.default_rng(0)
    batch = [rng.integers(1, model.config.vocab_size, args.width + 1) for _ in range(args.rows)]
    per_token = forward_flops_per_token(model, mean_context=args.width)
    tokens = args.rows * args.width

    def row(variant: str, seconds: float) -> None:
        mfu = mfu_line(tokens / seconds * per_token) or ""
        mfu = mfu.split("= ")[-1] if "=" in mfu else "-"
        print(f"| {name} | {params} | {variant} | {tokens / seconds:,.0f} | {mfu} |", flush=True)

    for label, compile in [("eager", False), ("compiled (miniplm score's default)", True)]:
        start = time.perf_counter()
        scorer = LogProbScorer(model, {0}, dtype, head_chunk, log=print, compile=compile)
        scorer.score(batch)
        setup = f" ({time.perf_counter() - start:.0f} s to compile)" if compile else ""
        row(label + setup, seconds_per_call(lambda s=scorer: s.score(batch), device, args.batches))
    row("ceiling: its matmuls and attention alone", ceiling_seconds(model, dtype, device, args.rows, args.width, 3))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="smollm2-135m")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--batches", type=int, default=10, help="timed batches per variant")
    parser.add_argument("--head-chunk", type=int, default=None, help="default: miniplm's (4096 GPU, 256 CPU)")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    head_chunk = args.head_chunk or default_head_chunk(device)
    print(f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}, "
          f"batch {args.rows} x {args.width}, bf16 autocast, head chunk {head_chunk}")
    print("| teacher shape | params | variant | tokens/s | MFU |")
    print("|---|---|---|---|---|")
    for name in args.shapes.split(","):
        bench_shape(name, args, device, torch.bfloat16, head_chunk)
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
