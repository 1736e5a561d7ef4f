"""`miniplm prepare`: raw corpus -> packed instances in the teacher's tokenizer, split by document.

Output directory:
    manifest.json        inputs (sha256), tokenizer, config and its hash, versions, counts, skips
    documents.parquet    one row per document read: doc_index, doc_id, source, record, domain, split,
                         n_tokens (with EOS; 0 when skipped), skip, detail
    tokenizer/           the tokenizer, saved, so later stages load exactly what packed the corpus
    <split>/             packed instances of each split (see miniplm.data.shards): train = D,
                         ref = D_ref for the reference LM, held-out evaluation splits
"""

from __future__ import annotations

import hashlib
import io
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.parquet as pq
from rich.console import Console
from rich.table import Table

from miniplm.core import stop
from miniplm.core.config import ConfigError, Progress, option, require_at_least_one
from miniplm.core.hashing import path_sha256
from miniplm.core.progress import progress
from miniplm.core.stage import Stage, StageResult, execute
from miniplm.core.tokenizer import DEFAULT_TOKENIZER, load_tokenizer, source_fingerprint
from miniplm.data import default_corpus
from miniplm.data.packing import BoundaryTable, Packer
from miniplm.data.readers import (
    BadRecordError,
    Document,
    Fields,
    InputFile,
    InputSpec,
    expand_inputs,
    input_bytes,
    read_documents,
)
from miniplm.data.shards import ShardWriter, token_dtype

TRAIN_SPLIT = "train"
DEFAULT_INPUT = "default"

DOCUMENT_SCHEMA = pa.schema(
    [
        ("doc_index", pa.int64()),
        ("doc_id", pa.string()),
        ("source", pa.string()),
        ("record", pa.int64()),
        ("domain", pa.string()),
        ("split", pa.string()),
        ("n_tokens", pa.int64()),
        ("skip", pa.string()),
        ("detail", pa.string()),
    ]
)


@dataclass
class SplitSpec:
    fraction: float = option(0.0, "share of documents (so, in expectation, of tokens) assigned to this split; "
                             "1 with `domains`: every document of those domains (a domain no model trains on)")
    domains: list[str] | None = option(None, "only documents of these domains are eligible (null: all)")


def _default_splits() -> dict[str, SplitSpec]:
    return {
        "ref": SplitSpec(0.05),
        "heldout": SplitSpec(0.01),
        "heldout_hq": SplitSpec(0.05, ["wikipedia"]),
        "heldout_unseen": SplitSpec(1.0, ["dictionary"]),
    }


@dataclass
class PrepareConfig(Progress):
    inputs: list[str | InputSpec] = option(
        default_factory=lambda: [DEFAULT_INPUT],
        help="files, directories or globs (jsonl[.gz|.zst], parquet, .txt, HF save_to_disk), or mappings "
        "{path, format, domain}; 'default' is the default corpus, assembled from package registries",
    )
    output: str = option("out/corpus", "output directory", hashed=False)
    tokenizer: str = option(DEFAULT_TOKENIZER, "HF tokenizer: local directory, hub id, .gguf file, or 'smollm2'")
    trust_remote_code: bool = option(False, "allow a tokenizer's own code from its directory or hub repo to run")
    text_field: str = option("text", "record field holding the document text (a dotted path reads a nested "
                             "field, e.g. metadata.text)")
    domain_field: str | None = option("domain", "record field naming the domain (null: one domain); a dotted path "
                                      "reads a nested field, e.g. metadata.domain in datatrove's jsonl")
    id_field: str | None = option("id", "record field holding a document id (default: file:line); dotted paths "
                                  "as text_field")
    default_domain: str = option("default", "domain of records without a domain field")
    eos_token: str | None = option(None, "token appended to every document (null: the tokenizer's EOS)")
    max_len: int = option(1024, "training positions per instance; instances hold up to max_len + 1 tokens")
    max_chunks_per_document: int | None = option(2000, "stop a document after this many instances (null: no cap)")
    max_documents_per_domain: int | None = option(None, "use only the first N documents of each domain")
    splits: dict[str, SplitSpec] = option(
        default_factory=_default_splits,
        help="named splits carved out of the corpus by document; the rest is 'train' (D). ref is D_ref "
        "(5% as the paper's 5B of 105B), heldout a held-out sample of the mix, heldout_hq a held-out "
        "high-quality set, heldout_unseen the default corpus's unseen domain, held out whole (a split is "
        "empty when no document has one of its domains)",
    )
    seed: int = option(10, "seed for split assignment and shuffling (the paper's seed)")
    shuffle: bool = option(False, "shuffle instances within each shard (students read in stored order)")
    shard_tokens: int = option(1 << 26, "tokens per shard file")
    on_bad_record: Literal["skip", "fail"] = option("skip", "bad records: count and skip, or stop with an error",
                                                   hashed=False)
    batch_documents: int = option(256, "documents per tokenizer call", hashed=False)

    def validate(self) -> None:
        if self.max_len < 8:
            raise ConfigError(f"max_len: must be at least 8, got {self.max_len}")
        if not self.inputs:
            raise ConfigError("inputs: give at least one file, directory or glob (or 'default')")
        for name, spec in self.splits.items():
            if name == TRAIN_SPLIT:
                raise ConfigError(f"splits.{TRAIN_SPLIT}: '{TRAIN_SPLIT}' is the remainder; it takes no fraction")
            if not 0 <= spec.fraction <= 1:
                raise ConfigError(f"splits.{name}.fraction: must be in [0, 1], got {spec.fraction}")
            if spec.fraction == 1 and not spec.domains:
                raise ConfigError(f"splits.{name}.fraction: 1 takes whole domains; name them in "
                                  f"splits.{name}.domains, or give a fraction below 1")
        if sum(s.fraction for s in self.splits.values() if s.fraction < 1) >= 1:
            raise ConfigError("splits: the fractions add up to 1 or more, leaving nothing for train")
        require_at_least_one(self, "max_chunks_per_document", "max_documents_per_domain", "shard_tokens",
                             "batch_documents")


