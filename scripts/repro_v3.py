"""Reproduction v3's fixed inputs (docs/results/repro_v3.md), computed before any new arm is compared.

    .venv/bin/python scripts/repro_v3.py contamination out/v2_rerun/corpus results/repro_v3

`contamination`: each evaluation split's word 8-gram containment in the pool (the first 16,500 train
instances) and in D_ref, per domain, and `heldout-clean`: the positions (in evaluation order) of the
`heldout` instances whose containment in the pool is below 0.5 (an instance with no word 8-gram counts as
clean). Writes `contamination.json` into the results folder.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from miniplm.data.shards import PackedCorpus
from miniplm.evaluation.contamination import containment, instance_texts, ngram_set, summary

POOL, N, THRESHOLD = 16_500, 8, 0.5
SPLITS = {"heldout": None, "heldout_hq": None, "heldout_unseen": 1000}  # evaluated instances, as v2


def contamination(corpus_path: Path, results: Path) -> None:
    corpus = PackedCorpus(corpus_path)
    references = {"pool": ngram_set(instance_texts(corpus, "train", POOL), N),
                  "ref": ngram_set(instance_texts(corpus, "ref"), N)}
    out: dict = {"corpus_key": corpus.key, "n": N, "threshold": THRESHOLD, "pool_instances": POOL, "splits": {}}
    for split, count in SPLITS.items():
        texts = instance_texts(corpus, split, count)
        domains = corpus.split(split).table.column("domain").to_pylist()[: len(texts)]
        shares = {name: containment(texts, grams, N) for name, grams in references.items()}
        out["splits"][split] = {name: summary(s, domains, THRESHOLD) for name, s in shares.items()}
        if split == "heldout":
            pool = np.nan_to_num(shares["pool"], nan=0.0)
            out["heldout_clean"] = [int(i) for i in np.flatnonzero(pool < THRESHOLD)]
    results.mkdir(parents=True, exist_ok=True)
    (results / "contamination.json").write_text(json.dumps(out, indent=1) + "\n")
    clean = len(out["heldout_clean"])
    print(f"heldout-clean: {clean} of {out['splits']['heldout']['pool']['instances']} heldout instances")
    for split, by in out["splits"].items():
        for name, s in by.items():
            print(f"{split} in {name}: mean containment {s['mean']:.3f}, {s['at_or_above']} of {s['instances']} "
                  f"at or above {THRESHOLD}; " + ", ".join(f"{d} {v['at_or_above']}/{v['instances']}"
                                                           for d, v in s["domains"].items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("contamination", help="containment of the evaluation splits; the clean heldout subset")
    c.add_argument("corpus", type=Path, help="v2's prepared corpus (scripts/repro_v2_rerun.py rebuilds it)")
    c.add_argument("results", type=Path)
    args = parser.parse_args()
    contamination(args.corpus, args.results)


if __name__ == "__main__":
    main()
