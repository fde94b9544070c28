"""Collections over real gRPC: lifecycle, items, search (text, image, vector, id, weighted, filtered,
exact), the bound model, durability across restarts, and every kind of bad input."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import grpc
import numpy as np
import pytest
from tandem.v1 import tandem_pb2 as pb
from tandem.v1 import tandem_pb2_grpc as pb_grpc

from server.client import (
    AlreadyExists,
    ById,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Overloaded,
    ServerError,
    TandemClient,
)
from tests.conftest import SHIPPED_MODELS, png_bytes, start_server
from training.data import procedural

C = grpc.StatusCode


@pytest.fixture(scope="module")
def shapes_server(tmp_path_factory):  # type: ignore[no-untyped-def]
    server = start_server(SHIPPED_MODELS, data_dir=str(tmp_path_factory.mktemp("data")), max_items_per_request=64)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def shapes(shapes_server):  # type: ignore[no-untyped-def]
    """A collection of 448 procedural test images with their labels as metadata."""
    data = list(procedural.ShapesDataset("test", 448, seed=11))
    with TandemClient(shapes_server.target, timeout_s=120) as c:
        c.create_collection("shapes")
        for start in range(0, len(data), 64):
            chunk = data[start : start + 64]
            r = c.upsert("shapes", [{"id": f"img-{start + i}", "image": png_bytes(img),
                                     "metadata": {"label": spec.label, "size": spec.size, "colour": spec.colour,
                                                  "shape": spec.shape, "n": start + i}}
                                    for i, (img, spec) in enumerate(chunk)])
            assert r.upserted == len(chunk) and all(x.code == 0 for x in r.results)
    return {f"img-{i}": spec for i, (_, spec) in enumerate(data)}


def test_text_finds_images(shapes_server, shapes) -> None:  # type: ignore[no-untyped-def]
    """Cross-modal: "large red circle" finds the large red circles, for every seen class with 3+ images."""
    from collections import Counter

    counts = Counter(spec.label for spec in shapes.values() if not procedural.is_held_out(spec.label))
    labels = [label for label, n in counts.items() if n >= 3]
    assert "large red circle" in labels and len(labels) >= 10
    with TandemClient(shapes_server.target) as c:
        results = c.search("shapes", *labels, top_k=3)
    right = sum(all(shapes[h.id].label == label for h in hits) for label, hits in zip(labels, results))
    assert right >= 0.9 * len(labels), f"{right} of {len(labels)} labels found only their own images"
    red = results[labels.index("large red circle")]
    assert [h.metadata["label"] for h in red] == ["large red circle"] * 3 and red[0].score >= red[-1].score


def test_image_finds_texts(shapes_server) -> None:  # type: ignore[no-untyped-def]
    labels = procedural.class_labels()
    img, spec = next(iter(procedural.ShapesDataset("test", 1, seed=5)))
    with TandemClient(shapes_server.target) as c:
        c.create_collection("captions")
        c.upsert("captions", [{"id": label, "text": f"a photo of a {label}."} for label in labels])
        hits = c.search("captions", png_bytes(img), top_k=1)[0]
        c.drop_collection("captions")
    assert hits[0].id == spec.label


def test_filter_keeps_the_unfiltered_order_of_the_matches(shapes_server, shapes) -> None:  # type: ignore[no-untyped-def]
    selective = 'colour = "blue" and size = "small"'
    with TandemClient(shapes_server.target) as c:
        filtered = c.search("shapes", "a small blue square", top_k=5, filter=selective)[0]
        everything = c.search("shapes", "a small blue square", top_k=448)[0]
    expected = [h.id for h in everything if shapes[h.id].colour == "blue" and shapes[h.id].size == "small"][:5]
    assert expected and [h.id for h in filtered] == expected


def test_a_selective_filter_is_answered_exactly(shapes_server, shapes) -> None:  # type: ignore[no-untyped-def]
    stub = pb_grpc.CollectionsStub(shapes_server.channel())
    r = stub.Search(pb.SearchRequest(collection="shapes", queries=[pb.Query(terms=[pb.QueryTerm(text="x")])],
                                     filter='shape = "square"'))
    assert r.exact and all(h.metadata["shape"] == "square" for h in r.results[0].hits)


def test_vector_id_and_weighted_queries(shapes_server, shapes) -> None:  # type: ignore[no-untyped-def]
    with TandemClient(shapes_server.target) as c:
        stored = c.get("shapes", ["img-3", "nope"], with_vectors=True)
        assert list(stored.items) == ["img-3"] and stored.missing == ["nope"]
        assert stored.vectors.shape == (1, 64)
        by_vector, by_id = c.search("shapes", stored.vectors[0], ById("img-3"), top_k=1)
        text = c.embed_text(["a large red circle", "blue"]).embeddings
        weighted = c.search("shapes", [(1.0, "a large red circle"), (-0.5, "blue")], top_k=4)[0]
        manual = c.search("shapes", text[0] - 0.5 * text[1], top_k=4)[0]
    assert by_vector[0].id == by_id[0].id == "img-3" and by_vector[0].score == pytest.approx(1.0, abs=1e-5)
    assert [h.id for h in weighted] == [h.id for h in manual]


@pytest.mark.parametrize("metric", ["cosine", "ip", "l2"])
def test_a_lone_vector_query_scores_as_the_general_weighted_path_does(shapes_server, metric) -> None:  # type: ignore[no-untyped-def]
    """One plain vector takes a shortcut in the server; the same query split into weighted terms takes the
    general path. Both must score alike, and a weight other than 1 must still count."""
    rng = np.random.default_rng(3)
    v, q = rng.standard_normal((20, 64)).astype(np.float32), 3 * rng.standard_normal(64).astype(np.float32)
    with TandemClient(shapes_server.target) as c:
        c.create_collection(f"lone-{metric}", metric=metric)
        try:
            c.upsert(f"lone-{metric}", [{"id": f"v{i}", "vector": v[i]} for i in range(20)])
            plain, halves, doubled = c.search(f"lone-{metric}", q, [(0.5, q), (0.5, q)], [(2.0, q)], top_k=5)
        finally:
            c.drop_collection(f"lone-{metric}")
    assert [h.id for h in plain] == [h.id for h in halves]
    np.testing.assert_allclose([h.score for h in plain], [h.score for h in halves], rtol=1e-5, atol=1e-5)
    plain_scores, doubled_scores = [h.score for h in plain], [h.score for h in doubled]
    if metric == "cosine":  # the query is normalised: its length does not count
        np.testing.assert_allclose(plain_scores, doubled_scores, rtol=1e-5)
    elif metric == "ip":  # a query twice as long scores twice as high
        np.testing.assert_allclose([2 * s for s in plain_scores], doubled_scores, rtol=1e-5)
    else:  # l2: the query moved away from every item
        assert doubled_scores != pytest.approx(plain_scores)


def test_upsert_replaces_and_delete_removes(shapes_server) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(0)
    v = rng.standard_normal((3, 64)).astype(np.float32)
    with TandemClient(shapes_server.target) as c:
        c.create_collection("vectors", metric="ip")
        c.upsert("vectors", [{"id": f"v{i}", "vector": v[i], "metadata": {"i": i}} for i in range(3)])
        c.upsert("vectors", [{"id": "v0", "vector": v[1], "metadata": {"i": 10}}])  # replace v0
        assert c.get("vectors", ["v0"]).items["v0"] == {"i": 10}
        assert sorted(h.id for h in c.search("vectors", v[1], top_k=3)[0][:2]) == ["v0", "v1"]
        r = c.delete("vectors", ["v1", "missing"])
        assert (r.deleted, r.not_found) == (1, 1)
        assert c.delete("vectors", filter="i = 10").deleted == 1
        hits = c.search("vectors", v[1], top_k=3)[0]
        info = c.get_collection("vectors")
        c.drop_collection("vectors")
    assert [h.id for h in hits] == ["v2"] and info.count == 1  # 3 stored, v0 replaced, v1 and v0 deleted


def test_hits_carry_the_metadata_of_the_collection_they_come_from(shapes_server) -> None:  # type: ignore[no-untyped-def]
    """Search hits' metadata is cached by rowid; a dropped and re-created collection reuses rowids, and an
    upsert of a stored id gets a new rowid: neither may answer stale metadata."""
    v = np.eye(64, dtype=np.float32)[:2]
    with TandemClient(shapes_server.target) as c:
        for generation in range(2):
            c.create_collection("again", metric="ip")
            c.upsert("again", [{"id": f"g{generation}", "vector": v[0], "metadata": {"generation": generation}}])
            first = c.search("again", v[0], top_k=1)[0]
            c.upsert("again", [{"id": f"g{generation}", "vector": v[0], "metadata": {"generation": 10 + generation}}])
            replaced = c.search("again", v[0], top_k=1)[0]
            c.drop_collection("again")
            assert [(h.id, h.metadata) for h in first] == [(f"g{generation}", {"generation": generation})]
            assert [(h.id, h.metadata) for h in replaced] == [(f"g{generation}", {"generation": 10 + generation})]


def test_hit_cache_is_bounded_in_bytes() -> None:
    from server.collections import HitCache

    cache = HitCache(max_bytes=10_000)
    a, b = cache.tag(), cache.tag()
    for rowid in range(1000):
        id_field, metadata_field = cache.add(a, rowid, f"item-{rowid}", f'{{"text": "{"x" * 100}", "n": {rowid}}}')
        hit = pb.Hit.FromString(id_field + metadata_field)
        assert hit.id == f"item-{rowid}" and hit.metadata["n"] == rowid
        assert cache.bytes <= 10_000
    assert set(cache.lookup(a, [0, 998, 999])) == {998, 999}  # the latest are still cached, the first was evicted
    assert cache.lookup(b, [998, 999]) == {}  # the same rowids of another collection are other items
    cache.add(b, 999, "other", "{}")
    assert cache.lookup(b, [999])[999][0] != cache.lookup(a, [999])[999][0]


def test_one_hit_cache_budget_holds_for_all_collections(shapes_server) -> None:  # type: ignore[no-untyped-def]
    """hit_cache_bytes bounds the server, not each collection: writes to many collections share it, least
    recently used out first."""
    service = shapes_server.server.collections_service
    budget = service.hits.max_bytes
    v = np.random.default_rng(5).standard_normal((64, 64)).astype(np.float32)
    with TandemClient(shapes_server.target) as client:
        names = [f"budget{i}" for i in range(4)]
        try:
            service.hits.max_bytes = 50_000  # room for ~130 small entries in all
            for name in names:
                client.create_collection(name)
                for start in range(0, 64, 16):  # small upserts: cached on the event loop, before the answer
                    client.upsert(name, [{"id": f"{name}-{i}", "vector": v[i], "metadata": {"text": "x" * 40}}
                                         for i in range(start, start + 16)])
            assert service.hits.bytes <= service.hits.max_bytes  # 4 x 64 items did not fit: the budget held
            newest = shapes_server.server.collections.get(names[-1])
            first = shapes_server.server.collections.get(names[0])
            tag_new, tag_first = service._tag(newest), service._tag(first)
            assert len(service.hits.lookup(tag_new, range(1, 65))) == 64  # the latest writes are all cached
            assert service.hits.lookup(tag_first, range(1, 65)) == {}  # the oldest collection's went out first
        finally:
            service.hits.max_bytes = budget
            for name in names:
                client.drop_collection(name)


def test_dropping_a_collection_frees_its_hit_cache_entries(shapes_server) -> None:  # type: ignore[no-untyped-def]
    service = shapes_server.server.collections_service
    v = np.random.default_rng(6).standard_normal((40, 64)).astype(np.float32)
    with TandemClient(shapes_server.target) as client:
        client.create_collection("dropped")
        client.upsert("dropped", [{"id": f"d{i}", "vector": v[i], "metadata": {"text": "y" * 40}} for i in range(40)])
        tag = service._tag(shapes_server.server.collections.get("dropped"))
        assert len(service.hits.lookup(tag, range(1, 41))) == 40
        before = service.hits.bytes
        client.drop_collection("dropped")
    assert service.hits.lookup(tag, range(1, 41)) == {}
    assert before - service.hits.bytes >= 40 * 320  # every entry's bytes back in the budget


def test_hits_found_again_are_resolved_from_the_cache_not_sqlite(shapes_server, shapes) -> None:  # type: ignore[no-untyped-def]
    c = shapes_server.server.collections.get("shapes")
    asked: list[list[int]] = []
    real = c.resolve

    def counting(rowids):  # type: ignore[no-untyped-def]
        asked.append(list(rowids))
        return real(rowids)

    q = np.random.default_rng(11).standard_normal(64).astype(np.float32)
    c.resolve = counting
    try:
        with TandemClient(shapes_server.target) as client:
            first = client.search("shapes", q, top_k=5)[0]
            after_first = sum(map(len, asked))
            again = client.search("shapes", q, top_k=5)[0]
            without = client.search("shapes", q, top_k=5, with_metadata=False)[0]
    finally:
        del c.resolve
    assert len(first) == 5 and after_first <= 5  # at most the five hits were looked up (fewer if seen before)
    assert sum(map(len, asked)) == after_first  # the same hits again: no SQLite lookup
    assert [(h.id, h.metadata, h.score) for h in again] == [(h.id, h.metadata, h.score) for h in first]
    assert [(h.id, h.metadata) for h in without] == [(h.id, {}) for h in first]


def test_items_just_written_are_found_without_sqlite_and_deleted_ones_leave_the_cache(shapes_server) -> None:  # type: ignore[no-untyped-def]
    v = np.random.default_rng(2).standard_normal((6, 64)).astype(np.float32)
    with TandemClient(shapes_server.target) as client:
        client.create_collection("fresh")
        try:
            c = shapes_server.server.collections.get("fresh")
            asked: list[int] = []
            real = c.resolve
            c.resolve = lambda rowids: asked.extend(rowids) or real(rowids)  # type: ignore[method-assign]
            client.upsert("fresh", [{"id": f"f{i}", "vector": v[i], "metadata": {"i": i}} for i in range(6)])
            hits = client.search("fresh", v[4], top_k=6)[0]
            assert hits[0].id == "f4" and hits[0].metadata == {"i": 4} and len(hits) == 6
            assert asked == []  # every hit came from the cache its write filled
            cache = shapes_server.server.collections_service.hits
            before = cache.bytes
            client.delete("fresh", ["f4"])
            client.upsert("fresh", [{"id": "f3", "vector": v[3], "metadata": {"i": 33}}])  # replaces f3's row
            assert cache.bytes < before
            again = client.search("fresh", v[3], top_k=6)[0]
            assert [h.id for h in again][0] == "f3" and again[0].metadata == {"i": 33} and "f4" not in \
                [h.id for h in again] and asked == []
        finally:
            client.drop_collection("fresh")


def test_a_lone_search_never_blocks_the_event_loop_on_a_busy_index(shapes_server, shapes, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A lone search runs on the event loop; when a write or a snapshot holds the index it must queue for a pool
    thread instead of waiting there, or every other client (here a health check) waits with it."""
    import threading

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from server import collections, errors

    monkeypatch.setattr(collections, "INLINE_SEARCH_MAX_S", float("inf"))  # inline however slow this machine is

    c = shapes_server.server.collections.get("shapes")
    q = np.random.default_rng(8).standard_normal(64).astype(np.float32)
    with TandemClient(shapes_server.target) as client:
        expected = client.search("shapes", q, top_k=5)[0]  # also times a run, so the next lone one goes inline
        found: list = []  # type: ignore[type-arg]
        with c._lock.write():  # what a commit applying writes holds
            searching = threading.Thread(target=lambda: found.append(client.search("shapes", q, top_k=5)[0]))
            searching.start()
            for _ in range(500):  # until the search is in its handler
                if errors._in_flight:
                    break
                threading.Event().wait(0.01)
            assert errors._in_flight == 1
            health = health_pb2_grpc.HealthStub(shapes_server.channel())
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == \
                health_pb2.HealthCheckResponse.SERVING  # answered while the index is still held
            assert not found
        searching.join(30)
    assert [(h.id, h.score) for h in found[0]] == [(h.id, h.score) for h in expected]


