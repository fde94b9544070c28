"""The index package without gRPC: group commit, a full disk, training in the background, rebuilds."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from index.collection import Collection, CollectionError, Spec
from index.manager import CollectionExists, Collections
from index.store import Put, StoreFull


def spec(index_spec: str = "", metric: str = "cosine", dim: int = 16) -> Spec:
    return Spec.new("c", "m", "1", "sha", dim, metric, index_spec)


def vectors(n: int, dim: int = 16, seed: int = 0, centres: int = 20, noise: float = 0.3) -> np.ndarray:
    """Clustered unit vectors (IVF needs structure to be tested honestly)."""
    rng = np.random.default_rng(seed)
    middle = rng.standard_normal((centres, dim))
    x = middle[rng.integers(0, centres, n)] + noise * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def put_all(c: Collection, x: np.ndarray, prefix: str = "v") -> None:
    c.store.write([Put(f"{prefix}{i}", v, json.dumps({"i": i})) for i, v in enumerate(x)]).result()


def test_concurrent_writers_share_commits(tmp_path: Path) -> None:
    """Group commit: writes queued while a commit is on disk go out together in the next one."""
    c = Collection.create(tmp_path / "c", spec())
    x = vectors(64)
    entered, gate = threading.Event(), threading.Event()
    apply = c.store.on_commit

    def hold_first_commit(batch):  # type: ignore[no-untyped-def]
        entered.set()
        gate.wait(10)  # the writer thread stays busy with the first commit until the other 63 have queued
        apply(batch)  # type: ignore[misc]

    c.store.on_commit = hold_first_commit
    futures = [c.store.write([Put("first", x[0], "{}")])]
    assert entered.wait(10)
    futures += [c.store.write([Put(f"w{i}", x[i], "{}")]) for i in range(1, 64)]
    gate.set()
    seqs = [f.result(10).seq for f in futures]
    assert sorted(seqs) == list(range(1, 65))  # one sequence number per write, all durable
    assert c.store.commits == 2  # the first write alone, then the 63 that queued behind it
    c.close()


def test_a_full_disk_fails_the_write_whole_and_corrupts_nothing(tmp_path: Path) -> None:
    c = Collection.create(tmp_path / "c", spec())
    put_all(c, vectors(10))
    pages = c.store._writer_db.execute("PRAGMA page_count").fetchone()[0]
    c.store._writer_db.execute(f"PRAGMA max_page_count={pages + 1}")  # the database may not grow: a full disk
    big = [Put(f"big{i}", v, json.dumps({"pad": "x" * 2000})) for i, v in enumerate(vectors(50, seed=1))]
    with pytest.raises(StoreFull, match="is full"):
        c.store.write(big).result()
    assert c.store.count() == 10 and c.describe()["count"] == 10
    c.store._writer_db.execute("PRAGMA max_page_count=1073741823")  # space again: writes go on
    put_all(c, vectors(5, seed=2), prefix="after")
    c.close()
    c = Collection.open(tmp_path / "c")
    assert c.store.count() == 15
    _, rowids, _ = c.search(vectors(10)[:1], 1)
    assert c.store.by_rowids([int(rowids[0, 0])])[int(rowids[0, 0])][0] == "v0"
    c.close()


def test_an_ivf_spec_answers_exactly_until_trained_then_trains_in_the_background(tmp_path: Path) -> None:
    c = Collection.create(tmp_path / "c", spec("IVF16,Flat"))
    x = vectors(3000, centres=300, noise=0.5)  # hard enough that nprobe 1 of 16 finds about 70% of the top 10
    put_all(c, x[:500])
    d = c.describe()
    assert (d["index_kind"], d["trained"], d["exact"]) == ("Flat", False, True)  # 500 < 1000 needed for IVF16
    put_all(c, x[500:], prefix="w")
    deadline = time.monotonic() + 60
    while c.describe()["index_kind"] != "IVF16,Flat" and time.monotonic() < deadline:
        time.sleep(0.05)
    d = c.describe()
    assert (d["index_kind"], d["trained"], d["exact"], d["count"]) == ("IVF16,Flat", True, False, 3000)
    approx = c.search(x[:50], 10)[1]
    exact = c.search(x[:50], 10, exact=True)[1]
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(approx, exact)])
    assert c.nprobe > 1 and recall >= 0.9  # nprobe tuned for recall@10 >= 0.95 on a sample; FAISS's 1 is far below
    while c.snapshot_seq == 0 and time.monotonic() < deadline:  # the snapshot is written in the background too
        time.sleep(0.05)
    assert c.snapshot_seq > 0  # the trained index was snapshotted
    c.close()
    reopened = Collection.open(tmp_path / "c")
    assert reopened.describe()["index_kind"] == "IVF16,Flat"  # from the snapshot, not retrained
    reopened.close()


def test_rebuild_drops_deleted_vectors(tmp_path: Path) -> None:
    c = Collection.create(tmp_path / "c", spec("HNSW8", metric="l2"))
    x = vectors(200)
    put_all(c, x)
    c.store.write(delete_ids=[f"v{i}" for i in range(0, 200, 2)]).result()
    assert c.describe()["deleted_pending"] == 100
    c.rebuild()
    d = c.describe()
    assert (d["deleted_pending"], d["count"], c.index.ntotal) == (0, 100, 100)
    _, rowids, _ = c.search(x[:4], 1)
    ids = [c.store.by_rowids([int(r)])[int(r)][0] for r in rowids[:, 0]]
    assert ids[1] == "v1" and ids[3] == "v3" and ids[0] != "v0"
    c.close()


def test_bad_specs_are_refused_with_the_reason(tmp_path: Path) -> None:
    cs = Collections(tmp_path)
    cs.load()
    with pytest.raises(CollectionError, match="not a FAISS index_factory string"):
        cs.create(spec("IVF,Bogus"))
    with pytest.raises(CollectionError, match="leave out IDMap"):
        cs.create(spec("IDMap,Flat"))
    # Specs FAISS builds, but aborts on at the first write (HNSW0), cannot search with (IVF0), takes minutes to
    # allocate (IVF99999999), or builds only once over all vectors (NSG): refused before anything is stored.
    for bad, reason in [("HNSW0", "HNSW needs 2 to 256"), ("IVF64_HNSW1,Flat", "HNSW needs 2 to 256"),
                        ("IVF0,Flat", "IVF needs 1 to 262,144 lists"), ("IVF99999999,Flat", "got 99999999"),
                        ("IMI2x16,Flat", r"2\^32 lists"), ("NSG32", "builds NSG indexes once"),
                        ("Flat\x00", "printable"), ("Flat," * 100, "at most 200"),
                        ("PCA2000,Flat", "cannot make 2000 dimensions out of 16")]:
        with pytest.raises(CollectionError, match=reason):
            cs.create(spec(bad))
    for metric in ("l2", "ip"):  # L2norm would score directions while exact paths score the vectors
        with pytest.raises(CollectionError, match="use metric cosine"):
            cs.create(spec("L2norm,Flat", metric=metric))
    assert cs.all() == [] and [p.name for p in (tmp_path / "collections").iterdir()] == []
    for good in ("HNSW32", "IVF64,Flat", "OPQ8,IVF64,PQ8"):
        cs.create(Spec.new(f"ok{len(cs.all())}", "m", "1", "sha", 16, "cosine", good))
    # Exact specs besides Flat say so (searches skip the approximate index's retries and exact=True scans)
    for good, exact in (("L2norm,Flat", True), ("Flat,Refine(Flat)", True), ("HNSW32,Refine(Flat)", False)):
        assert cs.create(Spec.new(f"ok{len(cs.all())}", "m", "1", "sha", 16, "cosine", good)).exact is exact
    cs.close()


def test_approximate_searches_return_k_hits_when_k_items_are_allowed(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """HNSW stops after efSearch candidates: with a query's whole neighbourhood deleted or filtered out it came
    back with a few hits or none; an IVF index's nprobe lists held fewer than a large k. Such queries are
    searched again with more effort, then exactly: k hits whenever k items are allowed."""
    import index.collection as collection

    x = vectors(3000, centres=30, noise=0.2, seed=3)
    labels = np.argmax(x @ x[np.arange(30) * 100].T, axis=1)  # a cluster number per vector
    hnsw = Collection.create(tmp_path / "h", spec("HNSW8"))
    hnsw.store.write([Put(f"v{i}", v, json.dumps({"cluster": int(c)})) for i, (v, c) in enumerate(zip(x, labels))]).result()
    near = x[labels == labels[0]][:20]  # queries inside cluster labels[0]
    others = int((labels != labels[0]).sum())
    hnsw.store.write(delete_ids=[f"v{i}" for i in np.flatnonzero(labels == labels[0])]).result()  # all of it
    _, i, _ = hnsw.search(near, 50)
    assert ((i >= 0).sum(1) == 50).all()
    assert not np.isin(i, [r for r in range(1, 3001) if labels[r - 1] == labels[0]]).any()
    monkeypatch.setattr(collection, "EXACT_FILTER_MAX", 100)  # the filter's matches go to FAISS, not exact scoring
    where = ("json_extract(metadata, '$.cluster') != ?", [int(labels[1])])
    _, i, _ = hnsw.search(x[labels == labels[1]][:20], 50, where=where)
    assert ((i >= 0).sum(1) == 50).all() and others > 50
    hnsw.close()

    ivf = Collection.create(tmp_path / "i", spec("IVF16,Flat"))
    put_all(ivf, x)
    deadline = time.monotonic() + 60
    while ivf.describe()["index_kind"] != "IVF16,Flat" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ivf.nprobe < 16
    _, i, _ = ivf.search(x[:5], 1000)  # more than nprobe lists hold
    assert ((i >= 0).sum(1) == 1000).all() and all(len(set(row)) == 1000 for row in i)
    ivf.close()


def test_searches_go_on_while_a_snapshot_serializes_the_index(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The periodic snapshot serializes the index in the writer thread after the writers heard back, sharing
    the lock with searches: a search that must not wait (wait=False, as on the event loop) still runs."""
    import faiss

    serializing, searched = threading.Event(), threading.Event()
    write_index = faiss.write_index

    def slow_write(index, writer):  # type: ignore[no-untyped-def]
        serializing.set()
        searched.wait(30)  # held until the search below has run
        return write_index(index, writer)

    monkeypatch.setattr(faiss, "write_index", slow_write)
    c = Collection.create(tmp_path / "c", spec("Flat"))
    c.snapshot_every = 100
    x = vectors(150)
    put_all(c, x)  # 150 changes >= 100: acknowledged, then snapshotted
    assert serializing.wait(30)
    _, rowids, _ = c.search(x[:1], 1, wait=False)  # raised IndexBusy when a snapshot held the index alone
    searched.set()
    assert c.store.by_rowids([int(rowids[0, 0])])[int(rowids[0, 0])][0] == "v0"
    for _ in range(3000):  # the snapshot is written in a background thread
        if c.snapshot_seq == 1:
            break
        time.sleep(0.01)
    assert c.snapshot_seq == 1 and (tmp_path / "c" / "snapshot.json").exists()
    c.close()


