"""What the response headers say: X-Robots-Tag opt-outs for our User-Agent, and Retry-After."""
from __future__ import annotations

import email.utils
import re
from datetime import datetime, timezone
from typing import Iterable, Optional

DEFAULT_USER_AGENT = "mmcurate/0.1 (+https://github.com/mmcurate/mmcurate)"
OPTOUT_DIRECTIVES = frozenset({"noai", "noimageai", "noindex", "noimageindex", "none"})  # none = noindex, nofollow


# -- headers ---------------------------------------------------------------------------------------

_VALUED_DIRECTIVES = frozenset({"unavailable_after", "max-snippet", "max-image-preview", "max-video-preview"})
_AGENT_TOKEN = re.compile(r"^[a-z0-9_.*-]+$")


def agent_tokens(user_agent: str) -> frozenset[str]:
    """The product names in a User-Agent, lower case: "mmcurate/0.1 (+https://...)" -> {"mmcurate"},
    "Mozilla/5.0 (compatible; ExampleBot/2.1)" -> {"mozilla", "examplebot"}."""
    text = re.sub(r"\S*://\S*", "", user_agent)  # a contact URL is not a product
    products = re.findall(r"([A-Za-z][\w.-]*)/", text) or text.split()[:1]
    return frozenset(p.lower() for p in products)


def optouts(header_values: Iterable[str], tokens: frozenset[str]) -> set[str]:
    """The opt-out directives among X-Robots-Tag values that apply to an agent named by ``tokens``.

    ``noai, noimageai`` applies to everyone; ``otherbot: noai`` only to otherbot; within one header a
    ``bot:`` prefix scopes the directives that follow it.
    """
    found: set[str] = set()
    for value in header_values:
        scope = None
        for part in value.split(","):
            name, sep, rest = part.partition(":")
            name = name.strip().lower()
            if sep and name not in _VALUED_DIRECTIVES and _AGENT_TOKEN.match(name):
                scope, part = name, rest
            directive = part.strip().lower()
            if directive in OPTOUT_DIRECTIVES and (scope is None or scope in tokens):
                found.add(directive)
    return found


_DELTA_SECONDS = re.compile(r"[0-9]+")  # RFC 9110 delta-seconds: ASCII digits only ("²".isdigit() is True)


def retry_after_seconds(value: Optional[str]) -> Optional[float]:
    """Retry-After as seconds from now (delta-seconds or HTTP-date), or None if absent/invalid.

    The value comes from the network: anything malformed (Unicode digits, signs, fractions, a
    date out of range) is None, never an exception.
    """
    if not value:
        return None
    value = value.strip()
    if _DELTA_SECONDS.fullmatch(value):
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