def test_the_hit_cache_is_warmed_from_the_store_newest_first_while_it_fits(tmp_path: Path) -> None:
    from index.collection import Spec
    from index.manager import Collections
    from index.store import Put
    from server.collections import HitCache

    collections = Collections(tmp_path)
    collections.claim()
    collections.load()
    c = collections.create(Spec.new("warm", "m", "1", "0" * 64, 4, "ip", "Flat"))
    try:
        c.write([Put(f"i{n}", np.ones(4, np.float32), f'{{"n": {n}}}') for n in range(2500)]).result()
        c.write([], delete_ids=["i2499"]).result()  # deleted rows are not stored, so never cached
        rows = {item_id: r for r, item_id, _ in c.newest(2**63 - 1, 5000)}
        everything = HitCache(10 << 20)
        tag = everything.tag()
        assert everything.warm(tag, c, everything.max_bytes, page=1000)[0] == 2499 and len(rows) == 2499
        found = everything.lookup(tag, [rows["i0"], rows["i2498"]])
        assert pb.Hit.FromString(b"".join(found[rows["i0"]])) == pb.Hit(id="i0", metadata={"n": 0})
        small = HitCache(1200 * 360)  # room for about 1,200 entries: the newest whole pages, then it stops
        tag = small.tag()
        assert small.warm(tag, c, small.max_bytes, page=500)[0] == 1000 and small.bytes <= small.max_bytes
        assert set(small.lookup(tag, [rows["i2498"], rows["i1499"], rows["i1498"], rows["i0"]])) == \
            {rows["i2498"], rows["i1499"]}
        shared = HitCache(10 << 20)  # a share: another collection may have the rest of the budget
        tag = shared.tag()
        assert shared.warm(tag, c, 1200 * 360, page=500) == (1000, shared.bytes) and shared.bytes <= 1200 * 360
    finally:
        collections.close()