def test_a_late_snapshot_of_a_replaced_index_never_overwrites_the_rebuilt_one(tmp_path: Path) -> None:
    """A snapshot serialized just before a rebuild swapped its index in, and written after the rebuild's own
    snapshot, must be dropped: the rebuild forgets the deletions its index no longer holds, so the old index
    on disk would bring deleted items back after a restart."""
    c = Collection.create(tmp_path / "c", spec("Flat"))
    x = vectors(20)
    put_all(c, x)
    c.store.write(delete_ids=[f"v{i}" for i in range(10)]).result()
    late = c._serialize()  # the old index: 20 vectors, 10 of them tombstones
    c.rebuild()  # 10 vectors; snapshot written; the 10 deletions forgotten
    c._write_snapshot(*late)  # the background thread writing its copy only now
    c.close()
    reopened = Collection.open(tmp_path / "c")
    _, rowids, _ = reopened.search(x, 1)
    found = reopened.store.by_rowids([int(r) for r in rowids[:, 0]])
    assert reopened.index.ntotal == 10 and sorted(i for i, _ in found.values()) == [f"v{i}" for i in range(10, 20)]
    reopened.close()


def test_a_snapshot_that_fails_midway_leaves_the_last_one_whole(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The disk fills while FAISS streams the index out: the error reaches the caller, no partial file stays,
    and the snapshot on disk is still the last good one, which a restart loads."""
    import faiss

    c = Collection.create(tmp_path / "c", spec("Flat"))
    x = vectors(30)
    put_all(c, x[:20])
    c.snapshot()
    put_all(c, x[20:], prefix="late")

    def full(index, writer):  # type: ignore[no-untyped-def]
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(faiss, "write_index", full)
        with pytest.raises(OSError, match="No space left"):
            c.snapshot()
    folder = tmp_path / "c"
    assert not list(folder.glob("*.tmp")) and len(list(folder.glob("index-*.faiss"))) == 1
    assert c.snapshot_seq == 1
    c.close(snapshot=False)
    reopened = Collection.open(folder)
    assert reopened.snapshot_seq == 1 and reopened.count() == 30 and reopened.index.ntotal == 30  # 10 replayed
    reopened.close()


def test_exact_and_filtered_searches_racing_a_replacement_see_each_item_once(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """exact=True scans the store page by page, and a filter reads its matches and then their vectors. An item
    replaced between two reads was found twice (its old row, then its new one) or not at all (matched as its old
    row, whose vector was gone by the next read): each search now reads one state of the store."""
    from index.store import Reader

    c = Collection.create(tmp_path / "c", spec("HNSW8"))
    x = vectors(300, seed=4)
    put_all(c, x)
    real_scan, real_matching = Reader.scan, Reader.matching
    writes: list[int] = []

    def replace(item_id: str) -> None:
        writes.append(c.store.write([Put(item_id, x[0], json.dumps({"i": 0}))]).result().seq)

    def scan_with_a_write_between_pages(self, batch=10_000):  # type: ignore[no-untyped-def]
        for n, page in enumerate(real_scan(self, batch=100)):
            yield page
            if n == 0:
                replace("v0")  # v0 (in the first page) is replaced by a copy that lands in the last page

    def matching_then_a_write(self, where, params):  # type: ignore[no-untyped-def]
        rows = real_matching(self, where, params)
        replace("v1")  # v1's matched row is deleted before its vector is read
        return rows

    monkeypatch.setattr(Reader, "scan", scan_with_a_write_between_pages)
    _, rowids, exact = c.search(x[:1], 5, exact=True)
    found = [int(r) for r in rowids[0] if r >= 0]
    assert exact and len(found) == len(set(found)) == 5 and writes
    assert found[0] == 1 and all(r <= 300 for r in found)  # v0's row as the search began, once
    monkeypatch.setattr(Reader, "matching", matching_then_a_write)
    _, rowids, _ = c.search(x[1:2], 300, where=("json_extract(metadata, '$.i') >= ?", [0]))
    assert (rowids >= 0).sum() == 300 and 2 in rowids  # all 300, v1 as its old row (rowid 2) included
    c.close()


def test_a_store_restored_from_an_older_copy_is_not_paired_with_a_newer_snapshot(tmp_path: Path) -> None:
    """The snapshot held items the restored store had never written, and new items took their rowids again:
    searches returned ids twice. A snapshot ahead of its store is now ignored and the index rebuilt."""
    import shutil

    folder = tmp_path / "c"
    c = Collection.create(folder, spec())
    x = vectors(90, seed=6)
    put_all(c, x[:50])
    c.close()  # snapshot at the store's seq
    shutil.copy(folder / "store.sqlite", tmp_path / "backup.sqlite")
    c = Collection.open(folder)
    put_all(c, x[50:70], prefix="later")
    c.close()  # a snapshot with the 20 later items
    for extra in ("-wal", "-shm"):
        (folder / f"store.sqlite{extra}").unlink(missing_ok=True)
    shutil.copy(tmp_path / "backup.sqlite", folder / "store.sqlite")  # the operator restores the backup
    c = Collection.open(folder)
    put_all(c, x[70:90], prefix="new")  # takes the rowids the later items had
    _, rowids, _ = c.search(x[:1], 100)
    found = [int(r) for r in rowids[0] if r >= 0]
    assert len(found) == len(set(found)) == 70 == c.count()
    c.close()


def test_items_added_and_deleted_after_the_snapshot_are_no_tombstones_after_a_crash(tmp_path: Path) -> None:
    folder = tmp_path / "c"
    c = Collection.create(folder, spec("HNSW8"))
    x = vectors(500, seed=7)
    put_all(c, x[:200])
    c.snapshot()
    put_all(c, x[200:], prefix="w")
    c.store.write(delete_ids=[f"w{i}" for i in range(300)] + ["v0"]).result()
    c.close(snapshot=False)  # as a crash: the last snapshot is from before the 300
    c = Collection.open(folder)
    assert c.describe()["deleted_pending"] == 1  # v0, which the snapshot's index holds; not the 300
    _, rowids, _ = c.search(x[:4], 250)
    assert ((rowids >= 0).sum(1) == 199).all()  # every live item, none of the deleted
    c.close()


@pytest.mark.parametrize("index_spec", ["Flat,Refine(Flat)", "HNSW8,Refine(Flat)"])
def test_indexes_that_take_no_selector_search_after_deletes_and_under_filters(tmp_path: Path, monkeypatch,  # type: ignore[no-untyped-def]
                                                                               index_spec: str) -> None:
    """FAISS's IndexRefine (and IndexPQ) refuse an IDSelector: every search failed (INTERNAL) after one delete."""
    import index.collection as collection

    c = Collection.create(tmp_path / "c", spec(index_spec))
    x = vectors(400, seed=8)
    put_all(c, x)
    c.store.write(delete_ids=[f"v{i}" for i in range(0, 400, 2)]).result()  # the even ones
    _, rowids, _ = c.search(x[:8], 20)
    assert ((rowids >= 0).sum(1) == 20).all() and not np.isin(rowids, np.arange(1, 401, 2)).any()
    monkeypatch.setattr(collection, "EXACT_FILTER_MAX", 10)  # the filter's matches would go to FAISS
    _, rowids, exact = c.search(x[:8], 20, where=("json_extract(metadata, '$.i') % 4 = ?", [1]))
    assert exact and ((rowids >= 0).sum(1) == 20).all() and set(((rowids - 1) % 4).ravel().tolist()) == {1}
    c.close()


def test_hnsw_collections_search_64_candidates_after_a_restart_too(tmp_path: Path) -> None:
    """FAISS's HNSW default keeps 16 candidates: recall@10 0.41 on uniform 64-d noise (docs/benchmarks.md)."""
    import faiss

    x = vectors(3000, seed=9, centres=3000, noise=0.0)  # nearly uniform directions: the hard case for HNSW
    c = Collection.create(tmp_path / "c", spec("HNSW16"))
    put_all(c, x)
    assert faiss.downcast_index(c.index.index).hnsw.efSearch == 64
    q = x[:100] + 0.01
    _, exact, _ = c.search(q, 10, exact=True)
    _, approx, _ = c.search(q, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(approx, exact)])
    c.close()
    c = Collection.open(tmp_path / "c")  # from the snapshot
    assert faiss.downcast_index(c.index.index).hnsw.efSearch == 64
    c.close()
    assert recall >= 0.9


