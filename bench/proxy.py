"""Proxy scoring's frontier: how much of the exact top half a label fraction recovers, random vs active labels.

    .venv/bin/python bench/proxy.py --corpus out/repro_v2/corpus --teacher out/repro_v2/scores/teacher \
        --reference out/bench/reference-features

Needs a pool whose exact teacher scores are known (`--teacher`, a `miniplm score` run of the whole pool) and the
reference's scores of the same pool made with `--features true`. Each row runs the proxy's own label rounds
(`miniplm.scoring.proxy.active_labels`) with the exact scores standing in for the teacher's label jobs, so no
teacher runs here: a row's teacher time is its labelled tokens at the throughput the exact teacher run
measured. Offline time of a row = the reference pass with features (its manifest) + those teacher seconds + the
predictor's measured fitting time; exact scoring = the teacher's pass over the pool + the plain reference pass
(the reference-features run's time stands in for it: features add a mean and five quantiles per instance).

Columns: precision of the kept half (the share of the proxy's kept instances that the exact selection keeps;
equal to recall at equal sizes), Spearman of the predicted teacher scores on the unlabelled rows, and time.
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np

from miniplm.core.config import load_config
from miniplm.core.manifest import read_manifest
from miniplm.data.shards import PackedCorpus
from miniplm.scoring.proxy import ProxyConfig, active_labels, agreement, combined_r, kept, load_pool, quotas
from miniplm.scoring.score import read_scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", required=True)
    parser.add_argument("--teacher", required=True, help="exact teacher scores of the whole pool")
    parser.add_argument("--reference", required=True, help="the reference's scores made with --features true")
    parser.add_argument("--max-instances", type=int, default=None, help="the pool: the first N instances")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.4])
    parser.add_argument("--predictors", nargs="+", default=["ridge"], choices=["ridge", "boosting"])
    parser.add_argument("--features", nargs="+", default=["stats", "hidden"], choices=["stats", "hidden"],
                        help="stats: reference log-prob statistics, length and domain; hidden: also its hidden state")
    parser.add_argument("--domain-quota", default="none", choices=["none", "proportional"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[10])
    args = parser.parse_args()

    corpus = PackedCorpus(args.corpus)
    teacher_manifest, reference_manifest = read_manifest(args.teacher), read_manifest(args.reference)
    exact = read_scores(args.teacher)
    throughput = teacher_manifest["throughput"]["tokens_per_second"]
    base = load_config(ProxyConfig, None, {"corpus": args.corpus, "reference": args.reference,
                                           "max_instances": args.max_instances, "domain_quota": args.domain_quota,
                                           "progress": False})
    pools = {name: load_pool(dataclasses.replace(base, hidden=name == "hidden"), corpus) for name in args.features}
    first = next(iter(pools.values()))
    teacher = exact.column("logp_sum").to_numpy()[: first.n] / exact.column("n_scored").to_numpy()[: first.n]
    cut_quota = quotas(first, base.alpha, args.domain_quota == "proportional")
    truth = kept(teacher - first.reference, first, cut_quota)
    pool_tokens = int(first.tokens.sum())
    exact_seconds = pool_tokens / throughput + reference_manifest["wall_seconds"]
    print(f"pool: {first.n:,} instances, {pool_tokens:,} tokens; teacher {throughput:,.0f} tok/s (exact pass "
          f"{pool_tokens / throughput:,.0f} s), reference pass with features "
          f"{reference_manifest['wall_seconds']:.0f} s; exact scoring {exact_seconds:,.0f} s; {args.domain_quota} "
          f"quota, alpha {base.alpha}")
    print()
    print("| labels | strategy | predictor | features | precision of the kept half | Spearman (unlabelled) | "
          "predictor s | offline s | / exact |")
    print("|---|---|---|---|---|---|---|---|---|")
    for fraction in args.fractions:
        for strategy, first_fraction, rounds in (("random", 1.0, 0), ("active", 0.5, 4)):
            for predictor in args.predictors:
                for name, pool in pools.items():
                    precisions, spearmans, fits, offline = [], [], [], []
                    for seed in args.seeds:
                        config = dataclasses.replace(base, label_fraction=fraction, first_fraction=first_fraction,
                                                     rounds=rounds, predictor=predictor, seed=seed,
                                                     hidden=name == "hidden")
                        try:
                            labels, predicted, _, records = active_labels(
                                config, pool, lambda k, ids: teacher[ids], log=lambda m: None)
                        except ValueError as exc:  # a first sample too small for the predictor
                            print(f"| {fraction:.0%} | {strategy} | {predictor} | {name} | {exc} |")
                            break
                        mine = kept(combined_r(pool, labels, predicted), pool, cut_quota)
                        precisions.append((mine & truth).sum() / max(mine.sum(), 1))
                        spearmans.append(agreement(np.where(labels.labelled, np.nan, predicted), teacher)["spearman"])
                        fits.append(sum(r["fit_seconds"] for r in records))
                        offline.append(reference_manifest["wall_seconds"] + pool.tokens[labels.labelled].sum()
                                       / throughput + fits[-1])
                    if not precisions:
                        continue
                    spread = f" ± {np.std(precisions, ddof=1):.3f}" if len(precisions) > 1 else ""
                    print(f"| {fraction:.0%} | {strategy} | {predictor} | {name} | {np.mean(precisions):.3f}{spread} | "
                          f"{np.mean(spearmans):.3f} | {np.mean(fits):.1f} | {np.mean(offline):,.0f} | "
                          f"{np.mean(offline) / exact_seconds:.2f} |", flush=True)


if __name__ == "__main__":
    main()