def test_a_restarted_server_answers_its_first_searches_from_the_warmed_cache(tmp_path: Path) -> None:
    """Warming fills the cache smallest collection first, each taking an equal share of what is left: the small
    collection takes what it needs (30 items, ~10 KB) and the big one the rest of the 800 KB, two pages of 1,000
    items (~345 KB each), where an equal split would have left it one."""
    v = np.random.default_rng(4).standard_normal((30, 64)).astype(np.float32)
    big = np.random.default_rng(5).standard_normal((3000, 64)).astype(np.float32)
    first = start_server(SHIPPED_MODELS, data_dir=str(tmp_path / "data"))
    try:
        with TandemClient(first.target) as c:
            c.create_collection("kept", metric="ip")
            c.upsert("kept", [{"id": f"k{i}", "vector": v[i], "metadata": {"i": i}} for i in range(30)])
            c.create_collection("big", metric="ip", index_spec="Flat")
            for start in range(0, 3000, 250):
                c.upsert("big", [{"id": f"b{i}", "vector": big[i], "metadata": {"i": i}}
                                 for i in range(start, start + 250)])
    finally:
        first.stop()
    again = start_server(SHIPPED_MODELS, data_dir=str(tmp_path / "data"), hit_cache_bytes=800_000)
    try:
        assert [f.result(30) for f in again.server.cache_warming] == [30, 2000]
        c = again.server.collections.get("kept")
        asked: list[int] = []
        real = c.resolve
        c.resolve = lambda rowids: asked.extend(rowids) or real(rowids)  # type: ignore[method-assign]
        with TandemClient(again.target) as client:
            hits = client.search("kept", v[7], top_k=5)[0]
        assert hits[0].id == "k7" and hits[0].metadata == {"i": 7} and asked == []
    finally:
        again.stop()


