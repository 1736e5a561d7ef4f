"""How much a bf16 score depends on the batch it is computed in: at another padded width, and at the same
padded width beside other rows (what `plan_batches` guarantees: only this one should be zero).

    .venv/bin/python bench/invariance.py --corpus /tmp/pfull --instances 12

Each instance is cut to a random length, scored alone (padded to its own width), then (a) in a batch
whose longest instance is longer (another width: kernels pick their blocking, and so their summation
order, by shape) and (b) in batches of 2-8 rows of its own padded width, at every place. Prints the
largest and mean difference per token of (a) and (b).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from miniplm.core.allocator import keep_freed_memory
from miniplm.core.models import load_causal_lm, resolve_precision
from miniplm.data.shards import PackedCorpus
from miniplm.scoring.plan import padded_width
from miniplm.scoring.scorer import LogProbScorer


def main() -> None:
    keep_freed_memory()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default="out/corpus")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--instances", type=int, default=12)
    parser.add_argument("--precision", default="bf16", choices=["auto", "fp32", "bf16", "fp16"])
    parser.add_argument("--eager", action="store_true", help="without torch.compile")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    corpus = PackedCorpus(args.corpus)
    split = corpus.split("train")
    rng = np.random.default_rng(0)
    pool = [split[int(i)] for i in rng.choice(len(split), size=args.instances + 8, replace=False)]
    longest = max(pool, key=len)
    dtype = resolve_precision(args.precision, device)
    scorer = LogProbScorer(load_causal_lm(args.model, device=device), {corpus.eos_id}, dtype, log=print,
                           compile=not args.eager)
    other_width, same_width = [], []
    for x in pool[: args.instances]:
        x = x[: int(rng.integers(16, len(x) + 1))]
        alone, n = (v[0] for v in scorer.score([x]))
        in_longer = scorer.score([x, longest])[0][0]
        other_width.append(abs(in_longer - alone) / n)
        # neighbours of the same padded width: the pool's instances cut to x's length
        neighbours = [y[: len(x)] for y in pool[args.instances:] if padded_width(len(y)) >= padded_width(len(x))]
        for rows in (2, 3, 8):
            batch = [x, *neighbours[: rows - 1]]
            for place in range(len(batch)):
                order = batch[1 : place + 1] + [x] + batch[place + 1 :]
                same_width.append(abs(scorer.score(order)[0][place] - alone) / n)
    print(f"model {args.model}, device {device}, autocast {dtype}, compiled {not args.eager}, "
          f"{args.instances} instances")
    print("| batch | max diff (nats/token) | mean diff |")
    print("|---|---|---|")
    for name, diffs in [("another width (beside a longer instance)", other_width),
                        ("same padded width, 2-8 rows, every place", same_width)]:
        print(f"| {name} | {max(diffs):.2e} | {np.mean(diffs):.2e} |")


if __name__ == "__main__":
    main()
