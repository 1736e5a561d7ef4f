"""What every stage must agree on about token ids: the loss mask, vocabulary identity, re-tokenization.

The paper's loss mask: a position is scored (in scoring, training and evaluation alike) unless its *input*
token is EOS or pad, so no instance is judged on predicting the first token of the next document.
"""

from __future__ import annotations

import json
from typing import NamedTuple

import numpy as np

from miniplm.core.manifest import manifest_key


def masked_input_ids(eos_id: int, tokenizer) -> set[int]:
    """Input ids whose next-token prediction is not scored: EOS, and pad where the tokenizer has one."""
    masked = {int(eos_id)}
    if tokenizer.pad_token_id is not None:
        masked.add(int(tokenizer.pad_token_id))
    return masked


def masked_id_array(eos_id: int, tokenizer) -> np.ndarray:
    """`masked_input_ids` as a sorted array, for vectorised lookups (`scored_targets`)."""
    return np.array(sorted(masked_input_ids(eos_id, tokenizer)))


def vocab_fingerprint(tokenizer) -> str:
    """Identity of a vocabulary: equal for two tokenizers exactly when they map the same strings to the same ids."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return manifest_key(vocab)


class Piece(NamedTuple):
    """A document, or the part of one, inside an instance: tokens[start:stop], then EOS when `closed`."""

    text: str  # the source tokens decoded
    closed: bool  # the document ends here (an EOS follows inside the instance)
    faithful: bool  # `text` is exactly the bytes the source tokens stand for
    start: int
    stop: int


class DocumentPieces:
    """Splits an instance on EOS into its documents or document pieces, decoded by the source tokenizer.

    A piece is unfaithful when its tokens decode to something else than the bytes they stand for: an
    instance cut inside a character decodes to U+FFFD."""

    def __init__(self, source, source_eos: int):
        self.source, self.source_eos = source, source_eos
        self.source_bytes = token_bytes(source)

    def __call__(self, tokens: np.ndarray) -> list[Piece]:
        ends = np.flatnonzero(tokens == self.source_eos)
        out = []
        for a, b in zip([0, *(ends + 1)], [*ends, len(tokens)]):
            closed = bool(b < len(tokens))
            if b > a or closed:  # an EOS alone (its document ended in the previous instance) is a piece too
                text = self.source.decode(tokens[a:b].tolist())
                exact = b"".join(self.source_bytes[t] for t in tokens[a:b])
                # SentencePiece decoders drop the space of a leading '▁'
                faithful = text.encode("utf-8") in (exact, exact.removeprefix(b" "))
                out.append(Piece(text, closed, faithful, int(a), int(b)))
        return out


class Retokenizer:
    """Corpus token ids -> student token ids, one instance to one instance.

    A piece counts as lossy when the student's tokens do not spell its source text: when the piece is not
    faithful (`DocumentPieces`), or when the student's decode(encode(text)) differs.
    """

    def __init__(self, source, source_eos: int, student, max_len: int, add_bos: str):
        self.student, self.max_len = student, max_len
        if student.eos_token_id is None:
            raise ValueError(f"student tokenizer {type(student).__name__} has no EOS token to separate documents")
        bos = student.bos_token_id
        uses_bos = bos is not None and student("a")["input_ids"][:1] == [bos]
        self.bos = bos if (add_bos == "yes" or (add_bos == "auto" and uses_bos)) else None
        if add_bos == "yes" and bos is None:
            raise ValueError("add_bos: yes, but the student tokenizer has no BOS token")
        self.pieces = self.lossy = 0
        self.pieces_of = DocumentPieces(source, source_eos)

    def __call__(self, tokens: np.ndarray) -> np.ndarray:
        ids = [] if self.bos is None else [self.bos]
        for piece in self.pieces_of(tokens):
            encoded = self.student(piece.text, add_special_tokens=False, split_special_tokens=True)["input_ids"] \
                if piece.text else []
            self.pieces += 1
            if not piece.faithful or (piece.text and self.student.decode(encoded) != piece.text):
                self.lossy += 1
            ids += encoded + ([self.student.eos_token_id] if piece.closed else [])
        return np.asarray(ids[: self.max_len + 1], dtype=np.int64)


def token_bytes(tokenizer) -> list[bytes]:
    """The bytes of text each token id stands for (specials: their literal text).

    Byte-level BPE (GPT-2, SmolLM2, GPT-NeoX, Qwen2): each character of a token's string maps to one byte.
    SentencePiece-style (Metaspace): `▁` is a space and `<0xNN>` one byte. Otherwise: the token decoded alone.
    """
    strings = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    kind = _decoder_kind(tokenizer)
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_encoder", {}).values())
    decode_byte = {c: b for b, c in _byte_alphabet().items()}
    out = []
    for i, s in enumerate(strings):
        if s is None:
            out.append(b"")
        elif i in special or kind == "other":
            out.append(s.encode("utf-8") if i in special else tokenizer.convert_tokens_to_string([s]).encode("utf-8"))
        elif kind == "byte_level":
            out.append(bytes(decode_byte.get(c, 0) for c in s) if all(c in decode_byte for c in s)
                       else s.encode("utf-8"))
        elif len(s) == 6 and s.startswith("<0x") and s.endswith(">"):
            out.append(bytes([int(s[3:5], 16)]))
        else:
            out.append(s.replace("\u2581", " ").encode("utf-8"))
    return out


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map, which byte-level BPE vocabularies are written in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def token_byte_lengths(tokenizer, eos_id: int) -> np.ndarray:
    """UTF-8 bytes of text each token id stands for, as bits per byte counts them: special tokens stand for
    no text, except EOS, which counts one byte (the document separator every tokenizer predicts once per
    document); added non-special tokens match their literal text."""
    lengths = np.array([len(b) for b in token_bytes(tokenizer)], dtype=np.int64)
    lengths[list(tokenizer.all_special_ids)] = 0
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