def test_lone_and_concurrent_searches_answer_the_same(shapes_server, shapes) -> None:  # type: ignore[no-untyped-def]
    """A lone search runs on the event loop; concurrent ones go through the search batcher (whose batches
    tests/server/test_batcher.py checks). Both paths give the same answers."""
    import asyncio

    from server.client import AsyncTandemClient

    queries = np.random.default_rng(5).standard_normal((12, 64)).astype(np.float32)
    with TandemClient(shapes_server.target) as c:
        alone = [c.search("shapes", q, top_k=5)[0] for q in queries]

    async def together() -> list:  # type: ignore[type-arg]
        clients = [AsyncTandemClient(shapes_server.target) for _ in queries]
        try:
            await asyncio.gather(*(cl.get_collection("shapes") for cl in clients))  # connected before the burst
            return await asyncio.gather(*(cl.search("shapes", q, top_k=5) for cl, q in zip(clients, queries)))
        finally:
            await asyncio.gather(*(cl.close() for cl in clients))

    concurrent = [r[0] for r in asyncio.run(together())]
    assert [[(h.id, h.metadata, round(h.score, 5)) for h in r] for r in concurrent] == \
        [[(h.id, h.metadata, round(h.score, 5)) for h in r] for r in alone]
    assert all(len(r) == 5 for r in alone)


