"""The JSON text of every JSON and JSON-lines file the package writes: strict JSON, which every reader takes.

Python's json writes a float NaN or infinity as the bare tokens NaN and Infinity, which are no JSON: JavaScript's
JSON.parse, Go, serde_json, DuckDB and a strict Python reader refuse the whole line. A non-finite figure is written
as null instead (the run stops at a non-finite loss before recording it; this is the backstop for any other figure),
and allow_nan=False makes one that slipped past the mapping an error here, not a file no reader takes.

`loads` reads them back, and raises JSON nested past Python's recursion limit (no file a run writes) as a ValueError
like any other damage, where json.loads raises RecursionError."""

from __future__ import annotations

import json
import math
from typing import Any


def finite_or_none(value: Any) -> Any:
    """`value` with every non-finite float in it, at any depth of dicts, lists and tuples, replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(item) for item in value]
    return value


def json_text(value: Any, indent: int | None = None) -> str:
    """`value` as one strict JSON document and a newline: a JSON-lines record (no `indent`), or a JSON file."""
    return json.dumps(finite_or_none(value), indent=indent, allow_nan=False) + "\n"


class NestedTooDeep(ValueError):
    """JSON nested past Python's recursion limit: json.loads raises RecursionError on it."""


def loads(text: str) -> Any:
    """json.loads; every damaged text raises a ValueError: json's JSONDecodeError, or NestedTooDeep."""
    try:
        return json.loads(text)
    except RecursionError:
        raise NestedTooDeep("nested too deep to read") from None
