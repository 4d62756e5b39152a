"""Helpers shared by the tests (no tests here). ``tests/`` is on sys.path (``pythonpath`` in
pyproject.toml), so test modules import them as ``from helpers.paths import REPO``."""
