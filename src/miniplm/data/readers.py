"""Corpus readers: jsonl (plain, .gz, .zst), parquet, directories of .txt, HF `save_to_disk` datasets.

Every reader yields `Document`s in a deterministic order. A record that cannot be used is still yielded,
with `skip` set to a reason, so the caller decides between a counted skip and a hard error
(`on_bad_record`) and the books balance: documents read = documents packed + documents skipped.
Inputs are split across workers by file with (rank, world_size).
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

from miniplm.core.config import option

FORMATS = ("jsonl", "parquet", "txt", "hf")
_JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
_COMPRESSIONS = ("", ".gz", ".zst")
HF_MARKERS = ("state.json", "dataset_dict.json")

# Why a record was skipped, and what to do about it (shown by --on-bad-record fail).
SKIP_FIXES = {
    "empty": "remove empty or whitespace-only documents",
    "invalid_utf8": "re-encode the file as UTF-8",
    "binary": "remove binary files from the input",
    "bad_json": "fix the line so that it is one JSON object",
    "missing_field": "add the field, or point --text-field/--domain-field/--id-field at the right one",
    "not_text": "store the text field as a string",
    "lone_surrogate": "write the character the \\uD8xx escape belongs to with its pair (or as UTF-8), or remove it",
    "unreadable_file": "replace the file with a readable one, or remove it from the inputs",
}


@dataclass(slots=True)
class Document:
    text: str | None  # None when skipped
    domain: str
    source: str  # the file (or dataset directory[split]) the record came from
    record: int  # 1-based line for jsonl, 0-based row for parquet/hf, 0 for a txt file
    doc_id: str
    skip: str | None = None  # a key of SKIP_FIXES
    detail: str = ""

    def where(self) -> str:
        return f"{self.source}:{self.record}"


class BadRecordError(ValueError):
    """A bad record under on_bad_record=fail: names the file, the line/row and the fix."""

    def __init__(self, doc: Document):
        fix = SKIP_FIXES.get(doc.skip or "", "")
        super().__init__(
            f"{doc.where()}: {doc.skip}: {doc.detail}. Fix: {fix}; or pass --on-bad-record skip "
            f"to count and skip such records"
        )
        self.doc = doc


@dataclass
class InputSpec:
    """One input: a file, a directory or a glob, with optional per-input settings."""

    path: str = option("", "file, directory or glob (** recurses)")
    format: str = option("auto", "auto (by extension), jsonl, parquet, txt or hf")
    domain: str | None = option(None, "domain for every document of this input (overrides domain_field)")


@dataclass(frozen=True)
class InputFile:
    path: str
    format: str
    domain: str | None  # a fixed domain from the InputSpec


@dataclass(frozen=True)
class Fields:
    text: str = "text"
    domain: str | None = "domain"
    id: str | None = "id"
    default_domain: str = "default"


def detect_format(path: Path) -> str | None:
    name = path.name.lower()
    if path.is_dir():
        return "hf" if any((path / m).is_file() for m in HF_MARKERS) else None
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(".txt"):
        return "txt"
    if any(name.endswith(s + c) for s in _JSONL_SUFFIXES for c in _COMPRESSIONS):
        return "jsonl"
    return None


def expand_inputs(specs: list[InputSpec]) -> list[InputFile]:
    """Resolve globs and directories into a sorted list of files, refusing inputs that match nothing."""
    files: list[InputFile] = []
    for spec in specs:
        if spec.format not in ("auto", *FORMATS):
            raise ValueError(f"input {spec.path!r}: unknown format {spec.format!r}; use auto or one of {FORMATS}")
        if any(ch in spec.path for ch in "*?["):
            candidates = [Path(p) for p in sorted(glob.glob(os.path.expanduser(spec.path), recursive=True))]
        else:
            root = Path(spec.path).expanduser()
            if not root.exists():
                raise FileNotFoundError(f"input {spec.path!r} does not exist")
            if root.is_dir() and detect_format(root) is None:
                candidates = sorted(p for p in root.rglob("*") if p.is_file())
            else:
                candidates = [root]
        matched = []
        for path in candidates:
            fmt = detect_format(path) if spec.format == "auto" else spec.format
            if fmt is not None and (path.is_file() or fmt == "hf"):
                matched.append(InputFile(str(path), fmt, spec.domain))
        if not matched:
            raise FileNotFoundError(
                f"input {spec.path!r} matched no readable files (jsonl[.gz|.zst], parquet, txt, or an HF "
                f"save_to_disk directory); check the path or set its format"
            )
        files.extend(matched)
    return files


def input_bytes(file: InputFile) -> int:
    path = Path(file.path)
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def read_documents(
    files: list[InputFile],
    fields: Fields,
    rank: int = 0,
    world_size: int = 1,
    on_bytes: Callable[[int], None] | None = None,
) -> Iterator[Document]:
    """Documents of this worker's files (file i goes to rank i % world_size), in file order."""
    on_bytes = on_bytes or (lambda n: None)
    for i, file in enumerate(files):
        if i % world_size != rank:
            continue
        reader = _READERS[file.format]
        yield from reader(file, fields, on_bytes)