def test_lifecycle_and_describe(shapes_server, shapes) -> None:  # type: ignore[no-untyped-def]
    with TandemClient(shapes_server.target) as c:
        info = c.get_collection("shapes")
        assert (info.count, info.dim, info.metric, info.index_spec, info.device) == (448, 64, "cosine", "auto", "cpu")
        assert info.model.name == "tandem-shapes" and info.model_loaded and info.exact and info.durable_seq >= 3
        assert "shapes" in [x.name for x in c.list_collections()]
        with pytest.raises(AlreadyExists):
            c.create_collection("shapes")
        with pytest.raises(InvalidArgument, match="index_factory"):
            c.create_collection("bad", index_spec="IVF-nonsense")
        with pytest.raises(InvalidArgument, match="metric 'hamming'"):
            c.create_collection("bad", metric="hamming")
        with pytest.raises(InvalidArgument, match="1-64 characters"):
            c.create_collection("no/slashes")
        with pytest.raises(NotFound, match="collection 'nope' does not exist"):
            c.search("nope", "x")
        with pytest.raises(NotFound):
            c.drop_collection("nope")
        assert c.search("shapes", "x", filter='label = "purple blob"')[0] == []


def test_empty_collection_answers_an_empty_result(shapes_server) -> None:  # type: ignore[no-untyped-def]
    with TandemClient(shapes_server.target) as c:
        c.create_collection("empty")
        assert c.search("empty", "anything", "else") == [[], []]
        c.drop_collection("empty")


