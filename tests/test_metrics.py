"""Bits per byte, n-gram levels and bootstrap intervals: the measures every model is read with."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from conftest import SENTENCES, make_corpus, save_tiny_llama
from miniplm.core.config import load_config
from miniplm.core.metrics import loss_summary
from miniplm.core.tokens import token_byte_lengths
from miniplm.data import ngram
from miniplm.data.prepare import PrepareConfig, prepare
from miniplm.data.shards import PackedCorpus
from miniplm.evaluation.loss import HeldOut, heldout_loss, ngram_loss


def save_byte_tokenizer(path: Path) -> Path:
    """A byte-level tokenizer with no merges: one token per byte, plus EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(alphabet))}
    vocab["<|endoftext|>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(path)
    return path


def save_bpe_tokenizer(path: Path, vocab_size: int, eos: str) -> Path:
    """A byte-level BPE of another vocabulary than the test tokenizer's, trained on the same sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(SENTENCES * 20, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[eos], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos).save_pretrained(path)
    return path


def prepared(root: Path, tokenizer: Path) -> PackedCorpus:
    make_corpus(root / "raw", n_docs=30)
    cfg = load_config(PrepareConfig, None, {"inputs": [str(root / "raw")], "output": str(root / "corpus"),
                                            "tokenizer": str(tokenizer), "max_len": 64, "progress": False,
                                            "splits": {"heldout": {"fraction": 0.2}}})
    prepare(cfg, log=lambda m: None)
    return PackedCorpus(root / "corpus")


def test_bits_per_byte_of_a_byte_level_tokenizer_is_nats_per_token_over_ln2(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer_dir = save_byte_tokenizer(tmp_path / "bytes")
    corpus = prepared(tmp_path, tokenizer_dir)
    heldout = HeldOut(corpus, "heldout")
    model_dir = save_tiny_llama(tmp_path / "model", tokenizer_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    result = heldout_loss(model, AutoTokenizer.from_pretrained(model_dir), heldout, precision="fp32")
    assert result["bytes"] == result["tokens"] > 0
    assert result["bits_per_byte"] == pytest.approx(result["loss_per_token"] / math.log(2), rel=1e-12)
    for order in (1, 2):
        tokenizer = corpus.load_tokenizer()
        model = ngram.fit(order, heldout.instances, len(tokenizer), np.array([corpus.eos_id]))
        level = ngram_loss(model, heldout, tokenizer, corpus.eos_id)
        assert level["bits_per_byte"] == pytest.approx(level["loss_per_token"] / math.log(2), rel=1e-12)


def test_two_tokenizers_count_the_same_bytes_of_the_same_text(tmp_path, tokenizer_dir):
    """Every token's bytes add up to the text's UTF-8 bytes (+1 per EOS) in both vocabularies; what is
    scored differs only by the unscored first token of each instance and document."""
    from transformers import AutoTokenizer

    corpus = prepared(tmp_path, tokenizer_dir)
    heldout = HeldOut(corpus, "heldout")
    source = corpus.load_tokenizer()
    other = AutoTokenizer.from_pretrained(save_bpe_tokenizer(tmp_path / "other", vocab_size=420, eos="</s>"))
    tables = {}
    for tokenizer in (source, other):
        instances, eos = heldout.for_tokenizer(tokenizer)
        tables[tokenizer] = (instances, eos, token_byte_lengths(tokenizer, eos))
    for i, x in enumerate(heldout.instances):
        eos_count = int((x == corpus.eos_id).sum())
        text = source.decode(x[x != corpus.eos_id].tolist())
        for instances, _, lengths in tables.values():
            assert lengths[instances[i]].sum() == len(text.encode("utf-8")) + eos_count
    for tokenizer, (instances, eos, lengths) in tables.items():
        first = [x[0] for x in instances] + [x[j + 1] for x in instances for j in np.flatnonzero(x[:-1] == eos)]
        total = sum(lengths[x].sum() for x in instances)
        assert heldout.scored_bytes(tokenizer).sum() == total - lengths[np.array(first)].sum()


def hand_bigram(pairs: list[tuple[int, int]], vocab: int, d: float, v: int, w: int) -> float:
    """Interpolated Kneser-Ney written out from its definition, with dictionaries."""
    count = {}
    for pair in pairs:
        count[pair] = count.get(pair, 0) + 1
    distinct = len(count)
    predecessors = {b: len({a for a, bb in count if bb == b}) for b in range(vocab)}
    seen_targets = sum(1 for b in range(vocab) if predecessors[b] > 0)
    p_cont = (max(predecessors[w] - d, 0) + d * seen_targets / vocab) / distinct
    c_v = sum(c for (a, _), c in count.items() if a == v)
    if c_v == 0:
        return p_cont
    followers = len({b for a, b in count if a == v})
    return (max(count.get((v, w), 0) - d, 0) + d * followers * p_cont) / c_v


def test_bigram_equals_a_hand_computation_and_normalises():
    eos, vocab = 0, 6
    instances = [np.array([1, 2, 3, 1, 2, 0, 2, 3, 3]), np.array([4, 1, 2, 0, 3, 1])]
    masked = np.array([eos])
    contexts, targets, _ = ngram._pairs(instances, masked)
    pairs = list(zip(contexts.tolist(), targets.tolist()))
    assert (0, 2) not in pairs and (0, 3) not in pairs  # positions whose input is EOS are not scored
    model = ngram.Bigram(vocab, contexts, targets, discount=0.4)
    grid = [(v, w) for v in range(vocab) for w in range(vocab)]
    got = np.exp(model.log_probs(np.array([v for v, _ in grid]), np.array([w for _, w in grid])))
    want = np.array([hand_bigram(pairs, vocab, 0.4, v, w) for v, w in grid])
    np.testing.assert_allclose(got, want, rtol=1e-12)
    np.testing.assert_allclose(got.reshape(vocab, vocab).sum(1), 1.0, rtol=1e-12)  # seen and unseen contexts
    unigram = ngram.fit(1, instances, vocab, masked)
    counts = np.bincount(targets, minlength=vocab) + 1
    np.testing.assert_allclose(np.exp(unigram.logp), counts / counts.sum())


def test_the_discount_is_chosen_on_the_fitting_instances_alone():
    rng = np.random.default_rng(0)
    instances = [rng.integers(1, 40, size=50) for _ in range(30)]
    masked = np.array([0])
    model = ngram.fit(2, instances, 40, masked)
    contexts, targets, owner = ngram._pairs(instances, masked)
    tune = owner % 10 == 9
    losses = [-ngram.Bigram(40, contexts[~tune], targets[~tune], d).log_probs(contexts[tune], targets[tune]).mean()
              for d in ngram.DISCOUNTS]
    assert model.d == ngram.DISCOUNTS[int(np.argmin(losses))]
    assert model.facts["fit_tokens"] == len(targets)  # then counted over all of them
    with pytest.raises(ValueError, match="order 3 is not supported"):
        ngram.fit(3, instances, 40, masked)


def test_bootstrap_interval_is_seeded_and_shrinks_with_more_instances():
    rng = np.random.default_rng(1)
    counts = rng.integers(50, 100, size=400)
    nats = counts * rng.normal(5.0, 0.5, size=400)
    small, large = loss_summary(nats[:40], counts[:40], counts[:40] * 4), loss_summary(nats, counts, counts * 4)
    assert large == loss_summary(nats, counts, counts * 4)
    low, high = large["loss_per_token_ci95"]
    assert low < large["loss_per_token"] < high
    assert high - low < small["loss_per_token_ci95"][1] - small["loss_per_token_ci95"][0]


def test_paired_difference_resamples_instances_jointly():
    from miniplm.core.metrics import paired_difference

    rng = np.random.default_rng(2)
    tokens = rng.integers(50, 100, size=300)
    hardness = rng.normal(5.0, 1.0, size=300)  # both models find the same instances hard
    theirs = {"nats": (hardness * tokens).tolist(), "tokens": tokens.tolist(), "bytes": (tokens * 4).tolist()}
    shifted = {**theirs, "nats": ((hardness - 0.1) * tokens).tolist()}
    exact = paired_difference(shifted, theirs)
    assert exact["loss_per_token"] == pytest.approx(-0.1)
    assert exact["loss_per_token_ci95"] == pytest.approx([-0.1, -0.1])
    assert exact["bits_per_byte"] == pytest.approx(-0.1 / 4 / math.log(2))
    noisy = {**theirs, "nats": ((hardness - 0.1 + rng.normal(0, 0.05, 300)) * tokens).tolist()}
    paired = paired_difference(noisy, theirs)
    low, high = paired["loss_per_token_ci95"]
    own = loss_summary(np.array(noisy["nats"]), tokens, tokens * 4)["loss_per_token_ci95"]
    assert low < -0.1 < high and high - low < (own[1] - own[0]) / 5  # far narrower than one model's interval
    with pytest.raises(ValueError, match="different numbers of instances"):
        paired_difference({k: v[:10] for k, v in theirs.items()}, theirs)
