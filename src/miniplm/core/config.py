"""Typed configs: dataclasses loaded from YAML, overridden by dotted command-line options.

Every stage has one dataclass config. `load_config` builds it from (defaults <- YAML file <- overrides),
checking every key and type so a typo fails with the key's dotted path and the valid choices instead of
being silently ignored. `config_hash` is what manifests compare to decide whether an output is stale.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value or key that cannot be used; the message names the key and the fix."""


def type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in get_args(tp))
    if origin is not None:
        return f"{origin.__name__}[{', '.join(type_name(a) for a in get_args(tp))}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp` and return it in that type (ints widen to floats)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        candidates = [arg for arg in args if arg is not type(None)]
        for arg in candidates:
            try:
                return coerce(value, arg, where)
            except ConfigError:
                if len(candidates) == 1 and dataclasses.is_dataclass(arg) and isinstance(value, dict):
                    raise  # an optional section: its own message names the key inside it
        raise ConfigError(f"{where}: expected {type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{where}: expected one of {type_name(tp)}, got {value!r}")
        return value
    if origin is list:
        (item_tp,) = get_args(tp)
        if isinstance(value, (str, dict)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        key_tp, val_tp = get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {coerce(k, key_tp, where): coerce(v, val_tp, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config annotation {tp!r} at {where}")


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass `cls` from a mapping, refusing unknown keys and wrong types."""
    hints = _field_types(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"unknown config key '{path}'{hint}")
        kwargs[key] = coerce(value, hints[key], path)
    try:
        obj = cls(**kwargs)
    except TypeError as exc:  # a required field without a default was not given
        raise ConfigError(f"{where or cls.__name__}: {exc}") from None
    validate = getattr(obj, "validate", None)
    if validate is not None:
        validate()
    return obj


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    node = data
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"cannot set '{dotted}': '{part}' is not a mapping")
        node = child
    node[parts[-1]] = value


def parse_override_value(text: str) -> Any:
    """Command-line values are YAML scalars/collections: `512`, `0.05`, `true`, `[a, b]`, `{x: 1}`."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def load_config(cls: type[T], path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> T:
    """defaults <- YAML file at `path` <- `overrides` (dotted keys -> already-parsed values)."""
    data: dict[str, Any] = to_dict(cls())
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of config keys")
        for key, value in loaded.items():
            if key not in data:
                from_dict(cls, {key: value})  # raises the unknown-key error with suggestions
            data[key] = value
    for dotted, value in (overrides or {}).items():
        _set_dotted(data, dotted, value)
    return from_dict(cls, data)


def hashed_fields(obj: Any) -> Any:
    """`obj` as plain data without the fields declared `hashed=False`, nor those declared `hashed="when-set"`
    while they hold their default (at any depth)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: hashed_fields(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                if f.metadata.get("hashed", True) is True
                or f.metadata.get("hashed") == "when-set" and getattr(obj, f.name) != _default(f)}
    if isinstance(obj, dict):
        return {k: hashed_fields(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [hashed_fields(v) for v in obj]
    return obj


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def config_hash(obj: Any) -> str:
    """Stable hash of the fields that change outputs: every field but those declared `hashed=False`."""
    blob = json.dumps(hashed_fields(obj), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def list_item_type(tp: Any) -> Any | None:
    """The item type when `tp` is a list (or an optional list), else None."""
    if get_origin(tp) is list:
        return get_args(tp)[0]
    if get_origin(tp) in (typing.Union, types.UnionType):
        for arg in get_args(tp):
            if get_origin(arg) is list:
                return get_args(arg)[0]
    return None


def require_at_least_one(config: Any, *keys: str) -> None:
    """Refuse a count-like option below 1 (None, where allowed, means 'no limit' and passes)."""
    for key in keys:
        value = getattr(config, key)
        if value is not None and value < 1:
            raise ConfigError(f"{key}: must be at least 1, got {value}")


def iter_leaf_fields(cls: type, prefix: str = ""):
    """(dotted name, annotation, default, help) for every option of a config, nested dataclasses flattened."""
    hints = _field_types(cls)
    defaults = cls()
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        tp = hints[f.name]
        default = getattr(defaults, f.name)
        if dataclasses.is_dataclass(tp):
            yield from iter_leaf_fields(tp, f"{name}.")
        else:
            yield name, tp, default, f.metadata.get("help", "")


def option(default: Any = dataclasses.MISSING, help: str = "", default_factory: Any = dataclasses.MISSING,
           hashed: bool | Literal["when-set"] = True):
    """A dataclass field with the help text shown by `miniplm <cmd> --help`. `hashed=False` declares a field that
    changes how a stage runs but not what it produces (paths, progress bars, threads): it stays out of the key
    that decides whether an output is up to date. `hashed="when-set"` declares an option added after outputs
    were written whose default does what they did: it enters the key only when set, so existing outputs stay
    up to date."""
    metadata = {"help": help, "hashed": hashed}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


Precision = Literal["auto", "fp32", "bf16", "fp16"]


@dataclass
class Progress:
    """Shared by every stage that can take long."""

    progress: bool = option(True, "show a progress bar", hashed=False)


@dataclass
class Compute(Progress):
    """Shared by every stage that runs a model: where, how many threads, and in which precision."""

    device: str = option("auto", "auto (cuda when available), cpu, cuda, cuda:N", hashed=False)
    threads: int | None = option(None, "torch CPU threads (null: torch's default)", hashed=False)
    precision: Precision = option(
        "auto", "autocast dtype of the matmuls (auto: bf16 where the CPU/GPU supports it, else fp16/fp32); "
        "weights stay fp32")

    def validate(self) -> None:
        require_at_least_one(self, "threads")
