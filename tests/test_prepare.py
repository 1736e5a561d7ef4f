import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import make_corpus, write_jsonl
from miniplm.core.config import ConfigError, load_config
from miniplm.data.prepare import PrepareConfig, assign_split, prepare, split_point
from miniplm.data.readers import BadRecordError
from miniplm.data.shards import PackedSplit


def config(tmp_path, tokenizer_dir, **overrides) -> PrepareConfig:
    base = {"inputs": [str(tmp_path / "corpus")], "output": str(tmp_path / "out"), "tokenizer": str(tokenizer_dir),
            "max_len": 32, "progress": False, "shard_tokens": 500,
            "splits": {"ref": {"fraction": 0.2}, "heldout": {"fraction": 0.1}}}
    base.update(overrides)
    return load_config(PrepareConfig, None, base)


@pytest.fixture
def corpus(tmp_path):
    return make_corpus(tmp_path / "corpus")


def read_all(out: Path, split: str) -> tuple[PackedSplit, list[list[int]]]:
    manifest = json.loads((out / "manifest.json").read_text())
    packed = PackedSplit(out / split, manifest["tokenizer"]["dtype"])
    return packed, [packed[i].tolist() for i in range(len(packed))]


def test_prepare_packs_every_document_and_accounts_for_all(tmp_path, tokenizer_dir, corpus):
    from transformers import AutoTokenizer

    cfg = config(tmp_path, tokenizer_dir)
    manifest = prepare(cfg, log=lambda m: None).manifest
    out = Path(cfg.output)
    tok = AutoTokenizer.from_pretrained(out / "tokenizer")  # the saved copy loads through from_pretrained
    docs = pq.read_table(out / "documents.parquet").to_pylist()
    assert manifest["documents"] == {"read": 120, "packed": 120, "skipped": 0, "skip_reasons": {},
                                     "skip_examples": []}
    assert len(docs) == 120 and [d["doc_index"] for d in docs] == list(range(120))
    assert manifest["tokenizer"]["dtype"] == "uint16"
    assert (out / "train" / "tokens-00000.bin").is_file() and (out / "train" / "tokens-00000.offsets.npy").is_file()

    total_tokens = 0
    for split in ("train", "ref", "heldout"):
        packed, instances = read_all(out, split)
        assert manifest["splits"][split]["instances"] == len(instances) > 0
        table = packed.table.to_pylist()
        for row, tokens in zip(table, instances):
            assert 2 <= len(tokens) <= cfg.max_len + 1
            assert {docs[i]["domain"] for i in row["doc_indices"]} == {row["domain"]}  # one domain per instance
            assert {docs[i]["split"] for i in row["doc_indices"]} == {split}  # splits are disjoint by document
        # every document's text comes back, in order, from the instances of its split and domain
        for domain in ("news", "books"):
            stream = [t for row, toks in zip(table, instances) if row["domain"] == domain for t in toks]
            text = tok.decode(stream)
            expected = "".join(json.loads(line)["text"] + "<|endoftext|>"
                               for d in docs if d["split"] == split and d["domain"] == domain
                               for line in [Path(d["source"]).read_text().splitlines()[d["record"] - 1]])
            assert text == expected
        total_tokens += sum(len(t) for t in instances)
    assert total_tokens == sum(d["n_tokens"] for d in docs)  # nothing dropped on this corpus
    assert manifest["inputs"]["files"][0]["sha256"] and manifest["versions"]["transformers"]


def test_rerun_is_skipped_and_changes_invalidate(tmp_path, tokenizer_dir, corpus):
    logs = []
    cfg = config(tmp_path, tokenizer_dir)
    first = prepare(cfg, log=logs.append).manifest
    again = prepare(cfg, log=logs.append)
    assert not again.ran and again.manifest == first
    # a field that does not change outputs does not invalidate
    assert not prepare(config(tmp_path, tokenizer_dir, batch_documents=7), log=logs.append).ran
    # a changed config rebuilds
    second = prepare(config(tmp_path, tokenizer_dir, max_len=16), log=logs.append).manifest
    assert second["key"] != first["key"] and second["max_len"] == 16
    assert max(len(t) for t in read_all(Path(cfg.output), "train")[1]) <= 17
    # a changed input rebuilds
    with open(corpus / "news.jsonl", "a") as fh:
        fh.write(json.dumps({"text": "One more news document.", "domain": "news", "id": "news-x"}) + "\n")
    third = prepare(config(tmp_path, tokenizer_dir, max_len=16), log=logs.append).manifest
    assert third["key"] != second["key"] and third["documents"]["read"] == 121
    # a leftover from a killed run is cleaned up, and --force rebuilds
    (tmp_path / "out.partial").mkdir()
    (tmp_path / "out.partial" / "junk").write_text("x")
    forced = prepare(config(tmp_path, tokenizer_dir, max_len=16), force=True, log=logs.append)
    assert forced.ran and forced.manifest["created"] >= third["created"]
    assert not (tmp_path / "out.partial").exists()


