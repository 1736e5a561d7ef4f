"""Packing documents into instances as MiniPLM does.

Each document is encoded without special tokens and gets EOS appended. Tokens go into one buffer per
domain, so an instance never mixes domains but may span documents. Whenever a buffer holds max_len + 1
tokens (max_len training positions plus one for the shift), the chunk is cut back to its last sentence
boundary and the tail stays in the buffer; a chunk with no boundary at all is cut hard at max_len + 1.
Chunks of <= 1 token are dropped (they have no position to train on).

A sentence boundary ends at a token that is EOS or another special token, contains a newline, or ends
in one of `.!?;` and is followed by whitespace (the whitespace either ends the same token or starts the
next one, which covers byte-level BPE's 'Ġword' and SentencePiece's '▁word').
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from miniplm.core.tokens import token_bytes

SENTENCE_END = (".", "!", "?", ";")
# full-width sentence ends, a boundary with or without a following space (CJK text has none); matched on the
# bytes of the last tokens, since byte-level vocabularies often split them into two or three tokens
WIDE_SENTENCE_END = ("。", "！", "？", "；")
WIDE_CODES = np.array([int.from_bytes(c.encode("utf-8"), "big") for c in WIDE_SENTENCE_END], dtype=np.int64)
TAIL = 3  # bytes of each token's end kept for the wide-ending check (each of them is 3 bytes in UTF-8)


@dataclass(frozen=True)
class BoundaryTable:
    """Per-vocabulary-id flags used to find sentence boundaries with vectorised lookups."""

    always: np.ndarray  # bool: EOS/special or contains a newline, or punctuation+whitespace in one token
    ends_sentence: np.ndarray  # bool: ends in . ! ? ;
    starts_space: np.ndarray  # bool: begins with whitespace
    tail: np.ndarray  # int64: the token's last (up to TAIL) bytes as a big-endian number
    tail_len: np.ndarray  # int64: how many bytes `tail` holds
    pieces: list[bytes]  # each token's bytes, to cut a boundary-less chunk between characters

    @classmethod
    def from_strings(cls, pieces: list[str], raw_pieces: list[str], special_ids: set[int],
                     piece_bytes: list[bytes] | None = None) -> BoundaryTable:
        """`pieces`: each id decoded alone; `raw_pieces`: the vocabulary strings (for 'Ġ'/'▁' markers);
        `piece_bytes`: the bytes each id stands for (default: the decoded piece's UTF-8)."""
        n = len(pieces)
        always = np.zeros(n, dtype=bool)
        ends = np.zeros(n, dtype=bool)
        starts = np.zeros(n, dtype=bool)
        tail = np.zeros(n, dtype=np.int64)
        tail_len = np.zeros(n, dtype=np.int64)
        piece_bytes = piece_bytes if piece_bytes is not None else [p.encode("utf-8") for p in pieces]
        for i, (piece, raw) in enumerate(zip(pieces, raw_pieces)):
            stripped = piece.rstrip()
            always[i] = i in special_ids or "\n" in piece or (stripped != piece and stripped.endswith(SENTENCE_END))
            ends[i] = piece.endswith(SENTENCE_END)
            starts[i] = piece[:1].isspace() or raw[:1] in ("Ġ", "▁", " ")
            if i not in special_ids:
                end = piece_bytes[i][-TAIL:]
                tail[i], tail_len[i] = int.from_bytes(end, "big"), len(end)
        return cls(always, ends, starts, tail, tail_len, piece_bytes)

    @classmethod
    def from_tokenizer(cls, tokenizer) -> BoundaryTable:
        ids = list(range(len(tokenizer)))
        pieces = tokenizer.batch_decode([[i] for i in ids], skip_special_tokens=False)
        raw = [t or "" for t in tokenizer.convert_ids_to_tokens(ids)]
        return cls.from_strings(pieces, raw, set(tokenizer.all_special_ids), token_bytes(tokenizer))

    def flags(self, tokens: np.ndarray) -> np.ndarray:
        """flags[i] is True when a sentence ends at tokens[i] (the cut may come right after it)."""
        flags = self.always[tokens]
        flags[:-1] |= self.ends_sentence[tokens[:-1]] & self.starts_space[tokens[1:]]
        # the last TAIL bytes of the text up to each token, from its own tail and its two predecessors'
        n = len(tokens)
        ends, length = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
        for back in range(TAIL):
            value, size = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
            value[back:], size[back:] = self.tail[tokens[: n - back]], self.tail_len[tokens[: n - back]]
            short = length < TAIL  # still fewer than TAIL bytes gathered at this position
            ends[short] |= value[short] << (8 * length[short])
            length[short] += size[short]
        flags |= np.isin(ends & ((1 << (8 * TAIL)) - 1), WIDE_CODES)
        return flags

    def ends_a_character(self, tokens: np.ndarray) -> bool:
        """Whether the text of `tokens` (its last few are enough) ends between two UTF-8 characters."""
        tail = b"".join(self.pieces[t] for t in tokens[-4:])[-4:]
        for back in range(1, len(tail) + 1):
            byte = tail[-back]
            if byte & 0xC0 != 0x80:  # not a continuation byte: the last character starts here
                return back == (1 if byte < 0x80 else 2 if byte >> 5 == 0b110 else 3 if byte >> 4 == 0b1110 else 4)
        return not tail


@dataclass
class Instance:
    tokens: np.ndarray  # int64, length 2..max_len+1
    domain: str
    doc_indices: np.ndarray  # int64, the documents whose tokens it holds, in order


@dataclass
class PackingStats:
    instances: int = 0
    tokens: int = 0  # tokens in emitted instances
    dropped_tokens: int = 0  # tokens in chunks of <= 1 token
    truncated_documents: int = 0  # documents cut short by max_chunks_per_document
    truncated_tokens: int = 0
    hard_cuts: int = 0  # chunks with no sentence boundary, cut at max_len + 1 or just before (between characters)
    split_characters: int = 0  # hard cuts that found no place between characters within three tokens


class _Buffer:
    """One domain's pending tokens. A start pointer avoids re-copying the tail after every cut."""

    def __init__(self) -> None:
        self.tokens = np.empty(0, dtype=np.int64)
        self.flags = np.empty(0, dtype=bool)
        self.docs = np.empty(0, dtype=np.int64)
        self.start = 0

    def __len__(self) -> int:
        return len(self.tokens) - self.start

    def append(self, tokens: np.ndarray, flags: np.ndarray, doc_index: int) -> None:
        s = self.start
        self.tokens = np.concatenate([self.tokens[s:], tokens])
        self.flags = np.concatenate([self.flags[s:], flags])
        self.docs = np.concatenate([self.docs[s:], np.full(len(tokens), doc_index, dtype=np.int64)])
        self.start = 0

    def take(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        s = self.start
        self.start += n
        return self.tokens[s : s + n].copy(), self.docs[s : s + n]

    def drop_document(self, doc_index: int) -> int:
        """Remove the pending tokens of one document (it is always the last one appended)."""
        keep = self.docs[self.start :] != doc_index
        removed = int((~keep).sum())
        s = self.start
        self.tokens, self.flags, self.docs = self.tokens[s:][keep], self.flags[s:][keep], self.docs[s:][keep]
        self.start = 0
        return removed


class Packer:
    """Feeds documents in, gets instances out. Deterministic: same documents in, same instances out."""

    def __init__(
        self,
        max_len: int,
        eos_id: int,
        boundaries: BoundaryTable,
        max_chunks_per_document: int | None = None,
    ) -> None:
        if max_len < 8:
            raise ValueError(f"max_len must be at least 8 (got {max_len})")
        self.max_len = max_len
        self.eos_id = eos_id
        self.boundaries = boundaries
        self.max_chunks = max_chunks_per_document
        self.buffers: dict[str, _Buffer] = {}
        self.stats = PackingStats()

    def add(self, token_ids: list[int] | np.ndarray, domain: str, doc_index: int) -> list[Instance]:
        """Append one document (without EOS; it is added here) and return the instances it completes."""
        tokens = np.empty(len(token_ids) + 1, dtype=np.int64)
        tokens[:-1] = token_ids
        tokens[-1] = self.eos_id
        buffer = self.buffers.setdefault(domain, _Buffer())
        buffer.append(tokens, self.boundaries.flags(tokens), doc_index)
        out: list[Instance] = []
        window = self.max_len + 1
        while len(buffer) >= window:
            flags = buffer.flags[buffer.start : buffer.start + window]
            ends = np.flatnonzero(flags)
            if len(ends):
                cut = int(ends[-1]) + 1
            else:
                cut = self._between_characters(buffer.tokens[buffer.start : buffer.start + window])
                self.stats.hard_cuts += 1
            self._emit(out, *buffer.take(cut), domain)
            if self.max_chunks is not None and len(out) >= self.max_chunks and len(buffer):
                removed = buffer.drop_document(doc_index)
                if removed:
                    self.stats.truncated_documents += 1
                    self.stats.truncated_tokens += removed
                break
        return out

    def flush(self) -> list[Instance]:
        """The remainders of all buffers (each <= max_len + 1 tokens), in domain first-seen order."""
        out: list[Instance] = []
        for domain, buffer in self.buffers.items():
            if len(buffer):
                self._emit(out, *buffer.take(len(buffer)), domain)
        self.buffers.clear()
        return out

    def _between_characters(self, chunk: np.ndarray) -> int:
        """A hard cut: at the full window, or up to three tokens earlier where that keeps a character whole
        (a byte-level vocabulary spells a CJK character or an emoji in two to four tokens)."""
        for cut in range(len(chunk), max(len(chunk) - 4, 1), -1):
            if self.boundaries.ends_a_character(chunk[:cut]):
                return cut
        self.stats.split_characters += 1
        return len(chunk)

    def _emit(self, out: list[Instance], tokens: np.ndarray, docs: np.ndarray, domain: str) -> None:
        if len(tokens) <= 1:
            self.stats.dropped_tokens += len(tokens)
            return
        # docs is non-decreasing within a buffer, so unique() keeps document order
        out.append(Instance(tokens, domain, np.unique(docs)))
        self.stats.instances += 1
        self.stats.tokens += len(tokens)
