"""Each export format read by its client's own code, not by miniplm's readers: megatron-core, datasets with
transformers.Trainer, datatrove, and nanoGPT's reading contract (nanoGPT is not a package). Every test
compares the tokens with the prepared corpus, at a vocabulary that fits uint16 and at one that does not."""

from __future__ import annotations

import math
import pickle
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from conftest import WIDE_OFFSET, export_run, kept_ids, save_wide_tokenizer
from miniplm.core.config import ConfigError
from miniplm.data.shards import PackedCorpus
from miniplm.export.export import ExportConfig, held_for_validation
from miniplm.export.formats import FORMATS


@pytest.fixture(scope="module")
def wide_tokenizer(tokenizer_dir, tmp_path_factory) -> Path:
    return save_wide_tokenizer(tmp_path_factory.mktemp("wide") / "tok", tokenizer_dir)


def corpus_tokens(prepared_corpus, ids=None, split="train", offset=0) -> list[list[int]]:
    """The prepared corpus's instances (all of the split, or `ids`), each id moved by `offset`."""
    instances = PackedCorpus(prepared_corpus).split(split)
    ids = range(len(instances)) if ids is None else ids
    return [(instances[i].astype(np.int64) + offset).tolist() for i in ids]


def flat(seqs: list[list[int]]) -> list[int]:
    return [t for seq in seqs for t in seq]


def test_the_config_offers_exactly_the_registered_formats():
    import typing

    hint = typing.get_type_hints(ExportConfig)["format"]
    assert set(typing.get_args(hint)) == set(FORMATS)


# -- Megatron ------------------------------------------------------------------------------------------------
def gpt_samples_match(dataset, sequences: list[list[int]]) -> int:
    """Every sample of a megatron-core GPTDataset is the window of the documents, in the dataset's own document
    order, that its sample index names (tokens, then the last label); returns how many samples were checked."""
    docs = [sequences[d] for d in dataset.document_index]
    stream = np.asarray(flat(docs), dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum([len(d) for d in docs])])
    for j in range(len(dataset)):
        i = dataset.shuffle_index[j]
        (d0, o0), (d1, o1) = dataset.sample_index[i], dataset.sample_index[i + 1]
        sample = dataset[j]
        got = np.concatenate([sample["tokens"].numpy(), sample["labels"][-1:].numpy()])
        assert got.tolist() == stream[starts[d0] + o0: starts[d1] + o1 + 1].tolist()
    return len(dataset)


@pytest.mark.parametrize("vocab", ["uint16", "wide"])
def test_megatron_core_reads_the_export(vocab, export_selection, prepared_corpus, wide_tokenizer, tmp_path):
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from megatron.core.tokenizers import MegatronTokenizer
    from transformers import AutoTokenizer

    wide = vocab == "wide"
    manifest, out = export_run(export_selection, tmp_path, "megatron",
                               **({"tokenizer": str(wide_tokenizer)} if wide else {}))
    expected = corpus_tokens(prepared_corpus, kept_ids(export_selection), offset=WIDE_OFFSET if wide else 0)
    assert manifest["dtype"] == ("int32" if wide else "uint16")  # Megatron has no uint32: int32, code 4
    assert max(flat(expected)) > (1 << 16) if wide else max(flat(expected)) < 300
    for mmap in (True, False):
        data = IndexedDataset(str(out / "data"), mmap=mmap)
        assert [data[i].tolist() for i in range(len(data))] == expected
        assert data.document_indices.tolist() == list(range(len(expected) + 1))

    tokenizer = MegatronTokenizer.from_pretrained(str(out / "tokenizer"))  # no extra arguments
    hf = AutoTokenizer.from_pretrained(out / "tokenizer")
    assert tokenizer.vocab_size == len(hf) == manifest["tokenizer"]["vocab_size"]
    assert tokenizer.eod == hf.eos_token_id == PackedCorpus(prepared_corpus).eos_id + (WIDE_OFFSET if wide else 0)
    assert tokenizer.pad == hf.pad_token_id not in (tokenizer.eod, *flat(expected))  # Megatron masks pad, not EOD
    config = GPTDatasetConfig(random_seed=1234, sequence_length=16, blend=([str(out / "data")], None),
                              split="90,5,5", tokenizer=tokenizer, reset_position_ids=False,
                              reset_attention_mask=False, eod_mask_loss=False, path_to_cache=str(tmp_path / "cache"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # e.g. "pad token id ... collides with another special token"
        splits = BlendedMegatronDatasetBuilder(GPTDataset, [32, 4, 4], lambda: True, config).build()
    assert all(isinstance(s, GPTDataset) for s in splits)
    assert sum(gpt_samples_match(s, expected) for s in splits) >= 40


# -- HF datasets + transformers.Trainer ------------------------------------------------------------------------
def tiny_trainer(tmp_path, tokenizer, dataset, collator):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
                                         max_position_embeddings=128, eos_token_id=tokenizer.eos_token_id,
                                         pad_token_id=tokenizer.pad_token_id))
    args = TrainingArguments(output_dir=str(tmp_path / "trainer"), max_steps=3, per_device_train_batch_size=4,
                             learning_rate=1e-3, report_to=[], save_strategy="no", use_cpu=True, logging_steps=1,
                             disable_tqdm=True, seed=0)
    return Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator)


