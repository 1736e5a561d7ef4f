"""What every stage must agree on about token ids: the loss mask, vocabulary identity, re-tokenization.

The paper's loss mask: a position is scored (in scoring, training and evaluation alike) unless its *input*
token is EOS or pad, so no instance is judged on predicting the first token of the next document.
"""

from __future__ import annotations

import json

import numpy as np

from miniplm.core.manifest import manifest_key


def masked_input_ids(eos_id: int, tokenizer) -> set[int]:
    """Input ids whose next-token prediction is not scored: EOS, and pad where the tokenizer has one."""
    masked = {int(eos_id)}
    if tokenizer.pad_token_id is not None:
        masked.add(int(tokenizer.pad_token_id))
    return masked


def vocab_fingerprint(tokenizer) -> str:
    """Identity of a vocabulary: equal for two tokenizers exactly when they map the same strings to the same ids."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return manifest_key(vocab)


class Retokenizer:
    """Corpus token ids -> student token ids, one instance to one instance."""

    def __init__(self, source, source_eos: int, student, max_len: int, add_bos: str):
        self.source, self.source_eos, self.student, self.max_len = source, source_eos, student, max_len
        if student.eos_token_id is None:
            raise ValueError(f"student tokenizer {type(student).__name__} has no EOS token to separate documents")
        bos = student.bos_token_id
        uses_bos = bos is not None and student("a")["input_ids"][:1] == [bos]
        self.bos = bos if (add_bos == "yes" or (add_bos == "auto" and uses_bos)) else None
        if add_bos == "yes" and bos is None:
            raise ValueError("add_bos: yes, but the student tokenizer has no BOS token")
        self.pieces = self.lossy = 0

    def pieces_of(self, tokens: np.ndarray) -> list[tuple[str, bool]]:
        """(decoded text, ended with EOS) for each document or piece of an instance."""
        ends = np.flatnonzero(tokens == self.source_eos)
        bounds = zip([0, *(ends + 1)], [*ends, len(tokens)])
        out = []
        for a, b in bounds:
            closed = b < len(tokens) and tokens[b] == self.source_eos
            if b > a or closed:
                out.append((self.source.decode(tokens[a:b].tolist()), bool(closed)))
        return out

    def __call__(self, tokens: np.ndarray) -> np.ndarray:
        ids = [] if self.bos is None else [self.bos]
        for text, closed in self.pieces_of(tokens):
            encoded = self.student(text, add_special_tokens=False)["input_ids"] if text else []
            self.pieces += 1
            if text and self.student.decode(encoded) != text:
                self.lossy += 1
            ids += encoded + ([self.student.eos_token_id] if closed else [])
        return np.asarray(ids[: self.max_len + 1], dtype=np.int64)



def token_byte_lengths(tokenizer, eos_id: int) -> np.ndarray:
    """UTF-8 bytes of text each token id stands for: what bits per byte divides by.

    Byte-level BPE (GPT-2, SmolLM2, GPT-NeoX, Qwen2): one character of a token's string is one byte.
    SentencePiece-style (Metaspace): `▁` is a space and `<0xNN>` one byte. Special tokens stand for no text,
    except EOS, which counts one byte: the document separator every tokenizer predicts once per document.
    """
    vocab_size = len(tokenizer)
    strings = tokenizer.convert_ids_to_tokens(list(range(vocab_size)))
    kind = _decoder_kind(tokenizer)
    lengths = np.zeros(vocab_size, dtype=np.int64)
    for i, s in enumerate(strings):
        if s is None:
            continue
        if kind == "byte_level":
            lengths[i] = len(s)
        elif kind == "metaspace" and len(s) == 6 and s.startswith("<0x") and s.endswith(">"):
            lengths[i] = 1
        elif kind == "metaspace":
            lengths[i] = len(s.replace("\u2581", " ").encode("utf-8"))
        else:
            lengths[i] = len(tokenizer.convert_tokens_to_string([s]).encode("utf-8"))
    for token_id in tokenizer.all_special_ids:
        lengths[token_id] = 0
    for token, token_id in getattr(tokenizer, "added_tokens_encoder", {}).items():
        if token_id not in tokenizer.all_special_ids:
            lengths[token_id] = len(token.encode("utf-8"))  # added tokens match their literal text
    lengths[int(eos_id)] = 1
    return lengths


def _decoder_kind(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = json.dumps(json.loads(backend.to_str()).get("decoder")) if backend is not None else ""
    if '"ByteLevel"' in decoder:
        return "byte_level"
    if '"Metaspace"' in decoder or "\\u2581" in decoder:
        return "metaspace"
    return "other"


def scored_targets(tokens: np.ndarray, masked: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) of the scored positions of one instance under the loss mask."""
    x = np.asarray(tokens, dtype=np.int64)
    keep = ~np.isin(x[:-1], masked)
    return x[:-1][keep], x[1:][keep]
