"""``language``: the language of each caption, from a detector whose package ships its model
(``py3langid``: no download at run time, numpy only, about 0.1 ms a caption).

Every row with a caption gets ``language`` (an ISO 639-1 code, or ISO 639-3 where the language has
no two-letter one, ``zxx`` for text that is no language) and ``language_score`` (the detector's
probability for that language, 0..1), in the status table and KEY.json. Rules:
``languages: [en, ...]`` keeps only captions detected as one of these, ``min_score`` rejects
detections less confident than it (short captions are often uncertain). A caption without a
single letter (missing, empty, only digits, spaces or punctuation) has nothing to identify: its
columns stay empty and it is rejected when either rule is set, kept otherwise.

How it compares: py3langid is langid.py (Lui & Baldwin 2012: naive Bayes over byte n-grams, here
140 languages) with probabilities normalised by a length temperature. DataComp's "basic" filter
keeps English captions as fastText's lid.176 model labels them; LAION's English subsets
(LAION-2B-en) used Google's CLD3 (a small network over character n-grams). All three agree on
ordinary sentences and all are unreliable on captions of one or two words; the scores are not on
one scale, so a ``min_score`` tuned for fastText does not carry over.

On interleaved documents (``document_view`` "document") the detector reads the whole text (the
text segments joined) and the columns are the document row's.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from pipeline.core import schema
from pipeline.core.config import ConfigError
from pipeline.core.schema import Batch

from .base import Filter

LANGUAGE, SCORE = "language", "language_score"
_CODE = re.compile(r"[a-z]{2,3}")


@functools.lru_cache(maxsize=1)
def load_identifier():
    """py3langid's shipped model, with probabilities: read once per process (about 1 s), then shared
    by every stage and thread (classifying does not change it)."""
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def has_text(caption: Any) -> bool:
    return isinstance(caption, str) and any(ch.isalpha() for ch in caption)


@dataclass
class LanguageConfig:
    languages: list[str] = field(default_factory=list)  # keep only these codes (empty: any language)
    min_score: Optional[float] = None                   # reject less confident detections

    def validate(self) -> None:
        for n, code in enumerate(self.languages):
            if not isinstance(code, str) or not _CODE.fullmatch(code):
                raise ConfigError(f"languages[{n}]: a lowercase ISO 639-1 (or 639-3) code such as 'en', got {code!r}")
        if self.min_score is not None and not 0 <= self.min_score <= 1:
            raise ConfigError(f"min_score: a probability, in 0..1; got {self.min_score}")


class LanguageFilter(Filter):
    name = "language"
    document_view = "document"  # on documents: their whole text
    Config = LanguageConfig

    @property
    def columns(self) -> dict[str, str]:
        return {LANGUAGE: "string", SCORE: "double"}

    def check(self) -> None:
        known = set(load_identifier().labels)
        unknown = [code for code in self.config.languages if code not in known]
        if unknown:
            raise ConfigError(f"language.languages: the detector does not know {', '.join(map(repr, unknown))} "
                              f"(it knows: {', '.join(sorted(known))})")

    def process(self, batch: Batch) -> Batch:
        identifier = load_identifier()
        rows, codes, scores = [], [], []
        for i in schema.alive(batch):
            caption = batch[schema.CAPTION][i]
            if not has_text(caption):
                why = self.rule_for_no_text()
                if why:
                    self.reject(batch, i, why)
                continue
            code, score = identifier.classify(caption)
            rows.append(i)
            codes.append(code)
            scores.append(float(score))
        schema.set_column(batch, LANGUAGE, rows, codes)
        schema.set_column(batch, SCORE, rows, scores)
        for i, code, score in zip(rows, codes, scores):
            why = self.problem_with(code, score)
            if why:
                self.reject(batch, i, why)
        return batch

    def fingerprint(self) -> dict[str, Any]:
        from importlib.metadata import version

        return {**super().fingerprint(), "detector": f"py3langid {version('py3langid')}"}

    def rule_for_no_text(self) -> Optional[str]:
        if self.config.languages or self.config.min_score is not None:
            return "the caption has no letters, so no language to identify"
        return None

    def problem_with(self, code: str, score: float) -> Optional[str]:
        c = self.config
        if c.languages and code not in c.languages:
            return f"caption language {code} ({score:.2f}) is not one of {', '.join(c.languages)}"
        if c.min_score is not None and score < c.min_score:
            return f"caption language {code} detected with score {score:.4f} below min_score {c.min_score:g}"
        return None
