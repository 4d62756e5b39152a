"""Build dataclass configs from plain dicts (YAML) with messages that name the bad key and value.

Every config in the project (job spec sections, filter and tokenizer options, catalog cards) is a
dataclass read through :func:`from_dict`, so unknown keys and wrong types are reported the same way.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal, Union


class ConfigError(ValueError):
    """A config value is missing, unknown or of the wrong type; the message names its path."""


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp) if a is not type(None)) + " or null"
    if origin in (list, tuple):
        return f"a list of {_describe(typing.get_args(tp)[0])}" if typing.get_args(tp) else "a list"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def convert(tp: Any, value: Any, path: str) -> Any:
    """Check ``value`` against the type ``tp`` (dataclass, Literal, Optional, list, dict, scalar)."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"{path}: expected {_describe(tp)}, got {value!r}")
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # Optional[X]: X's own message says what is wrong
            return convert(options[0], value, path)
        for arg in options:
            try:
                return convert(arg, value, path)
            except ConfigError:
                continue
        raise bad
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise bad
    if origin in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise bad
        (item_tp,) = typing.get_args(tp)[:1] or (Any,)
        return [convert(item_tp, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        key_tp, val_tp = typing.get_args(tp) or (Any, Any)
        return {convert(key_tp, k, path): convert(val_tp, v, f"{path}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise bad


def from_dict(cls: type, data: Any, path: str = "") -> Any:
    """Instantiate dataclass ``cls`` from ``data``; unknown keys and bad values raise ConfigError.

    After construction a ``validate()`` method, if the class has one, checks cross-field rules and
    may raise ConfigError (its message is prefixed with ``path``).
    """
    where = path or cls.__name__
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        sub = f"{path}.{key}" if path else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (known keys: {', '.join(fields)})"
            raise ConfigError(f"{sub}: unknown key{hint}")
        kwargs[key] = convert(hints[key], value, sub)
    for name, f in fields.items():
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{path + '.' if path else ''}{name}: required key is missing")
    obj = cls(**kwargs)
    check = getattr(obj, "validate", None)
    if check is not None:
        try:
            check()
        except ConfigError as e:
            raise ConfigError(f"{path + '.' if path else ''}{e}") from None
    return obj


def to_dict(obj: Any) -> Any:
    """The plain-dict form of a config (for manifest.json and fingerprints)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def parse_override(text: str) -> tuple[list[str], Any]:
    """``download.image_size=512`` -> (["download", "image_size"], 512); the value is parsed as YAML."""
    import yaml

    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY.SUB=VALUE")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"--set {text!r}: empty key")
    return parts, yaml.safe_load(raw) if raw.strip() else ""


def apply_override(data: dict, parts: list[str], value: Any, root: Any = None) -> None:
    """Set ``parts`` in ``data`` to ``value``; when the field of dataclass ``root`` at ``parts`` is a
    list, a bare string is a list of that one string (``--set input.files=a.parquet``)."""
    if isinstance(value, str) and typing.get_origin(_field_type(root, parts)) in (list, tuple):
        value = [value]
    node = data
    for p in parts[:-1]:
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {'.'.join(parts)}: {p} is not a mapping")
        node = nxt
    node[parts[-1]] = value


def _field_type(root: Any, parts: list[str]) -> Any:
    """The type of the field that ``parts`` names in dataclass ``root`` (None if unknown)."""
    tp = root
    for p in parts:
        if not dataclasses.is_dataclass(tp):
            return None
        tp = typing.get_type_hints(tp).get(p)
        if typing.get_origin(tp) in (Union, types.UnionType):  # Optional[X] -> X
            options = [a for a in typing.get_args(tp) if a is not type(None)]
            tp = options[0] if len(options) == 1 else None
    return tp
