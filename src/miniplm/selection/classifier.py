"""The classifier signal: how much an instance reads like a target set (DCLM's fastText filter, FineWeb-Edu's
classifier), with no language model at all.

A logistic regression on hashed word n-gram counts (scikit-learn's HashingVectorizer: no vocabulary to fit or
store) learns to tell the target's text (label 1) from a seeded random sample of the pool (label 0), as many
of each as the target has, up to `classifier_sample`. An instance's key is its log-odds of being target-like.
The target is a split of the corpus (D_ref, say) or files read as `miniplm prepare` reads them; never the
pool itself nor an evaluation split, whose text must stay unseen by anything that selects.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from miniplm.core.config import ConfigError
from miniplm.core.hashing import path_sha256
from miniplm.data.readers import Fields, InputSpec, expand_inputs, read_documents
from miniplm.data.shards import PackedCorpus, PackedSplit

BATCH = 2048  # instances decoded and scored at a time


def _sklearn():
    try:
        from sklearn.feature_extraction.text import HashingVectorizer
        from sklearn.linear_model import LogisticRegression
    except ImportError:
        raise ImportError("the classifier selector needs scikit-learn: pip install 'miniplm[classifier]'") from None
    return HashingVectorizer, LogisticRegression


def check_target(target: str | None, corpus: PackedCorpus, pool_split: str, evaluation: list[str]) -> dict:
    """Refuse a target the classifier may not learn from; return its identity for the stage key."""
    if not target:
        raise ConfigError("selector classifier needs --target: a split of the corpus (e.g. ref) or files")
    if target in corpus.split_names:
        if target == pool_split or target in evaluation or target.startswith("heldout"):
            raise ConfigError(f"target: {target!r} is {'the pool' if target == pool_split else 'an evaluation split'}"
                              f"; a classifier trained on it would select for the text it is judged on. Use a "
                              f"split held out of both (e.g. ref) or files")
        return {"split": target}
    files = expand_inputs([InputSpec(target)])
    return {"files": [{"path": f.path, "sha256": path_sha256(f.path)} for f in files]}


def _texts(split: PackedSplit, ids: np.ndarray, tokenizer) -> list[str]:
    return tokenizer.batch_decode([split[int(i)].tolist() for i in ids], skip_special_tokens=True)


def _target_texts(target: str, corpus: PackedCorpus, tokenizer, limit: int, seed: int) -> list[str]:
    if target in corpus.split_names:
        split = corpus.split(target)
        ids = np.arange(len(split))
        if len(ids) > limit:
            ids = np.sort(np.random.default_rng(seed).choice(len(ids), limit, replace=False))
        return _texts(split, ids, tokenizer)
    texts = []
    for doc in read_documents(expand_inputs([InputSpec(target)]), Fields()):
        if doc.text is not None:
            texts.append(doc.text)
            if len(texts) >= limit:
                break
    return texts


def classifier_keys(target: str, corpus: PackedCorpus, pool_split: str, n: int, out: Path, ngrams: int,
                    features: int, sample: int, seed: int, log) -> tuple[np.ndarray, dict]:
    """The log-odds of each of the pool's first `n` instances (an on-disk array), and the signal's facts."""
    HashingVectorizer, LogisticRegression = _sklearn()
    started = time.time()
    tokenizer = corpus.load_tokenizer()
    pool = corpus.split(pool_split)
    positives = _target_texts(target, corpus, tokenizer, sample, seed)
    if len(positives) < 2:
        raise ValueError(f"target {target!r} holds {len(positives)} documents; the classifier needs at least 2")
    rng = np.random.default_rng(seed)
    negative_ids = np.sort(rng.choice(n, min(len(positives), n), replace=False))
    negatives = _texts(pool, negative_ids, tokenizer)
    vectorizer = HashingVectorizer(ngram_range=(1, ngrams), n_features=features, alternate_sign=False)
    x = vectorizer.transform(positives + negatives)
    y = np.r_[np.ones(len(positives)), np.zeros(len(negatives))]
    # a seeded fifth held out, to say how well target and pool are told apart, then the fit on everything
    held = rng.random(len(y)) < 0.2
    accuracy = None
    if held.any() and (~held).any() and len(set(y[~held])) == 2:
        probe = LogisticRegression(max_iter=1000).fit(x[~held], y[~held])
        accuracy = float((probe.predict(x[held]) == y[held]).mean())
    model = LogisticRegression(max_iter=1000).fit(x, y)
    fitted = time.time()
    keys = np.lib.format.open_memmap(out, mode="w+", dtype=np.float64, shape=(n,))
    for start in range(0, n, BATCH):
        ids = np.arange(start, min(start + BATCH, n))
        keys[ids] = model.decision_function(vectorizer.transform(_texts(pool, ids, tokenizer)))
    keys.flush()
    facts = {"target": target, "target_documents": len(positives), "pool_negatives": len(negatives),
             "ngrams": ngrams, "features": features, "holdout_accuracy": accuracy,
             "fit_seconds": round(fitted - started, 2), "score_seconds": round(time.time() - fitted, 2)}
    log(f"classifier: target {target} ({len(positives):,} documents) against {len(negatives):,} pool instances"
        + (f", held-out accuracy {accuracy:.3f}" if accuracy is not None else "")
        + f"; fit {facts['fit_seconds']} s, pool scored in {facts['score_seconds']} s")
    return keys, facts