def test_hf_export_trains_with_the_trainer_and_keeps_every_eos_label(export_selection, prepared_corpus, tmp_path):
    from datasets import load_from_disk
    from transformers import AutoTokenizer, DataCollatorForLanguageModeling

    logs: list[str] = []
    manifest, out = export_run(export_selection, tmp_path, "hf", log=logs.append)
    expected = corpus_tokens(prepared_corpus, kept_ids(export_selection))
    data = load_from_disk(str(out / "dataset"))
    tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")
    assert [list(x) for x in data["input_ids"]] == expected
    assert [list(m) for m in data["attention_mask"]] == [[1] * len(x) for x in expected]
    # the corpus tokenizer pads with EOS: the export's tokenizer pads with a token of its own, used nowhere
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    assert pad not in (None, eos) and pad not in set(flat(expected))
    assert manifest["tokenizer"]["pad"] == {"token": "<|pad|>", "id": pad, "added": True}
    assert manifest["tokenizer"]["vocab_size"] == len(tokenizer) == 301 and any("added <|pad|>" in m for m in logs)

    trainer = tiny_trainer(tmp_path, tokenizer, data, DataCollatorForLanguageModeling(tokenizer, mlm=False))
    batch = next(iter(trainer.get_train_dataloader()))
    real = batch["attention_mask"] == 1
    at_eos = (batch["input_ids"] == eos) & real
    assert at_eos.sum() > 0 and (batch["labels"][at_eos] == eos).all()  # EOS is a target, never -100
    assert (~real).sum() > 0 and (batch["labels"][~real] == -100).all()  # padding is not
    assert (batch["labels"][real] == batch["input_ids"][real]).all()
    result = trainer.train()
    assert trainer.state.global_step == 3 and math.isfinite(result.training_loss)


def test_hf_blocks_are_run_clms_layout(export_selection, prepared_corpus, tmp_path):
    from datasets import load_from_disk
    from transformers import AutoTokenizer, default_data_collator

    manifest, out = export_run(export_selection, tmp_path, "hf", block_size=16)
    stream = flat(corpus_tokens(prepared_corpus, kept_ids(export_selection)))
    data = load_from_disk(str(out / "dataset"))
    n = len(stream) // 16
    assert len(data) == n == manifest["files"]["blocks"] and manifest["files"]["dropped_tokens"] == len(stream) - 16 * n
    assert flat([list(x) for x in data["input_ids"]]) == stream[: 16 * n]
    assert data["labels"] == data["input_ids"] and all(m == [1] * 16 for m in data["attention_mask"])
    tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")
    trainer = tiny_trainer(tmp_path, tokenizer, data, default_data_collator)
    assert math.isfinite(trainer.train().training_loss) and trainer.state.global_step == 3


# -- datatrove -----------------------------------------------------------------------------------------------
def test_datatrove_reads_the_text_exports_and_its_tokenizer_gives_the_instances_back(
        export_selection, prepared_corpus, tokenizer_dir, tmp_path):
    from datatrove.pipeline.readers import JsonlReader, ParquetReader
    from datatrove.pipeline.tokens import DocumentTokenizer

    ids = kept_ids(export_selection)
    expected = corpus_tokens(prepared_corpus, ids)
    eos = PackedCorpus(prepared_corpus).eos_id
    manifest, out = export_run(export_selection, tmp_path, "jsonl", layout="piece")
    assert manifest["round_trip"]["inexact"] == 0 and manifest["round_trip"]["pieces"] > len(ids)
    docs = list(JsonlReader(str(out), glob_pattern="data.jsonl").run())
    assert len(docs) == manifest["round_trip"]["pieces"] and docs[0].id == f"{ids[0]}/0"

    # datatrove's own tokenizer on the records (no EOS of its own), then EOS where the document ended
    DocumentTokenizer(str(tmp_path / "tokenized"), tokenizer_name_or_path=str(tokenizer_dir / "tokenizer.json"),
                      eos_token=None, shuffle_documents=False, save_filename="pieces").run(iter(docs), 0, 1)
    (tokens_file,) = (tmp_path / "tokenized").glob("*.ds")
    tokens = np.fromfile(tokens_file, dtype=np.uint16)
    ends = np.fromfile(f"{tokens_file}.index", dtype=np.uint64).astype(np.int64)
    rebuilt: dict[int, list[int]] = defaultdict(list)
    for doc, piece in zip(docs, np.split(tokens, ends[:-1]), strict=True):
        rebuilt[doc.metadata["instance_id"]] += piece.tolist() + ([eos] if doc.metadata["doc_end"] else [])
    assert list(rebuilt) == ids and [rebuilt[i] for i in ids] == expected

    _, out = export_run(export_selection, tmp_path, "parquet")  # one record per instance
    docs = list(ParquetReader(str(out), glob_pattern="data.parquet").run())
    assert [d.metadata["instance_id"] for d in docs] == ids
    assert [d.text for d in docs] == ["\n\n".join(p for p in d.metadata["pieces"] if p) for d in docs]
    assert all(len(d.metadata["doc_ends"]) == len(d.metadata["pieces"]) for d in docs)


