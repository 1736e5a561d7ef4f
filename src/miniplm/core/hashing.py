"""Content hashes and seeded per-id uniforms: what keys, splits and random selections are made of."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def path_sha256(path: str | Path) -> str:
    """A file's sha256, or for a directory the hash of its files' relative names and hashes."""
    p = Path(path)
    if p.is_file():
        return file_sha256(p)
    digest = hashlib.sha256()
    for child in sorted(c for c in p.rglob("*") if c.is_file()):
        digest.update(str(child.relative_to(p)).encode())
        digest.update(file_sha256(child).encode())
    return digest.hexdigest()


def uniform_hash(seed: int, ids: np.ndarray) -> np.ndarray:
    """A uniform number in (0, 1) per (seed, id), the same in any order or chunking (splitmix64)."""
    with np.errstate(over="ignore"):
        z = ids.astype(np.uint64) + np.uint64((seed * 0x9E3779B97F4A7C15) % 2**64)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return ((z >> np.uint64(11)).astype(np.float64) + 0.5) / 2.0**53