def split_point(seed: int, doc_id: str) -> float:
    """A uniform number in [0, 1) fixed by seed and document id."""
    digest = hashlib.blake2b(f"{seed}\0{doc_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def assign_split(u: float, domain: str, splits: dict[str, SplitSpec]) -> str:
    """A split that takes the whole domain, else consecutive intervals of [0, 1) among the splits the domain
    is eligible for."""
    for name, spec in splits.items():
        if spec.fraction == 1 and domain in spec.domains:
            return name
    low = 0.0
    for name, spec in splits.items():
        if spec.domains is not None and domain not in spec.domains:
            continue
        if u < low + spec.fraction:
            return name
        low += spec.fraction
    return TRAIN_SPLIT


@dataclass
class DomainCounts:
    documents: int = 0
    skipped: int = 0
    tokens: int = 0
    splits: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # documents per split


def _input_specs(config: PrepareConfig, log) -> list[InputSpec]:
    specs = []
    for item in config.inputs:
        if item == DEFAULT_INPUT:
            root = default_corpus.ensure_default_corpus(log=log)
            specs.extend(InputSpec(str(p)) for p in default_corpus.default_corpus_files(root))
        else:
            specs.append(item if isinstance(item, InputSpec) else InputSpec(item))
    return specs


class _DocumentTable:
    """Streams documents.parquet in row groups so memory stays flat on large corpora."""

    def __init__(self, path: Path):
        self.writer = pq.ParquetWriter(path, DOCUMENT_SCHEMA)
        self.rows: list[dict] = []

    def add(self, doc: Document, index: int, split: str | None, n_tokens: int) -> None:
        self.rows.append(dict(doc_index=index, doc_id=doc.doc_id, source=doc.source, record=doc.record,
                              domain=doc.domain, split=split, n_tokens=n_tokens, skip=doc.skip, detail=doc.detail))
        if len(self.rows) >= 65536:
            self.flush()

    def flush(self) -> None:
        if self.rows:
            self.writer.write_table(pa.Table.from_pylist(self.rows, schema=DOCUMENT_SCHEMA))
            self.rows = []

    def close(self) -> None:
        self.flush()
        self.writer.close()


class Prepare(Stage):
    name = "prepare"
    config = PrepareConfig
    version = 2  # special-token strings in text are text; full-width sentence ends are boundaries

    def inputs(self, config: PrepareConfig, log) -> dict:
        files = expand_inputs(_input_specs(config, log))
        return {"files": [{"path": f.path, "format": f.format, "domain": f.domain, "bytes": input_bytes(f),
                           "sha256": path_sha256(f.path)} for f in files],
                "tokenizer": source_fingerprint(config.tokenizer)}

    def run(self, config: PrepareConfig, out: Path, inputs: dict, log) -> dict:
        files = [InputFile(f["path"], f["format"], f["domain"]) for f in inputs["files"]]
        tokenizer = load_tokenizer(config.tokenizer, trust_remote_code=config.trust_remote_code)
        eos_id = _eos_id(tokenizer, config)
        vocab_size = len(tokenizer)
        dtype = token_dtype(vocab_size)
        boundaries = BoundaryTable.from_tokenizer(tokenizer)
        fields = Fields(config.text_field, config.domain_field, config.id_field, config.default_domain)
        split_names = [TRAIN_SPLIT, *config.splits]

        tokenizer.save_pretrained(out / "tokenizer")
        packers = {s: Packer(config.max_len, eos_id, boundaries, config.max_chunks_per_document) for s in split_names}
        writers = {s: ShardWriter(out / s, dtype, config.shard_tokens, config.shuffle, config.seed)
                   for s in split_names}
        documents = _DocumentTable(out / "documents.parquet")
        domains: dict[str, DomainCounts] = defaultdict(DomainCounts)
        skip_reasons: dict[str, int] = defaultdict(int)
        skip_examples: list[str] = []
        doc_index = 0

        def skip(doc: Document) -> None:
            nonlocal doc_index
            if config.on_bad_record == "fail" and doc.skip != "over_limit":
                raise BadRecordError(doc)
            domains[doc.domain].skipped += 1
            skip_reasons[doc.skip] += 1
            if len(skip_examples) < 20:
                skip_examples.append(f"{doc.where()}: {doc.skip}: {doc.detail}")
            documents.add(doc, doc_index, None, 0)
            doc_index += 1

        def pack(batch: list[Document]) -> None:
            nonlocal doc_index
            # split_special_tokens: a literal "<|im_end|>" in a document is text, not a document boundary
            encoded = tokenizer([d.text for d in batch], add_special_tokens=False,
                                split_special_tokens=True)["input_ids"]
            for doc, ids in zip(batch, encoded):
                split = assign_split(split_point(config.seed, doc.doc_id), doc.domain, config.splits)
                for instance in packers[split].add(ids, doc.domain, doc_index):
                    writers[split].add(instance)
                counts = domains[doc.domain]
                counts.documents += 1
                counts.tokens += len(ids) + 1
                counts.splits[split] += 1
                documents.add(doc, doc_index, split, len(ids) + 1)
                doc_index += 1

        total_bytes = sum(f["bytes"] for f in inputs["files"])
        with progress(config.progress, total_bytes, "prepare", unit="bytes") as advance:
            batch: list[Document] = []
            per_domain: dict[str, int] = defaultdict(int)
            for doc in read_documents(files, fields, on_bytes=advance):
                if doc.skip is None and config.max_documents_per_domain is not None:
                    per_domain[doc.domain] += 1
                    if per_domain[doc.domain] > config.max_documents_per_domain:
                        doc.text, doc.skip, doc.detail = None, "over_limit", "beyond max_documents_per_domain"
                if doc.skip is not None:
                    if batch:  # keep documents.parquet in reading order
                        pack(batch)
                        batch = []
                    skip(doc)
                    continue
                batch.append(doc)
                if len(batch) >= config.batch_documents:
                    pack(batch)
                    batch = []
                    stop.check()  # prepare writes its output whole: a stop abandons it
            if batch:
                pack(batch)

        splits_summary = {}
        for name in split_names:
            for instance in packers[name].flush():
                writers[name].add(instance)
            summary = writers[name].close()
            summary["documents"] = sum(c.splits.get(name, 0) for c in domains.values())
            summary["packing"] = vars(packers[name].stats)
            splits_summary[name] = summary
        documents.close()
        truncated = sum(s["packing"]["truncated_documents"] for s in splits_summary.values())
        if truncated:
            dropped = sum(s["packing"]["truncated_tokens"] for s in splits_summary.values())
            log(f"prepare: {truncated:,} document(s) ran past max_chunks_per_document "
                f"({config.max_chunks_per_document:,} instances); their last {dropped:,} tokens were dropped "
                f"(raise the cap, or set it to null, to keep them)")

        read = doc_index
        packed = sum(c.documents for c in domains.values())
        skipped = sum(c.skipped for c in domains.values())
        assert read == packed + skipped, "document accounting is broken"
        if packed == 0:
            names = ", ".join(f["path"] for f in inputs["files"][:5]) + (" ..." if len(inputs["files"]) > 5 else "")
            why = "; ".join(f"{n} {reason}" for reason, n in skip_reasons.items()) or "no records"
            raise ValueError(f"nothing to pack: the inputs ({names}) held {read:,} documents, none usable ({why}); "
                             f"check the paths and --text-field")
        _warn_empty_splits(config, splits_summary, log)
        return dict(
            tokenizer={"spec": config.tokenizer, "fingerprint": inputs["tokenizer"], "class": type(tokenizer).__name__,
                       "vocab_size": vocab_size, "eos_id": eos_id, "eos_token": tokenizer.convert_ids_to_tokens(eos_id),
                       "path": "tokenizer", "dtype": dtype.name},
            max_len=config.max_len,
            documents={"read": read, "packed": packed, "skipped": skipped, "skip_reasons": dict(skip_reasons),
                       "skip_examples": skip_examples},
            domains={d: {"documents": c.documents, "skipped": c.skipped, "tokens": c.tokens,
                         "split_documents": dict(c.splits)} for d, c in sorted(domains.items())},
            splits=splits_summary,
        )

    def summary(self, manifest: dict) -> str:
        header, rows = summary_rows(manifest)
        table = Table(title=f"prepared {manifest['output']} (tokens; the last columns split them by "
                            f"D/D_ref/held-out)")
        for i, column in enumerate(header):
            table.add_column(column, justify="left" if i == 0 else "right")
        for row in rows:
            table.add_row(*[f"{v:,}" if isinstance(v, int) else str(v) for v in row])
        text = Console(file=io.StringIO(), width=120, color_system=None)
        text.print(table)
        docs = manifest["documents"]
        reasons = ", ".join(f"{k}: {v:,}" for k, v in sorted(docs["skip_reasons"].items())) or "none"
        return (text.file.getvalue() + f"documents read {docs['read']:,} = packed {docs['packed']:,} + skipped "
                f"{docs['skipped']:,} ({reasons}); wall time {manifest['wall_seconds']:.1f} s")


def prepare(config: PrepareConfig, force: bool = False, log=print) -> StageResult:
    """Pack the corpus (or reuse an up-to-date output)."""
    return execute(Prepare(), config, force, log)


def _eos_id(tokenizer, config: PrepareConfig) -> int:
    if config.eos_token is None:
        if tokenizer.eos_token_id is None:
            raise ConfigError(f"tokenizer '{config.tokenizer}' has no EOS token; set eos_token to one of its tokens")
        return int(tokenizer.eos_token_id)
    eos_id = tokenizer.convert_tokens_to_ids(config.eos_token)
    if eos_id is None or eos_id == tokenizer.unk_token_id:
        raise ConfigError(f"eos_token: {config.eos_token!r} is not a token of '{config.tokenizer}'")
    return int(eos_id)


def _warn_empty_splits(config: PrepareConfig, splits: dict, log) -> None:
    for name, spec in config.splits.items():
        if spec.fraction > 0 and splits[name]["instances"] == 0:
            where = f" (domains {spec.domains})" if spec.domains else ""
            log(f"warning: split '{name}'{where} received no documents")


def summary_rows(manifest: dict) -> tuple[list[str], list[list]]:
    """The per-domain table printed at the end: documents, skipped, tokens, instances, tokens per split."""
    split_names = list(manifest["splits"])
    per_domain_instances: dict[str, int] = defaultdict(int)
    per_domain_tokens: dict[str, int] = defaultdict(int)
    per_split_domain: dict[tuple[str, str], int] = defaultdict(int)
    for split, info in manifest["splits"].items():
        for domain, counts in info["domains"].items():
            per_domain_instances[domain] += counts["instances"]
            per_domain_tokens[domain] += counts["tokens"]
            per_split_domain[(split, domain)] += counts["tokens"]
    header = ["domain", "documents", "skipped", "tokens", "instances", *split_names]
    rows = []
    for domain, counts in manifest["domains"].items():
        rows.append([domain, counts["documents"], counts["skipped"], per_domain_tokens[domain],
                     per_domain_instances[domain], *[per_split_domain[(s, domain)] for s in split_names]])
    totals = ["total"] + [sum(r[i] for r in rows) for i in range(1, len(header))]
    rows.append(totals)
    return header, rows
