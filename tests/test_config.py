from dataclasses import dataclass
from typing import Literal

import pytest

from miniplm.core.config import ConfigError, config_hash, load_config, option
from miniplm.data.prepare import PrepareConfig


@dataclass
class Inner:
    rate: float = option(0.5, "a rate")
    workers: int = option(1, "how many workers (changes the speed, not the result)", hashed=False)


@dataclass
class Outer:
    name: str = option("x", "a name")
    size: int = option(8, "a size")
    mode: Literal["a", "b"] = option("a", "a mode")
    inner: Inner = option(default_factory=Inner)
    tags: list[str] | None = option(None, "tags")


def test_defaults_then_yaml_then_dotted_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("size: 16\ninner:\n  rate: 0.25\nname: from-file\n")
    cfg = load_config(Outer, path, {"inner.rate": 0.75, "tags": ["a", "b"]})
    assert (cfg.name, cfg.size, cfg.inner.rate, cfg.tags) == ("from-file", 16, 0.75, ["a", "b"])
    assert load_config(Outer).size == 8


def test_unknown_key_suggests_the_close_one(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("sise: 3\n")
    with pytest.raises(ConfigError, match="unknown config key 'sise'; did you mean 'size'"):
        load_config(Outer, path)
    with pytest.raises(ConfigError, match="unknown config key 'inner.rat'"):
        load_config(Outer, None, {"inner.rat": 1})


@pytest.mark.parametrize(
    "override, message",
    [
        ({"size": "big"}, "size: expected an integer"),
        ({"size": True}, "size: expected an integer"),
        ({"mode": "c"}, "mode: expected one of 'a' | 'b'"),
        ({"inner.rate": "fast"}, "inner.rate: expected a number"),
        ({"tags": "notalist"}, "tags: expected list"),
    ],
)
def test_wrong_types_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Outer, None, override)


def test_int_widens_to_float_and_hash_ignores_excluded_fields():
    assert load_config(Outer, None, {"inner.rate": 1}).inner.rate == 1.0
    a = load_config(Outer, None, {"name": "p"})
    b = load_config(Outer, None, {"name": "q"})
    assert config_hash(a) != config_hash(b)
    # a field declared hashed=False, at any depth, does not change the hash
    c = load_config(Outer, None, {"name": "p", "inner.workers": 4})
    assert config_hash(c) == config_hash(a)
    assert config_hash(load_config(Outer, None, {"name": "p", "inner.rate": 0.7})) != config_hash(a)


@pytest.mark.parametrize(
    "override, message",
    [
        ({"max_len": 4}, "max_len: must be at least 8"),
        ({"splits.ref.fraction": 1.5}, r"splits.ref.fraction: must be in \[0, 1\]"),
        ({"splits.ref.fraction": 1}, "1 takes whole domains; name them in splits.ref.domains"),
        ({"splits.ref.fraction": 0.6, "splits.heldout.fraction": 0.5}, "add up to 1 or more"),
        ({"splits": {"train": {"fraction": 0.1}}}, "'train' is the remainder"),
        ({"shard_tokens": 0}, "shard_tokens: must be at least 1"),
        ({"inputs": []}, "inputs: give at least one"),
        ({"on_bad_record": "ignore"}, "on_bad_record: expected one of"),
    ],
)
def test_prepare_config_refuses_bad_values(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(PrepareConfig, None, override)


def test_config_file_must_exist_and_be_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Outer, tmp_path / "missing.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(Outer, bad)


def test_an_option_added_later_keys_outputs_only_when_set():
    @dataclass
    class Before:
        steps: int = option(3, "")

    @dataclass
    class After:
        steps: int = option(3, "")
        features: bool = option(False, "", hashed="when-set")
        subset: list[int] = option(default_factory=list, hashed="when-set")

    assert config_hash(After()) == config_hash(Before())  # outputs written before the option stay up to date
    assert config_hash(After(features=True)) != config_hash(Before())
    assert config_hash(After(subset=[1])) != config_hash(After())
