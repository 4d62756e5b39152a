"""Where the tests find the repository and their data, in one place."""
from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent  # tests/helpers/paths.py -> the repository root
TEST_DATA = REPO / "tests" / "data"
