"""String values inside MLflow search filters (``name = '...'``, ``tags.`k` = '...'``), quoted safely.

MLflow's filter parser strips one pair of outer quotes and never unescapes, so a value is written in
single quotes, or in double quotes when it holds a single quote; a value holding both cannot be expressed.
"""

from __future__ import annotations

from pipelines.core.errors import LeukopsError


class SearchFilterError(LeukopsError, ValueError):
    pass


def quoted(value: str) -> str:
    """``value`` as a string literal of an MLflow search filter."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise SearchFilterError(f"{value!r} holds both quote characters: MLflow search filters cannot express it")
