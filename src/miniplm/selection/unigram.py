"""The model-free baseline: how typical an instance's tokens are of its own domain.

Key of an instance = the mean log-probability of its scored tokens (the loss mask of `core.tokens`) under
an add-one unigram model of its domain, fitted on the pool's instances of that domain: what a user can rank
by with no model at all. Two streaming passes over the pool (counts, then keys), so memory holds one
domains x vocabulary table, not the pool.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from miniplm.core.tokens import masked_id_array, scored_targets
from miniplm.data.shards import PackedCorpus

CHUNK = 4096  # instances read per step


def unigram_keys(corpus: PackedCorpus, split: str, n: int, domain_codes: np.ndarray, domains: int,
                 out: Path) -> tuple[np.ndarray, dict]:
    """(keys as an on-disk array of the first `n` instances, facts for the manifest)."""
    tokenizer = corpus.load_tokenizer()
    masked = masked_id_array(corpus.eos_id, tokenizer)
    vocab = len(tokenizer)
    table = corpus.split(split)

    def targets(start: int, stop: int):
        for i in range(start, stop):
            yield i, scored_targets(table[i], masked)[1]

    counts = np.ones((domains, vocab))  # add-one
    for start in range(0, n, CHUNK):
        for i, t in targets(start, min(start + CHUNK, n)):
            counts[domain_codes[i]] += np.bincount(t, minlength=vocab)
    fit_tokens = int(counts.sum() - counts.size)
    logp = np.log(counts / counts.sum(axis=1, keepdims=True))
    keys = np.lib.format.open_memmap(out, mode="w+", dtype=np.float64, shape=(n,))
    for start in range(0, n, CHUNK):
        for i, t in targets(start, min(start + CHUNK, n)):
            keys[i] = logp[domain_codes[i], t].mean() if len(t) else np.nan
    return keys, {"smoothing": "add-one", "per": "domain", "fit_tokens": fit_tokens, "vocab": vocab}
