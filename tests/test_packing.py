import numpy as np
import pytest

from miniplm.data.packing import BoundaryTable, Packer

# A hand-made vocabulary: id -> decoded piece. 0 is EOS.
PIECES = ["<eos>", "Hello", " world", ".", " Next", "!", "\n", "abc", " def", "3", ".14", " ok;", "?"]
EOS = 0
TABLE = BoundaryTable.from_strings(PIECES, PIECES, special_ids={EOS})


def test_boundary_flags():
    #          Hello world  .  Next !  \n abc  3 .14 ok; ?  eos
    tokens = np.array([1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 0])
    flags = TABLE.flags(tokens)
    # "." then " Next" (whitespace follows): yes; "!" then "\n": yes; "\n" itself: yes; "abc" then "3": no;
    # ".14" ends in a digit: no; " ok;" then "?" (no whitespace): no; "?" then EOS: no; EOS: yes.
    assert flags.tolist() == [False, False, True, False, True, True, False, False, False, False, False, True]


def pack(docs, max_len=8, **kw):
    packer = Packer(max_len, EOS, TABLE, **kw)
    out = []
    for i, (domain, ids) in enumerate(docs):
        out += packer.add(ids, domain, i)
    out += packer.flush()
    return packer, out


def test_cuts_at_the_last_sentence_boundary_and_carries_the_rest():
    # Hello world. Next! \n abc def ... : boundaries after "." (index 2), "\n" (index 5)
    doc = [1, 2, 3, 4, 5, 6, 7, 8, 7, 8, 7]
    packer, out = pack([("d", doc)], max_len=8)
    tokens = [x.tokens.tolist() for x in out]
    assert tokens[0] == [1, 2, 3, 4, 5, 6]  # cut after "\n", the last boundary within 9 tokens
    assert tokens[1] == [7, 8, 7, 8, 7, EOS]  # the carried-over rest plus EOS
    assert all(len(t) <= 9 for t in tokens)
    assert np.concatenate([x.tokens for x in out]).tolist() == doc + [EOS]  # nothing lost
    assert packer.stats.hard_cuts == 0


def test_hard_cut_without_boundary_and_eos_appended():
    doc = [7] * 20
    packer, out = pack([("d", doc)], max_len=8)
    assert [len(x.tokens) for x in out] == [9, 9, 3]
    assert out[-1].tokens[-1] == EOS
    assert packer.stats.hard_cuts == 2


def test_instances_span_documents_within_a_domain_but_never_mix_domains():
    docs = [("a", [7, 8]), ("b", [1, 2]), ("a", [7, 8, 7]), ("b", [9])]
    _, out = pack(docs, max_len=8)
    assert [(x.domain, x.tokens.tolist(), x.doc_indices.tolist()) for x in out] == [
        ("a", [7, 8, EOS, 7, 8, 7, EOS], [0, 2]),
        ("b", [1, 2, EOS, 9, EOS], [1, 3]),
    ]


def test_chunks_of_one_token_are_dropped():
    # "\n" + 9 x "abc" + EOS: the only boundary in the first window is the "\n" at its start, so the
    # first chunk is that single token (dropped); the next is a hard cut of 9; the EOS left over is dropped.
    packer, out = pack([("d", [6] + [7] * 9)], max_len=8)
    assert [x.tokens.tolist() for x in out] == [[7] * 9]
    assert packer.stats.dropped_tokens == 2
    packer = Packer(8, EOS, TABLE)
    out = packer.add([], "d", 0) + packer.flush()  # an empty document is just EOS: one token, dropped
    assert out == [] and packer.stats.dropped_tokens == 1


def test_max_chunks_per_document_truncates_the_document():
    packer, out = pack([("d", [7] * 100), ("d", [8, 8])], max_len=8, max_chunks_per_document=3)
    assert len(out) == 4
    assert [x.doc_indices.tolist() for x in out] == [[0], [0], [0], [1]]
    assert packer.stats.truncated_documents == 1
    assert packer.stats.truncated_tokens == 101 - 27


def test_deterministic_and_validates_max_len():
    docs = [("a", list(np.random.default_rng(0).integers(1, 13, size=50))) for _ in range(5)]
    _, first = pack(docs)
    _, second = pack(docs)
    assert [x.tokens.tolist() for x in first] == [x.tokens.tolist() for x in second]
    with pytest.raises(ValueError, match="at least 8"):
        Packer(7, EOS, TABLE)


def test_boundary_table_from_a_real_tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    table = BoundaryTable.from_tokenizer(tok)
    text = "The cat sat on the mat. It was warm!\nRivers flow 3.14 miles"
    ids = np.array(tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
    cuts = [tok.decode(ids[: i + 1]) for i in np.flatnonzero(table.flags(ids))]
    assert cuts[0] == "The cat sat on the mat."
    assert cuts[-1] == text + "<|endoftext|>"
    assert all(c.rstrip(" ").endswith((".", "!", "\n", "<|endoftext|>")) for c in cuts)
    assert not any(c.endswith("3.") for c in cuts)  # a decimal point is not a sentence end


def test_full_width_sentence_ends_are_boundaries_even_split_over_byte_tokens(tokenizer_dir):
    """CJK text has no space after 。！？；; a byte-level vocabulary trained on English spells each of them
    as three one-byte tokens, and the boundary falls after the third."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    table = BoundaryTable.from_tokenizer(tok)
    text = "日本語の文です。次の文！終わり？はい；最後"
    ids = np.array(tok(text, add_special_tokens=False)["input_ids"])
    cuts = [tok.decode(ids[: i + 1]) for i in np.flatnonzero(table.flags(ids))]
    assert cuts == ["日本語の文です。", "日本語の文です。次の文！", "日本語の文です。次の文！終わり？",
                    "日本語の文です。次の文！終わり？はい；"]
    packer = Packer(max_len=64, boundaries=table, eos_id=tok.eos_token_id)
    for i in range(10):
        packer.add(tok(text * 10, add_special_tokens=False)["input_ids"], "cjk", i)
    assert packer.stats.hard_cuts == 0


def test_hard_cuts_fall_between_characters_and_a_split_character_counts_as_lossy(tokenizer_dir):
    """A byte-level vocabulary trained on English spells each CJK character in three tokens: a chunk with
    no sentence boundary is cut where a character ends, so no instance decodes to U+FFFD; a piece that does
    split a character is counted lossy when re-tokenized, although the student round-trips its U+FFFD."""
    from transformers import AutoTokenizer

    from miniplm.core.tokens import Retokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    table = BoundaryTable.from_tokenizer(tok)
    text = "漢字仮名交じり文" * 40 + "🙂" * 20  # no sentence end anywhere: every cut is a hard one
    ids = tok(text, add_special_tokens=False)["input_ids"]
    packer = Packer(max_len=31, boundaries=table, eos_id=tok.eos_token_id)
    instances = packer.add(ids, "cjk", 0) + packer.flush()
    assert packer.stats.hard_cuts > 10 and packer.stats.split_characters == 0
    assert all("\ufffd" not in tok.decode(x.tokens.tolist()) for x in instances)
    assert "".join(tok.decode(x.tokens.tolist()) for x in instances) == text + "<|endoftext|>"

    retokenize = Retokenizer(tok, tok.eos_token_id, tok, 64, "no")
    retokenize(np.array(ids[:30]))  # whole characters
    assert (retokenize.pieces, retokenize.lossy) == (1, 0)
    retokenize(np.array(ids[:31]))  # the 31st token is the first third of a character
    assert (retokenize.pieces, retokenize.lossy) == (2, 1)
