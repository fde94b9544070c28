"""Metadata validation and canonical JSON (index/metadata.py)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from index.metadata import MetadataError, canonical_json, canonicalize, loads

ALLOWED = "values must be strings, numbers, booleans or lists of them"


def test_canonical_text_sorts_keys_drops_whitespace_and_keeps_unicode() -> None:
    text = canonical_json({"b": "snow ☃", "a": 1, "C": [True, False, "x"]})
    assert text == '{"C":[true,false,"x"],"a":1,"b":"snow ☃"}'
    assert canonical_json({"a": 1, "b": 2}) == canonical_json({"b": 2, "a": 1})


@pytest.mark.parametrize(
    ("value", "stored"),
    [
        (3.0, "3"),  # a protobuf Struct number
        (-0.0, "0"),
        (-7.0, "-7"),
        (2.0**53 - 1, "9007199254740991"),
        (2.0**53, "9007199254740992.0"),  # from 2**53 on, floats stay floats
        (1e20, "1e+20"),
        (2.5, "2.5"),
        (0.1, "0.1"),
        (3, "3"),
        (2**63 - 1, "9223372036854775807"),
        (True, "true"),  # a boolean is not the number 1
        (False, "false"),
        (np.int64(4), "4"),
        (np.float32(1.5), "1.5"),
        (np.float64(6.0), "6"),
        (np.bool_(True), "true"),
        ("", '""'),
        ('quote " and \\ and \n', '"quote \\" and \\\\ and \\n"'),
    ],
)
def test_values_are_stored_canonically(value: object, stored: str) -> None:
    assert canonical_json({"k": value}) == '{"k":' + stored + "}"
    assert canonical_json({"k": [value]}) == '{"k":[' + stored + "]}"


def test_integral_floats_read_back_as_ints() -> None:
    back = loads(canonical_json({"n": 3.0, "x": 3.5, "l": (1.0, 2.5), "t": True}))
    assert back == {"n": 3, "x": 3.5, "l": [1, 2.5], "t": True}
    assert type(back["n"]) is int and type(back["t"]) is bool
    assert canonicalize({"n": 3.0, "l": (1.0,)}) == {"n": 3, "l": [1]}


def test_keys_may_hold_any_characters() -> None:
    meta = {"with space": 1, "a.b": 2, 'quo"te': 3, "back\\slash": 4, "é☃": 5, "tab\t": 6, "`": 7, "k" * 256: 8}
    assert loads(canonical_json(meta)) == meta


def test_empty_lists_and_empty_metadata_are_allowed() -> None:
    assert canonical_json({}) == "{}"
    assert canonical_json({"tags": []}) == '{"tags":[]}'


def test_loads_of_nothing_is_empty_metadata() -> None:
    assert loads(None) == {} and loads("") == {}
    with pytest.raises(MetadataError, match="not a JSON object"):
        loads("[1]")


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ({"color": None}, f"metadata['color'] is null; {ALLOWED}. To say an item has no value, leave the key out"),
        ({"tags": ["a", None]}, f"metadata['tags'][1] is null; {ALLOWED}. Remove it from the list"),
        (
            {"size": {"w": 1}},
            f"metadata['size'] is an object; {ALLOWED}. Nested objects are not supported: "
            "flatten them into keys such as 'size.name'",
        ),
        ({"tags": [1, [2]]}, "metadata['tags'][1] is a list; lists hold strings, numbers or booleans, not lists or objects"),
        ({"tags": [{"a": 1}]}, "metadata['tags'][0] is an object; lists hold strings, numbers or booleans, not lists or objects"),
        ({"x": float("nan")}, "metadata['x'] is NaN; numbers must be finite (no NaN or infinity)"),
        ({"x": float("inf")}, "metadata['x'] is infinity; numbers must be finite (no NaN or infinity)"),
        ({"x": [float("-inf")]}, "metadata['x'][0] is -infinity; numbers must be finite (no NaN or infinity)"),
        ({"": 1}, "metadata has an empty key ''; keys must be 1 to 256 characters"),
        ({"k" * 257: 1}, f"metadata key {'k' * 40!r}... is 257 characters long, over the limit of 256"),
        ({3: "x"}, "metadata key 3 is of type int; keys must be strings"),
        ({"x": b"raw"}, f"metadata['x'] is of type bytes; {ALLOWED}"),
        ({"x": 2**63}, "metadata['x'] is the integer 9223372036854775808, outside the 64-bit range SQLite stores "
                       "(-9223372036854775808 to 9223372036854775807); send it as a float or a string"),
        ({"x": "a\x00b"}, "metadata['x'] contains the character U+0000 (NUL), which cannot be stored; remove it"),
        ({"a\x00": 1}, "metadata key 'a\\x00' contains the character U+0000 (NUL), which cannot be stored; remove it"),
        ({"x": ["\ud800"]}, "metadata['x'][0] contains the lone surrogate U+D800, which is not valid Unicode text; "
                            "send the text as valid UTF-8"),
        ([("a", 1)], "metadata must be an object mapping keys to values, got a list"),
        (None, "metadata must be an object mapping keys to values, got null"),
    ],
)
def test_invalid_metadata_is_refused_naming_the_key(metadata: object, message: str) -> None:
    with pytest.raises(MetadataError) as caught:
        canonical_json(metadata)  # type: ignore[arg-type]
    assert str(caught.value) == message
    assert isinstance(caught.value, ValueError)


def test_long_keys_are_shortened_in_messages() -> None:
    with pytest.raises(MetadataError) as caught:
        canonical_json({"k" * 200: None})
    assert str(caught.value).startswith(f"metadata[{'k' * 57 + '...'!r}] is null")


def test_size_limit_counts_utf8_bytes_of_the_canonical_text() -> None:
    meta = {"a": "é" * 10, "b": 1}  # '{"a":"éééééééééé","b":1}': 14 ASCII + 2*10 bytes
    size = len(canonical_json(meta).encode())
    assert size == 34
    assert canonical_json(meta, max_bytes=size)
    with pytest.raises(MetadataError) as caught:
        canonical_json(meta, max_bytes=size - 1)
    assert str(caught.value) == (
        "metadata is 34 bytes as JSON, over the limit of 33 (server option max_metadata_bytes); "
        "the largest entry is metadata['a'] (26 bytes)"
    )


def test_default_size_limit_is_16_kib() -> None:
    assert canonical_json({"t": "x" * (16384 - 8)})  # {"t":"..."} = 8 bytes of framing
    with pytest.raises(MetadataError, match=re.escape("metadata is 16385 bytes as JSON, over the limit of 16384")):
        canonical_json({"t": "x" * (16384 - 7)})


def test_canonical_text_is_valid_json_that_sqlite_reads() -> None:
    import sqlite3

    text = canonical_json({"n": 3.0, "f": 0.1, "b": True, "s": 'q"\\é', "l": [1, "a", False]})
    rows = sqlite3.connect(":memory:").execute("SELECT key, type, atom FROM json_each(?) ORDER BY key", (text,))
    assert rows.fetchall() == [
        ("b", "true", 1), ("f", "real", 0.1), ("l", "array", None), ("n", "integer", 3), ("s", "text", 'q"\\é'),
    ]
    assert json.loads(text) == loads(text)
