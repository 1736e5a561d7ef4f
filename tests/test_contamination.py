"""Word n-gram containment of held-out text in training text (evaluation.contamination), on hand-checked toys."""

from __future__ import annotations

import math

import numpy as np

from miniplm.data.shards import PackedCorpus
from miniplm.evaluation.contamination import containment, instance_texts, ngram_set, summary, word_ngrams


def test_containment_is_the_share_of_distinct_ngrams_seen():
    pool = ["One two three four five six seven eight, and more words follow here."]
    reference = ngram_set(pool, n=8)
    held = ["one TWO three four five six seven eight nine",  # 2 8-grams: the first is in the pool
            "nothing of this text was ever seen by any model at all",  # 4 8-grams, none seen
            "too short to hold eight words",  # no 8-gram at all
            "one two three four five six seven eight"]  # its only 8-gram, seen
    shares = containment(held, reference, n=8)
    assert shares[0] == 0.5 and shares[1] == 0.0 and math.isnan(shares[2]) and shares[3] == 1.0
    assert len(word_ngrams("a a a a a a a a a a", n=8)) == 1  # distinct n-grams: repeats count once
    assert word_ngrams("Same words, other CASE and punctuation!", 3) == word_ngrams("same words other case and "
                                                                                   "punctuation", 3)


def test_summary_counts_per_domain():
    out = summary(np.array([0.9, 0.1, 0.5, np.nan]), ["email", "email", "wiki", "wiki"], threshold=0.5)
    assert out["instances"] == 4 and out["at_or_above"] == 2
    assert out["domains"]["email"] == {"instances": 2, "mean": 0.5, "at_or_above": 1}
    assert out["domains"]["wiki"] == {"instances": 2, "mean": 0.5, "at_or_above": 1}


def test_a_split_read_back_as_text_contains_itself(prepared_corpus):
    corpus = PackedCorpus(prepared_corpus)
    texts = instance_texts(corpus, "train", 20)
    assert len(texts) == 20 and all("<|endoftext|>" not in t for t in texts)
    shares = containment(texts, ngram_set(texts, n=4), n=4)
    assert np.all(shares[np.isfinite(shares)] == 1.0)
