"""`miniplm export`: a selection (or its complement) in the formats students' trainers read.

Formats, all in original corpus order (export/formats.py: each one's record, dtype rule and limits):
    jsonl, parquet  text with its scores, one record per instance (pieces: its documents or document pieces,
                    split on the source EOS; doc_ends: whether each piece's document ends there; text: the
                    pieces joined by a blank line), or with `layout: piece` one record per piece (id, text,
                    instance_id, piece, doc_end), so that re-tokenizing each record and appending EOS where
                    doc_end holds gives back the instance's tokens
    tokens          miniplm token shards (the `prepare` layout), readable by `miniplm train`
    megatron        Megatron-LM indexed dataset: data.bin + data.idx (MMIDIDX, version 1), uint16 below 65,500
                    entries, else int32, as Megatron's preprocessing; tokenizer/ opens with MegatronTokenizer
    nanogpt         nanoGPT's train.bin, val.bin (uint16; the held-out split, or --val-fraction of the export)
                    and meta.pkl with vocab_size; vocabularies past uint16 are refused
    hf              an HF dataset (`save_to_disk`): input_ids, attention_mask and the scores per instance, or
                    --block-size blocks with labels as run_clm builds; its tokenizer pads with a token not EOS
Token formats re-tokenize for a student tokenizer when one is given (cross-family, as the paper): each
instance is split on the source EOS, each piece decoded and encoded with the student's tokenizer, the
pieces joined with the student's EOS, BOS prepended for families that use one, and the result truncated
to max_len + 1 tokens: one output instance per input instance. Pieces whose text does not survive the
student tokenizer's round trip are counted and reported (warned above 1%).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from miniplm.core import stop
from miniplm.core.config import ConfigError, Progress, option
from miniplm.core.manifest import read_manifest
from miniplm.core.progress import progress
from miniplm.core.stage import Stage, StageResult, execute
from miniplm.core.tokenizer import load_tokenizer, source_fingerprint
from miniplm.core.tokens import Retokenizer
from miniplm.data.prepare import split_point
from miniplm.data.shards import PackedCorpus
from miniplm.export.formats import FORMATS, ROWS_PER_BATCH, Job

FormatName = Literal["jsonl", "parquet", "tokens", "megatron", "nanogpt", "hf"]  # FORMATS' keys (tested)


@dataclass
class ExportConfig(Progress):
    selection: str = option("out/selection", "a `miniplm select` output")
    subset: Literal["selected", "unselected", "all"] = option("selected", "which instances to export")
    format: FormatName = option("tokens", "output format (see `miniplm export --help`)")
    tokenizer: str | None = option(None, "student tokenizer for token formats (null: the corpus's, no re-tokenizing)")
    max_len: int | None = option(None, "student sequence length: instances are truncated to max_len + 1 tokens "
                                 "(null: the corpus's max_len)")
    add_bos: Literal["auto", "yes", "no"] = option("auto", "prepend BOS (auto: when the student tokenizer adds one)")
    layout: Literal["instance", "piece"] = option(
        "instance", "jsonl/parquet: one record per instance, or per document piece (id, text, instance_id, piece, "
        "doc_end: re-tokenize each and append EOS where doc_end to get the instance's tokens back)",
        hashed="when-set")
    block_size: int | None = option(
        None, "hf: rows of exactly this many tokens (input_ids, attention_mask, labels), the instances concatenated "
        "and cut as HF's run_clm does, the last partial block dropped (null: one row per instance)",
        hashed="when-set")
    val_split: str = option("heldout", "nanogpt: the corpus split written to val.bin", hashed="when-set")
    val_fraction: float | None = option(
        None, "nanogpt: write this share of the exported instances (drawn by instance id) to val.bin instead of "
        "train.bin, in place of val_split", hashed="when-set")
    output: str = option("out/export", "output directory", hashed=False)
    trust_remote_code: bool = option(False, "allow the tokenizer's own code to run", hashed=False)

    def validate(self) -> None:
        if self.max_len is not None and self.max_len < 8:
            raise ConfigError(f"max_len: must be at least 8, got {self.max_len}")
        fmt = FORMATS[self.format]
        if self.layout != "instance" and fmt.tokens:
            raise ConfigError(f"layout: {self.layout} is for the text formats (jsonl, parquet), not {self.format}")
        if self.block_size is not None and self.format != "hf":
            raise ConfigError(f"block_size: only the hf format writes blocks, not {self.format}")
        if self.block_size is not None and self.block_size < 2:
            raise ConfigError(f"block_size: must be at least 2 (one input and one target), got {self.block_size}")
        if self.val_fraction is not None and self.format != "nanogpt":
            raise ConfigError(f"val_fraction: only the nanogpt format writes a validation file, not {self.format}")
        if self.val_fraction is not None and not 0 < self.val_fraction < 1:
            raise ConfigError(f"val_fraction: must be between 0 and 1, got {self.val_fraction}")


def _rows(selection: Path, subset: str) -> Iterator[dict]:
    """Batches of the selection's rows in corpus order, filtered to the subset."""
    for batch in pq.ParquetFile(selection / "instances.parquet").iter_batches(batch_size=ROWS_PER_BATCH):
        table = pa.Table.from_batches([batch])
        if subset != "all":
            mask = table.column("selected")
            table = table.filter(mask if subset == "selected" else pc.invert(mask))
        if table.num_rows:
            yield table.to_pydict()


