"""Item metadata: validation and the canonical JSON text a collection stores.

A collection keeps each item's metadata as one JSON object in the `metadata`
TEXT column of its SQLite `items` table, and filters (index/filters.py) are
evaluated by SQLite's JSON functions over that text. Everything stored goes
through `canonical_json`, so the filter compiler can rely on its shape:

- a JSON object whose keys are non-empty strings of at most 256 characters;
- each value a string, a finite number, a boolean, or a list of those
  (no null, no nested objects, no lists of lists);
- keys sorted, no whitespace, non-ASCII characters written as themselves
  (only `"`, `\\` and control characters are escaped);
- integral numbers written as integers: 3.0 (what a protobuf Struct carries
  for 3) is stored as 3, so it reads back as an int and equals 3 everywhere.

Messages name the offending key and say how to fix it: the server shows them to
API users as INVALID_ARGUMENT.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Mapping
from typing import Any

import numpy as np

MAX_KEY_CHARS = 256
DEFAULT_MAX_BYTES = 16384
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# Floats with an integral value below this magnitude are stored as integers:
# every such float is exactly one integer, and every integer up to it one float.
EXACT_INT_LIMIT = 2**53

ALLOWED = "values must be strings, numbers, booleans or lists of them"


class MetadataError(ValueError):
    """Metadata that cannot be stored; the message says which key and why."""


def _where(key: str, index: int | None = None) -> str:
    """`metadata['color']` or `metadata['tags'][2]`, with the key quoted and shortened."""
    shown = key if len(key) <= 60 else key[:57] + "..."
    return f"metadata[{shown!r}]" + ("" if index is None else f"[{index}]")


def _check_text(text: str, what: str) -> None:
    """SQLite's JSON functions stop a string at U+0000, and a lone surrogate is not UTF-8."""
    if "\x00" in text:
        raise MetadataError(f"{what} contains the character U+0000 (NUL), which cannot be stored; remove it")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = ord(text[e.start])
        raise MetadataError(
            f"{what} contains the lone surrogate U+{bad:04X}, which is not valid Unicode text; "
            "send the text as valid UTF-8"
        ) from None


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, list | tuple):
        return "a list"
    return f"of type {type(value).__name__}"


def _scalar(value: Any, where: str, null_hint: str) -> str | int | float | bool:
    """One checked, canonical scalar, or MetadataError naming `where`."""
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, str):
        _check_text(value, where)
        return value
    if isinstance(value, numbers.Integral):
        n = int(value)
        if not INT64_MIN <= n <= INT64_MAX:
            raise MetadataError(
                f"{where} is the integer {n}, outside the 64-bit range SQLite stores "
                f"({INT64_MIN} to {INT64_MAX}); send it as a float or a string"
            )
        return n
    if isinstance(value, numbers.Real):
        x = float(value)
        if not math.isfinite(x):
            shown = "NaN" if math.isnan(x) else ("-" if x < 0 else "") + "infinity"
            raise MetadataError(f"{where} is {shown}; numbers must be finite (no NaN or infinity)")
        if x.is_integer() and abs(x) < EXACT_INT_LIMIT:
            return int(x)
        return x
    if value is None:
        raise MetadataError(f"{where} is null; {ALLOWED}. {null_hint}")
    raise MetadataError(f"{where} is {_type_name(value)}; {ALLOWED}")


def canonicalize(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """The checked metadata with canonical values (integral floats as ints, tuples as lists)."""
    if not isinstance(metadata, Mapping):
        raise MetadataError(f"metadata must be an object mapping keys to values, got {_type_name(metadata)}")
    out: dict[str, Any] = {}
    for key, value in metadata.items():
        if not isinstance(key, str):
            raise MetadataError(f"metadata key {key!r} is {_type_name(key)}; keys must be strings")
        if not key:
            raise MetadataError("metadata has an empty key ''; keys must be 1 to 256 characters")
        if len(key) > MAX_KEY_CHARS:
            raise MetadataError(
                f"metadata key {key[:40]!r}... is {len(key)} characters long, over the limit of {MAX_KEY_CHARS}"
            )
        _check_text(key, f"metadata key {key[:60]!r}")
        where = _where(key)
        if isinstance(value, list | tuple):
            items = []
            for i, element in enumerate(value):
                if isinstance(element, list | tuple | Mapping):
                    raise MetadataError(
                        f"{_where(key, i)} is {_type_name(element)}; lists hold strings, numbers or booleans, "
                        "not lists or objects"
                    )
                items.append(_scalar(element, _where(key, i), "Remove it from the list"))
            out[key] = items
        elif isinstance(value, Mapping):
            raise MetadataError(
                f"{where} is an object; {ALLOWED}. Nested objects are not supported: "
                f"flatten them into keys such as '{key}.name'"
            )
        else:
            out[key] = _scalar(value, where, "To say an item has no value, leave the key out")
    return out


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def canonical_json(metadata: Mapping[str, Any], max_bytes: int = DEFAULT_MAX_BYTES) -> str:
    """Check `metadata` and return the JSON text to store, or raise MetadataError.

    Sorted keys, no whitespace, non-ASCII as itself, integral numbers below
    2**53 as integers. `max_bytes` bounds the UTF-8 size of the returned text.
    """
    clean = canonicalize(metadata)
    text = _dumps(clean)
    size = len(text.encode("utf-8"))
    if size > max_bytes:
        largest = max(clean, key=lambda k: len(_dumps({k: clean[k]}).encode("utf-8")))
        largest_size = len(_dumps({largest: clean[largest]}).encode("utf-8")) - 2  # without the braces
        raise MetadataError(
            f"metadata is {size} bytes as JSON, over the limit of {max_bytes} (server option max_metadata_bytes); "
            f"the largest entry is {_where(largest)} ({largest_size} bytes)"
        )
    return text


def loads(text: str | None) -> dict[str, Any]:
    """The metadata dict stored as `text` (None or "" for an item without metadata: {})."""
    if not text:
        return {}
    value = json.loads(text)
    if not isinstance(value, dict):
        raise MetadataError(f"stored metadata is not a JSON object: {text[:80]!r}")
    return value
