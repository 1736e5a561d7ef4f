"""Property-based tests of the text path (hypothesis): generated Unicode documents and malformed records
through the readers, packing and re-tokenizing export, as `miniplm prepare` and `export --tokenizer` run them.

Bounded and derandomized (a fixed sequence of examples), so CI sees the same cases every run and stays fast.
"""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_metrics import save_bpe_tokenizer

from miniplm.core.config import load_config
from miniplm.core.tokens import Retokenizer
from miniplm.data.prepare import PrepareConfig, prepare
from miniplm.data.shards import PackedCorpus

TRICKY = ["<|endoftext|>", "。", "！", "🙂", "👩‍👩‍👧", "\r\n", "\t", "\u202eRTL\u202c", "مرحبا", "שלום", "\ufeff",
          "日本語", "e\u0301", "\u0000", " ", ". ", "\n\n"]
texts = st.lists(st.one_of(st.text(st.characters(codec="utf-8"), max_size=30), st.sampled_from(TRICKY)),
                 max_size=12).map("".join)
good = texts.map(lambda t: json.dumps({"text": t}, ensure_ascii=False))
bad = st.one_of(st.just('{"text": "a \\ud800 b"}'), st.just('{"text": 7}'), st.just('{"body": "x"}'),
                st.just("[1, 2]"), st.text(st.characters(codec="utf-8", exclude_characters="\n\r"), max_size=20))
@pytest.fixture(scope="module")
def other_tokenizer(tmp_path_factory):
    return save_bpe_tokenizer(tmp_path_factory.mktemp("other"), vocab_size=400, eos="</s>")


FUZZ = settings(max_examples=25, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@FUZZ
@given(lines=st.lists(st.one_of(good, good, bad), min_size=1, max_size=12))
def test_prepare_packs_exactly_what_it_reads(lines, tmp_path_factory, tokenizer_dir, other_tokenizer):
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("fuzz")
    raw = root / "c.jsonl"
    raw.write_text("".join(line.replace("\n", " ").replace("\r", " ") + "\n" for line in lines), encoding="utf-8")
    config = load_config(PrepareConfig, None, {"inputs": [str(raw)], "tokenizer": str(tokenizer_dir), "max_len": 16,
                                               "output": str(root / "out"), "progress": False, "splits": {},
                                               "max_chunks_per_document": None})
    try:
        manifest = prepare(config, log=lambda m: None).manifest
    except ValueError as exc:  # every record unusable: refused with the reason, not a traceback
        assert "nothing to pack" in str(exc)
        return
    docs = manifest["documents"]
    assert docs["read"] == docs["packed"] + docs["skipped"]
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    table = pq.read_table(root / "out" / "documents.parquet")
    packed = list(_usable(raw))
    expected = []
    for text in packed:
        expected += tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"] + [tok.eos_token_id]
    split = PackedCorpus(root / "out").split("train")
    stream = [int(t) for i in range(len(split)) for t in split[i]]
    stats = manifest["splits"]["train"]["packing"]
    # one domain, no cap: the instances are the documents' encodings + EOS, in order, less dropped 1-token tails
    assert len(stream) + stats["dropped_tokens"] == len(expected) == int(table.column("n_tokens").to_numpy().sum())
    if stats["dropped_tokens"] == 0:
        assert stream == expected

    other = AutoTokenizer.from_pretrained(other_tokenizer)  # another vocabulary: each piece re-encoded
    retokenize = Retokenizer(tok, tok.eos_token_id, other, 1 << 20, "no")
    for i in range(len(split)):
        retokenize(split[i])
    assert 0 <= retokenize.lossy <= retokenize.pieces
    if stats["split_characters"] == 0:
        assert retokenize.lossy == 0  # whole characters, byte-level student: every piece spells its source


def _usable(path):
    """The lines a reader packs: JSON objects whose text is a non-blank string with no lone surrogate."""
    for number, line in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):  # not U+0085 etc.
        try:
            record = json.loads(line.removeprefix("\ufeff") if number == 1 else line)
        except json.JSONDecodeError:
            continue
        text = record.get("text") if isinstance(record, dict) else None
        if isinstance(text, str) and text.strip():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                continue
            yield text
