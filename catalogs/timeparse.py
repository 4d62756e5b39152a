"""Published time values to seconds: numbers, ``[H]H:MM:SS[.fff]``, ``MM:SS`` and ISO-8601 durations.

Values that cannot be parsed are returned unchanged, so the shard planner reports them as a bad
span with the original text instead of the reader guessing.
"""
from __future__ import annotations

import math
import re
from typing import Any

_CLOCK = re.compile(r"^(?:(\d+):)?(\d{1,2}):(\d{1,2}(?:[.,]\d+)?)$")
_ISO = re.compile(r"^P(?:(\d+(?:\.\d+)?)D)?(?:T(?:(\d+(?:\.\d+)?)H)?(?:(\d+(?:\.\d+)?)M)?(?:(\d+(?:\.\d+)?)S)?)?$",
                  re.IGNORECASE)


def to_seconds(value: Any) -> Any:
    """Seconds as a float, ``None`` for missing values, or the value itself when unparseable."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) else value
    if isinstance(value, bytes):
        return value
    if not isinstance(value, str):
        return value
    text = value.strip()
    if not text:
        return None
    try:
        number = float(text)
    except ValueError:
        pass
    else:
        return number if math.isfinite(number) else value
    m = _CLOCK.match(text)
    if m:
        hours, minutes, seconds = m.groups()
        if int(minutes) >= 60 and hours is not None:
            return value
        return int(hours or 0) * 3600.0 + int(minutes) * 60.0 + float(seconds.replace(",", "."))
    m = _ISO.match(text)
    if m and text.upper() not in ("P", "PT"):
        days, hours, minutes, seconds = (float(g) if g else 0.0 for g in m.groups())
        return days * 86400 + hours * 3600 + minutes * 60 + seconds
    return value
