"""`miniplm export`: a selection (or its complement) in the formats students' trainers read.

Formats, all in original corpus order, one record/sequence per instance:
    jsonl, parquet  text with its scores: instance_id, domain, n_tokens, teacher_logp, ref_logp, key,
                    pieces (the instance's documents or document pieces, split on the source EOS) and text
                    (the pieces joined by a blank line)
    tokens          miniplm token shards (the `prepare` layout), readable by `miniplm train`
    megatron        Megatron-LM / GPT-NeoX indexed dataset: <name>.bin + <name>.idx (MMIDIDX, version 1)
    nanogpt         a flat memmap `train.bin` of all tokens back to back (nanoGPT's layout), `meta.json`
    hf              an HF dataset (`save_to_disk`) with input_ids and the score columns
Token formats re-tokenize for a student tokenizer when one is given (cross-family, as the paper): each
instance is split on the source EOS, each piece decoded and encoded with the student's tokenizer, the
pieces joined with the student's EOS, BOS prepended for families that use one, and the result truncated
to max_len + 1 tokens: one output instance per input instance. Pieces whose text does not survive the
student tokenizer's round trip are counted and reported (warned above 1%).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from miniplm.core.config import ConfigError, Progress, option
from miniplm.core.manifest import read_manifest, write_json_atomic
from miniplm.core.stage import Stage, StageResult, execute
from miniplm.core.tokenizer import load_tokenizer, source_fingerprint
from miniplm.core.tokens import Retokenizer
from miniplm.data.packing import Instance
from miniplm.data.shards import PackedCorpus, ShardWriter, atomic_write, token_dtype

ROWS_PER_BATCH = 4096
MEGATRON_DTYPES = {np.dtype(np.uint8): 1, np.dtype(np.int8): 2, np.dtype(np.int16): 3, np.dtype(np.int32): 4,
                   np.dtype(np.int64): 5, np.dtype(np.float64): 6, np.dtype(np.float32): 7,
                   np.dtype(np.uint16): 8}


@dataclass
class ExportConfig(Progress):
    selection: str = option("out/selection", "a `miniplm select` output")
    subset: Literal["selected", "unselected", "all"] = option("selected", "which instances to export")
    format: Literal["jsonl", "parquet", "tokens", "megatron", "nanogpt", "hf"] = option(
        "tokens", "output format (see `miniplm export --help`)")
    tokenizer: str | None = option(None, "student tokenizer for token formats (null: the corpus's, no re-tokenizing)")
    max_len: int | None = option(None, "student sequence length: instances are truncated to max_len + 1 tokens "
                                 "(null: the corpus's max_len)")
    add_bos: Literal["auto", "yes", "no"] = option("auto", "prepend BOS (auto: when the student tokenizer adds one)")
    output: str = option("out/export", "output directory", hashed=False)
    trust_remote_code: bool = option(False, "allow the tokenizer's own code to run", hashed=False)

    def validate(self) -> None:
        if self.max_len is not None and self.max_len < 8:
            raise ConfigError(f"max_len: must be at least 8, got {self.max_len}")


def _rows(selection: Path, subset: str) -> Iterator[dict]:
    """Batches of the selection's rows in corpus order, filtered to the subset."""
    for batch in pq.ParquetFile(selection / "instances.parquet").iter_batches(batch_size=ROWS_PER_BATCH):
        table = pa.Table.from_batches([batch])
        if subset != "all":
            mask = table.column("selected")
            table = table.filter(mask if subset == "selected" else pc.invert(mask))
        if table.num_rows:
            yield table.to_pydict()


