"""server/hitwire.py writes Search responses by hand; protobuf's parser must read them as the messages protobuf
itself would build from the same parts."""

from __future__ import annotations

import numpy as np
from google.protobuf import struct_pb2, wrappers_pb2
from hypothesis import given, settings
from hypothesis import strategies as st
from tandem.v1 import tandem_pb2 as pb

from server import hitwire

text = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=200)
scalar = st.one_of(text, st.booleans(), st.integers(-(2**63), 2**63 - 1),
                   st.floats(allow_nan=False, allow_infinity=False))
metadata = st.dictionaries(text.filter(bool), st.one_of(scalar, st.lists(scalar, max_size=5)), max_size=8)
score = st.floats(width=32, allow_nan=False)
hit_parts = st.tuples(text, score, metadata)


def as_message(item_id: str, s: float, meta: dict, with_metadata: bool) -> pb.Hit:  # type: ignore[type-arg]
    h = pb.Hit(id=item_id, score=s)
    if with_metadata:
        h.metadata.CopyFrom(struct_pb2.Struct())
        h.metadata.update(meta)
    return h


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(hit_parts, max_size=12), min_size=1, max_size=4), st.booleans(), st.booleans(),
       st.text(max_size=30), st.text(max_size=10))
def test_search_responses_parse_as_the_messages_protobuf_builds(results, with_metadata, exact, name, version) -> None:  # type: ignore[no-untyped-def]
    wire_results = []
    for hits in results:
        fields = [hitwire.item_fields(item_id, meta) for item_id, _, meta in hits]
        scores = np.array([s for _, s, _ in hits], "<f4").tobytes()
        wire_results.append(hitwire.query_result([*fields, None], scores + b"\0" * 4, with_metadata))  # None: left out
    ref = pb.ModelRef(name=name, version=version)
    got = pb.SearchResponse.FromString(hitwire.search_response(ref.SerializeToString(), wire_results, exact))
    want = pb.SearchResponse(model=ref, exact=exact, results=[
        pb.QueryResult(hits=[as_message(i, s, m, with_metadata) for i, s, m in hits]) for hits in results])
    assert got == want


@given(st.integers(0, 2**64 - 1))
def test_varints_read_back(n) -> None:  # type: ignore[no-untyped-def]
    assert wrappers_pb2.UInt64Value.FromString(b"\x08" + hitwire.varint(n)).value == n


def test_an_empty_result_and_no_metadata_are_kept_apart_from_absent_ones() -> None:
    id_field, meta_field = hitwire.item_fields("a", {})
    got = pb.SearchResponse.FromString(hitwire.search_response(
        b"", [b"", hitwire.query_result([(id_field, meta_field)], np.float32(0.0).tobytes(), True)], False))
    assert len(got.results) == 2 and list(got.results[0].hits) == []  # one result per query, even with no hits
    assert got.results[1].hits[0].id == "a" and got.results[1].hits[0].HasField("metadata")
    assert dict(got.results[1].hits[0].metadata) == {}
