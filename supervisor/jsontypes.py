"""Strict JSON helpers shared by the runtime message parser and the OCI profile loader."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["DuplicateKeyError", "json_type", "unique_keys"]


def json_type(value: object) -> str:
    """The JSON type of a decoded value with its article: ``"an array"``, ``"null"``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, list | tuple):
        return "an array"
    return type(value).__name__


class DuplicateKeyError(ValueError):
    """A JSON object names the same key twice."""


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` for :func:`json.loads` that refuses a repeated key.

    Two parsers that keep different copies of a repeated key would read different
    documents (the runtime's and ours); refusing is the only safe reading.
    """
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            shown = key if len(key) <= 60 else key[:60] + "..."
            raise DuplicateKeyError(f"duplicate key {shown!r} in an object (it appears twice)")
        result[key] = value
    return result
