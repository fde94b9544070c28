"""The GPU search path of a collection, on the CPU.

A collection that can search on a GPU keeps a device copy of its index
(index/gpu.py) and searches it without IDSelectors: it over-fetches by the
number of tombstones and drops them itself. There is no GPU here, so FAISS's
GPU cloner is replaced by its CPU cloner: the copy is a real FAISS index of the
same kind, and everything the collection does with it (keeping it in step with
writes, rebuilds and recovery, dropping deleted hits, falling back to the CPU
index) runs as on a GPU machine. benchmarks/gpu_check runs the real thing.
"""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest

from index import collection as collection_module
from index import gpu
from index.collection import Collection
from index.store import Put
from tests.index.test_collection import put_all, spec, vectors


@pytest.fixture
def fake_gpu(monkeypatch):  # type: ignore[no-untyped-def]
    copies: list[faiss.Index] = []

    def to_device(index: faiss.Index, nprobe: int) -> faiss.Index:
        if isinstance(faiss.downcast_index(index.index), faiss.IndexHNSW):
            raise RuntimeError("Error in index_cpu_to_gpu: cannot clone an IndexHNSWFlat to the GPU")
        copy = faiss.clone_index(index)
        if nprobe:
            faiss.extract_index_ivf(copy).nprobe = nprobe
        copies.append(copy)
        return copy

    monkeypatch.setattr(gpu, "available", lambda: True)
    monkeypatch.setattr(gpu, "to_device", to_device)
    return copies


def ids_of(c: Collection, rowids: np.ndarray) -> list[list[str]]:
    found = c.store.by_rowids([int(r) for r in np.unique(rowids) if r >= 0])
    return [[found[int(r)][0] for r in row if r >= 0] for row in rowids]


def test_the_device_copy_answers_like_the_cpu_index_with_deletes(tmp_path: Path, fake_gpu) -> None:  # type: ignore[no-untyped-def]
    x = vectors(300)
    on_gpu = Collection.create(tmp_path / "g", spec())
    on_cpu = Collection.create(tmp_path / "c", spec(), device="cpu")
    for c in (on_gpu, on_cpu):
        put_all(c, x)
        c.store.write(delete_ids=[f"v{i}" for i in range(0, 300, 3)]).result()
        c.store.write([Put("v1", x[7], "{}")]).result()  # a replaced item: old vector out, new one in
    assert (on_gpu.device, on_cpu.device) == ("cuda", "cpu") and on_cpu.replica is None
    assert on_gpu.replica is fake_gpu[-1] and on_gpu.replica.ntotal == on_gpu.index.ntotal == 301
    q = x[:40]
    s_gpu, r_gpu, _ = on_gpu.search(q, 10)
    s_cpu, r_cpu, _ = on_cpu.search(q, 10)
    assert ids_of(on_gpu, r_gpu) == ids_of(on_cpu, r_cpu)
    np.testing.assert_allclose(s_gpu, s_cpu, rtol=1e-5)
    assert not any(int(i[1:]) % 3 == 0 for row in ids_of(on_gpu, r_gpu) for i in row)  # deleted: never found
    on_gpu.close()
    on_cpu.close()


def test_fewer_alive_items_than_k_are_padded(tmp_path: Path, fake_gpu) -> None:  # type: ignore[no-untyped-def]
    c = Collection.create(tmp_path / "g", spec())
    x = vectors(6)
    put_all(c, x)
    c.store.write(delete_ids=["v0", "v2", "v4"]).result()
    scores, rowids, _ = c.search(x[:1], 5)
    assert sorted(ids_of(c, rowids)[0]) == ["v1", "v3", "v5"]
    assert list(rowids[0, 3:]) == [-1, -1] and np.isneginf(scores[0, 3:]).all()
    assert (np.diff(scores[0, :3]) <= 0).all()  # best first
    c.close()


