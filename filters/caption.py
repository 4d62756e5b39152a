"""``caption``: simple text rules on the caption. The defaults are DataComp's basic text rule
(more than 2 words and more than 5 characters); regexes are matched case-insensitively.
On interleaved documents (``document_view`` "document") the rules judge the whole text: the text
segments joined (``core/document.full_text``), so ``min_words`` / ``max_chars`` bound a document."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

from pipeline.core import schema
from pipeline.core.config import ConfigError

from .base import Filter, Row


@dataclass
class CaptionConfig:
    min_words: int = 3
    max_words: Optional[int] = None
    min_chars: int = 6
    max_chars: Optional[int] = None
    min_alpha_fraction: Optional[float] = None  # letters / non-space characters, e.g. rejects "IMG_0042.JPG"
    must_match: list[str] = field(default_factory=list)      # reject unless one of these matches
    must_not_match: list[str] = field(default_factory=list)  # reject if any of these matches

    def validate(self) -> None:
        for name in ("min_words", "min_chars"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if self.min_alpha_fraction is not None and not 0 <= self.min_alpha_fraction <= 1:
            raise ConfigError(f"min_alpha_fraction: must be in 0..1, got {self.min_alpha_fraction}")
        for name in ("must_match", "must_not_match"):
            for k, pattern in enumerate(getattr(self, name)):
                try:
                    re.compile(pattern)
                except re.error as e:
                    raise ConfigError(f"{name}[{k}]: not a valid regular expression ({e}): {pattern!r}") from None


class CaptionFilter(Filter):
    name = "caption"
    document_view = "document"  # on documents: their whole text
    Config = CaptionConfig

    def __init__(self, config: CaptionConfig) -> None:
        super().__init__(config)
        self.must = [re.compile(p, re.IGNORECASE) for p in config.must_match]
        self.must_not = [re.compile(p, re.IGNORECASE) for p in config.must_not_match]

    def problem(self, row: Row) -> Optional[str]:
        o, text = self.config, (row[schema.CAPTION] or "").strip()
        words, chars = len(text.split()), len(text)
        if words < o.min_words:
            return f"{words} words, fewer than {o.min_words}"
        if o.max_words is not None and words > o.max_words:
            return f"{words} words, more than {o.max_words}"
        if chars < o.min_chars:
            return f"{chars} characters, fewer than {o.min_chars}"
        if o.max_chars is not None and chars > o.max_chars:
            return f"{chars} characters, more than {o.max_chars}"
        if o.min_alpha_fraction is not None:
            visible = [c for c in text if not c.isspace()]
            alpha = sum(c.isalpha() for c in visible) / max(len(visible), 1)
            if alpha < o.min_alpha_fraction:
                return f"letters are {alpha:.0%} of the characters, below {o.min_alpha_fraction:.0%}"
        if self.must and not any(p.search(text) for p in self.must):
            return "matches none of must_match"
        for p in self.must_not:
            if p.search(text):
                return f"matches must_not_match {p.pattern!r}"
        return None