def test_a_datatrove_written_corpus_keeps_its_domains(prepared_corpus, tokenizer_dir, tmp_path):
    """datatrove's JsonlWriter nests every field but text and id under metadata: `--domain-field metadata.domain`
    reads it, and the corpus is the one prepared from the same documents with a top-level domain."""
    from datatrove.data import Document
    from datatrove.pipeline.writers import JsonlWriter

    from conftest import make_corpus
    from miniplm.core.config import load_config
    from miniplm.data.prepare import PrepareConfig, prepare
    from miniplm.data.readers import Fields, InputFile, read_jsonl

    raw = make_corpus(tmp_path / "raw", n_docs=80)
    records = [d for f in sorted(raw.glob("*.jsonl"))
               for d in read_jsonl(InputFile(str(f), "jsonl", None), Fields(), lambda n: None)]
    with JsonlWriter(str(tmp_path / "datatrove"), compression=None) as writer:
        for d in records:
            writer.write(Document(text=d.text, id=d.doc_id, metadata={"domain": d.domain}), rank=0)

    def prepared(inputs: Path, name: str, **fields) -> PackedCorpus:
        config = load_config(PrepareConfig, None, {"inputs": [str(inputs)], "output": str(tmp_path / name),
                                                   "tokenizer": str(tokenizer_dir), "max_len": 64,
                                                   "progress": False, **fields})
        prepare(config, log=lambda m: None)
        return PackedCorpus(tmp_path / name)

    ours = prepared(raw, "ours")
    theirs = prepared(tmp_path / "datatrove", "theirs", domain_field="metadata.domain")
    assert ours.manifest["domains"].keys() == theirs.manifest["domains"].keys() == {"news", "books"}
    for split in ours.split_names:
        a, b = ours.split(split), theirs.split(split)
        assert a.table.column("domain").to_pylist() == b.table.column("domain").to_pylist()
        assert [a[i].tolist() for i in range(len(a))] == [b[i].tolist() for i in range(len(b))]


# -- nanoGPT -------------------------------------------------------------------------------------------------
def nanogpt_reads(out: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """What nanoGPT's train.py reads: uint16 memmaps of train.bin and val.bin, vocab_size from meta.pkl."""
    with open(out / "meta.pkl", "rb") as fh:
        meta = pickle.load(fh)  # our own file, written by the export just now
    return (np.memmap(out / "train.bin", dtype=np.uint16, mode="r"),
            np.memmap(out / "val.bin", dtype=np.uint16, mode="r"), meta)


def test_nanogpt_export_is_what_nanogpts_train_py_reads(export_selection, prepared_corpus, tmp_path):
    ids = kept_ids(export_selection)
    manifest, out = export_run(export_selection, tmp_path, "nanogpt")
    train, val, meta = nanogpt_reads(out)
    assert train.tolist() == flat(corpus_tokens(prepared_corpus, ids))
    assert val.tolist() == flat(corpus_tokens(prepared_corpus, split="heldout")) and len(val) > 0
    assert meta == {"vocab_size": 300}
    assert manifest["validation"] == {"source": "heldout",
                                      "instances": len(PackedCorpus(prepared_corpus).split("heldout"))}

    manifest, out = export_run(export_selection, tmp_path / "fraction", "nanogpt", val_fraction=0.25)
    train, val, _ = nanogpt_reads(out)
    held = [i for i in ids if held_for_validation(i, 0.25)]
    assert 0.1 < len(held) / len(ids) < 0.4 and manifest["validation"]["instances"] == len(held)
    assert val.tolist() == flat(corpus_tokens(prepared_corpus, held))
    assert train.tolist() == flat(corpus_tokens(prepared_corpus, [i for i in ids if i not in set(held)]))


def test_a_vocabulary_past_a_formats_dtype_is_refused_before_any_token_is_written(export_selection, wide_tokenizer,
                                                                                   tmp_path):
    with pytest.raises(ConfigError, match=r"format nanogpt: nanoGPT's train.py reads train.bin and val.bin as "
                                          r"uint16.*has 70,300 entries\. Export as tokens or megatron or hf"):
        export_run(export_selection, tmp_path, "nanogpt", tokenizer=str(wide_tokenizer))
    assert not any(tmp_path.iterdir())  # nothing written, nothing half-written
    with pytest.raises(ConfigError, match="val_split: the corpus .* has no split 'dev'.*--val-fraction"):
        export_run(export_selection, tmp_path, "nanogpt", val_split="dev")
    assert not any(tmp_path.iterdir())