def field_value(record: dict, path: str):
    """The value at `path` in a record: a top-level key, or a dotted path into nested objects
    (`metadata.domain`, as datatrove's writers nest every field but text and id); None when absent.
    A top-level key that itself holds dots wins over the nested reading."""
    if path in record:
        return record[path]
    value = record
    for key in path.split("."):
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def _domain(file: InputFile, record: dict, fields: Fields) -> str:
    if file.domain is not None:
        return file.domain
    value = field_value(record, fields.domain) if fields.domain else None
    return fields.default_domain if value is None else str(value)


def _document(file: InputFile, record: dict, index: int, fields: Fields) -> Document:
    """A Document from one parsed record (a dict), checking the text field."""
    doc_id = field_value(record, fields.id) if fields.id else None
    doc_id = f"{file.path}:{index}" if doc_id is None else str(doc_id)
    domain = _domain(file, record, fields)
    text = field_value(record, fields.text)
    if text is None:
        return Document(None, domain, file.path, index, doc_id, "missing_field", f"no '{fields.text}' field")
    if not isinstance(text, str):
        return Document(None, domain, file.path, index, doc_id, "not_text", f"'{fields.text}' is {type(text).__name__}")
    if not text.strip():
        return Document(None, domain, file.path, index, doc_id, "empty", "empty or whitespace-only text")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:  # a JSON \ud800 escape without its pair: no tokenizer can take it
        return Document(None, domain, file.path, index, doc_id, "lone_surrogate",
                        f"character {exc.start} is a lone surrogate ({text[exc.start]!a})")
    return Document(text, domain, file.path, index, doc_id)


def _open_binary(path: str) -> io.BufferedIOBase:
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith(".zst"):
        raw = open(path, "rb")
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True))
    return open(path, "rb")


def read_jsonl(file: InputFile, fields: Fields, on_bytes: Callable[[int], None]) -> Iterator[Document]:
    compressed = file.path.endswith((".gz", ".zst"))
    with _open_binary(file.path) as fh:
        for line_no, line in enumerate(fh, start=1):
            if not compressed:
                on_bytes(len(line))
            if not line.strip():
                continue  # blank lines separate nothing in jsonl; they are not documents
            bad = Document(None, file.domain or fields.default_domain, file.path, line_no, f"{file.path}:{line_no}")
            try:  # a byte-order mark may open the file (utf-8-sig)
                record = json.loads(line.decode("utf-8-sig" if line_no == 1 else "utf-8"))
            except UnicodeDecodeError as exc:
                bad.skip, bad.detail = "invalid_utf8", f"byte {exc.start}: {exc.reason}"
            except json.JSONDecodeError as exc:  # some messages end in "at" ("Invalid control character at")
                bad.skip, bad.detail = "bad_json", f"{exc.msg.removesuffix(' at')} at column {exc.colno}"
            else:
                if isinstance(record, dict):
                    yield _document(file, record, line_no, fields)
                    continue
                bad.skip, bad.detail = "bad_json", f"a JSON {type(record).__name__}, not an object"
            yield bad
    if compressed:
        on_bytes(os.path.getsize(file.path))


