"""How much of a held-out instance the training data already holds: word n-gram containment.

An instance's containment in a reference set of texts is the share of its distinct word n-grams (words:
lowercased `\\w+` runs; n = 8 by default, as contamination studies of LM benchmarks use) that occur anywhere
in the reference. Near-duplicates on both sides of a document split (mailing-list quotes, boilerplate) give
high containment; a held-out loss averaged over such instances measures memorisation as much as learning.
n-grams are hashed with blake2b (stable across processes, unlike `hash`), 8 bytes each.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable

import numpy as np

from miniplm.data.shards import PackedCorpus

WORD = re.compile(r"\w+")


def word_ngrams(text: str, n: int = 8) -> set[int]:
    """The distinct word n-grams of `text`, hashed (empty when it has fewer than n words)."""
    words = WORD.findall(text.lower())
    return {int.from_bytes(hashlib.blake2b(" ".join(words[i:i + n]).encode(), digest_size=8).digest(), "little")
            for i in range(len(words) - n + 1)}


def ngram_set(texts: Iterable[str], n: int = 8) -> set[int]:
    out: set[int] = set()
    for text in texts:
        out |= word_ngrams(text, n)
    return out


def containment(texts: Iterable[str], reference: set[int], n: int = 8) -> np.ndarray:
    """Per text, the share of its distinct word n-grams found in `reference` (nan for a text with none)."""
    shares = []
    for text in texts:
        grams = word_ngrams(text, n)
        shares.append(len(grams & reference) / len(grams) if grams else np.nan)
    return np.array(shares, dtype=np.float64)


def instance_texts(corpus: PackedCorpus, split: str, count: int | None = None) -> list[str]:
    """The text of the first `count` instances of a split (all by default), special tokens dropped."""
    tokenizer, table = corpus.load_tokenizer(), corpus.split(split)
    n = len(table) if count is None else min(count, len(table))
    return [tokenizer.decode(np.asarray(table[i]).tolist(), skip_special_tokens=True) for i in range(n)]


def summary(shares: np.ndarray, domains: list[str], threshold: float = 0.5) -> dict:
    """Mean containment and the instances at or above `threshold`, overall and per domain."""
    domains_ = np.asarray(domains)

    def of(mask: np.ndarray) -> dict:
        values = shares[mask]
        return {"instances": int(mask.sum()), "mean": float(np.nanmean(values)) if np.isfinite(values).any() else None,
                "at_or_above": int((values >= threshold).sum())}

    return {"threshold": threshold, **of(np.ones(len(shares), dtype=bool)),
            "domains": {d: of(domains_ == d) for d in sorted(set(domains))}}