@pytest.mark.parametrize("where", ["event loop", "pool thread"])
def test_bad_items_get_their_own_status_and_good_ones_are_stored(shapes_server, where, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from server import collections

    # small upserts are checked on the event loop, large ones in a pool thread: both must answer alike
    monkeypatch.setattr(collections, "INLINE_UPSERT_ITEMS", 16 if where == "event loop" else 0)
    ok = np.ones(64, np.float32)
    items = [
        {"id": "good-1", "vector": ok},
        {"id": "", "vector": ok},
        {"id": "x" * 257, "vector": ok},
        {"id": "short", "vector": np.ones(3, np.float32)},
        {"id": "nan", "vector": np.full(64, np.nan, np.float32)},
        {"id": "dup", "vector": ok, "metadata": {"v": 1}},
        {"id": "dup", "vector": ok, "metadata": {"v": 2}},
        {"id": "nested", "vector": ok, "metadata": {"a": {"b": 1}}},
        {"id": "big", "vector": ok, "metadata": {"s": "x" * 20000}},
        {"id": "img", "image": b"not an image"},
        {"id": "blank", "text": "   "},
        {"id": "good-2", "text": "a red circle"},
    ]
    with TandemClient(shapes_server.target) as c:
        c.create_collection("mixed")
        r = c.upsert("mixed", items)
        got = c.get("mixed", [i["id"] for i in items if 0 < len(i["id"]) <= 256])
        c.drop_collection("mixed")
    codes = [x.code for x in r.results]
    assert codes == [0, 3, 3, 3, 3, 3, 0, 3, 3, 3, 3, 0]
    msgs = [x.message for x in r.results]
    assert "items[1].id is empty" in msgs[1] and "257 characters" in msgs[2]
    assert "1 x 3" in msgs[3] and "dim 64" in msgs[3] and "NaN" in msgs[4]
    assert "appears again at items[6]; only the last one counts" in msgs[5]
    assert "metadata['a']" in msgs[7] and "max_metadata_bytes" in msgs[8]
    assert "items[9].image" in msgs[9] and "items[10].text is empty" in msgs[10]
    assert r.upserted == 3 and sorted(got.items) == ["dup", "good-1", "good-2"] and got.items["dup"] == {"v": 2}


@pytest.mark.parametrize("kwargs, message", [
    ({"top_k": 1001}, "top_k 1001 is over the limit of 1000"),
    ({"filter": "colour = "}, "filter"),
    ({"filter": 'size > "big"'}, "needs a number"),
])
def test_bad_searches_are_invalid(shapes_server, shapes, kwargs, message) -> None:  # type: ignore[no-untyped-def]
    with TandemClient(shapes_server.target) as c, pytest.raises(InvalidArgument, match=message):
        c.search("shapes", "x", **kwargs)


def _with(index: int, value: float, scale: float = 1.0) -> np.ndarray:
    v = np.full(64, scale, np.float32)
    v[index] = value
    return v


@pytest.mark.parametrize("vector, message", [
    (_with(5, np.nan), "has NaN or infinite values"),
    (_with(63, -np.inf), "has NaN or infinite values"),
    (np.full(64, 2e14, np.float32), r"has length 1.6e\+15, over 1e\+15"),
    (np.full(64, 3e18, np.float32), r"has length 2.4e\+19, over 1e\+15"),  # its float32 square is infinite
    (np.zeros(64, np.float32), "has length 0; a cosine collection compares directions"),  # scored 0 against all
])
def test_vectors_that_are_not_finite_or_too_long_are_refused_in_queries_and_items(shapes_server, shapes, vector, message) -> None:  # type: ignore[no-untyped-def]
    with TandemClient(shapes_server.target) as c:
        with pytest.raises(InvalidArgument, match=r"queries\[0\].terms\[0\].vector " + message):
            c.search("shapes", vector)
        c.create_collection("finite")
        try:
            r = c.upsert("finite", [{"id": "bad", "vector": vector}, {"id": "near-limit", "vector": np.full(
                64, 1.2e14, np.float32)}, {"id": "fp16", "vector": np.ones(64, np.float16)}])
            assert [x.code for x in r.results] == [3, 0, 0] and re.search(message, r.results[0].message)
            assert c.search("finite", np.full(64, 1.2e14, np.float32), top_k=1)[0][0].id in {"near-limit", "fp16"}
        finally:
            c.drop_collection("finite")


def test_query_with_wrong_dimension_or_unknown_id(shapes_server, shapes) -> None:  # type: ignore[no-untyped-def]
    with TandemClient(shapes_server.target) as c:
        with pytest.raises(InvalidArgument, match=r"queries\[0\].terms\[0\].vector is 1 x 5"):
            c.search("shapes", np.ones(5, np.float32))
        with pytest.raises(NotFound, match="'ghost' is not stored"):
            c.search("shapes", ById("ghost"))
        with pytest.raises(InvalidArgument, match="give the ids to delete, or a filter"):
            c.delete("shapes")
        with pytest.raises(InvalidArgument, match="its weighted terms cancel out"):  # "a" - "a": no direction
            c.search("shapes", [(1.0, "a red circle"), (-1.0, "a red circle")])
        with pytest.raises(InvalidArgument, match=r"ids\[1\] is 300 characters; ids are 1 to 256"):
            c.get("shapes", ["fine", "x" * 300])
        with pytest.raises(InvalidArgument, match=r"ids\[0\] is empty"):
            c.delete("shapes", [""])


def test_collection_survives_a_restart_and_a_corrupt_snapshot(tmp_path: Path) -> None:
    data = tmp_path / "data"
    v = np.random.default_rng(1).standard_normal((50, 64)).astype(np.float32)
    server = start_server(SHIPPED_MODELS, data_dir=str(data))
    try:
        with TandemClient(server.target) as c:
            c.create_collection("keep", metric="l2")
            c.upsert("keep", [{"id": f"k{i}", "vector": v[i], "metadata": {"i": i}} for i in range(50)])
            c.delete("keep", ["k7"])
            before = c.search("keep", v[3], top_k=5)[0]
    finally:
        server.stop()  # clean stop: writes a snapshot
    snaps = list((data / "collections" / "keep").glob("index-*.faiss"))
    assert len(snaps) == 1
    for damage in ("restart", "corrupt"):
        if damage == "corrupt":
            snaps[0].write_bytes(snaps[0].read_bytes()[:200])
        server = start_server(SHIPPED_MODELS, data_dir=str(data))
        try:
            with TandemClient(server.target) as c:
                after = c.search("keep", v[3], top_k=5)[0]
                assert c.get_collection("keep").count == 49
                assert c.get("keep", ["k7"]).missing == ["k7"]
        finally:
            server.stop()
        assert [(h.id, h.metadata) for h in after] == [(h.id, h.metadata) for h in before]
        assert after[0].id == "k3" and after[0].score == pytest.approx(0.0, abs=1e-3)  # -squared L2 distance


def test_missing_bound_model_is_a_failed_precondition_naming_it(tmp_path: Path, tiny_repo: Path) -> None:
    data = tmp_path / "data"
    server = start_server(tiny_repo, data_dir=str(data), default_model="tiny-clip")
    try:
        with TandemClient(server.target) as c:
            c.create_collection("tiny")
            c.upsert("tiny", [{"id": "a", "text": "a red circle"}])
    finally:
        server.stop()
    other = tmp_path / "models"
    shutil.copytree(tiny_repo / "tiny-image", other / "tiny-image")
    server = start_server(other, data_dir=str(data))
    try:
        with TandemClient(server.target) as c:
            info = c.get_collection("tiny")
            assert not info.model_loaded and info.count == 1
            for call in (lambda: c.search("tiny", "a red circle"), lambda: c.upsert("tiny", [{"id": "b", "text": "x"}])):
                with pytest.raises(FailedPrecondition, match="bound to model tiny-clip/1 .* has not loaded"):
                    call()
    finally:
        server.stop()


def test_health_reports_collections(shapes_server) -> None:  # type: ignore[no-untyped-def]
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    stub = health_pb2_grpc.HealthStub(shapes_server.channel())
    r = stub.Check(health_pb2.HealthCheckRequest(service="tandem.v1.Collections"))
    assert r.status == health_pb2.HealthCheckResponse.SERVING


def test_a_full_disk_is_resource_exhausted_and_stores_nothing(shapes_server) -> None:  # type: ignore[no-untyped-def]
    from server.client import Overloaded

    v = np.random.default_rng(2).standard_normal((30, 64)).astype(np.float32)
    with TandemClient(shapes_server.target) as c:
        c.create_collection("full")
        c.upsert("full", [{"id": "kept", "vector": v[0]}])
        store = shapes_server.server.collections.get("full").store
        pages = store._writer_db.execute("PRAGMA page_count").fetchone()[0]
        store._writer_db.execute(f"PRAGMA max_page_count={pages}")  # the database cannot grow: a full disk
        with pytest.raises(Overloaded, match="is full.*nothing of this write was stored"):
            c.upsert("full", [{"id": f"b{i}", "vector": v[i], "metadata": {"pad": "x" * 4000}} for i in range(1, 30)])
        assert c.get_collection("full").count == 1 and c.search("full", v[0], top_k=5)[0][0].id == "kept"
        store._writer_db.execute("PRAGMA max_page_count=1073741823")
        assert c.upsert("full", [{"id": "after", "vector": v[1]}]).upserted == 1
        c.drop_collection("full")


def test_rebuild_drops_deleted_vectors_from_the_index(shapes_server) -> None:  # type: ignore[no-untyped-def]
    v = np.random.default_rng(3).standard_normal((20, 64)).astype(np.float32)
    with TandemClient(shapes_server.target) as c:
        c.create_collection("rb", index_spec="HNSW16")
        c.upsert("rb", [{"id": f"r{i}", "vector": v[i]} for i in range(20)])
        c.delete("rb", [f"r{i}" for i in range(10)])
        assert c.get_collection("rb").deleted_pending == 10
        info = c.rebuild("rb")
        hits = c.search("rb", v[12], top_k=3)[0]
        c.drop_collection("rb")
    assert (info.deleted_pending, info.count, info.index_kind) == (0, 10, "HNSW16")
    assert hits[0].id == "r12" and all(int(h.id[1:]) >= 10 for h in hits)


def test_metrics_say_where_a_collection_searches_and_how_many_items_it_holds(shapes_server, shapes) -> None:  # type: ignore[no-untyped-def]
    from prometheus_client import REGISTRY

    assert REGISTRY.get_sample_value("tandem_collection_items", {"collection": "shapes"}) == 448
    labels = {"collection": "shapes", "device": "cpu", "index_kind": "Flat"}
    assert REGISTRY.get_sample_value("tandem_collection_info", labels) == 1
    with TandemClient(shapes_server.target) as c:
        c.create_collection("gone")
        c.drop_collection("gone")
    assert REGISTRY.get_sample_value("tandem_collection_items", {"collection": "gone"}) is None


def test_dropping_a_collection_while_others_read_and_write_it(shapes_server) -> None:  # type: ignore[no-untyped-def]
    """Drop closed the collection's SQLite connection while a Get or a filtered Search was using it: the server
    died in libsqlite3 (segfault). Calls that race a drop now answer NOT_FOUND, writes too (they used to wait
    for a writer thread that had ended), and the server goes on."""
    import threading

    from server.client import TandemError

    rng = np.random.default_rng(9)
    v = rng.standard_normal((50, 64)).astype(np.float32)
    seen: list[str] = []
    stop = threading.Event()

    def work(kind: str) -> None:
        with TandemClient(shapes_server.target, timeout_s=20) as c:
            while not stop.is_set():
                try:
                    if kind == "get":
                        c.get("racing", [f"x{i}" for i in range(50)], with_vectors=True)
                    elif kind == "search":
                        c.search("racing", v[0], filter="not exists zz")
                    elif kind == "plain search":
                        c.search("racing", v[1])
                    elif kind == "rebuild":
                        c.rebuild("racing")
                    else:
                        c.upsert("racing", [{"id": f"x{i}", "vector": v[i]} for i in range(50)])
                    seen.append("OK")
                except TandemError as e:
                    seen.append(e.code.name)

    threads = [threading.Thread(target=work, args=(k,)) for k in ("get", "search", "plain search", "upsert",
                                                                     "rebuild")]
    with TandemClient(shapes_server.target) as admin:
        for t in threads:
            t.start()
        try:
            for _ in range(25):
                admin.create_collection("racing")
                admin.upsert("racing", [{"id": f"x{i}", "vector": v[i]} for i in range(50)])
                admin.drop_collection("racing")
        finally:
            stop.set()
            for t in threads:
                t.join(60)
        assert not any(t.is_alive() for t in threads)  # no call hung
        assert set(seen) <= {"OK", "NOT_FOUND"}, sorted(set(seen))
        assert "racing" not in [c.name for c in admin.list_collections()]


def test_the_client_refuses_an_item_with_two_contents() -> None:
    from server.client import _item

    with pytest.raises(ValueError, match="has image and vector; give exactly one of text, image, vector"):
        _item({"id": "a", "image": b"\x89PNG", "vector": np.zeros(4)})
    assert _item({"id": "a", "text": "x"}).text == "x"
    # numpy scalars and arrays in metadata (protobuf's Struct refused them without naming the item)
    meta = _item({"id": "n", "text": "x", "metadata": {"n": np.int64(3), "ok": np.bool_(True), "v": np.arange(2)}})
    assert dict(meta.metadata) == {"n": 3.0, "ok": True, "v": [0.0, 1.0]}
    with pytest.raises(ValueError, match="item 'bad': metadata"):
        _item({"id": "bad", "text": "x", "metadata": {"when": object()}})


def test_the_client_refuses_one_text_or_image_where_a_list_is_meant() -> None:
    """embed_text("hello") embedded five one-letter texts; embed_image(b"...") one image per byte."""
    from server.client import _Requests

    r = _Requests("", "")
    with pytest.raises(TypeError, match=r"texts must be a list of strings, got one str; wrap it in a list"):
        r.text("hello", True, False, "float32")
    with pytest.raises(TypeError, match="images must be a list of images"):
        r.image(b"\x89PNG...", True, "float32")
    with pytest.raises(TypeError, match="labels must be a list"):
        r.classify([b"x"], "cat", None, 1)


def test_collections_calls_while_the_server_opens_them_answer_unavailable(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Before the collections are open (health NOT_SERVING), ListCollections answered [] and the others NOT_FOUND
    (or INTERNAL for a create over an existing folder): a client could conclude its data was gone."""
    import asyncio
    import threading

    from index.manager import Collections
    from server.app import TandemServer
    from server.config import ServerConfig

    gate, entered = threading.Event(), threading.Event()
    real = Collections.load

    def slow_load(self):  # type: ignore[no-untyped-def]
        entered.set()
        gate.wait(60)
        return real(self)

    monkeypatch.setattr(Collections, "load", slow_load)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def make() -> TandemServer:
        return TandemServer(ServerConfig(models=str(SHIPPED_MODELS), port=0, metrics_port=0, data_dir=str(tmp_path)))

    server = asyncio.run_coroutine_threadsafe(make(), loop).result(60)
    starting = asyncio.run_coroutine_threadsafe(server.start(), loop)
    try:
        assert entered.wait(60)
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.CollectionsStub(channel)
            for call, request in ((stub.ListCollections, pb.ListCollectionsRequest()),
                                  (stub.GetCollection, pb.GetCollectionRequest(name="shapes")),
                                  (stub.CreateCollection, pb.CreateCollectionRequest(name="shapes"))):
                with pytest.raises(grpc.RpcError) as info:
                    call(request, timeout=10)
                assert info.value.code() == C.UNAVAILABLE and "still opening its collections" in info.value.details()
            gate.set()
            starting.result(60)
            assert stub.ListCollections(pb.ListCollectionsRequest(), timeout=10).collections == []
    finally:
        gate.set()
        asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def test_a_full_disk_in_any_call_is_resource_exhausted(shapes_server, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Upsert and Delete said so already; a create or rebuild hitting a full disk answered INTERNAL."""
    import errno
    import sqlite3

    from index.manager import Collections

    with TandemClient(shapes_server.target) as c:
        for error in (OSError(errno.ENOSPC, "No space left on device"), sqlite3.OperationalError(
                "database or disk is full")):
            def full(self, spec, error=error):  # type: ignore[no-untyped-def]
                raise error

            monkeypatch.setattr(Collections, "create", full)
            with pytest.raises(Overloaded, match="the server's disk is full; nothing of this call was acknowledged"):
                c.create_collection("full")
        monkeypatch.setattr(Collections, "create", lambda self, spec: (_ for _ in ()).throw(OSError(errno.EIO, "io")))
        with pytest.raises(ServerError, match="CreateCollection failed inside the server"):
            c.create_collection("broken")
