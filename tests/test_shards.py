import numpy as np
import pytest

from miniplm.data.packing import Instance
from miniplm.data.shards import PackedSplit, ShardWriter, shard_paths, token_dtype


@pytest.mark.parametrize("vocab, dtype", [(300, np.uint16), (49_152, np.uint16), (65_536, np.uint16),
                                          (65_537, np.uint32), (151_936, np.uint32)])
def test_token_dtype_is_the_smallest_that_fits(vocab, dtype):
    assert token_dtype(vocab) == dtype
    assert np.iinfo(token_dtype(vocab)).max >= vocab - 1


def write(tmp_path, instances, dtype=np.uint16, shard_tokens=10, shuffle=False, seed=0):
    writer = ShardWriter(tmp_path, np.dtype(dtype), shard_tokens, shuffle, seed)
    for x in instances:
        writer.add(x)
    return writer.close()


def make_instances(n, vocab=70_000):
    rng = np.random.default_rng(1)
    return [Instance(rng.integers(0, vocab, size=int(rng.integers(2, 9))), "abc"[i % 3], np.array([i]))
            for i in range(n)]


def test_round_trip_through_memmap_shards_offsets_and_table(tmp_path):
    instances = make_instances(25)
    summary = write(tmp_path, instances, dtype=np.uint32)
    split = PackedSplit(tmp_path, np.uint32)
    assert len(split) == 25 and summary["instances"] == 25 and summary["shards"] > 1
    for i, x in enumerate(instances):
        assert split[i].tolist() == x.tokens.tolist()
    assert split.table.column("instance_id").to_pylist() == list(range(25))
    assert split.table.column("doc_indices").to_pylist() == [[i] for i in range(25)]
    bin_path, idx_path = shard_paths(tmp_path, 0)
    offsets = np.load(idx_path)
    raw = np.fromfile(bin_path, dtype=np.uint32)
    assert offsets[0] == 0 and offsets[-1] == len(raw)
    assert raw[offsets[1]:offsets[2]].tolist() == instances[1].tokens.tolist()
    assert not list(tmp_path.glob("*.tmp"))
    assert sum(len(r) for r in [split.shard_indices(r, 3) for r in range(3)]) == 25


def test_shuffle_within_shards_is_seeded(tmp_path):
    instances = make_instances(30, vocab=300)

    def stored(name, seed):
        write(tmp_path / name, instances, shuffle=True, seed=seed)
        split = PackedSplit(tmp_path / name, np.uint16)
        return [tuple(split[i]) for i in range(len(split))]

    a, b, c = stored("a", 3), stored("b", 3), stored("c", 4)
    plain = [tuple(x.tokens) for x in instances]
    assert a == b and a != c and a != plain
    assert sorted(a) == sorted(plain)
