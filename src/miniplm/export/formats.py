"""The export formats: one writer per format, each stating what a record is, its dtype rule and its limits.

A writer receives the exported instances in corpus order (`add`) and writes them into the output directory;
the stage (export.py) reads the selection, re-tokenizes and owns the staged output, so a writer knows
nothing of where its rows come from. `check_vocabulary` runs before the first token is written, so no
format fails after writing its data. FORMATS is the one table that `--help`, the stage and the README's
table of clients read.
"""

from __future__ import annotations

import json
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from miniplm.core.config import ConfigError
from miniplm.core.manifest import write_json_atomic
from miniplm.core.tokens import DocumentPieces
from miniplm.data.packing import Instance
from miniplm.data.shards import ShardWriter, atomic_write, token_dtype

ROWS_PER_BATCH = 4096
INT32_IDS = (1 << 31) - 1  # ids stored as int32 (Megatron past uint16, Arrow's list<int32>)
PAD_TOKEN = "<|pad|>"  # added to an HF export's tokenizer that has no pad distinct from EOS


@dataclass
class Job:
    """What a writer needs to know about one export."""

    out: Path
    tokenizer: Any  # the tokenizer of the written ids (the student's, or the corpus's)
    source: Any  # the corpus tokenizer, which text formats decode with
    source_eos: int
    dtype: np.dtype
    options: Any  # the ExportConfig: layout, block_size


class Format:
    """One export format. Subclasses set the class attributes and write `add` and `close`."""

    name: ClassVar[str]
    tokens: ClassVar[bool] = True  # writes token ids (re-tokenized by --tokenizer), else text
    validation: ClassVar[bool] = False  # also writes a validation file (`add_validation`)
    version: ClassVar[int] = 1  # bump when what the format writes changes
    max_vocab: ClassVar[int | None] = None
    distinct_pad: ClassVar[bool] = False  # the saved tokenizer pads with a token that is not EOS
    client: ClassVar[str]  # who reads it, for --help and the README
    record: ClassVar[str]  # what one record/sequence is

    @classmethod
    def dtype(cls, vocab: int) -> np.dtype:
        return np.dtype(np.int32)

    @classmethod
    def check_vocabulary(cls, vocab: int, tokenizer: str) -> None:
        if cls.max_vocab is not None and vocab > cls.max_vocab:
            carry = [f.name for f in FORMATS.values() if f.tokens and (f.max_vocab or vocab) >= vocab]
            raise ConfigError(f"format {cls.name}: {cls.limit_reason}; the tokenizer {tokenizer} has {vocab:,} "
                              f"entries. Export as {' or '.join(carry)} (they carry this vocabulary), or choose "
                              f"a student tokenizer of at most {cls.max_vocab:,} entries")

    limit_reason: ClassVar[str] = ""

    def __init__(self, job: Job):
        self.job = job

    def save_tokenizer(self) -> dict:
        """Save the tokenizer of the written ids beside them; return facts for the manifest.

        With pad = EOS (SmolLM2's, GPT-2's, Qwen's usual setting) HF's DataCollatorForLanguageModeling sets the
        label of every EOS to -100, so the model never learns to end a document, and Megatron warns that pad
        collides with EOD: formats read by such clients get a pad of its own, which no exported id is."""
        tok = self.job.tokenizer
        facts = {}
        if self.distinct_pad:
            added = tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id
            if added:
                tok.add_special_tokens({"pad_token": PAD_TOKEN})
            facts = {"pad": {"token": tok.pad_token, "id": int(tok.pad_token_id), "added": added},
                     "vocab_size": len(tok)}
        tok.save_pretrained(self.job.out / "tokenizer")
        return facts

    def add(self, record: dict, ids: np.ndarray) -> None:
        raise NotImplementedError

    def add_validation(self, ids: np.ndarray) -> None:
        raise NotImplementedError

    def close(self) -> dict:
        raise NotImplementedError


