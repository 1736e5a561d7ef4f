import json
import math
import struct

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import export_run as run
from conftest import kept_ids
from miniplm.core.config import load_config
from miniplm.data.shards import PackedCorpus, PackedSplit
from miniplm.export.export import ExportConfig, export


def source(prepared_corpus):
    corpus = PackedCorpus(prepared_corpus)
    return corpus, corpus.split("train")


@pytest.fixture(scope="module")
def selection(export_selection):
    return export_selection


def read_megatron(prefix):
    """An independent reader of Megatron's MMIDIDX index, written from the published format."""
    dtypes = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
              8: np.uint16}
    raw = open(f"{prefix}.idx", "rb").read()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    version, = struct.unpack("<Q", raw[9:17])
    code, = struct.unpack("<B", raw[17:18])
    n_seq, = struct.unpack("<Q", raw[18:26])
    n_doc, = struct.unpack("<Q", raw[26:34])
    offset = 34
    sizes = np.frombuffer(raw, np.int32, n_seq, offset)
    offset += 4 * n_seq
    pointers = np.frombuffer(raw, np.int64, n_seq, offset)
    offset += 8 * n_seq
    docs = np.frombuffer(raw, np.int64, n_doc, offset)
    data = np.memmap(f"{prefix}.bin", dtype=dtypes[code], mode="r")
    itemsize = np.dtype(dtypes[code]).itemsize
    return version, docs, [data[p // itemsize: p // itemsize + s] for p, s in zip(pointers, sizes)]


def test_token_formats_read_back_by_independent_readers(selection, prepared_corpus, tmp_path):
    corpus, split = source(prepared_corpus)
    ids = kept_ids(selection)
    expected = [split[i].tolist() for i in ids]

    manifest, out = run(selection, tmp_path, "tokens")
    packed = PackedSplit(out / "train", manifest["dtype"])
    assert [packed[i].tolist() for i in range(len(packed))] == expected
    assert packed.table.column("doc_indices").to_pylist() == [[i] for i in ids]

    _, out = run(selection, tmp_path, "megatron")
    version, docs, seqs = read_megatron(out / "data")
    assert version == 1 and docs.tolist() == list(range(len(ids) + 1))
    assert [s.tolist() for s in seqs] == expected

    datasets = pytest.importorskip("datasets")
    _, out = run(selection, tmp_path, "hf")
    ds = datasets.load_from_disk(str(out / "dataset"))
    assert ds["instance_id"] == ids and [list(x) for x in ds["input_ids"]] == expected


def test_text_formats_carry_text_and_scores(selection, prepared_corpus, tmp_path):
    corpus, split = source(prepared_corpus)
    tok = corpus.load_tokenizer()
    ids = kept_ids(selection, "unselected")
    _, out = run(selection, tmp_path, "jsonl", subset="unselected")
    rows = [json.loads(line) for line in (out / "data.jsonl").read_text().splitlines()]
    assert [r["instance_id"] for r in rows] == ids
    for r in rows[:20]:
        assert tok.decode(split[r["instance_id"]].tolist()) == "<|endoftext|>".join(r["pieces"]) + (
            "<|endoftext|>" if split[r["instance_id"]][-1] == corpus.eos_id else "")
        assert r["text"] == "\n\n".join(p for p in r["pieces"] if p) and isinstance(r["key"], float)
        assert len(r["doc_ends"]) == len(r["pieces"]) and all(r["doc_ends"][:-1])
    _, out = run(selection, tmp_path, "parquet", subset="unselected")
    table = pq.read_table(out / "data.parquet").to_pylist()
    assert [r["instance_id"] for r in table] == ids and table[0]["pieces"] == rows[0]["pieces"]


def make_student(tmp_path, bos: bool, lossless: bool = True):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from conftest import SENTENCES

    if lossless:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        alphabet = []
    specials = ["<s>", "</s>", "[UNK]"]
    trainer = (trainers.BpeTrainer(vocab_size=400, special_tokens=specials, initial_alphabet=alphabet) if lossless
               else trainers.WordLevelTrainer(vocab_size=30, special_tokens=specials))
    tok.train_from_iterator(SENTENCES * 5, trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    path = tmp_path / f"student-{bos}-{lossless}"
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="[UNK]")
    fast.save_pretrained(path)
    return path


def test_cross_tokenizer_export_keeps_instances_and_lossless_text(selection, prepared_corpus, tmp_path):
    from transformers import AutoTokenizer

    corpus, split = source(prepared_corpus)
    src = corpus.load_tokenizer()
    student_dir = make_student(tmp_path, bos=True)
    student = AutoTokenizer.from_pretrained(student_dir)
    manifest, out = run(selection, tmp_path, "tokens", tokenizer=str(student_dir), max_len=512)
    ids = kept_ids(selection)
    packed = PackedSplit(out / "train", manifest["dtype"])
    assert len(packed) == len(ids) == manifest["instances"]
    assert manifest["tokenizer"]["retokenized"] and manifest["tokenizer"]["bos"] == student.bos_token_id
    assert manifest["round_trip"]["lossy"] == 0
    for i, instance_id in enumerate(ids):
        got = packed[i].tolist()
        assert got[0] == student.bos_token_id
        src_tokens = split[instance_id]
        source_pieces = src.decode(src_tokens.tolist()).split("<|endoftext|>")
        student_pieces = student.decode(got[1:]).split("</s>")
        assert student_pieces == source_pieces
        assert got.count(student.eos_token_id) == int((src_tokens == corpus.eos_id).sum())
    # no BOS for a family that does not use one, and truncation to max_len + 1
    manifest, out = run(selection, tmp_path / "nobos", "tokens", tokenizer=str(make_student(tmp_path, bos=False)),
                        max_len=8)
    packed = PackedSplit(out / "train", manifest["dtype"])
    assert manifest["tokenizer"]["bos"] is None and max(len(packed[i]) for i in range(len(packed))) <= 9


def test_lossy_student_tokenizer_is_reported(selection, tmp_path):
    logs = []
    cfg = load_config(ExportConfig, None, {"selection": str(selection), "format": "tokens",
                                           "output": str(tmp_path / "x"),
                                           "tokenizer": str(make_student(tmp_path, bos=False, lossless=False))})
    manifest = export(cfg, log=logs.append).manifest
    assert manifest["round_trip"]["fraction"] > 0.5
    assert any("do not round-trip" in m for m in logs)


def test_refuses_a_missing_or_stale_selection(selection, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a `miniplm select` output"):
        run(tmp_path / "nothing", tmp_path, "tokens")


def test_a_trained_small_vocabulary_tokenizer_round_trips_through_export_train_and_eval(selection, prepared_corpus,
                                                                                         tmp_path):
    from transformers import AutoTokenizer

    from miniplm.data.bpe import TokenizerTrainConfig, train_tokenizer
    from miniplm.evaluation.loss import EvalLossConfig, evaluate_loss
    from miniplm.training.train import TrainConfig, train

    config = load_config(TokenizerTrainConfig, None, {"corpus": str(prepared_corpus), "split": "train",
                                                      "vocab_size": 290, "output": str(tmp_path / "tok"),
                                                      "progress": False})
    manifest = train_tokenizer(config, log=lambda m: None).manifest
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert len(tokenizer) == manifest["vocab_size"] == 290 and tokenizer.eos_token == "<|endoftext|>"
    assert not train_tokenizer(config, log=lambda m: None).ran  # a rerun is skipped
    corpus, split = source(prepared_corpus)
    text = corpus.load_tokenizer().decode(split[0][split[0] != corpus.eos_id].tolist())
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text

    exported, out = run(selection, tmp_path, "tokens", tokenizer=str(tmp_path / "tok"))
    assert exported["tokenizer"]["retokenized"] and exported["round_trip"]["lossy"] == 0
    data = PackedCorpus(out)
    assert max(int(data.split("train")[i].max()) for i in range(len(data.split("train")))) < 290
    student = train(load_config(TrainConfig, None, {
        "corpus": str(out), "output": str(tmp_path / "student"), "model": "llama-tiny", "batch_size": 4,
        "max_steps": 4, "warmup_steps": 1, "precision": "fp32", "progress": False}), log=lambda m: None).manifest
    assert student["model"]["parameters"] < 1e6
    result = evaluate_loss(load_config(EvalLossConfig, None, {
        "model": str(tmp_path / "student" / "final"), "corpus": str(prepared_corpus), "split": "heldout",
        "precision": "fp32", "progress": False}), log=lambda m: None)["points"][0]
    assert result["loss_per_token"] < math.log(290)  # below the uniform level: it learned from its data
    assert result["bits_per_byte"] == pytest.approx(
        result["loss_per_token"] * result["tokens"] / result["bytes"] / math.log(2), rel=1e-12)


@pytest.mark.parametrize("size, message", [(200, "between 257"), (2**32 + 1, "and 2\\^32")])
def test_tokenizer_vocabulary_sizes_out_of_range_are_refused(size, message):
    from miniplm.core.config import ConfigError
    from miniplm.data.bpe import TokenizerTrainConfig

    with pytest.raises(ConfigError, match=message):
        load_config(TokenizerTrainConfig, None, {"vocab_size": size})