def test_a_folder_that_is_not_a_collection_is_left_alone(tmp_path: Path) -> None:
    """lost+found (or any folder without a store) got a store.sqlite written into it, then start-up refused it."""
    cs = Collections(tmp_path)
    cs.claim()
    (tmp_path / "collections" / "lost+found").mkdir()
    (tmp_path / "collections" / "stray").mkdir()
    cs.load()
    assert cs.all() == [] and not (tmp_path / "collections" / "lost+found" / "store.sqlite").exists()
    with pytest.raises(CollectionExists, match="a folder named 'stray' is still in the data dir"):
        cs.create(Spec.new("stray", "m", "1", "sha", 16, "cosine", ""))
    cs.close()


def test_an_ivf_index_under_a_refine_step_answers_large_k_and_after_deletes(tmp_path: Path) -> None:
    """Widening a short answer passed IVF parameters to IndexRefine, which refuses them: INTERNAL."""
    c = Collection.create(tmp_path / "c", spec("IVF16,Flat,Refine(Flat)"))
    x = vectors(2000, seed=10, centres=40)
    put_all(c, x)
    deadline = time.monotonic() + 60
    while c.kind != "IVF16,Flat,Refine(Flat)" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert c.kind == "IVF16,Flat,Refine(Flat)" and c.nprobe < 16
    _, rowids, _ = c.search(x[:3], 1000)
    assert ((rowids >= 0).sum(1) == 1000).all()
    c.store.write(delete_ids=[f"v{i}" for i in range(0, 2000, 3)]).result()
    _, rowids, _ = c.search(x[:3], 1000)
    assert ((rowids >= 0).sum(1) == 1000).all() and not np.isin(rowids, np.arange(1, 2001, 3)).any()
    c.close()


def test_a_background_training_that_fails_is_not_retried_in_a_loop(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A spec that can never train failed again at once after each failure: ~100 tracebacks a second."""
    c = Collection.create(tmp_path / "c", spec("IVF16,Flat"))
    tries: list[int] = []
    real = c._rebuild

    def failing(factory):  # type: ignore[no-untyped-def]
        tries.append(1)
        raise RuntimeError("cannot train")

    monkeypatch.setattr(c, "_rebuild", failing)
    put_all(c, vectors(1200))  # enough to train IVF16: the background try starts and fails
    deadline = time.monotonic() + 30
    while not c._background_failed and time.monotonic() < deadline:
        time.sleep(0.01)
    put_all(c, vectors(50, seed=1), prefix="w")  # a write asks for training again: refused while failed
    time.sleep(0.2)
    assert c._background_failed and len(tries) == 1
    monkeypatch.setattr(c, "_rebuild", real)
    c.rebuild()  # an explicit Rebuild that works clears it
    assert not c._background_failed
    c.close()
