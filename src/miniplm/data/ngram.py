"""Count n-gram models of packed instances: the levels a trained LM must beat, and a student-free view of
what a selection's data is like.

Both models see exactly the positions every model is scored on (the loss mask of `core.tokens`).

    unigram   add-one smoothed token frequencies
    bigram    interpolated Kneser-Ney (Chen & Goodman 1998, one discount): for a context v seen c(v) times,
              p(w | v) = max(c(v,w) - d, 0) / c(v) + d N1+(v.) / c(v) * p_cont(w), and for an unseen v,
              p_cont(w); p_cont(w) = (max(N1+(.w) - d, 0) + d N1+(..>0) / V) / N1+(..), the continuation
              counts interpolated with the uniform distribution so that no token has probability 0.
              The discount d is chosen on a tenth of the fitting instances (every tenth one) held out from
              counting, on a grid, then the counts are taken over all of them: never on an evaluation split.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from miniplm.core.metrics import loss_summary, scored_bytes
from miniplm.core.tokens import masked_id_array, scored_targets, token_byte_lengths
from miniplm.data.shards import PackedCorpus

ORDERS = (1, 2)
DISCOUNTS = np.round(np.arange(0.05, 1.0, 0.05), 2)
TUNING_EVERY = 10  # every tenth fitting instance tunes the discount


def check_orders(orders: Sequence[int], where: str) -> None:
    bad = [o for o in orders if o not in ORDERS]
    if bad:
        raise ValueError(f"{where}: n-gram order {bad[0]} is not supported; use 1 (unigram) or 2 (bigram)")


def _pairs(instances: Sequence[np.ndarray], masked: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(contexts, targets, instance index) of every scored position of `instances`."""
    contexts, targets, owner = [], [], []
    for i, x in enumerate(instances):
        c, t = scored_targets(x, masked)
        contexts.append(c)
        targets.append(t)
        owner.append(np.full(len(t), i, dtype=np.int64))
    if not targets:
        return (np.zeros(0, dtype=np.int64),) * 3
    return np.concatenate(contexts), np.concatenate(targets), np.concatenate(owner)


class Unigram:
    order = 1

    def __init__(self, vocab_size: int, contexts: np.ndarray, targets: np.ndarray):
        counts = np.bincount(targets, minlength=vocab_size).astype(np.float64) + 1.0
        self.logp = np.log(counts / counts.sum())
        self.facts = {"smoothing": "add-one", "fit_tokens": int(len(targets))}

    def log_probs(self, contexts: np.ndarray, targets: np.ndarray) -> np.ndarray:
        return self.logp[targets]


class Bigram:
    order = 2

    def __init__(self, vocab_size: int, contexts: np.ndarray, targets: np.ndarray, discount: float):
        if not 0 < discount < 1:
            raise ValueError(f"discount must be in (0, 1), got {discount}")
        self.V, self.d = vocab_size, float(discount)
        keys, self.counts = np.unique(contexts * vocab_size + targets, return_counts=True)
        self.keys = keys
        v, w = keys // vocab_size, keys % vocab_size
        self.context_counts = np.bincount(v, weights=self.counts, minlength=vocab_size)
        self.followers = np.bincount(v, minlength=vocab_size)
        predecessors = np.bincount(w, minlength=vocab_size).astype(np.float64)
        distinct = max(len(keys), 1)
        seen = float((predecessors > 0).sum())
        self.p_cont = (np.maximum(predecessors - self.d, 0) + self.d * seen / vocab_size) / distinct
        if len(keys) == 0:
            self.p_cont = np.full(vocab_size, 1.0 / vocab_size)
        self.facts = {"smoothing": "interpolated Kneser-Ney", "discount": self.d, "fit_tokens": int(len(targets))}

    def log_probs(self, contexts: np.ndarray, targets: np.ndarray) -> np.ndarray:
        keys = contexts * self.V + targets
        pair = np.zeros(len(keys))
        if len(self.keys):
            at = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
            pair = np.where(self.keys[at] == keys, self.counts[at], 0)
        seen = self.context_counts[contexts]
        backoff = self.p_cont[targets]
        p = np.where(seen > 0, (np.maximum(pair - self.d, 0) + self.d * self.followers[contexts] * backoff)
                     / np.maximum(seen, 1), backoff)
        return np.log(p)


def fit(order: int, instances: Sequence[np.ndarray], vocab_size: int, masked: np.ndarray):
    """An n-gram model of `instances` (the bigram's discount tuned on every tenth of them, then refit on all)."""
    check_orders([order], "order")
    contexts, targets, owner = _pairs(instances, masked)
    if order == 1:
        return Unigram(vocab_size, contexts, targets)
    tuning = owner % TUNING_EVERY == TUNING_EVERY - 1
    if tuning.any() and (~tuning).any():
        losses = [-Bigram(vocab_size, contexts[~tuning], targets[~tuning], d)
                  .log_probs(contexts[tuning], targets[tuning]).mean() for d in DISCOUNTS]
        discount = float(DISCOUNTS[int(np.argmin(losses))])
    else:  # too few instances to hold any out: the closed-form estimate of Ney et al.
        _, counts = np.unique(contexts * vocab_size + targets, return_counts=True)
        n1, n2 = (counts == 1).sum(), (counts == 2).sum()
        discount = float(np.clip(n1 / max(n1 + 2 * n2, 1), DISCOUNTS[0], DISCOUNTS[-1]))
    return Bigram(vocab_size, contexts, targets, discount)


def instance_losses(model, instances: Sequence[np.ndarray], masked: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per instance: summed loss (nats) and scored positions, under `model`."""
    contexts, targets, owner = _pairs(instances, masked)
    nats = -model.log_probs(contexts, targets)
    return (np.bincount(owner, weights=nats, minlength=len(instances)),
            np.bincount(owner, minlength=len(instances)))


def heldout_level(model, instances: Sequence[np.ndarray], masked: np.ndarray, nbytes: np.ndarray) -> dict:
    """The loss summary of a fitted n-gram model on held-out instances (whose scored bytes are `nbytes`),
    with the model's own facts (smoothing, discount, tokens fitted on)."""
    return {**loss_summary(*instance_losses(model, instances, masked), nbytes), **model.facts}


NAMES = {1: "unigram", 2: "bigram"}


def diagnostic(corpus: PackedCorpus, split: str, fits: dict[str, np.ndarray], eval_splits: Sequence[str],
               max_instances: int | None = None) -> dict:
    """What a selection's data is like, before any student trains on it: for each named set of instance indices
    of `split` (say the pool and the kept half), the held-out loss on each of `eval_splits` of the unigram and
    bigram models fitted on that set. {eval split: {set: {unigram: summary, bigram: summary}}}."""
    tokenizer = corpus.load_tokenizer()
    masked = masked_id_array(corpus.eos_id, tokenizer)
    byte_lengths = token_byte_lengths(tokenizer, corpus.eos_id)
    source = corpus.split(split)
    models = {name: {NAMES[order]: fit(order, [source[int(i)] for i in indices], len(tokenizer), masked)
                     for order in ORDERS} for name, indices in fits.items()}
    found = {}
    for name in eval_splits:
        heldout = corpus.split(name)
        n = len(heldout) if max_instances is None else min(max_instances, len(heldout))
        instances = [heldout[i] for i in range(n)]
        nbytes = scored_bytes(instances, masked, byte_lengths)
        found[name] = {fitted: {level: heldout_level(model, instances, masked, nbytes)
                                for level, model in levels.items()} for fitted, levels in models.items()}
    return found
