"""Exact top-alpha selection on synthetic score streams: time and peak memory against the stream length.

    .venv/bin/python bench/selection.py                 # 1e6, 1e7, 1e8 scores
    .venv/bin/python bench/selection.py --sizes 1e6 1e7

Each size runs in a fresh process (so peak RSS is that size's own) and streams chunks of 2^20 scores
generated from a seed, as the selection streams joined score arrays from disk: nothing of size N is held
in memory. Scores are rounded to 3 decimals, so ties are plentiful. For the smallest size the result is
checked against a full in-memory sort.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np

CHUNK = 1 << 20


def stream_of(n: int, seed: int):
    def stream():
        for start in range(0, n, CHUNK):
            stop = min(start + CHUNK, n)
            rng = np.random.default_rng([seed, start])
            yield (np.arange(start, stop, dtype=np.int64), np.round(rng.normal(size=stop - start), 3),
                   np.ones(stop - start, dtype=np.int64))
    return stream


def one(n: int, alpha: float) -> dict:
    from miniplm.selection.topk import exact_top

    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    cut = exact_top(stream_of(n, 0), int(alpha * n))
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = {"n": n, "seconds": seconds, "passes": cut.passes, "peak_rss_mb": peak / 1024,
              "growth_mb": (peak - baseline) / 1024, "kept": cut.selected_rows}
    if n <= 2_000_000:
        ids, keys, _ = (np.concatenate(x) for x in zip(*stream_of(n, 0)()))
        expected = np.lexsort((ids, -keys))[: int(alpha * n)]
        chosen = cut.selects(ids, keys)
        result["matches_full_sort"] = bool(chosen.sum() == len(expected) and chosen[expected].all())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", type=float, default=[1e6, 1e7, 1e8])
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.alpha)))
        return
    print("| scores | time (s) | ns/score/pass | passes | peak RSS (MB) | checked |")
    print("|---|---|---|---|---|---|")
    for size in args.sizes:
        out = subprocess.run([sys.executable, __file__, "--one", str(int(size)), "--alpha", str(args.alpha)],
                             capture_output=True, text=True, check=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        check = {True: "= full sort", False: "MISMATCH", None: "-"}[r.get("matches_full_sort")]
        print(f"| {r['n']:,} | {r['seconds']:.1f} | {1e9 * r['seconds'] / r['n'] / r['passes']:.0f} | "
              f"{r['passes']} | {r['peak_rss_mb']:.0f} | {check} |")


if __name__ == "__main__":
    main()
