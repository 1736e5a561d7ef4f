"""Scoring speed compiled (`miniplm score --compile true`, the default) against eager, per model family.

    .venv/bin/python bench/compile.py --corpus out/demo/corpus --instances 27 --size mini

Builds a model of each family from its preset (random weights: speed and agreement do not need trained
ones) with the corpus tokenizer's vocabulary, scores the same instances (length-sorted token-budget
batches, as `miniplm score`) eagerly and compiled, and prints a markdown table: wall seconds including
compilation, tokens/s, how many graphs torch.compile built, and the largest per-instance difference of the
mean log-prob between the two.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch._dynamo.utils import counters
from transformers import AutoModelForCausalLM

from miniplm.core.allocator import keep_freed_memory
from miniplm.core.models import resolve_precision
from miniplm.core.tokens import masked_input_ids
from miniplm.data.shards import PackedCorpus
from miniplm.scoring.plan import plan_batches, plan_parts
from miniplm.scoring.scorer import LogProbScorer
from miniplm.training.presets import build_config


def score_all(model, corpus: PackedCorpus, instances, precision: str, compile: bool, batch_tokens: int):
    tokenizer = corpus.load_tokenizer()
    torch._dynamo.reset()
    counters.clear()
    start = time.perf_counter()
    scorer = LogProbScorer(model, masked_input_ids(corpus.eos_id, tokenizer),
                           resolve_precision(precision, torch.device("cpu")), log=print, compile=compile)
    lengths = np.array([len(x) for x in instances])
    sums, counts = np.zeros(len(instances)), np.zeros(len(instances), dtype=np.int64)
    for part in plan_parts(lengths, 1 << 62):
        for batch in plan_batches(part, lengths, batch_tokens):
            sums[batch], counts[batch] = scorer.score([instances[i] for i in batch])
    seconds = time.perf_counter() - start
    graphs = int(sum(counters["stats"].get(k, 0) for k in ("unique_graphs",)))
    return sums / np.maximum(counts, 1), seconds, int(counts.sum()), graphs


def main() -> None:
    keep_freed_memory()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default="out/corpus")
    parser.add_argument("--instances", type=int, default=27)
    parser.add_argument("--size", default="mini", help="preset size: tiny, mini, small, 104m, ...")
    parser.add_argument("--families", nargs="+", default=["llama", "gptneox", "mamba"])
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--batch-tokens", type=int, default=16384)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    corpus = PackedCorpus(args.corpus)
    split = corpus.split("train")
    rng = np.random.default_rng(args.seed)
    # instances cut to varied lengths: the shapes a real pool brings
    instances = [split[i][: int(rng.integers(16, len(split[i]) + 1))] for i in range(args.instances)]
    tokenizer = corpus.load_tokenizer()
    print(f"{args.instances} instances, {sum(len(x) for x in instances):,} tokens, precision {args.precision}, "
          f"{torch.get_num_threads()} threads\n")
    print("| family | parameters | eager s | eager tok/s | compiled s | compiled tok/s | graphs | max diff |")
    print("|---|---|---|---|---|---|---|---|")
    for family in args.families:
        config = build_config(f"{family}-{args.size}", len(tokenizer), corpus.manifest["max_len"] + 1,
                              corpus.eos_id, tokenizer.pad_token_id)
        torch.manual_seed(args.seed)
        model = AutoModelForCausalLM.from_config(config).eval()
        eager, eager_s, tokens, _ = score_all(model, corpus, instances, args.precision, False, args.batch_tokens)
        compiled, compiled_s, _, graphs = score_all(model, corpus, instances, args.precision, True,
                                                    args.batch_tokens)
        params = sum(p.numel() for p in model.parameters())
        print(f"| {family} | {params / 1e6:.1f}M | {eager_s:.1f} | {tokens / eager_s:,.0f} | {compiled_s:.1f} | "
              f"{tokens / compiled_s:,.0f} | {graphs} | {np.abs(eager - compiled).max():.1e} |", flush=True)


if __name__ == "__main__":
    main()
