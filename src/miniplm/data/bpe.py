"""`miniplm tokenizer train`: a byte-level BPE tokenizer of a chosen size, trained on a split of a packed corpus.

A CPU-sized student with the teacher's 49k-entry vocabulary spends most of its parameters on the embedding;
a small vocabulary puts them into layers. The text is the split's documents as the corpus tokenizer decodes
them (D_ref by default, text no student trains on as such); the result is an HF tokenizer directory that
`export --tokenizer`, `train` (through the exported corpus) and `eval` read like any other. Byte-level: any
text encodes, nothing maps to an unknown token, and a token's string is its bytes (bits per byte are exact).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from miniplm.core.config import ConfigError, Progress, option
from miniplm.core.stage import Stage, StageResult, execute
from miniplm.core.tokens import DocumentPieces
from miniplm.data.shards import PackedCorpus

BYTE_ALPHABET = 256


@dataclass
class TokenizerTrainConfig(Progress):
    corpus: str = option("out/corpus", "a `miniplm prepare` output whose text the tokenizer learns from")
    split: str = option("ref", "the split to learn from (ref: D_ref)")
    vocab_size: int = option(8192, "entries, special tokens included (at least the 256 bytes plus them)")
    min_frequency: int = option(2, "a merge must occur at least this often")
    max_instances: int | None = option(None, "learn from the first N instances of the split (null: all)")
    eos_token: str = option("<|endoftext|>", "the end-of-document token (also pad)")
    output: str = option("out/tokenizer", "the HF tokenizer directory to write", hashed=False)

    def validate(self) -> None:
        least = BYTE_ALPHABET + 1
        if not least <= self.vocab_size <= 2**32:
            raise ConfigError(f"vocab_size: must be between {least} (the 256 byte symbols and the special token "
                              f"{self.eos_token!r}) and 2^32, got {self.vocab_size}")
        if self.min_frequency < 1:
            raise ConfigError(f"min_frequency: must be at least 1, got {self.min_frequency}")
        if not self.eos_token:
            raise ConfigError("eos_token: give the end-of-document token's text, e.g. <|endoftext|>")


def documents(corpus: PackedCorpus, split: str, max_instances: int | None) -> Iterator[str]:
    """The text of each document piece of the split's instances, decoded by the corpus tokenizer."""
    source = corpus.load_tokenizer()
    pieces_of = DocumentPieces(source, corpus.eos_id)
    instances = corpus.split(split)
    n = len(instances) if max_instances is None else min(max_instances, len(instances))
    for i in range(n):
        for piece in pieces_of(instances[i]):
            if piece.text:
                yield piece.text


class TrainTokenizer(Stage):
    name = "tokenizer train"
    config = TokenizerTrainConfig

    def inputs(self, config: TokenizerTrainConfig, log) -> dict:
        corpus = PackedCorpus(config.corpus)
        corpus.split(config.split)
        return {"corpus": corpus.key}

    def run(self, config: TokenizerTrainConfig, out: Path, inputs: dict, log) -> dict:
        corpus = PackedCorpus(config.corpus)
        bpe = Tokenizer(models.BPE())
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=config.vocab_size, min_frequency=config.min_frequency,
                                      special_tokens=[config.eos_token], show_progress=config.progress,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        texts = list(documents(corpus, config.split, config.max_instances))
        if not texts:
            raise ValueError(f"{corpus.path}/{config.split} has no text to learn a tokenizer from")
        bpe.train_from_iterator(texts, trainer, length=len(texts))
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=config.eos_token,
                                            pad_token=config.eos_token)
        tokenizer.save_pretrained(out)
        size = len(tokenizer)
        if size < config.vocab_size:
            log(f"tokenizer train: {size:,} entries, fewer than {config.vocab_size:,}: the text has no more merges "
                f"occurring {config.min_frequency}+ times")
        return {"vocab_size": size, "documents": len(texts),
                "characters": sum(len(t) for t in texts), "corpus": {"path": str(corpus.path), "split": config.split}}

    def summary(self, manifest: dict) -> str:
        return (f"trained a {manifest['vocab_size']:,}-entry byte-level BPE on {manifest['documents']:,} documents "
                f"of {manifest['corpus']['path']}/{manifest['corpus']['split']} into {manifest['output']}")


def train_tokenizer(config: TokenizerTrainConfig, force: bool = False, log=print) -> StageResult:
    return execute(TrainTokenizer(), config, force, log)