class Text(Format):
    """Text with its scores; `layout: piece` writes one record per document piece, so that re-tokenizing
    each record and appending EOS where `doc_end` is true gives back the instance's tokens."""

    tokens = False
    version = 2  # doc_ends per instance; the piece layout

    def __init__(self, job: Job):
        super().__init__(job)
        self.path = job.out / f"data.{self.name}"
        self.pieces_of = DocumentPieces(job.source, job.source_eos)
        self.pieces = self.inexact = 0
        self.rows: list[dict] = []

    def add(self, record: dict, ids: np.ndarray) -> None:
        pieces = self.pieces_of(ids)
        self._count_round_trips(ids, pieces)
        scores = {k: _float(record[k]) for k in ("teacher_logp", "ref_logp", "key")}
        instance_id = int(record["instance_id"])
        if self.job.options.layout == "piece":
            self.rows += [{"id": f"{instance_id}/{k}", "text": p.text, "instance_id": instance_id, "piece": k,
                           "doc_end": p.closed, "n_tokens": p.stop - p.start, "domain": record["domain"], **scores}
                          for k, p in enumerate(pieces)]
        else:
            texts = [p.text for p in pieces]
            self.rows.append({"instance_id": instance_id, "domain": record["domain"],
                              "n_tokens": int(record["n_tokens"]), **scores, "pieces": texts,
                              "doc_ends": [p.closed for p in pieces], "text": "\n\n".join(t for t in texts if t)})
        if len(self.rows) >= ROWS_PER_BATCH:
            self._flush()

    def _count_round_trips(self, ids: np.ndarray, pieces) -> None:
        """Count the pieces whose text does not re-encode to their own tokens (an instance cut inside a
        character or a word): the manifest says how exact the round trip is."""
        if not pieces:
            return
        texts = [p.text for p in pieces]
        encoded = self.job.source(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        self.pieces += len(pieces)
        self.inexact += sum(e != ids[p.start:p.stop].tolist() for e, p in zip(encoded, pieces))

    def _flush(self) -> None:
        raise NotImplementedError

    def round_trip(self) -> dict:
        return {"pieces": self.pieces, "inexact": self.inexact,
                "fraction": round(self.inexact / max(self.pieces, 1), 5)}


class Jsonl(Text):
    name = "jsonl"
    client = "datatrove JsonlReader, pandas, any JSON lines reader"
    record = "an instance (layout instance) or a document piece (layout piece), with its scores"

    def __init__(self, job: Job):
        super().__init__(job)
        self.fh = open(self.path, "w", encoding="utf-8")

    def _flush(self) -> None:
        self.fh.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in self.rows)
        self.rows = []

    def close(self) -> dict:
        self._flush()
        self.fh.close()
        return {"data": self.path.name}


class Parquet(Text):
    name = "parquet"
    client = "datatrove ParquetReader, pyarrow, pandas"
    record = Jsonl.record

    def __init__(self, job: Job):
        super().__init__(job)
        self.writer: pq.ParquetWriter | None = None

    def _flush(self) -> None:
        if self.rows:
            table = pa.Table.from_pylist(self.rows)
            if self.writer is None:
                self.writer = pq.ParquetWriter(self.path, table.schema)
            self.writer.write_table(table)
            self.rows = []

    def close(self) -> dict:
        self._flush()
        if self.writer is None:  # nothing exported: still write an empty, readable file
            pq.write_table(pa.table({"instance_id": pa.array([], pa.int64())}), self.path)
        else:
            self.writer.close()
        return {"data": self.path.name}


def _float(value) -> float | None:
    return None if value is None or value != value else float(value)  # NaN -> null


class Tokens(Format):
    name = "tokens"
    max_vocab = 1 << 32
    limit_reason = "token shards hold ids as uint16 or uint32"
    client = "miniplm train --corpus"
    record = "an instance (one document index: the source instance_id)"

    @classmethod
    def dtype(cls, vocab: int) -> np.dtype:
        return token_dtype(vocab)

    def __init__(self, job: Job):
        super().__init__(job)
        self.writer = ShardWriter(job.out / "train", job.dtype, 1 << 26, shuffle=False, seed=0)

    def add(self, record: dict, ids: np.ndarray) -> None:
        self.writer.add(Instance(ids, record["domain"], np.array([record["instance_id"]], dtype=np.int64)))

    def close(self) -> dict:
        summary = self.writer.close()
        return {"split": "train", "instances": summary["instances"], "shards": summary["shards"],
                "note": "doc_indices hold the source instance_id"}


