"""Scoring throughput: a naive loop, a reference-style padded batch, and miniplm, on the same instances.

    .venv/bin/python bench/score.py --corpus out/corpus --model smollm2 --instances 32

Prints a markdown table of tokens/s for
  (i)   naive: one document per forward, `model(input_ids, labels=...)` (HF's own loss), over the
        documents (and document pieces) the instances are made of; in plain fp32, as a user would call
        it, and in the same autocast precision as the others;
  (ii)  padded: batches of 16 in stored order padded to their longest, full logits, fp32 cross-entropy
        over the whole vocabulary (the reference implementation's shape);
  (iii) miniplm: LogProbScorer on length-sorted token-budget batches, chunked output layer, compiled
        layers (as `miniplm score` runs it; `--eager` without torch.compile);
and the machine's matmul throughput at the model's shapes, the tokens/s bound it implies, and miniplm's
fraction of that bound. All use the same thread count and instances, and (but for plain (i)) precision.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from flops import forward_flops_per_token, linear_shapes, mfu_line

from miniplm.core.allocator import keep_freed_memory
from miniplm.core.models import load_causal_lm, resolve_precision
from miniplm.data.shards import PackedCorpus
from miniplm.scoring.plan import plan_batches, plan_parts
from miniplm.scoring.scorer import LogProbScorer


def autocast(dtype, device):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else torch.autocast(device.type, enabled=False)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def documents(instances, eos):
    """The instances cut after each EOS: the documents (or document pieces) they are made of."""
    pieces = []
    for x in instances:
        ends = [i + 1 for i in np.flatnonzero(x == eos)]
        pieces += [x[a:b] for a, b in zip([0, *ends], [*ends, len(x)]) if b - a > 1]
    return pieces


@torch.inference_mode()
def naive(model, instances, eos, dtype, device):
    for x in documents(instances, eos):
        ids = torch.from_numpy(x.astype(np.int64))[None].to(device)
        with autocast(dtype, device):
            model(input_ids=ids, labels=ids).loss.item()


@torch.inference_mode()
def padded(model, instances, eos, dtype, device, batch=16):
    for start in range(0, len(instances), batch):
        chunk = instances[start : start + batch]
        width = max(len(x) for x in chunk)
        ids = torch.full((len(chunk), width), eos, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, x in enumerate(chunk):
            ids[i, : len(x)] = torch.from_numpy(x.astype(np.int64))
            mask[i, : len(x)] = 1
        ids, mask = ids.to(device), mask.to(device)
        with autocast(dtype, device):
            logits = model(input_ids=ids, attention_mask=mask).logits
        loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                               reduction="none").view(len(chunk), -1)
        keep = mask[:, 1:].bool() & (ids[:, :-1] != eos)
        (loss * keep).sum(1).tolist()


def miniplm(scorer, instances, batch_tokens):
    lengths = np.array([len(x) for x in instances])
    for part in plan_parts(lengths, 1 << 30):
        for batch in plan_batches(part, lengths, batch_tokens):
            scorer.score([instances[i] for i in batch])


def matmul_bound(model, dtype, device, tokens: int) -> float:
    """Measured matmul FLOP/s at the model's linear-layer shapes, each weighted by how often it occurs."""
    mm_dtype = dtype or torch.float32
    total_flops = total_time = 0.0
    for (i, o), n in linear_shapes(model).items():
        a = torch.randn(tokens, i, dtype=mm_dtype, device=device)
        b = torch.randn(i, o, dtype=mm_dtype, device=device)
        a @ b  # warm-up
        seconds = timed(lambda a=a, b=b: [a @ b for _ in range(3)]) / 3
        total_flops += 2 * tokens * i * o * n
        total_time += seconds * n
    return total_flops / total_time


def main() -> None:
    keep_freed_memory()  # as the CLI does
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default="out/corpus")
    parser.add_argument("--split", default="train")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--instances", type=int, default=32)
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--batch-tokens", type=int, default=16384)
    parser.add_argument("--head-chunk", type=int, default=None, help="positions per output-layer chunk "
                        "(default: miniplm's, 256 on CPU and 4096 on GPU)")
    parser.add_argument("--skip-naive", action="store_true", help="leave out (i), the slowest")
    parser.add_argument("--eager", action="store_true",
                        help="miniplm without torch.compile (`miniplm score --compile false`)")
    parser.add_argument("--profile", action="store_true",
                        help="also print torch.profiler's top operators over miniplm's pass")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    corpus = PackedCorpus(args.corpus)
    split = corpus.split(args.split)
    # a spread of lengths, as the corpus has: every k-th instance rather than the first n
    step = max(1, len(split) // args.instances)
    instances = [split[i] for i in range(0, step * args.instances, step)][: args.instances]
    tokens = sum(len(x) for x in instances)
    model = load_causal_lm(args.model, device=device)
    dtype = resolve_precision(args.precision, device)
    results = {}
    if not args.skip_naive:
        results["(i) naive, one document per forward, fp32 (plain usage)"] = timed(
            lambda: naive(model, instances, corpus.eos_id, None, device))
        if dtype is not None:
            results[f"(i) naive, one document per forward, {dtype} autocast"] = timed(
                lambda: naive(model, instances, corpus.eos_id, dtype, device))
    results["(ii) padded batch of 16, full logits"] = timed(
        lambda: padded(model, instances, corpus.eos_id, dtype, device))
    # after the baselines: compiling changes the model's layers in place
    start = time.perf_counter()
    scorer = LogProbScorer(model, {corpus.eos_id}, dtype, args.head_chunk, log=print, compile=not args.eager)
    miniplm(scorer, instances[:2], args.batch_tokens)  # warm-up
    print(f"miniplm set-up and warm-up (compilation included): {time.perf_counter() - start:.1f} s")
    label = "(iii) miniplm" + (", eager" if args.eager else "")
    results[label] = timed(lambda: miniplm(scorer, instances, args.batch_tokens))
    # the bound at a batch's token count (on a CPU at most 4,096 rows: its rate is flat past that, and it saves time)
    flops = matmul_bound(model, dtype, device, tokens=args.batch_tokens if device.type == "cuda" else
                         min(args.batch_tokens, 4096))
    per_token = forward_flops_per_token(model, mean_context=float(np.mean([len(x) for x in instances])))
    bound = flops / per_token
    speed = {k: tokens / v for k, v in results.items()}
    ours = list(speed.values())[-1]

    if args.profile:
        from torch.profiler import profile

        with profile() as prof:
            miniplm(scorer, instances, args.batch_tokens)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))
    n_docs = len(documents(instances, corpus.eos_id))
    print(f"model {args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M), "
          f"{len(instances)} instances, {tokens:,} tokens (mean {tokens / len(instances):.0f}), {n_docs} documents "
          f"or pieces, device {device}, threads {torch.get_num_threads()}, autocast {dtype}")
    print("| method | tokens/s | miniplm speed-up |")
    print("|---|---|---|")
    for name, value in speed.items():
        print(f"| {name} | {value:,.0f} | {ours / value:.2f}x |")
    print(f"| matmul bound ({flops / 1e9:,.0f} GFLOP/s at the model's shapes, {per_token / 1e6:.0f} MFLOP/token) | "
          f"{bound:,.0f} | miniplm at {ours / bound:.0%} of it |")
    line = mfu_line(ours * per_token)
    if line:
        print(line)

if __name__ == "__main__":
    main()
