"""Token shards: flat numpy memmaps of instances, an offsets index per shard, and a parquet table.

Layout of one packed split (e.g. `corpus/train/`):
    tokens-00000.bin          instance tokens back to back (uint16 when the vocabulary fits, else uint32)
    tokens-00000.offsets.npy  int64 [n + 1]: instance i of the shard is bin[offsets[i]:offsets[i+1]]
    instances.parquet         instance_id, shard, offset, n_tokens, domain, doc_indices (list<int64>)
Instance ids run 0..N-1 over the split in stored order. doc_indices point into the corpus's
documents.parquet. Files are written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from transformers import AutoTokenizer

from miniplm.core.manifest import read_manifest
from miniplm.data.packing import Instance

PACKED_STAGES = ("prepare", "generate", "export")  # stages whose output is a corpus (export: --format tokens)

INSTANCE_SCHEMA = pa.schema(
    [
        ("instance_id", pa.int64()),
        ("shard", pa.int32()),
        ("offset", pa.int64()),
        ("n_tokens", pa.int32()),
        ("domain", pa.string()),
        ("doc_indices", pa.list_(pa.int64())),
    ]
)


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every token id."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def shard_paths(split_dir: Path, shard: int) -> tuple[Path, Path]:
    return split_dir / f"tokens-{shard:05d}.bin", split_dir / f"tokens-{shard:05d}.offsets.npy"


def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path) then rename into place, so a reader never sees a partial file."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as exc:  # disk full, quota, permissions: leave nothing half-written behind
        tmp.unlink(missing_ok=True)
        raise OSError(exc.errno, f"could not write {path}: {exc.strerror or exc}; the files already complete "
                                 f"are kept: free the space (or fix the cause) and rerun the same command") from exc


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as fh:  # a file object: np.save would append ".npy" to a ".tmp" path
        np.save(fh, array)


class ShardWriter:
    """Collects instances of one split into shards of about `shard_tokens` tokens.

    With `shuffle`, the instances of each shard are permuted (seeded by seed and shard number) before
    they are written, so the order is reproducible and memory stays bounded by one shard.
    """

    def __init__(self, split_dir: Path, dtype: np.dtype, shard_tokens: int, shuffle: bool, seed: int):
        self.dir = Path(split_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dtype = dtype
        self.shard_tokens = shard_tokens
        self.shuffle = shuffle
        self.seed = seed
        self.pending: list[Instance] = []
        self.pending_tokens = 0
        self.shard = 0
        self.next_id = 0
        self.table = pq.ParquetWriter(self.dir / "instances.parquet.tmp", INSTANCE_SCHEMA)
        self.domains: dict[str, dict[str, int]] = {}

    def add(self, instance: Instance) -> None:
        self.pending.append(instance)
        self.pending_tokens += len(instance.tokens)
        if self.pending_tokens >= self.shard_tokens:
            self._write_shard()

    def _write_shard(self) -> None:
        if not self.pending:
            return
        order = np.arange(len(self.pending))
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.shard]).permutation(len(self.pending))
        instances = [self.pending[i] for i in order]
        lengths = np.array([len(x.tokens) for x in instances], dtype=np.int64)
        offsets = np.zeros(len(instances) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        tokens = np.concatenate([x.tokens for x in instances]).astype(self.dtype)
        bin_path, idx_path = shard_paths(self.dir, self.shard)
        atomic_write(bin_path, tokens.tofile)
        atomic_write(idx_path, lambda p: _save_npy(p, offsets))
        ids = np.arange(self.next_id, self.next_id + len(instances), dtype=np.int64)
        self.table.write_table(
            pa.table(
                {
                    "instance_id": ids,
                    "shard": np.full(len(instances), self.shard, dtype=np.int32),
                    "offset": offsets[:-1],
                    "n_tokens": lengths.astype(np.int32),
                    "domain": [x.domain for x in instances],
                    "doc_indices": [x.doc_indices for x in instances],
                },
                schema=INSTANCE_SCHEMA,
            )
        )
        for x in instances:
            counts = self.domains.setdefault(x.domain, {"instances": 0, "tokens": 0})
            counts["instances"] += 1
            counts["tokens"] += len(x.tokens)
        self.next_id += len(instances)
        self.shard += 1
        self.pending, self.pending_tokens = [], 0

    def close(self) -> dict:
        self._write_shard()
        self.table.close()
        os.replace(self.dir / "instances.parquet.tmp", self.dir / "instances.parquet")
        return {
            "instances": self.next_id,
            "tokens": sum(d["tokens"] for d in self.domains.values()),
            "shards": self.shard,
            "domains": self.domains,
        }


class PackedSplit:
    """Read access to one packed split: `len()`, `split[i]` -> token array, `shard_indices(rank, world)`."""

    def __init__(self, split_dir: str | Path, dtype: str | np.dtype):
        self.dir = Path(split_dir)
        self.table = pq.read_table(self.dir / "instances.parquet")
        self.dtype = np.dtype(dtype)
        self._shard_ids = self.table.column("shard").to_numpy()
        self._offsets = self.table.column("offset").to_numpy()
        self._lengths = self.table.column("n_tokens").to_numpy()
        self._maps: dict[int, np.memmap] = {}

    def __len__(self) -> int:
        return self.table.num_rows

    def _shard(self, shard: int) -> np.memmap:
        if shard not in self._maps:
            self._maps[shard] = np.memmap(shard_paths(self.dir, shard)[0], dtype=self.dtype, mode="r")
        return self._maps[shard]

    def __getitem__(self, i: int) -> np.ndarray:
        start = int(self._offsets[i])
        return np.asarray(self._shard(int(self._shard_ids[i]))[start : start + int(self._lengths[i])])

    def shard_indices(self, rank: int, world_size: int) -> range:
        """This worker's contiguous share of instance indices."""
        n = len(self)
        return range(n * rank // world_size, n * (rank + 1) // world_size)


class PackedCorpus:
    """A `miniplm prepare` output: its manifest, its splits and the tokenizer that packed it."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        manifest = read_manifest(self.path)
        if manifest is None or manifest.get("stage") not in PACKED_STAGES or not manifest.get("splits"):
            raise FileNotFoundError(f"{self.path} is not a packed corpus (no manifest.json of `miniplm prepare` or "
                                    f"`miniplm export --format tokens`); run `miniplm prepare --output {self.path}` "
                                    f"first")
        self.manifest = manifest
        self.key: str = manifest["key"]
        self.eos_id: int = manifest["tokenizer"]["eos_id"]
        self.dtype = np.dtype(manifest["tokenizer"]["dtype"])

    @property
    def split_names(self) -> list[str]:
        return list(self.manifest["splits"])

    def split(self, name: str) -> PackedSplit:
        if name not in self.manifest["splits"]:
            raise ValueError(f"{self.path} has no split '{name}'; it has: {', '.join(self.split_names)}")
        return PackedSplit(self.path / name, self.dtype)

    def load_tokenizer(self):
        return AutoTokenizer.from_pretrained(self.path / self.manifest["tokenizer"]["path"])
