"""Source paths of a card's column map: ``col``, ``col.key``, ``col[other.path]`` and ``@index``.

``A|B`` lists alternatives: per row, the first non-null value among the columns the file has (for
datasets whose releases spell a column differently, or that fill one of several caption columns).

A path is compiled once per card and then resolved against a row (a mapping of source columns,
plus ``@index`` for exploded rows). Missing keys, out-of-range indices and nulls resolve to None.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Optional

_SEGMENT = re.compile(r"^(?P<name>@index|[^.\[\]]+)(?:\[(?P<index>.+)\])?$")


@dataclass(frozen=True)
class Segment:
    name: str
    index: Optional["Path"] = None


@dataclass(frozen=True)
class Path:
    text: str
    segments: tuple[Segment, ...]

    @property
    def column(self) -> str:
        """The top-level source column the path starts from."""
        return self.segments[0].name

    @property
    def is_column(self) -> bool:
        return len(self.segments) == 1 and self.segments[0].index is None

    def pick(self, available) -> "Path":
        return self

    def columns(self) -> set[str]:
        """Every top-level column the path reads, including those inside index expressions."""
        out = {self.column}
        for seg in self.segments:
            if seg.index is not None:
                out |= seg.index.columns()
        return out

    def resolve(self, row: dict[str, Any]) -> Any:
        value: Any = row
        for i, seg in enumerate(self.segments):
            if value is None:
                return None
            if isinstance(value, dict):
                value = value.get(seg.name)
            else:
                return None
            if seg.index is not None:
                idx = seg.index.resolve(row)
                if not isinstance(value, (list, tuple)) or isinstance(idx, bool) or not isinstance(idx, int):
                    return None
                value = value[idx] if -len(value) <= idx < len(value) else None
        return value


@dataclass(frozen=True)
class Choice:
    """Alternatives ``A|B``: per row the first non-null value of the columns the file has."""
    text: str
    options: tuple[Path, ...]

    @property
    def column(self) -> str:
        return self.options[0].column

    @property
    def is_column(self) -> bool:
        return all(p.is_column for p in self.options)

    def columns(self) -> set[str]:
        return set().union(*(p.columns() for p in self.options))

    def pick(self, available) -> "Path | Choice":
        """The one option the file has; when it has several, the choice itself (resolved per row)."""
        present = [p for p in self.options if p.column in available]
        if len(present) > 1:
            return self
        return present[0] if present else self.options[0]

    def resolve(self, row: dict[str, Any]) -> Any:
        for p in self.options:
            value = p.resolve(row)
            if value is not None:
                return value
        return None


def compile_path(text: str):
    """Parse a path (or ``A|B`` alternatives); raises ValueError naming the path when malformed."""
    if "|" in text:
        return Choice(text, tuple(_compile_one(t.strip()) for t in text.split("|")))
    return _compile_one(text)


def _compile_one(text: str) -> Path:
    segments = []
    for part in _split(text):
        m = _SEGMENT.match(part)
        if not m:
            raise ValueError(f"not a valid column path: {text!r}")
        index = _compile_one(m.group("index")) if m.group("index") else None
        segments.append(Segment(m.group("name"), index))
    if not segments:
        raise ValueError(f"empty column path: {text!r}")
    return Path(text, tuple(segments))


def _split(text: str) -> list[str]:
    """Split on dots that are not inside brackets."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced brackets in column path: {text!r}")
        if ch == "." and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth:
        raise ValueError(f"unbalanced brackets in column path: {text!r}")
    parts.append("".join(cur))
    return parts