def _columns(fields: Fields, schema_names: list[str]) -> list[str]:
    """The columns to read: each field's own column, or the top-level column a dotted path starts in."""
    wanted = [f if f in schema_names else f.split(".")[0] for f in (fields.text, fields.domain, fields.id) if f]
    return list(dict.fromkeys(c for c in wanted if c in schema_names))


def _table_documents(
    file: InputFile, fields: Fields, batches, source: str, size: int, total_rows: int,
    on_bytes: Callable[[int], None],
) -> Iterator[Document]:
    """Documents from arrow batches/tables, reporting progress as the share of `size` read so far."""
    row = reported = 0
    located = InputFile(source, file.format, file.domain)
    for batch in batches:
        for record in batch.to_pylist():
            yield _document(located, record, row, fields)
            row += 1
        done = size * row // max(total_rows, 1)
        on_bytes(done - reported)
        reported = done


def read_parquet(file: InputFile, fields: Fields, on_bytes: Callable[[int], None]) -> Iterator[Document]:
    try:
        pf = pq.ParquetFile(file.path)
        columns = _columns(fields, pf.schema_arrow.names)
        batches = pf.iter_batches(batch_size=1024, columns=columns)
        yield from _table_documents(file, fields, batches, file.path, os.path.getsize(file.path),
                                    pf.metadata.num_rows, on_bytes)
    except (pa.ArrowException, OSError) as exc:
        yield Document(None, file.domain or fields.default_domain, file.path, 0, file.path,
                       "unreadable_file", f"{type(exc).__name__}: {exc}")


def read_txt(file: InputFile, fields: Fields, on_bytes: Callable[[int], None]) -> Iterator[Document]:
    """One document per file."""
    data = Path(file.path).read_bytes()
    on_bytes(len(data))
    doc = Document(None, file.domain or fields.default_domain, file.path, 0, file.path)
    if b"\x00" in data:
        doc.skip, doc.detail = "binary", "contains NUL bytes"
    else:
        try:
            doc.text = data.decode("utf-8-sig")  # without a leading byte-order mark
        except UnicodeDecodeError as exc:
            doc.skip, doc.detail = "invalid_utf8", f"byte {exc.start}: {exc.reason}"
        else:
            if not doc.text.strip():
                doc.text, doc.skip, doc.detail = None, "empty", "empty or whitespace-only file"
    yield doc


def read_hf(file: InputFile, fields: Fields, on_bytes: Callable[[int], None]) -> Iterator[Document]:
    try:
        import datasets  # optional, heavy: the hf extra, imported only for this input format
    except ImportError:
        raise ImportError("reading HF save_to_disk datasets needs 'datasets': pip install 'miniplm[hf]'") from None
    loaded = datasets.load_from_disk(file.path)
    splits = sorted(loaded.items()) if isinstance(loaded, datasets.DatasetDict) else [(None, loaded)]
    size = input_bytes(file)
    for split, ds in splits:
        source = file.path if split is None else f"{file.path}[{split}]"
        columns = _columns(fields, ds.column_names)
        batches = ds.select_columns(columns).with_format("arrow").iter(batch_size=1024)
        yield from _table_documents(file, fields, batches, source, size // len(splits), len(ds), on_bytes)


_READERS = {"jsonl": read_jsonl, "parquet": read_parquet, "txt": read_txt, "hf": read_hf}