def test_same_config_gives_byte_identical_outputs(tmp_path, tokenizer_dir, corpus):
    a = config(tmp_path, tokenizer_dir, output=str(tmp_path / "a"), shuffle=True)
    b = config(tmp_path, tokenizer_dir, output=str(tmp_path / "b"), shuffle=True)
    prepare(a, log=lambda m: None)
    prepare(b, log=lambda m: None)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) > 10
    for rel in files:
        if rel.name != "manifest.json":
            assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel


def test_splits_follow_fractions_and_domains():
    splits = load_config(PrepareConfig).splits
    points = [split_point(10, f"doc-{i}") for i in range(20_000)]
    mix = [assign_split(u, "email", splits) for u in points]
    hq = [assign_split(u, "wikipedia", splits) for u in points]
    assert abs(mix.count("ref") / len(mix) - 0.05) < 0.005
    assert abs(mix.count("heldout") / len(mix) - 0.01) < 0.003
    assert "heldout_hq" not in mix
    assert abs(hq.count("heldout_hq") / len(hq) - 0.05) < 0.005
    assert "heldout_unseen" not in mix + hq
    # the unseen domain is held out whole: never train, never D_ref
    assert {assign_split(u, "dictionary", splits) for u in points} == {"heldout_unseen"}
    with pytest.raises(ConfigError, match="1 takes whole domains"):
        load_config(PrepareConfig, None, {"splits": {"all": {"fraction": 1}}})
    assert split_point(10, "doc-1") == split_point(10, "doc-1") != split_point(11, "doc-1")


def test_bad_records_skip_with_counts_or_fail_with_location(tmp_path, tokenizer_dir):
    write_jsonl(tmp_path / "corpus" / "c.jsonl", [
        {"text": "Good one. Fine.", "id": "a"},
        {"text": "  "},
        "{not json",
        {"body": "no text"},
        {"text": "Another good one.", "id": "b"},
    ])
    manifest = prepare(config(tmp_path, tokenizer_dir), log=lambda m: None).manifest
    docs = manifest["documents"]
    assert (docs["read"], docs["packed"], docs["skipped"]) == (5, 2, 3)
    assert docs["skip_reasons"] == {"empty": 1, "bad_json": 1, "missing_field": 1}
    assert any("c.jsonl:3: bad_json" in e for e in docs["skip_examples"])
    with pytest.raises(BadRecordError, match=r"c\.jsonl:2: empty"):
        prepare(config(tmp_path, tokenizer_dir, output=str(tmp_path / "strict"), on_bad_record="fail"),
                log=lambda m: None)
    assert not (tmp_path / "strict").exists() and not (tmp_path / "strict.partial").exists()


def test_max_documents_per_domain_and_empty_split_warning(tmp_path, tokenizer_dir, corpus):
    logs = []
    cfg = config(tmp_path, tokenizer_dir, max_documents_per_domain=10,
                 splits={"ref": {"fraction": 0.2}, "hq": {"fraction": 0.1, "domains": ["wiki"]}})
    manifest = prepare(cfg, log=logs.append).manifest
    assert manifest["documents"]["packed"] == 20
    assert manifest["documents"]["skip_reasons"] == {"over_limit": 100}
    assert any("split 'hq'" in m and "no documents" in m for m in logs)


def test_eos_token_override_and_unknown_token(tmp_path, tokenizer_dir, corpus):
    from miniplm.core.config import ConfigError

    with pytest.raises(ConfigError, match="eos_token"):
        prepare(config(tmp_path, tokenizer_dir, eos_token="<|nope|>"), log=lambda m: None)


def test_special_token_strings_in_text_are_text_and_only_the_appended_eos_is_a_boundary(tmp_path, tokenizer_dir):
    from transformers import AutoTokenizer

    texts = ["A chat log ends with <|endoftext|> and goes on.", "Another <|endoftext|><|endoftext|> document."]
    path = write_jsonl(tmp_path / "raw" / "c.jsonl", [{"text": t, "id": str(i)} for i, t in enumerate(texts)])
    prepare(load_config(PrepareConfig, None, {"inputs": [str(path)], "tokenizer": str(tokenizer_dir),
                                              "output": str(tmp_path / "out"), "max_len": 256, "progress": False,
                                              "splits": {}}), log=lambda m: None)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    instance = PackedSplit(tmp_path / "out" / "train", "uint16")[0]
    assert int((instance == tok.eos_token_id).sum()) == len(texts)  # one EOS per document, the appended one
    ends = np.flatnonzero(instance == tok.eos_token_id)
    assert [tok.decode(x.tolist()) for x in np.split(instance, ends + 1)[:-1]] == [t + "<|endoftext|>" for t in texts]