class Megatron(Format):
    """Megatron-LM's MMapIndexedDataset (MMIDIDX, version 1): one sequence and one document per instance."""

    name = "megatron"
    distinct_pad = True
    version = 2  # int32 past uint16 (Megatron's own rule); tokenizer_metadata.json; a pad that is not EOS
    max_vocab = INT32_IDS
    limit_reason = "Megatron stores token ids as uint16 or int32"
    client = "megatron-core IndexedDataset, BlendedMegatronDatasetBuilder (GPTDataset)"
    record = "a sequence = a document = an instance"
    # megatron.core.datasets.indexed_dataset.DType codes
    CODES: ClassVar[dict] = {np.dtype(np.uint8): 1, np.dtype(np.int8): 2, np.dtype(np.int16): 3,
                             np.dtype(np.int32): 4, np.dtype(np.int64): 5, np.dtype(np.float64): 6,
                             np.dtype(np.float32): 7, np.dtype(np.uint16): 8}

    @classmethod
    def dtype(cls, vocab: int) -> np.dtype:
        # DType.optimal_dtype, which Megatron's preprocess_data.py writes with: uint16 below 65,500 entries
        return np.dtype(np.uint16) if vocab < 65500 else np.dtype(np.int32)

    def __init__(self, job: Job):
        super().__init__(job)
        self.prefix = job.out / "data"
        self.bin = open(self.prefix.with_suffix(".bin.tmp"), "wb")
        self.sizes: list[int] = []

    def save_tokenizer(self) -> dict:
        """Also the metadata file that `MegatronTokenizer.from_pretrained(<dir>)` opens the HF tokenizer with."""
        facts = super().save_tokenizer()
        write_json_atomic(self.job.out / "tokenizer" / "tokenizer_metadata.json",
                          {"library": "huggingface", "class_name": None, "class_path": None, "model_type": "gpt",
                           "chat_template": None})
        return {**facts, "megatron_metadata": "tokenizer/tokenizer_metadata.json"}

    def add(self, record: dict, ids: np.ndarray) -> None:
        self.bin.write(ids.astype(self.job.dtype).tobytes())
        self.sizes.append(len(ids))

    def close(self) -> dict:
        self.bin.close()
        dtype = self.job.dtype
        sizes = np.asarray(self.sizes, dtype=np.int32)
        pointers = np.zeros(len(sizes), dtype=np.int64)
        if len(sizes) > 1:
            np.cumsum(sizes[:-1].astype(np.int64) * dtype.itemsize, out=pointers[1:])
        doc_idx = np.arange(len(sizes) + 1, dtype=np.int64)

        def write_index(path: Path) -> None:
            with open(path, "wb") as fh:
                fh.write(b"MMIDIDX\x00\x00")
                fh.write(struct.pack("<Q", 1))
                fh.write(struct.pack("<B", self.CODES[dtype]))
                fh.write(struct.pack("<Q", len(sizes)))
                fh.write(struct.pack("<Q", len(doc_idx)))
                fh.write(sizes.tobytes(order="C"))
                fh.write(pointers.tobytes(order="C"))
                fh.write(doc_idx.tobytes(order="C"))

        self.prefix.with_suffix(".bin.tmp").rename(self.prefix.with_suffix(".bin"))
        atomic_write(self.prefix.with_suffix(".idx"), write_index)
        return {"bin": "data.bin", "idx": "data.idx", "dtype_code": self.CODES[dtype]}


class NanoGPT(Format):
    """nanoGPT's data/<name>/ layout: train.bin and val.bin of uint16 tokens back to back, and meta.pkl."""

    name = "nanogpt"
    validation = True
    version = 2  # val.bin, meta.pkl; uint16 only
    max_vocab = 1 << 16
    limit_reason = ("nanoGPT's train.py reads train.bin and val.bin as uint16, which holds token ids below 65,536 "
                    "(a wider dtype would be read as twice the tokens, every second one 0, with no error)")
    client = "nanoGPT train.py (np.memmap(..., np.uint16), meta.pkl's vocab_size)"
    record = "none: all tokens back to back, documents separated by EOS"

    @classmethod
    def dtype(cls, vocab: int) -> np.dtype:
        return np.dtype(np.uint16)

    def __init__(self, job: Job):
        super().__init__(job)
        self.files = {"train": open(job.out / "train.bin.tmp", "wb"), "val": open(job.out / "val.bin.tmp", "wb")}
        self.counts = {"train": 0, "val": 0}

    def _write(self, split: str, ids: np.ndarray) -> None:
        self.files[split].write(ids.astype(np.uint16).tobytes())
        self.counts[split] += len(ids)

    def add(self, record: dict, ids: np.ndarray) -> None:
        self._write("train", ids)

    def add_validation(self, ids: np.ndarray) -> None:
        self._write("val", ids)

    def close(self) -> dict:
        for split, fh in self.files.items():
            fh.close()
            (self.job.out / f"{split}.bin.tmp").rename(self.job.out / f"{split}.bin")
        vocab = len(self.job.tokenizer)

        def write_meta(path: Path) -> None:
            with open(path, "wb") as fh:  # nanoGPT's train.py reads vocab_size from this pickle
                pickle.dump({"vocab_size": vocab}, fh)

        atomic_write(self.job.out / "meta.pkl", write_meta)
        return {"train": "train.bin", "val": "val.bin", "meta": "meta.pkl", "dtype": "uint16",
                "train_tokens": self.counts["train"], "val_tokens": self.counts["val"]}