class Export(Stage):
    name = "export"
    config = ExportConfig
    version = 2  # special-token strings in text are encoded as text

    def inputs(self, config: ExportConfig, log) -> dict:
        return {"selection": _selection_manifest(config)["key"],
                "tokenizer": source_fingerprint(config.tokenizer) if config.tokenizer else None}

    def run(self, config: ExportConfig, out: Path, inputs: dict, log) -> dict:
        selection = Path(config.selection)
        sel_manifest = _selection_manifest(config)
        corpus = PackedCorpus(sel_manifest["corpus"]["path"])
        if corpus.key != sel_manifest["corpus"]["key"]:
            raise ValueError(f"{corpus.path} changed since {selection} was selected from it (corpus key "
                             f"{corpus.key} != {sel_manifest['corpus']['key']}); select again")
        split = corpus.split(sel_manifest["corpus"]["split"])
        max_len = config.max_len or corpus.manifest["max_len"]
        source_tok = corpus.load_tokenizer()
        token_format = config.format in ("tokens", "megatron", "nanogpt", "hf")
        student = load_tokenizer(config.tokenizer, config.trust_remote_code) if config.tokenizer else None
        convert = None
        if token_format and student is not None:
            convert = Retokenizer(source_tok, corpus.eos_id, student, max_len, config.add_bos)
        vocab = len(student) if student is not None else len(source_tok)
        dtype = token_dtype(vocab)

        if student is not None and token_format:
            student.save_pretrained(out / "tokenizer")
        elif token_format:
            source_tok.save_pretrained(out / "tokenizer")
        writer = _writer(config.format, out, dtype, corpus, source_tok)
        count = tokens = 0
        for rows in _rows(selection, config.subset):
            for i, instance_id in enumerate(rows["instance_id"]):
                ids = split[instance_id].astype(np.int64)
                if token_format:
                    ids = convert(ids) if convert is not None else ids[: max_len + 1]
                record = {k: v[i] for k, v in rows.items()}
                writer.add(record, ids)
                count += 1
                tokens += len(ids)
        details = writer.close()
        lossy = None
        if convert is not None:
            lossy = {"pieces": convert.pieces, "lossy": convert.lossy,
                     "fraction": round(convert.lossy / max(convert.pieces, 1), 5)}
            if lossy["fraction"] > 0.01:
                log(f"warning: {lossy['fraction']:.1%} of document pieces do not round-trip through the student "
                    f"tokenizer {config.tokenizer} (decode(encode(text)) != text)")
        return dict(
            selection={"path": str(selection), "key": sel_manifest["key"]},
            corpus={"path": str(corpus.path), "key": corpus.key},
            instances=count, tokens=tokens, dtype=dtype.name if token_format else None, max_len=max_len,
            tokenizer={"spec": config.tokenizer or corpus.manifest["tokenizer"]["spec"], "vocab_size": vocab,
                       "retokenized": convert is not None,
                       "bos": None if convert is None else convert.bos,
                       # what `PackedCorpus` reads, so that `miniplm train --corpus` takes a tokens export
                       **({"eos_id": int(student.eos_token_id if student is not None else corpus.eos_id),
                           "dtype": dtype.name, "path": "tokenizer"} if token_format else {})},
            splits={"train": {"instances": count, "tokens": tokens}} if config.format == "tokens" else None,
            round_trip=lossy, files=details,
        )

    def summary(self, manifest: dict) -> str:
        return (f"exported {manifest['instances']:,} instances ({manifest['tokens']:,} tokens) as "
                f"{manifest['config']['format']} into {manifest['output']}")


def export(config: ExportConfig, force: bool = False, log=print) -> StageResult:
    """Export the selection (or reuse an up-to-date export)."""
    return execute(Export(), config, force, log)


def _selection_manifest(config: ExportConfig) -> dict:
    manifest = read_manifest(config.selection)
    if manifest is None or manifest.get("stage") != "select":
        raise FileNotFoundError(f"{config.selection} is not a `miniplm select` output (no select manifest.json)")
    return manifest


def _writer(fmt: str, out: Path, dtype: np.dtype, corpus: PackedCorpus, source_tok):
    if fmt in ("jsonl", "parquet"):
        return _TextWriter(out, fmt, corpus.eos_id, source_tok)
    if fmt == "tokens":
        return _ShardExport(out, dtype)
    if fmt == "megatron":
        return _MegatronWriter(out / "data", dtype)
    if fmt == "nanogpt":
        return _NanoGPTWriter(out, dtype)
    return _HFWriter(out)


class _TextWriter:
    def __init__(self, out: Path, fmt: str, eos: int, tokenizer):
        self.path = out / f"data.{fmt}"
        self.fmt, self.eos, self.tokenizer = fmt, eos, tokenizer
        self.rows: list[dict] = []
        self.fh = open(self.path, "w", encoding="utf-8") if fmt == "jsonl" else None
        self.parquet: pq.ParquetWriter | None = None

    def add(self, record: dict, ids: np.ndarray) -> None:
        ends = np.flatnonzero(ids == self.eos)
        pieces = [self.tokenizer.decode(ids[a:b].tolist()) for a, b in zip([0, *(ends + 1)], [*ends, len(ids)])
                  if b > a]
        row = {"instance_id": int(record["instance_id"]), "domain": record["domain"],
               "n_tokens": int(record["n_tokens"]),
               **{k: _float(record[k]) for k in ("teacher_logp", "ref_logp", "key")},
               "pieces": pieces, "text": "\n\n".join(pieces)}
        if self.fh is not None:
            self.fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        else:
            self.rows.append(row)
            if len(self.rows) >= ROWS_PER_BATCH:
                self._flush()

    def _flush(self) -> None:
        if self.rows:
            table = pa.Table.from_pylist(self.rows)
            if self.parquet is None:
                self.parquet = pq.ParquetWriter(self.path, table.schema)
            self.parquet.write_table(table)
            self.rows = []

    def close(self) -> dict:
        if self.fh is not None:
            self.fh.close()
        else:
            self._flush()
            if self.parquet is None:  # nothing exported: still write an empty, readable file
                pq.write_table(pa.table({"instance_id": pa.array([], pa.int64())}), self.path)
            else:
                self.parquet.close()
        return {"data": self.path.name}