def held_for_validation(instance_id: int, fraction: float | None) -> bool:
    """Whether `--val-fraction` moves the instance from train.bin to val.bin (fixed by its id)."""
    return fraction is not None and split_point(0, f"val/{instance_id}") < fraction


class Export(Stage):
    name = "export"
    config = ExportConfig
    version = 2  # special-token strings in text are encoded as text

    def inputs(self, config: ExportConfig, log) -> dict:
        version = FORMATS[config.format].version  # in the key only once a format changed: tokens exports stay
        return {"selection": _selection_manifest(config)["key"],  # up to date across formats' changes
                "tokenizer": source_fingerprint(config.tokenizer) if config.tokenizer else None,
                **({"format_version": version} if version > 1 else {})}

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
        fmt = FORMATS[config.format]
        student = load_tokenizer(config.tokenizer, config.trust_remote_code) if config.tokenizer else None
        tokenizer = student if student is not None and fmt.tokens else source_tok
        vocab = len(tokenizer)
        fmt.check_vocabulary(vocab, config.tokenizer or corpus.manifest["tokenizer"]["spec"])
        validation = _validation_split(config, corpus) if fmt.validation else None
        convert = None
        if fmt.tokens and student is not None:
            convert = Retokenizer(source_tok, corpus.eos_id, student, max_len, config.add_bos)

        def tokens_of(instance: np.ndarray) -> np.ndarray:
            ids = instance.astype(np.int64)
            if not fmt.tokens:
                return ids
            return convert(ids) if convert is not None else ids[: max_len + 1]

        dtype = fmt.dtype(vocab)
        writer = fmt(Job(out, tokenizer, source_tok, corpus.eos_id, dtype, config))
        tokenizer_facts = writer.save_tokenizer() if fmt.tokens else {}
        count = tokens = held = 0
        rows_to_export = {"all": sel_manifest["instances"], "selected": sel_manifest["kept"],
                          "unselected": sel_manifest["instances"] - sel_manifest["kept"]}[config.subset]
        with progress(config.progress, rows_to_export, "export", unit="instances") as advance:
            for rows in _rows(selection, config.subset):
                for i, instance_id in enumerate(rows["instance_id"]):
                    ids = tokens_of(split[instance_id])
                    if held_for_validation(instance_id, config.val_fraction):
                        writer.add_validation(ids)
                        held += 1
                        continue
                    writer.add({k: v[i] for k, v in rows.items()}, ids)
                    count += 1
                    tokens += len(ids)
                advance(len(rows["instance_id"]))
                stop.check()  # an export is written whole: a stop abandons it
        if validation is not None:
            for i in range(len(validation)):
                writer.add_validation(tokens_of(validation[i]))
            held = len(validation)
        details = writer.close()
        round_trip = None
        if convert is not None:
            round_trip = {"pieces": convert.pieces, "lossy": convert.lossy,
                          "fraction": round(convert.lossy / max(convert.pieces, 1), 5)}
            if round_trip["fraction"] > 0.01:
                log(f"warning: {round_trip['fraction']:.1%} of document pieces do not round-trip through the "
                    f"student tokenizer {config.tokenizer} (decode(encode(text)) != text)")
        elif not fmt.tokens:
            round_trip = writer.round_trip()
            if round_trip["fraction"] > 0.01:
                log(f"warning: {round_trip['fraction']:.1%} of document pieces do not re-encode to their own "
                    f"tokens (instances cut inside a word or character): re-tokenizing the text export will "
                    f"differ from the corpus there")
        if tokenizer_facts.get("pad", {}).get("added"):
            pad = tokenizer_facts["pad"]
            log(f"the tokenizer had no pad token distinct from EOS: added {pad['token']} as id {pad['id']}, so a "
                f"model for this export needs {tokenizer_facts['vocab_size']:,} embedding rows "
                f"(model.resize_token_embeddings(len(tokenizer)) for an existing one)")
        return dict(
            selection={"path": str(selection), "key": sel_manifest["key"]},
            corpus={"path": str(corpus.path), "key": corpus.key},
            instances=count, tokens=tokens, dtype=dtype.name if fmt.tokens else None, max_len=max_len,
            tokenizer={"spec": config.tokenizer or corpus.manifest["tokenizer"]["spec"], "vocab_size": vocab,
                       "retokenized": convert is not None,
                       "bos": None if convert is None else convert.bos,
                       # what `PackedCorpus` reads, so that `miniplm train --corpus` takes a tokens export
                       **({"eos_id": int(tokenizer.eos_token_id if student is not None else corpus.eos_id),
                           "dtype": dtype.name, "path": "tokenizer"} if fmt.tokens else {}),
                       **tokenizer_facts},
            splits={"train": {"instances": count, "tokens": tokens}} if config.format == "tokens" else None,
            validation={"source": "val_fraction" if validation is None else config.val_split, "instances": held}
            if fmt.validation else None,
            round_trip=round_trip, files=details,
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


def _validation_split(config: ExportConfig, corpus: PackedCorpus):
    """The corpus split that nanoGPT's val.bin holds, checked before any token is written."""
    if config.val_fraction is not None:
        return None
    if config.val_split not in corpus.split_names:
        raise ConfigError(f"val_split: the corpus {corpus.path} has no split {config.val_split!r} (it has "
                          f"{', '.join(corpus.split_names)}); name one, or hold out part of the export with "
                          f"--val-fraction 0.01")
    return corpus.split(config.val_split)