class HF(Format):
    """An HF dataset for the Trainer: packed instances (padded by the collator) or run_clm's fixed blocks."""

    name = "hf"
    distinct_pad = True
    version = 2  # attention_mask; a pad distinct from EOS; block layout
    max_vocab = INT32_IDS
    limit_reason = "the dataset stores token ids as int32"
    client = "datasets.load_from_disk + transformers.Trainer (DataCollatorForLanguageModeling, or "\
             "default_data_collator for blocks)"
    record = "an instance (input_ids, attention_mask, scores), or with block_size a block of exactly that many " \
             "tokens (input_ids, attention_mask, labels), as run_clm's group_texts builds"
    PACKED = pa.schema([("instance_id", pa.int64()), ("domain", pa.string()), ("teacher_logp", pa.float64()),
                        ("ref_logp", pa.float64()), ("key", pa.float64()), ("input_ids", pa.list_(pa.int32())),
                        ("attention_mask", pa.list_(pa.int8()))])
    BLOCKS = pa.schema([("input_ids", pa.list_(pa.int32())), ("attention_mask", pa.list_(pa.int8())),
                        ("labels", pa.list_(pa.int32()))])

    def __init__(self, job: Job):
        try:
            import datasets  # noqa: F401 - optional, heavy: the hf extra, imported only for this format
        except ImportError:
            raise ImportError("the hf export format needs 'datasets': pip install 'miniplm[hf]'") from None
        super().__init__(job)
        self.block = job.options.block_size
        self.schema = self.BLOCKS if self.block else self.PACKED
        self.arrow_path = job.out / "rows.arrow"
        self.sink = pa.OSFile(str(self.arrow_path), "wb")
        self.stream = pa.ipc.new_stream(self.sink, self.schema)
        self.rows: list[dict] = []
        self.carry = np.zeros(0, dtype=np.int32)  # blocks: tokens not yet in a full block
        self.blocks = 0

    def add(self, record: dict, ids: np.ndarray) -> None:
        ids = ids.astype(np.int32)
        if self.block:
            self.carry = np.concatenate([self.carry, ids])
            n = len(self.carry) // self.block
            for k in range(n):
                block = self.carry[k * self.block:(k + 1) * self.block]
                self.rows.append({"input_ids": block, "attention_mask": np.ones(self.block, np.int8),
                                  "labels": block})
            self.carry = self.carry[n * self.block:]
            self.blocks += n
        else:
            self.rows.append({**{k: record[k] for k in ("instance_id", "domain", "teacher_logp", "ref_logp", "key")},
                              "input_ids": ids, "attention_mask": np.ones(len(ids), np.int8)})
        if len(self.rows) >= ROWS_PER_BATCH:
            self._flush()

    def _flush(self) -> None:
        if self.rows:
            self.stream.write_table(pa.Table.from_pylist(self.rows, schema=self.schema))
            self.rows = []

    def close(self) -> dict:
        import datasets  # optional, heavy: the hf extra (checked in __init__)

        self._flush()
        self.stream.close()
        self.sink.close()
        datasets.Dataset.from_file(str(self.arrow_path)).save_to_disk(str(self.job.out / "dataset"))
        self.arrow_path.unlink()
        blocks = {"block_size": self.block, "blocks": self.blocks, "dropped_tokens": len(self.carry)} \
            if self.block else {}
        return {"dataset": "dataset", **blocks}


FORMATS: dict[str, type[Format]] = {f.name: f for f in (Jsonl, Parquet, Tokens, Megatron, NanoGPT, HF)}