def _float(value) -> float | None:
    return None if value is None or value != value else float(value)  # NaN -> null


class _ShardExport:
    def __init__(self, out: Path, dtype: np.dtype):
        self.writer = ShardWriter(out / "train", dtype, 1 << 26, shuffle=False, seed=0)

    def add(self, record: dict, ids: np.ndarray) -> None:
        self.writer.add(Instance(ids, record["domain"], np.array([record["instance_id"]], dtype=np.int64)))

    def close(self) -> dict:
        summary = self.writer.close()
        return {"split": "train", "instances": summary["instances"], "shards": summary["shards"],
                "note": "doc_indices hold the source instance_id"}


class _MegatronWriter:
    """Megatron-LM's MMapIndexedDataset: one sequence (and one document) per instance."""

    def __init__(self, prefix: Path, dtype: np.dtype):
        self.prefix, self.dtype = prefix, dtype
        self.bin = open(prefix.with_suffix(".bin.tmp"), "wb")
        self.sizes: list[int] = []

    def add(self, record: dict, ids: np.ndarray) -> None:
        self.bin.write(ids.astype(self.dtype).tobytes())
        self.sizes.append(len(ids))

    def close(self) -> dict:
        self.bin.close()
        sizes = np.asarray(self.sizes, dtype=np.int32)
        pointers = np.zeros(len(sizes), dtype=np.int64)
        if len(sizes) > 1:
            np.cumsum(sizes[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        doc_idx = np.arange(len(sizes) + 1, dtype=np.int64)

        def write_index(path: Path) -> None:
            with open(path, "wb") as fh:
                fh.write(b"MMIDIDX\x00\x00")
                fh.write(struct.pack("<Q", 1))
                fh.write(struct.pack("<B", MEGATRON_DTYPES[self.dtype]))
                fh.write(struct.pack("<Q", len(sizes)))
                fh.write(struct.pack("<Q", len(doc_idx)))
                fh.write(sizes.tobytes(order="C"))
                fh.write(pointers.tobytes(order="C"))
                fh.write(doc_idx.tobytes(order="C"))

        self.prefix.with_suffix(".bin.tmp").rename(self.prefix.with_suffix(".bin"))
        atomic_write(self.prefix.with_suffix(".idx"), write_index)
        return {"bin": self.prefix.with_suffix(".bin").name, "idx": self.prefix.with_suffix(".idx").name}


class _NanoGPTWriter:
    def __init__(self, out: Path, dtype: np.dtype):
        self.out, self.dtype = out, dtype
        self.fh = open(out / "train.bin.tmp", "wb")
        self.tokens = 0

    def add(self, record: dict, ids: np.ndarray) -> None:
        self.fh.write(ids.astype(self.dtype).tobytes())
        self.tokens += len(ids)

    def close(self) -> dict:
        self.fh.close()
        (self.out / "train.bin.tmp").rename(self.out / "train.bin")
        write_json_atomic(self.out / "meta.json", {"dtype": self.dtype.name, "tokens": self.tokens})
        return {"bin": "train.bin", "meta": "meta.json", "dtype": self.dtype.name}


class _HFWriter:
    """Rows go to an Arrow stream file on disk (bounded memory), which `datasets` maps and saves."""

    SCHEMA = pa.schema([("instance_id", pa.int64()), ("domain", pa.string()), ("teacher_logp", pa.float64()),
                        ("ref_logp", pa.float64()), ("key", pa.float64()), ("input_ids", pa.list_(pa.int32()))])

    def __init__(self, out: Path):
        try:
            import datasets  # noqa: F401 - optional, heavy: the hf extra, imported only for this format
        except ImportError:
            raise ImportError("the hf export format needs 'datasets': pip install 'miniplm[hf]'") from None
        self.out = out
        self.arrow_path = out / "rows.arrow"
        self.sink = pa.OSFile(str(self.arrow_path), "wb")
        self.stream = pa.ipc.new_stream(self.sink, self.SCHEMA)
        self.rows: list[dict] = []

    def add(self, record: dict, ids: np.ndarray) -> None:
        self.rows.append({**{k: record[k] for k in ("instance_id", "domain", "teacher_logp", "ref_logp", "key")},
                          "input_ids": ids.astype(np.int32)})
        if len(self.rows) >= ROWS_PER_BATCH:
            self._flush()

    def _flush(self) -> None:
        if self.rows:
            self.stream.write_table(pa.Table.from_pylist(self.rows, schema=self.SCHEMA))
            self.rows = []

    def close(self) -> dict:
        import datasets  # optional, heavy: the hf extra (checked in __init__)

        self._flush()
        self.stream.close()
        self.sink.close()
        datasets.Dataset.from_file(str(self.arrow_path)).save_to_disk(str(self.out / "dataset"))
        self.arrow_path.unlink()
        return {"dataset": "dataset"}
