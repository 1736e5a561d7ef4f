import gzip
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from conftest import write_jsonl
from miniplm.data.readers import BadRecordError, Fields, InputSpec, expand_inputs, read_documents

RECORDS = [
    {"text": "first doc", "domain": "a", "id": "d1"},
    {"text": "second doc", "domain": "b", "id": "d2"},
    {"text": "third doc", "id": "d3"},
]


def docs_of(*specs, fields: Fields | None = None):
    inputs = [InputSpec(**s) if isinstance(s, dict) else InputSpec(s) for s in specs]
    return list(read_documents(expand_inputs(inputs), fields or Fields()))


def summary(docs):
    return [(d.text, d.domain, d.doc_id, d.skip) for d in docs]


EXPECTED = [("first doc", "a", "d1", None), ("second doc", "b", "d2", None), ("third doc", "default", "d3", None)]


def test_jsonl_plain_gzip_and_zstd_read_the_same(tmp_path):
    plain = write_jsonl(tmp_path / "x.jsonl", RECORDS)
    data = plain.read_bytes()
    (tmp_path / "y.jsonl.gz").write_bytes(gzip.compress(data))
    (tmp_path / "z.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(data))
    for name in ("x.jsonl", "y.jsonl.gz", "z.jsonl.zst"):
        assert summary(docs_of(str(tmp_path / name))) == EXPECTED
    docs = docs_of(str(tmp_path / "x.jsonl"))
    assert [d.record for d in docs] == [1, 2, 3]  # 1-based line numbers


def test_glob_over_many_files_is_sorted_and_recursive(tmp_path):
    write_jsonl(tmp_path / "b" / "2.jsonl", RECORDS[1:2])
    write_jsonl(tmp_path / "a" / "1.jsonl", RECORDS[:1])
    docs = docs_of(str(tmp_path / "**" / "*.jsonl"))
    assert [d.doc_id for d in docs] == ["d1", "d2"]


def test_parquet_with_custom_fields(tmp_path):
    table = pa.table({"body": ["x y", "z"], "src": ["web", "books"], "uid": [7, 8]})
    pq.write_table(table, tmp_path / "p.parquet")
    docs = docs_of(str(tmp_path / "p.parquet"), fields=Fields(text="body", domain="src", id="uid"))
    assert summary(docs) == [("x y", "web", "7", None), ("z", "books", "8", None)]


def test_dotted_field_paths_read_nested_fields_in_jsonl_and_parquet(tmp_path):
    nested = [{"text": r["text"], "id": r["id"], "metadata": {"domain": r.get("domain"), "src": {"uid": i}}}
              for i, r in enumerate(RECORDS)]
    write_jsonl(tmp_path / "n.jsonl", nested)
    pq.write_table(pa.Table.from_pylist(nested), tmp_path / "n.parquet")
    for name in ("n.jsonl", "n.parquet"):
        assert summary(docs_of(str(tmp_path / name), fields=Fields(domain="metadata.domain"))) == EXPECTED
        docs = docs_of(str(tmp_path / name), fields=Fields(domain="metadata.domain", id="metadata.src.uid"))
        assert [d.doc_id for d in docs] == ["0", "1", "2"]
    # a path that is not there: the default domain, and a missing text field is flagged as before
    docs = docs_of(str(tmp_path / "n.jsonl"), fields=Fields(text="metadata.body", domain="metadata.nope"))
    assert {(d.domain, d.skip) for d in docs} == {("default", "missing_field")}
    # a top-level key that holds a dot is read as it is
    write_jsonl(tmp_path / "flat.jsonl", [{"text": "x", "metadata.domain": "flat", "metadata": {"domain": "deep"}}])
    assert docs_of(str(tmp_path / "flat.jsonl"), fields=Fields(domain="metadata.domain"))[0].domain == "flat"


def test_txt_directory_one_document_per_file_with_input_domain(tmp_path):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "b.txt").write_text("beta text")
    (tmp_path / "t" / "a.txt").write_text("alpha text")
    (tmp_path / "t" / "notes.md").write_text("ignored: not a known format")
    docs = docs_of({"path": str(tmp_path / "t"), "domain": "essays"})
    assert [(Path(d.source).name, d.text, d.domain) for d in docs] == [
        ("a.txt", "alpha text", "essays"), ("b.txt", "beta text", "essays")]


