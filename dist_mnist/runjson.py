"""The JSON text of every JSON and JSON-lines file the package writes: strict JSON, which every reader takes.

Python's json writes a float NaN or infinity as the bare tokens NaN and Infinity, which are no JSON: JavaScript's
JSON.parse, Go, serde_json, DuckDB and a strict Python reader refuse the whole line. A non-finite figure is written
as null instead (the run stops at a non-finite loss before recording it; this is the backstop for any other figure),
and allow_nan=False makes one that slipped past the mapping an error here, not a file no reader takes.

`loads` reads them back, and raises JSON nested past Python's recursion limit (no file a run writes) as a ValueError
like any other damage, where json.loads raises RecursionError; an integer past Python's digit limit, which json.loads
raises as a ValueError whose advice no reader of a run file can follow, is one too, in words of its own."""

from __future__ import annotations

import json
import math
import sys
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


class NumberTooLong(ValueError):
    """An integer of more digits than Python 3.11+ converts (sys.get_int_max_str_digits(), 4300 unless changed)."""


def loads(text: str) -> Any:
    """json.loads; every damaged text raises a ValueError: json's JSONDecodeError, NestedTooDeep or NumberTooLong."""
    try:
        return json.loads(text)
    except RecursionError:
        raise NestedTooDeep("nested too deep to read") from None
    except json.JSONDecodeError:
        raise
    except ValueError:
        # The one other ValueError json.loads raises on a str: int() refusing a literal past the digit limit. Its own
        # text ends "use sys.set_int_max_str_digits() to increase the limit", a call no user of the report can make.
        limit = getattr(sys, "get_int_max_str_digits", lambda: 0)()
        raise NumberTooLong(f"an integer longer than the {limit} digits Python reads") from None
