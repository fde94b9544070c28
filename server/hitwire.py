"""Search responses as protobuf wire bytes, put together from pieces cached per stored item.

A batch-1 search is mostly overhead: building ten `Hit` messages, merging each
one's metadata `Struct` in and serialising the lot cost more than FAISS on a
60,000-vector IVF index (docs/benchmarks.md, Collections). Every part of a hit
but its score is fixed per stored item, so HitCache (server/collections.py)
keeps each item's `id` and `metadata` fields already encoded, and a hit is those
bytes with the score's 5 bytes in between. The Search handler returns the
finished `SearchResponse` bytes and its response serializer passes bytes
through (server/errors.py, add_servicer).

This writes the protobuf wire format by hand for five messages (`Hit`,
`QueryResult`, `SearchResponse`, and `google.protobuf.Struct` / `Value` for
metadata, which index/metadata.py keeps flat: strings, finite numbers,
booleans and lists of those). protobuf's own serializer stays the reference:
tests/server/test_hitwire.py parses what this writes with it and compares
against messages it built, on generated metadata (hypothesis).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

# Tags: (field number << 3) | wire type (0 varint, 1 fixed64, 2 length-delimited, 5 fixed32).
_HIT_ID, _HIT_SCORE, _HIT_METADATA = b"\x0a", b"\x15", b"\x1a"  # Hit: id = 1, score = 2, metadata = 3
_RESULT_HIT = b"\x0a"  # QueryResult: repeated Hit hits = 1
_RESPONSE_MODEL, _RESPONSE_RESULT, _RESPONSE_EXACT = b"\x0a", b"\x12", b"\x18\x01"  # SearchResponse: 1, 2, 3
_STRUCT_ENTRY, _ENTRY_KEY, _ENTRY_VALUE = b"\x0a", b"\x0a", b"\x12"  # Struct.fields = 1 (map: key 1, value 2)
_NUMBER, _STRING, _BOOL, _LIST = b"\x11", b"\x1a", b"\x20", b"\x32"  # Value: number 2, string 3, bool 4, list 6
_LIST_VALUE = b"\x0a"  # ListValue: repeated Value values = 1
_ONE_BYTE = [bytes((n,)) for n in range(128)]
_double = struct.Struct("<d").pack


def varint(n: int) -> bytes:
    """A length (a non-negative integer) as a protobuf varint."""
    if n < 128:
        return _ONE_BYTE[n]
    out = bytearray()
    while n >= 128:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field: tag, length, payload."""
    return tag + varint(len(payload)) + payload


def _value(v: Any) -> bytes:
    """A google.protobuf.Value. The oneof member is written even when it holds its default (0, "", false),
    as protobuf does: that is what says which kind the value is."""
    if isinstance(v, bool):  # before numbers: a bool is an int in Python
        return _BOOL + (b"\x01" if v else b"\x00")
    if isinstance(v, (int, float)):
        return _NUMBER + _double(float(v))
    if isinstance(v, str):
        return _field(_STRING, v.encode())
    if isinstance(v, (list, tuple)):
        return _field(_LIST, b"".join(_field(_LIST_VALUE, _value(x)) for x in v))
    raise TypeError(f"metadata value of type {type(v).__name__} has no Struct encoding here")


def struct_bytes(metadata: Mapping[str, Any]) -> bytes:
    """A flat metadata dict as a serialized google.protobuf.Struct."""
    return b"".join(_field(_STRUCT_ENTRY, _field(_ENTRY_KEY, k.encode()) + _field(_ENTRY_VALUE, _value(v)))
                    for k, v in metadata.items())


def item_fields(item_id: str, metadata: Mapping[str, Any]) -> tuple[bytes, bytes]:
    """(Hit's encoded id field, Hit's encoded metadata field) of one stored item."""
    return _field(_HIT_ID, item_id.encode()), _field(_HIT_METADATA, struct_bytes(metadata))


def query_result(hits: Sequence[tuple[bytes, bytes] | None], scores: bytes, with_metadata: bool) -> bytes:
    """A serialized QueryResult. hits: item_fields() of each hit in order, None for one to leave out (padding, or
    deleted since the search); scores: the hits' float32 scores, 4 little-endian bytes each."""
    out = []
    for j, fields in enumerate(hits):
        if fields is not None:
            body = fields[0] + _HIT_SCORE + scores[4 * j:4 * j + 4] + (fields[1] if with_metadata else b"")
            out.append(_RESULT_HIT + varint(len(body)) + body)
    return b"".join(out)


def search_response(model_ref: bytes, results: Iterable[bytes], exact: bool) -> bytes:
    """A SearchResponse from a serialized ModelRef and one serialized QueryResult (joined hits) per query."""
    return b"".join((_field(_RESPONSE_MODEL, model_ref), *(_field(_RESPONSE_RESULT, r) for r in results),
                     _RESPONSE_EXACT if exact else b""))