def test_hf_save_to_disk_dataset_and_dataset_dict(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list(RECORDS)
    ds.save_to_disk(str(tmp_path / "ds"))
    assert summary(docs_of(str(tmp_path / "ds"))) == EXPECTED
    dd = datasets.DatasetDict({"train": ds, "validation": datasets.Dataset.from_list(RECORDS[:1])})
    dd.save_to_disk(str(tmp_path / "dd"))
    docs = docs_of(str(tmp_path / "dd"))
    assert [d.doc_id for d in docs] == ["d1", "d2", "d3", "d1"]
    assert docs[0].source.endswith("[train]") and docs[3].source.endswith("[validation]")


def test_bad_jsonl_records_are_flagged_with_their_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(
        b'{"text": "good"}\n'
        b'{"text": "   \\n  "}\n'
        b'{"text": "broken\n'
        b'{"body": "no text field"}\n'
        b'\xff\xfe{"text": "bad bytes"}\n'
        b'{"text": 42}\n'
        b'[1, 2]\n'
        b'\n'
        b'{"text": "last"}\n'
    )
    docs = docs_of(str(path))
    assert [(d.record, d.skip) for d in docs] == [
        (1, None), (2, "empty"), (3, "bad_json"), (4, "missing_field"), (5, "invalid_utf8"),
        (6, "not_text"), (7, "bad_json"), (9, None)]
    error = str(BadRecordError(docs[2]))
    assert f"{path}:3: bad_json" in error and "Fix:" in error and "--on-bad-record skip" in error


def test_unreadable_parquet_and_binary_or_undecodable_txt(tmp_path):
    (tmp_path / "broken.parquet").write_bytes(b"this is not parquet")
    (tmp_path / "bin.txt").write_bytes(b"abc\x00def")
    (tmp_path / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "blank.txt").write_text("  \n\t")
    assert [d.skip for d in docs_of(str(tmp_path / "broken.parquet"))] == ["unreadable_file"]
    assert [d.skip for d in docs_of(str(tmp_path / "*.txt"))] == ["binary", "empty", "invalid_utf8"]


def test_parquet_without_the_text_column_flags_every_row(tmp_path):
    pq.write_table(pa.table({"content": ["a", "b"]}), tmp_path / "p.parquet")
    assert [d.skip for d in docs_of(str(tmp_path / "p.parquet"))] == ["missing_field", "missing_field"]


def test_inputs_that_match_nothing_are_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        expand_inputs([InputSpec(str(tmp_path / "nope.jsonl"))])
    with pytest.raises(FileNotFoundError, match="matched no readable files"):
        expand_inputs([InputSpec(str(tmp_path / "*.jsonl"))])
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(FileNotFoundError, match="matched no readable files"):
        expand_inputs([InputSpec(str(tmp_path))])


def test_rank_world_size_split_files_without_overlap(tmp_path):
    for i in range(5):
        write_jsonl(tmp_path / f"{i}.jsonl", [{"text": f"doc {i}", "id": str(i)}])
    files = expand_inputs([InputSpec(str(tmp_path / "*.jsonl"))])
    shares = [[d.doc_id for d in read_documents(files, Fields(), rank=r, world_size=2)] for r in range(2)]
    assert shares == [["0", "2", "4"], ["1", "3"]]


def test_a_byte_order_mark_a_lone_surrogate_and_json_messages(tmp_path):
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b'\xef\xbb\xbf{"text": "first, after a BOM"}\n{"text": "a \\ud800 b"}\n{"text": "broken\n')
    docs = docs_of(str(bom))
    assert [(d.text, d.skip) for d in docs] == [("first, after a BOM", None), (None, "lone_surrogate"),
                                                (None, "bad_json")]
    assert "lone surrogate ('\\ud800')" in docs[1].detail
    assert docs[2].detail == "Invalid control character at column 17"  # not "at at column"
    assert "Fix: write the character" in str(BadRecordError(docs[1]))
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "a.txt").write_bytes(b"\xef\xbb\xbfText after a BOM.")
    assert [d.text for d in docs_of(str(tmp_path / "txt"))] == ["Text after a BOM."]
