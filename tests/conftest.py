"""Shared fixtures: a tiny byte-level BPE tokenizer trained here and saved, and small corpora on disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

SENTENCES = [
    "The cat sat on the mat. It was warm!",
    "Why do birds sing? Nobody knows; they just do.",
    "A long line without any punctuation at all that goes on and on and on",
    "Rivers flow to the sea.\nMountains stand still.",
    "Numbers like 3.14 are not the end of a sentence. But this is.",
]


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A real HF fast tokenizer (trained on the test sentences), loadable with AutoTokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SENTENCES * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    path = tmp_path_factory.mktemp("tokenizer")
    fast.save_pretrained(path)
    return path


def write_jsonl(path: Path, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for r in records:
            fh.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def make_corpus(root: Path, n_docs: int = 60, domains=("news", "books")) -> Path:
    """A jsonl corpus of `n_docs` documents per domain with ids, in one file per domain."""
    root.mkdir(parents=True, exist_ok=True)
    for d in domains:
        records = []
        for i in range(n_docs):
            text = " ".join(SENTENCES[(i + k) % len(SENTENCES)] for k in range(1 + i % 7))
            records.append({"text": f"{d} document {i}. {text}", "domain": d, "id": f"{d}-{i}"})
        write_jsonl(root / f"{d}.jsonl", records)
    return root
