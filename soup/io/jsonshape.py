"""Typed reads of JSON documents: a wrong type is one error naming the field path at once; missing
required fields are collected and reported after the whole document was checked."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

__all__ = ["BadShape", "Reader", "json_type", "jsonable"]


class BadShape(Exception):
    """A field of the wrong type; the message names the field."""


JSON_TYPES = {dict: "an object", list: "a list", str: "a string", int: "a number", float: "a number",
               bool: "true/false", type(None): "null"}


def json_type(value: Any) -> str:
    return JSON_TYPES.get(type(value), type(value).__name__)


class Reader:
    """Typed access to a JSON object. A wrong type raises at once; missing required fields are
    collected and reported after the whole document was checked (so a wrong type is named first)."""

    def __init__(self) -> None:
        self.missing: list[str] = []

    def get(self, obj: Mapping[str, Any], key: str, kind: type, path: str, *, required: bool = False) -> Any:
        value = obj.get(key)
        if value is None:
            if required:
                self.missing.append(path)
            return None
        if kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        elif kind is bool:
            ok = isinstance(value, bool)
        else:
            ok = isinstance(value, kind) and not isinstance(value, bool)
        if not ok and kind is int and isinstance(value, float):
            raise BadShape(f"{path}: expected a whole number, got {value!r}")
        if not ok:
            raise BadShape(f"{path}: expected {JSON_TYPES[kind]}, got {json_type(value)}")
        return float(value) if kind is float else value

    def numbers(self, obj: Mapping[str, Any], key: str, path: str) -> dict[str, float] | None:
        d = self.get(obj, key, dict, path)
        if d is None:
            return None
        return {str(k): self.get(d, k, float, f"{path}.{k}", required=True) for k in d}


def jsonable(value: Any) -> Any:
    """``value`` as JSON would give it back (anything JSON cannot hold becomes its ``str``)."""
    return json.loads(json.dumps(value, default=str))