def test_too_many_tombstones_for_a_gpu_search_fall_back_to_the_cpu_index(tmp_path: Path, fake_gpu,  # type: ignore[no-untyped-def]
                                                                        monkeypatch) -> None:
    monkeypatch.setattr(gpu, "MAX_K", 12)
    c = Collection.create(tmp_path / "g", spec())
    x = vectors(50)
    put_all(c, x)
    c.store.write(delete_ids=[f"v{i}" for i in range(5)]).result()
    searched: list[int] = []
    replica_search = c.replica.search

    def counting(q, k, *args, **kw):  # type: ignore[no-untyped-def]
        searched.append(k)
        return replica_search(q, k, *args, **kw)

    c.replica.search = counting
    deleted = {f"v{j}" for j in range(5)}
    _, rowids, _ = c.search(x[:8], 5)  # 5 + 5 tombstones <= 12: the copy, asked for 10
    found = ids_of(c, rowids)
    assert searched == [10] and not deleted & {i for row in found for i in row} and found[6][0] == "v6"
    _, rowids, _ = c.search(x[:8], 8)  # 8 + 5 > 12: the CPU index with its IDSelector
    found = ids_of(c, rowids)
    assert searched == [10] and not deleted & {i for row in found for i in row} and found[6][0] == "v6"
    c.close()


def test_rebuild_training_and_recovery_make_a_new_device_copy(tmp_path: Path, fake_gpu) -> None:  # type: ignore[no-untyped-def]
    c = Collection.create(tmp_path / "g", spec("IVF16,Flat"))
    x = vectors(1200, centres=100)
    put_all(c, x)
    c._background.join(60)  # 1200 >= 1000 needed: IVF trained in the background
    assert c.kind == "IVF16,Flat" and c.device == "cuda"
    assert faiss.extract_index_ivf(c.replica).nprobe == c.nprobe > 1
    put_all(c, x[:5] + 0.01, prefix="late")  # after the swap: reaches the copy too
    assert c.replica.ntotal == c.index.ntotal == 1205
    _, rowids, _ = c.search(x[:1] + 0.01, 1)
    assert ids_of(c, rowids) == [["late0"]]
    c.close()
    reopened = Collection.open(tmp_path / "g")
    assert reopened.device == "cuda" and reopened.replica is fake_gpu[-1] and reopened.replica.ntotal == 1205
    reopened.close()


def test_an_index_without_a_gpu_version_searches_on_the_cpu(tmp_path: Path, fake_gpu) -> None:  # type: ignore[no-untyped-def]
    c = Collection.create(tmp_path / "g", spec("HNSW8"))
    x = vectors(100)
    put_all(c, x)
    assert (c.kind, c.device, c.replica) == ("HNSW8", "cpu", None)
    assert ids_of(c, c.search(x[3:4], 1)[1]) == [["v3"]]
    c.close()


def test_many_deletes_are_compacted_in_the_background(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(collection_module, "COMPACT_MIN_DELETED", 20)
    c = Collection.create(tmp_path / "c", spec("Flat"))
    x = vectors(100)
    put_all(c, x)
    c.store.write(delete_ids=[f"v{i}" for i in range(15)]).result()
    assert c.describe()["deleted_pending"] == 15  # under 20: left as tombstones
    c.store.write(delete_ids=[f"v{i}" for i in range(15, 25)]).result()
    c._background.join(60)  # 25 >= max(20, 10% of 100): rebuilt without them
    d = c.describe()
    assert (d["deleted_pending"], d["count"], c.index.ntotal) == (0, 75, 75)
    c.close()


def test_a_search_that_must_not_wait_does_not_wait_for_the_gpu(tmp_path: Path, fake_gpu) -> None:  # type: ignore[no-untyped-def]
    """The event loop's search (wait=False) is refused while another search or copy holds the GPU, which FAISS
    lets one thread use at a time; a search that may wait gets its answer once the GPU is free."""
    import threading

    from index.collection import IndexBusy

    c = Collection.create(tmp_path / "g", spec())
    x = vectors(50)
    put_all(c, x)
    answers: list[list[list[str]]] = []
    with gpu.LOCK:
        with pytest.raises(IndexBusy):
            c.search(x[:1], 3, wait=False)
        waiting = threading.Thread(target=lambda: answers.append(ids_of(c, c.search(x[:1], 3)[1])))
        waiting.start()
        waiting.join(0.2)
        assert not answers  # it waits for the GPU
    waiting.join(30)
    assert answers[0][0][0] == "v0"
    c.close()
